"""USCL: semi-supervised video contrastive pretraining, as thin wiring over the shared pieces.

USCL (Chen et al., "USCL: Pretraining Deep Ultrasound Image Diagnosis Model through Video
Contrastive Representation Learning", MICCAI 2021; defaults from the authors' code): a ResNet-18
backbone, a 512-512-256 projection head and a classifier on the projection; views from sample
pair generation (``ultrasound.pairs``); loss NT-Xent (t 0.5) plus lambda (0.2) times the
cross-entropy on the views of labelled videos; Adam (lr 3e-4, weight decay 1e-4), constant for
10 epochs then cosine to 0 at epoch 300; 32 videos per batch; 224 x 224 images.

The baselines are the same code with other positive pairs (``pairs``: ``"frames"``, two frames
of one video unmixed; ``"image"``, two augmentations of one frame) and, for SimCLR, no
cross-entropy (:meth:`USCLConfig.plain_simclr`: the authors' SimCLR baseline).

Nothing here knows about workers: the model may be wrapped by DistributedDataParallel and
``NTXentLoss`` gathers negatives across workers by itself.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field, TypeAdapter, ValidationError, model_validator
from torch import nn

from ultrasound.augment import Augment, USCLAugment
from ultrasound.backbone import FEATURE_DIM, ResNet18Backbone
from ultrasound.config import Settings
from ultrasound.losses import NTXentLoss, SemiSupervisedCE
from ultrasound.pairs import PAIR_MODES, make_pair_batch

PROJECTION_DIM = 256


class USCLConfig(Settings):
    """USCL hyperparameters (defaults: the authors' code).

    ``batch_videos`` is the global batch (videos per optimisation step over all workers; the
    negatives of NT-Xent come from all of them). ``num_classes = 0`` means no class labels are
    known: the classifier and the cross-entropy term are then off whatever ``semi_supervised``
    says (see :attr:`uses_labels`). ``frames_per_video`` is what the data pipeline samples per
    video (SPG mixes 3). Each field's description is its command-line help.
    """

    what: ClassVar[str] = "USCL"

    epochs: int = Field(300, description="training epochs")
    batch_videos: int = Field(32, description="videos per step over all workers (the NT-Xent batch)")
    image_size: int = Field(224, description="square frame side in pixels")
    channels: int = Field(3, description="1 = grayscale, 3 = RGB")
    lr: float = Field(3e-4, description="Adam learning rate (cosine schedule after the warm-up)")
    weight_decay: float = Field(1e-4, description="Adam weight decay")
    warmup_epochs: int = Field(10, description="epochs at the full learning rate before the cosine decay")
    temperature: float = Field(0.5, description="NT-Xent temperature")
    mixup_alpha: float = Field(0.5, description="Beta(alpha, alpha) of sample pair generation's mixup")
    ce_weight: float = Field(0.2, description="weight of the semi-supervised cross-entropy")
    pairs: str = Field("uscl", description="positive pairs: uscl, frames or image")
    semi_supervised: bool = Field(True, description="train the cross-entropy on the labelled videos")
    aug_strength: float = Field(1.0, description="strength of the view augmentation, 0 to 2.5")
    frames_per_video: int = Field(3, description="frames the stream samples per video per epoch")
    seed: int = Field(0, description="seed of initialisation, order and augmentation")
    num_classes: int = Field(0, description="classes of the cross-entropy (set from the manifest)")

    @model_validator(mode="after")
    def _check(self) -> "USCLConfig":
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_videos >= 1, "batch_videos must be >= 1"),
            (self.image_size >= 32, "image_size must be >= 32 (ResNet-18 downsamples by 32)"),
            (self.channels in (1, 3), "channels must be 1 or 3"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.mixup_alpha > 0, "mixup_alpha must be > 0"),
            (self.ce_weight >= 0, "ce_weight must be >= 0"),
            (0 <= self.aug_strength <= 2.5, "aug_strength must be in [0, 2.5]"),
            (self.frames_per_video >= 1, "frames_per_video must be >= 1"),
            (self.num_classes >= 0, "num_classes must be >= 0"),
            (self.pairs in PAIR_MODES, f"pairs must be one of {', '.join(PAIR_MODES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"USCLConfig: {message}, got {self!r}")
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "USCLConfig":
        """Build from a YAML / CLI mapping. Unknown keys are rejected, naming the valid ones;
        numbers written as strings (YAML reads ``3e-4`` as text) are converted. The ``mixup``
        switch of earlier runs reads as ``pairs`` (true: ``"uscl"``, false: ``"frames"``)."""
        if "mixup" in values:
            values = dict(values)
            given = values.pop("mixup")
            try:
                mixup = TypeAdapter(bool).validate_python(given)
            except ValidationError:
                raise ValueError(f"USCL config key 'mixup' needs a bool, got {given!r}") from None
            values.setdefault("pairs", "uscl" if mixup else "frames")
        return cls.parse(values)

    def plain_simclr(self) -> "USCLConfig":
        """The authors' SimCLR baseline: two augmentations of one frame, no cross-entropy."""
        return self.replace(pairs="image", semi_supervised=False)

    @property
    def uses_labels(self) -> bool:
        """True when the semi-supervised cross-entropy is on (and classes are known)."""
        return self.semi_supervised and self.num_classes > 0


class USCLModel(nn.Module):
    """ResNet-18 backbone, projection head 512-512-256, and a classifier on the projection.

    Args:
        in_channels: 1 or 3.
        num_classes: size of the classifier; 0 builds none (``logits`` is then None).

    Shape:
        - Input: ``(N, in_channels, H, W)``.
        - Output: ``(z, logits)``: ``z`` ``(N, 256)`` projections (the NT-Xent input),
          ``logits`` ``(N, num_classes)`` or None.

    Example:
        >>> model = USCLModel(in_channels=1, num_classes=3)
        >>> z, logits = model(torch.zeros(2, 1, 32, 32))
        >>> tuple(z.shape), tuple(logits.shape)
        ((2, 256), (2, 3))
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 0) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.backbone = ResNet18Backbone(in_channels)
        self.projection = nn.Sequential(
            nn.Linear(FEATURE_DIM, FEATURE_DIM), nn.ReLU(inplace=True),
            nn.Linear(FEATURE_DIM, PROJECTION_DIM))
        self.classifier = nn.Linear(PROJECTION_DIM, num_classes) if num_classes > 0 else None
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg: USCLConfig) -> "USCLModel":
        """The model a config trains: no classifier unless the cross-entropy is on, so that every
        parameter takes part in the loss (DistributedDataParallel requires it)."""
        return cls(in_channels=cfg.channels, num_classes=cfg.num_classes if cfg.uses_labels else 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.projection(self.backbone(x))
        return z, (self.classifier(z) if self.classifier is not None else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def uscl_loss(
    model: nn.Module, x_i: torch.Tensor, x_j: torch.Tensor, class_index: torch.Tensor,
    cfg: USCLConfig, ntxent: NTXentLoss, ce: SemiSupervisedCE,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The USCL objective on a pair batch: NT-Xent + (when ``cfg.uses_labels``) the weighted CE.

    Both views go through the model in one forward pass (one set of BatchNorm statistics, one
    DistributedDataParallel forward per step).

    Shape:
        - x_i, x_j: ``(B, C, S, S)``; class_index: ``(B,)`` with -1 for unlabelled videos.
        - Output: ``(total, parts)``: scalar total with its graph, and
          ``parts = {"ntxent": scalar, "ce": scalar}`` detached.
    """
    if x_i.shape != x_j.shape:
        raise ValueError(f"x_i and x_j differ in shape: {tuple(x_i.shape)} vs {tuple(x_j.shape)}")
    z, logits = model(torch.cat([x_i, x_j], dim=0))
    z_i, z_j = z.chunk(2, dim=0)
    contrastive = ntxent(z_i, z_j)
    if cfg.uses_labels and logits is not None:
        logits_i, logits_j = logits.chunk(2, dim=0)
        classification = ce(logits_i, logits_j, class_index)
    else:
        classification = contrastive.new_zeros(())
    total = contrastive + classification
    return total, {"ntxent": contrastive.detach(), "ce": classification.detach()}


def make_optimizer(model: nn.Module, cfg: USCLConfig) -> torch.optim.Adam:
    """Adam with the config's lr and weight decay over all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at_epoch(epoch: int, cfg: USCLConfig) -> float:
    """Learning rate of 0-based ``epoch``: ``cfg.lr`` for the first ``warmup_epochs``, then cosine
    decay reaching 0 at ``epoch == cfg.epochs``."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    decay_epochs = cfg.epochs - cfg.warmup_epochs
    if epoch < cfg.warmup_epochs or decay_epochs <= 0:
        return cfg.lr
    progress = min(1.0, (epoch - cfg.warmup_epochs) / decay_epochs)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_augment(cfg: USCLConfig) -> USCLAugment:
    """The per-frame augmentation a config trains with."""
    return USCLAugment(cfg.image_size, cfg.channels, cfg.aug_strength)


def make_losses(cfg: USCLConfig) -> tuple[NTXentLoss, SemiSupervisedCE]:
    return NTXentLoss(cfg.temperature), SemiSupervisedCE(cfg.ce_weight)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any],
    augment: Augment, cfg: USCLConfig, rng: np.random.Generator, *,
    ntxent: NTXentLoss | None = None, ce: SemiSupervisedCE | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One optimisation step from a data-pipeline batch; returns the total loss as a float.

    Args:
        batch: ``{"frames": (B, K, H, W, C) uint8, "n_frames": (B,) int, "class_index": (B,)
            int64}`` (numpy or torch); ``class_index`` may be absent (all unlabelled).
        augment: the per-frame augmentation (``make_augment(cfg)``). The uint8 frames are moved
            to the model's device first (4x fewer bytes than float), so on a GPU the
            augmentation runs there too.
        rng: drives frame mixing weights and augmentations.
        autocast_dtype: e.g. ``torch.bfloat16`` for mixed precision on GPUs (losses are
            computed in float32 either way).
    """
    if ntxent is None or ce is None:
        default_ntxent, default_ce = make_losses(cfg)
        ntxent, ce = ntxent or default_ntxent, ce or default_ce
    device = next(model.parameters()).device
    frames = torch.as_tensor(batch["frames"]).to(device, non_blocking=True)
    n_frames = torch.as_tensor(batch["n_frames"]).reshape(-1).cpu()
    class_index = batch.get("class_index")
    if class_index is None:
        class_index = torch.full((len(n_frames),), -1, dtype=torch.long)
    class_index = torch.as_tensor(class_index).reshape(-1).to(device).long()
    x_i, x_j = make_pair_batch(frames, n_frames, augment, rng, alpha=cfg.mixup_alpha, mode=cfg.pairs)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        total, _ = uscl_loss(model, x_i, x_j, class_index, cfg, ntxent, ce)
    total.backward()
    optimizer.step()
    return float(total.detach())
