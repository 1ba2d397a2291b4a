"""The semi-supervised cross-entropy term of USCL.

USCL (Chen et al., MICCAI 2021) adds to NT-Xent a classification loss on the views of the videos
that carry a class label; unlabelled videos add nothing. As in the authors' training loop, each
of the two views contributes its own mean cross-entropy over the labelled items, weighted by
``lambda`` (0.2 by default; the authors sweep 0.1-0.5)::

    L_ce = lambda * CE(logits_i[L], y[L]) + lambda * CE(logits_j[L], y[L])

with ``L`` the labelled items (``class_index >= 0``; -1 marks an unlabelled video) and ``CE`` the
mean cross-entropy over them.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

UNLABELLED = -1


class SemiSupervisedCE(nn.Module):
    """Weighted cross-entropy on both views of the labelled videos of a batch.

    Args:
        weight: lambda >= 0 (USCL default 0.2).

    Shape:
        - logits_i, logits_j: ``(N, num_classes)``, the classifier outputs of the two views.
        - class_index: ``(N,)`` int, the video's class or -1 when unlabelled.
        - Output: scalar. With no labelled item it is a zero that is still connected to the
          logits, so every parameter receives a (zero) gradient, which DistributedDataParallel
          needs.

    Example:
        >>> ce = SemiSupervisedCE(weight=0.2)
        >>> logits = torch.zeros(3, 2)
        >>> round(float(ce(logits, logits, torch.tensor([0, -1, 1]))), 4)  # 0.2 * 2 * ln 2
        0.2773
    """

    def __init__(self, weight: float = 0.2) -> None:
        super().__init__()
        if not float(weight) >= 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"

    def forward(self, logits_i: torch.Tensor, logits_j: torch.Tensor,
                class_index: torch.Tensor) -> torch.Tensor:
        if logits_i.ndim != 2 or logits_i.shape != logits_j.shape:
            raise ValueError("logits_i and logits_j must both be (N, num_classes) with equal "
                             f"shapes, got {tuple(logits_i.shape)} and {tuple(logits_j.shape)}")
        class_index = torch.as_tensor(class_index, device=logits_i.device).reshape(-1).long()
        if class_index.shape[0] != logits_i.shape[0]:
            raise ValueError(f"class_index has {class_index.shape[0]} entries for "
                             f"{logits_i.shape[0]} items")
        num_classes = logits_i.shape[1]
        if bool(((class_index < UNLABELLED) | (class_index >= num_classes)).any()):
            raise ValueError(f"class_index values must be -1 (unlabelled) or in "
                             f"[0, {num_classes - 1}], got {class_index.tolist()}")
        labelled = class_index >= 0
        if not bool(labelled.any()):
            return (logits_i.float().sum() + logits_j.float().sum()) * 0.0
        targets = class_index[labelled]
        loss_i = F.cross_entropy(logits_i[labelled].float(), targets)
        loss_j = F.cross_entropy(logits_j[labelled].float(), targets)
        return self.weight * (loss_i + loss_j)
