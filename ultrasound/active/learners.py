"""The per-round learner of a simulated experiment: refitted on the labelled set every round.

- :class:`HeadModel` (embeddings mode): ``train_head`` / ``predict_head`` on rows of a frozen
  embedding matrix ``(N, D)``.
- :class:`FinetuneModel` (finetune mode): MSML retrained from its initial weights on frames
  ``(N, S, S, C)`` uint8.

Both take ``fit(idx, labels, weights, verified)``: pool rows, ``(M, L)`` 0/1 labels, ``(M,)``
training weights and which rows a human labelled (only those count for positive weights).
"""
from __future__ import annotations

import numpy as np

from ultrasound.active.head import positive_weights, predict_head, train_head
from ultrasound.active.sim_config import SimulationConfig


class HeadModel:
    """Embeddings mode: ``train_head`` / ``predict_head`` on rows of the embedding matrix."""

    def __init__(self, features: np.ndarray, config: SimulationConfig, seed: int) -> None:
        self.features, self.config = features, config

    def fit(self, idx: np.ndarray, labels: np.ndarray, weights: np.ndarray, verified: np.ndarray | None = None):
        """``verified`` ``(M,)`` bool marks the human labels: positive weights count only those
        (machine labels of a flooded stream must not decide a finding's prevalence)."""
        c = self.config
        pos_weight = None if c.head_pos_weight == "none" else human_positive_weights(labels, verified)
        # blas_threads=None: the caller (run_experiment / run_reference) already holds BLAS at
        # one thread; entering threadpoolctl again costs more than a small fit
        return train_head(self.features[idx], labels, weights, l2=c.head_l2, max_iter=c.head_max_iter,
                          pos_weight=pos_weight, blas_threads=None)

    def predict(self, fitted, idx: np.ndarray) -> np.ndarray:
        if idx.size == 0:
            return np.zeros((0, fitted.weight.shape[1]), np.float32)
        return predict_head(fitted, self.features[idx])


class FinetuneModel:
    """Finetune mode: MSML (``ultrasound.msml``) trained from its initial weights (seeded, plus
    the backbone checkpoint if any) on the labelled frames every round. Deterministic on CPU for
    a given labelled set, so a resumed experiment refits exactly; on GPUs kernels may not be."""

    def __init__(self, images: np.ndarray, config: SimulationConfig, seed: int, findings: tuple[str, ...],
                 init_backbone: bytes | None = None, device: str | None = None) -> None:
        import torch

        self.images, self.config, self.seed, self.findings = images, config, seed, findings
        self.init_backbone = init_backbone
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def _net(self):
        from ultrasound.backbone import adopt_weights, read_state
        from ultrasound.msml import MSMLConfig, MSMLNet

        c = self.config
        msml = MSMLConfig(findings=self.findings, image_size=int(self.images.shape[1]),
                          channels=int(self.images.shape[3]), lr=c.finetune_lr, epochs=c.finetune_epochs,
                          batch_size=c.finetune_batch_size, seed=self.seed)
        net = MSMLNet(msml)
        if self.init_backbone is not None:
            adopt_weights(net.backbone, read_state(self.init_backbone, "the --init checkpoint"),
                          "the --init checkpoint")
        return net.to(self.device)

    def fit(self, idx: np.ndarray, labels: np.ndarray, weights: np.ndarray, verified: np.ndarray | None = None):
        import torch

        from ultrasound.msml import build_loss, build_optimizer, msml_train_step

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = self._net()
            loss_fn = build_loss(net.config, labels if verified is None else labels[verified]).to(self.device)
            optimizer = build_optimizer(net, net.config)
            rng = np.random.default_rng([self.seed, idx.size])
            batch = net.config.batch_size
            for _ in range(net.config.epochs):
                order = rng.permutation(idx.size)
                for start in range(0, idx.size, batch):
                    part = order[start:start + batch]
                    if part.size < 2:  # batch norm needs two samples
                        continue
                    msml_train_step(net, optimizer, self.images[idx[part]], labels[part], loss_fn,
                                    net.config.image_size, sample_weight=weights[part], augment_rng=rng)
        return net

    def predict(self, fitted, idx: np.ndarray) -> np.ndarray:
        from ultrasound.msml import msml_predict

        if idx.size == 0:
            return np.zeros((0, len(self.findings)), np.float32)
        return msml_predict(fitted, self.images[idx], fitted.config.image_size)


def human_positive_weights(labels: np.ndarray, verified: np.ndarray | None) -> np.ndarray | str:
    """``#neg/#pos`` per finding over the human labels only (``train_head``'s ``"auto"`` rule on
    the verified rows); ``"auto"`` over every row when ``verified`` is None or selects none."""
    if verified is None or not np.asarray(verified).any():
        return "auto"
    return positive_weights("auto", np.asarray(labels, np.float32)[np.asarray(verified, bool)])


def make_model(config: SimulationConfig, features: np.ndarray, seed: int, findings: tuple[str, ...],
               init_backbone: bytes | None = None):
    if config.mode == "embeddings":
        return HeadModel(features, config, seed)
    return FinetuneModel(features, config, seed, findings, init_backbone)
