"""MSML: the multi-symptom multi-label lung-ultrasound classifier of TSAL.

TSAL (Liu et al., "Semi-Supervised Active Learning for COVID-19 Lung Ultrasound Multi-symptom
Classification", ICTAI 2020) trains a multi-symptom multi-label (MSML) network that "learns
discriminative features of lung symptoms", one sigmoid per symptom. The paper's code is not
public; this module is our reading (the reasons are in docs/tsal.md):

- a ResNet-18 trunk (:class:`ultrasound.backbone.ResNet18Backbone`, random init or a USCL
  checkpoint);
- a class-specific residual attention head (:class:`SymptomAttentionHead`, after Zhu & Wu,
  "Residual Attention: A Simple but Effective Method for Multi-Label Recognition", ICCV 2021):
  each symptom scores every position of the last feature map with its own 1x1 classifier and
  pools those scores twice, by a global average (what the whole frame says) and by a softmax
  attention over positions (where that symptom's evidence is: B-lines below the pleura, an
  effusion at the bottom of the sector). The logit is ``base + attention_lambda * attended``.

Training helpers: :func:`positive_weights` (imbalance), :func:`build_loss`,
:func:`build_optimizer`, :func:`prepare_images` and :func:`msml_train_step` (one optimisation
step on a uint8 batch), :func:`msml_predict` (probabilities).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from ultrasound.config import Names, Settings
from ultrasound.backbone import FEATURE_DIM, ResNet18Backbone
from ultrasound.augment import normalize_frames, resize_square, to_float_chw
from ultrasound.losses.multilabel import AsymmetricLoss, WeightedBCE
from ultrasound.multilabel_metrics import positive_balance

LOSSES = ("bce", "asymmetric")
POS_WEIGHT_MODES = ("auto", "none")


class MSMLConfig(Settings):
    """Everything that defines one MSML training run; each field's description is its
    command-line help.

    Attributes:
        findings: the finding (symptom) names, one output per name, in output order.
        image_size: square input side the frames are resized to.
        channels: 1 (grayscale) or 3 input channels.
        lr, weight_decay: AdamW settings.
        epochs, batch_size: training length and per-step batch.
        loss: ``"bce"`` (:class:`WeightedBCE`) or ``"asymmetric"`` (:class:`AsymmetricLoss`).
        pos_weight: ``"auto"`` (``#neg/#pos`` per finding, clipped; BCE only) or ``"none"``.
        seed: seed for initialisation, shuffling and augmentation.
        dropout: dropout on the feature map before the per-symptom classifiers.
        attention_lambda: weight of the attention-pooled score (0 = a plain linear head).
        attention_temperature: softmax temperature of the spatial attention (larger = sharper).
        max_pos_weight: clip for the automatic positive weights (and 1/max as the floor).
    """

    what: ClassVar[str] = "MSML"

    findings: Names = Field(description="finding columns, one output each, in output order")
    image_size: int = Field(224, description="square frame side in pixels")
    channels: int = Field(3, description="1 = grayscale, 3 = RGB")
    lr: float = Field(1e-4, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, description="AdamW weight decay")
    epochs: int = Field(30, description="training epochs")
    batch_size: int = Field(32, description="frames per step over all workers")
    loss: str = Field("bce", description="bce (positive-weighted) or asymmetric")
    pos_weight: str = Field("auto", description="auto (#neg/#pos per finding, clipped) or none")
    seed: int = Field(0, description="seed of initialisation, shuffling and augmentation")
    dropout: float = Field(0.2, description="dropout before the per-symptom classifiers")
    attention_lambda: float = Field(0.2, description="weight of the attention-pooled score")
    attention_temperature: float = Field(1.0, description="softmax temperature of the spatial attention")
    max_pos_weight: float = Field(50.0, description="clip of the automatic positive weights")

    @model_validator(mode="after")
    def _check(self) -> "MSMLConfig":
        findings = self.findings
        if not findings or not all(f for f in findings):
            raise ValueError(f"findings must be a non-empty sequence of names, got {findings!r}")
        if len(set(findings)) != len(findings):
            raise ValueError(f"findings must be unique, got {findings!r}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.pos_weight not in POS_WEIGHT_MODES:
            raise ValueError(f"pos_weight must be one of {POS_WEIGHT_MODES}, got {self.pos_weight!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention_lambda < 0 or self.attention_temperature <= 0:
            raise ValueError(
                "need attention_lambda >= 0 and attention_temperature > 0, got "
                f"{self.attention_lambda}, {self.attention_temperature}"
            )
        if self.max_pos_weight < 1:
            raise ValueError(f"max_pos_weight must be >= 1, got {self.max_pos_weight}")
        return self

    @property
    def num_findings(self) -> int:
        return len(self.findings)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MSMLConfig":
        """Build from a YAML/CLI mapping; unknown keys are rejected, naming the valid ones, and
        numbers written as text (YAML reads ``3e-4`` as a string) are converted."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if "findings" not in values and not unknown:
            raise ValueError("MSML config needs 'findings' (the finding names)")
        return cls.parse(values)


class SymptomAttentionHead(nn.Module):
    """Per-symptom classifier with class-specific residual attention (Zhu & Wu, ICCV 2021).

    For symptom ``l`` with classifier ``w_l`` and feature map ``f`` (positions ``x``):
    ``s_l(x) = w_l . f(x)``, ``base_l = mean_x s_l(x)``,
    ``attended_l = sum_x softmax_x(T * s_l(x)) * s_l(x)``,
    ``logit_l = base_l + lambda * attended_l + b_l``.
    ``attended_l`` equals ``w_l`` applied to a symptom-specific attention-pooled feature, so each
    symptom gets its own discriminative feature vector out of one shared trunk.

    Shape:
        - Input: ``(N, D, h, w)`` feature map.
        - Output: ``(N, L)`` logits.

    Example:
        >>> head = SymptomAttentionHead(512, 6)
        >>> head(torch.zeros(2, 512, 7, 7)).shape
        torch.Size([2, 6])
    """

    def __init__(
        self,
        in_dim: int,
        num_labels: int,
        attention_lambda: float = 0.2,
        temperature: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_dim < 1 or num_labels < 1:
            raise ValueError(f"in_dim and num_labels must be >= 1, got {in_dim}, {num_labels}")
        self.classifier = nn.Conv2d(in_dim, num_labels, kernel_size=1, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.attention_lambda = float(attention_lambda)
        self.temperature = float(temperature)

    def position_scores(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(N, D, h, w)`` -> ``(N, L, h*w)``: each symptom's score at each position (no bias)."""
        if feature_map.ndim != 4:
            raise ValueError(f"feature map must be (N, D, h, w), got {tuple(feature_map.shape)}")
        scores = F.conv2d(self.dropout(feature_map), self.classifier.weight)
        return scores.flatten(2)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        scores = self.position_scores(feature_map)
        logits = scores.mean(dim=2)
        if self.attention_lambda > 0:
            attention = torch.softmax(self.temperature * scores, dim=2)
            logits = logits + self.attention_lambda * (attention * scores).sum(dim=2)
        return logits + self.classifier.bias


class MSMLNet(nn.Module):
    """ResNet-18 trunk + per-symptom attention head: one logit per finding.

    Initialised from ``config.seed`` (the global torch RNG is left untouched). Load a USCL
    checkpoint into ``backbone`` with :func:`ultrasound.backbone.adopt_weights`.

    Shape:
        - Input: ``(N, C, H, W)`` float, normalised (see :func:`prepare_images`), H, W >= 32.
        - Output: ``(N, L)`` logits (apply a sigmoid for probabilities).

    Example:
        >>> net = MSMLNet(MSMLConfig(findings=("a_lines", "b_lines"), image_size=32))
        >>> net(torch.zeros(4, 3, 32, 32)).shape
        torch.Size([4, 2])
    """

    def __init__(self, config: MSMLConfig) -> None:
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(config.seed)
            self.backbone = ResNet18Backbone(in_channels=config.channels)
            self.head = SymptomAttentionHead(
                FEATURE_DIM,
                config.num_findings,
                attention_lambda=config.attention_lambda,
                temperature=config.attention_temperature,
                dropout=config.dropout,
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.feature_map(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, 512)`` pooled trunk features (the embeddings mode input)."""
        return self.backbone(images)


@dataclass(frozen=True)
class PositiveWeights:
    """Result of :func:`positive_weights`.

    Attributes:
        weights: ``(L,)`` float32, ``#negatives / #positives`` clipped to ``[1/max, max]``; 1.0
            for a finding without positives (its positive term never fires).
        no_positives: indices of findings with no positive label (report and leave out of
            the metrics).
    """

    weights: np.ndarray
    no_positives: tuple[int, ...]


def positive_weights(labels: np.ndarray, max_weight: float = 50.0) -> PositiveWeights:
    """Per-finding positive weights from a label matrix.

    Shape:
        - labels: ``(N, L)`` 0/1.
        - Output ``weights``: ``(L,)``.

    Example:
        >>> positive_weights(np.array([[1, 0], [0, 0], [0, 0], [0, 0]])).weights.tolist()
        [3.0, 1.0]
    """
    labels = _check_binary_matrix(labels, "labels")
    missing = tuple(int(i) for i in np.flatnonzero(labels.sum(axis=0) == 0))
    return PositiveWeights(weights=positive_balance(labels, max_weight), no_positives=missing)


def build_loss(config: MSMLConfig, train_labels: np.ndarray | None = None) -> nn.Module:
    """The loss a config asks for; ``pos_weight="auto"`` needs the training labels (N, L)."""
    if config.loss == "asymmetric":
        return AsymmetricLoss()
    if config.pos_weight == "none":
        return WeightedBCE(None)
    if train_labels is None:
        raise ValueError("pos_weight='auto' needs the training labels to count positives")
    labels = _check_binary_matrix(train_labels, "train_labels")
    if labels.shape[1] != config.num_findings:
        raise ValueError(f"train_labels has {labels.shape[1]} columns, config has {config.num_findings} findings")
    return WeightedBCE(positive_weights(labels, config.max_pos_weight).weights)


def build_optimizer(model: nn.Module, config: MSMLConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with the config's lr and weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def prepare_images(
    images: np.ndarray | torch.Tensor,
    image_size: int,
    channels: int,
    augment_rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """uint8 frames -> normalised model input.

    Resizes (bilinear, antialiased) to ``image_size``, matches the channel count (gray is
    repeated to 3 channels; RGB is averaged to 1), normalises with mean 0.5 / std 0.25. With
    ``augment_rng``, each frame is flipped left-right with probability 0.5 and its brightness
    and contrast scaled by factors in [0.9, 1.1] (light: findings are geometric, so no crops
    that could cut a B-line or an effusion off).

    Shape:
        - images: ``(N, H, W, C)`` or ``(N, H, W)`` uint8.
        - Output: ``(N, channels, image_size, image_size)`` float32.
    """
    frames = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if frames.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {frames.dtype}")
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.shape[0] == 0:
        raise ValueError(f"images must be (N, H, W, C) with C in (1, 3), got {tuple(frames.shape)}")
    x = to_float_chw(frames)
    if x.shape[1] != channels:
        x = x.repeat(1, 3, 1, 1) if channels == 3 else x.mean(dim=1, keepdim=True)
    x = resize_square(x, image_size)
    if augment_rng is not None:
        n = x.shape[0]
        flip = torch.from_numpy(augment_rng.random(n) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        brightness = torch.from_numpy(augment_rng.uniform(0.9, 1.1, n).astype(np.float32))
        contrast = torch.from_numpy(augment_rng.uniform(0.9, 1.1, n).astype(np.float32))
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast[:, None, None, None] + mean) * brightness[:, None, None, None]
        x = x.clamp_(0.0, 1.0)
    return normalize_frames(x)


def msml_train_step(
    model: MSMLNet,
    optimizer: torch.optim.Optimizer,
    images_uint8: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    loss_fn: nn.Module,
    image_size: int,
    sample_weight: np.ndarray | torch.Tensor | None = None,
    augment_rng: np.random.Generator | None = None,
) -> float:
    """One optimisation step on a batch; returns the batch loss before the update.

    Shape:
        - images_uint8: ``(N, H, W, C)`` uint8.
        - targets: ``(N, L)`` 0/1.
        - sample_weight (optional): ``(N,)``, e.g. lower for machine labels.
    """
    model.train()
    device = next(model.parameters()).device
    x = prepare_images(images_uint8, image_size, model.config.channels, augment_rng).to(device)
    y = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets)
    y = y.to(device=device, dtype=torch.float32)
    if y.shape != (x.shape[0], model.config.num_findings):
        raise ValueError(
            f"targets must be (N, L) = ({x.shape[0]}, {model.config.num_findings}), got {tuple(y.shape)}"
        )
    weight = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32).to(device)
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y, weight) if weight is not None else loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def msml_predict(
    model: MSMLNet, images_uint8: np.ndarray | torch.Tensor, image_size: int, batch_size: int = 64
) -> np.ndarray:
    """Sigmoid probabilities, eval mode, in batches.

    Shape:
        - images_uint8: ``(N, H, W, C)`` uint8.
        - Output: ``(N, L)`` float32 in [0, 1].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images_uint8), batch_size):
        x = prepare_images(images_uint8[start:start + batch_size], image_size, model.config.channels)
        out.append(torch.sigmoid(model(x.to(device))).float().cpu().numpy())
    if not out:
        return np.zeros((0, model.config.num_findings), np.float32)
    return np.concatenate(out)


def _check_binary_matrix(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be (N, L), got shape {labels.shape}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 values")
    return labels.astype(np.int64)
