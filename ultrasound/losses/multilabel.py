"""Multi-label losses for the MSML classifier: one sigmoid per finding, imbalance-aware.

Lung-ultrasound findings are imbalanced (effusion or air bronchogram are rare next to A-lines), so
the plain per-label binary cross-entropy is dominated by easy negatives. Two remedies:

- :class:`WeightedBCE`: binary cross-entropy with a per-finding positive weight (usually
  ``#negatives / #positives`` from :func:`ultrasound.msml.positive_weights`).
- :class:`AsymmetricLoss`: Ridnik et al., "Asymmetric Loss For Multi-Label Classification",
  ICCV 2021: focusing with separate exponents for positives and negatives, plus a probability
  margin that discards very easy negatives.

Both accept an optional weight per sample or per (sample, finding), e.g. a lower weight for
machine labels in the TSAL loop, and return the weighted mean over all ``N * L`` terms.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _check_pair(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, L), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} differs from logits shape {tuple(logits.shape)}"
        )


def _weighted_mean(terms: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``terms (N, L)``; with ``weight`` (N,) or (N, L): ``sum(w * t) / sum(w)``."""
    if weight is None:
        return terms.mean()
    weight = torch.as_tensor(weight, dtype=terms.dtype, device=terms.device)
    if weight.ndim == 1:
        if weight.shape[0] != terms.shape[0]:
            raise ValueError(f"weight (N,) must have N={terms.shape[0]}, got {weight.shape[0]}")
        weight = weight[:, None].expand_as(terms)
    elif weight.shape != terms.shape:
        raise ValueError(f"weight must be (N,) or (N, L), got shape {tuple(weight.shape)}")
    if bool((weight < 0).any()):
        raise ValueError("weight must be non-negative")
    total = weight.sum()
    if float(total) <= 0:
        raise ValueError("weight sums to zero: nothing to learn from")
    return (weight * terms).sum() / total


class WeightedBCE(nn.Module):
    """Binary cross-entropy on logits with a positive weight per finding.

    ``loss_nl = -[w_l * y_nl * log(sigmoid(x_nl)) + (1 - y_nl) * log(1 - sigmoid(x_nl))]``,
    averaged over all ``N * L`` terms (or weighted by ``weight``).

    Args:
        pos_weight: ``(L,)`` weights > 0 for the positive term of each finding, or ``None`` for
            the unweighted loss.

    Shape:
        - logits: ``(N, L)`` float, raw scores.
        - targets: ``(N, L)`` float in [0, 1] (0/1 labels).
        - weight (optional): ``(N,)`` or ``(N, L)`` non-negative.
        - Output: scalar.

    Example:
        >>> loss = WeightedBCE(pos_weight=[3.0, 1.0])
        >>> round(float(loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))), 4)  # (3 + 1) ln2 / 2
        1.3863
    """

    def __init__(self, pos_weight: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        if pos_weight is None:
            self.pos_weight: torch.Tensor | None = None
        else:
            weights = torch.as_tensor(pos_weight, dtype=torch.float32).flatten()
            if weights.numel() == 0 or bool((weights <= 0).any()) or not bool(
                torch.isfinite(weights).all()
            ):
                raise ValueError(f"pos_weight must be finite and > 0, got {weights.tolist()}")
            self.register_buffer("pos_weight", weights)

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        _check_pair(logits, targets)
        if self.pos_weight is not None and self.pos_weight.shape[0] != logits.shape[1]:
            raise ValueError(
                f"pos_weight has {self.pos_weight.shape[0]} entries, logits have {logits.shape[1]}"
            )
        terms = F.binary_cross_entropy_with_logits(
            logits, targets.to(logits.dtype), pos_weight=self.pos_weight, reduction="none"
        )
        return _weighted_mean(terms, weight)


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (ASL), Ridnik et al., ICCV 2021, eq. 5-7.

    With ``p = sigmoid(x)`` and the shifted probability ``p_m = max(p - clip, 0)``:

    - positive term: ``L+ = (1 - p)^gamma_pos * log(p)``
    - negative term: ``L- = p_m^gamma_neg * log(1 - p_m)``
    - ``loss_nl = -(y * L+ + (1 - y) * L-)``

    The authors' reference code sums over the batch; here the terms are averaged over ``N * L``
    so the learning rate does not depend on batch size or label count (same gradient direction).
    ``gamma_neg=gamma_pos=0, clip=0`` gives the plain binary cross-entropy.

    Args:
        gamma_neg: focusing exponent for negatives (paper default 4).
        gamma_pos: focusing exponent for positives (paper default 0).
        clip: probability margin ``m`` for negatives, in [0, 1) (paper default 0.05).
        eps: floor inside the logarithms.

    Shape:
        - logits: ``(N, L)`` float, raw scores.
        - targets: ``(N, L)`` float 0/1.
        - weight (optional): ``(N,)`` or ``(N, L)`` non-negative.
        - Output: scalar.

    Example:
        >>> loss = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0.0)
        >>> round(float(loss(torch.zeros(1, 1), torch.ones(1, 1))), 4)  # ln 2
        0.6931
    """

    def __init__(
        self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8
    ) -> None:
        super().__init__()
        if gamma_neg < 0 or gamma_pos < 0:
            raise ValueError(f"gammas must be >= 0, got gamma_neg={gamma_neg} gamma_pos={gamma_pos}")
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"clip must be in [0, 1), got {clip}")
        if not 0.0 < eps < 0.1:
            raise ValueError(f"eps must be in (0, 0.1), got {eps}")
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        _check_pair(logits, targets)
        targets = targets.to(logits.dtype)
        p = torch.sigmoid(logits)
        p_shifted = (p - self.clip).clamp(min=0.0) if self.clip > 0 else p
        positive = (1.0 - p).pow(self.gamma_pos) * torch.log(p.clamp(min=self.eps))
        negative = p_shifted.pow(self.gamma_neg) * torch.log((1.0 - p_shifted).clamp(min=self.eps))
        terms = -(targets * positive + (1.0 - targets) * negative)
        return _weighted_mean(terms, weight)
