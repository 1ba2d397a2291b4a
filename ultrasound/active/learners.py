"""The per-round learner of a simulated experiment: refitted on the labelled set every round.

- :class:`HeadModel` (embeddings mode): ``train_head`` / ``predict_head`` on rows of a frozen
  embedding matrix ``(N, D)``.
- :class:`FinetuneModel` (finetune mode): MSML retrained from its initial weights on frames
  ``(N, S, S, C)`` uint8.

Both take ``fit(idx, labels, weights, verified)``: pool rows, ``(M, L)`` 0/1 labels, ``(M,)``
training weights and which rows a human labelled (only those count for positive weights).
:func:`fit_models` fits many :class:`FitRequest` at once: the head fits of a batch of
experiments as one batched solve (``train_heads``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ultrasound.active.head import HeadProblem, head_problem, positive_weights, predict_head, train_heads
from ultrasound.active.sim_config import SimulationConfig


class HeadModel:
    """Embeddings mode: ``train_head`` / ``predict_head`` on rows of the embedding matrix."""

    def __init__(self, features: np.ndarray, config: SimulationConfig, seed: int) -> None:
        self.features, self.config = features, config

    def fit(self, idx: np.ndarray, labels: np.ndarray, weights: np.ndarray, verified: np.ndarray | None = None):
        """``verified`` ``(M,)`` bool marks the human labels: positive weights count only those
        (machine labels of a flooded stream must not decide a finding's prevalence)."""
        (fitted,) = fit_models([FitRequest(self, idx, labels, weights, verified)])
        if isinstance(fitted, Exception):
            raise fitted
        return fitted

    def problem(self, idx: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                verified: np.ndarray | None = None) -> HeadProblem:
        pos_weight = None if self.config.head_pos_weight == "none" else human_positive_weights(labels, verified)
        return head_problem(self.features[idx], labels, weights, pos_weight)

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


@dataclass(frozen=True, eq=False)
class FitRequest:
    """One refit: ``model.fit(rows, labels, weights, verified)`` (rows index the model's features)."""

    model: Any
    rows: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    verified: np.ndarray | None = None


def fit_models(requests: Sequence[FitRequest]) -> list[Any]:
    """Every request's fitted learner, or the exception that its fit raised, in order.

    Head requests that share an embedding matrix and solver settings are solved as one batch
    (``train_heads``; ``head_l2`` may differ between them), a finetune request on its own.
    """
    out: list[Any] = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, HeadProblem, float]]] = {}
    for i, request in enumerate(requests):
        try:
            if isinstance(request.model, HeadModel):
                c = request.model.config
                problem = request.model.problem(request.rows, request.labels, request.weights, request.verified)
                key = (id(request.model.features), c.head_max_iter, c.head_tol)
                groups.setdefault(key, []).append((i, problem, c.head_l2))
            else:
                out[i] = request.model.fit(request.rows, request.labels, request.weights, request.verified)
        except Exception as err:  # noqa: BLE001 - one request's bad input fails that request
            out[i] = err
    for (_, max_iter, tol), members in groups.items():
        # threads=None: the caller (the simulator's executors) holds the threads it wants
        try:
            fitted = train_heads([p for _, p, _ in members], l2=[l2 for _, _, l2 in members], max_iter=max_iter,
                                 tol=tol, threads=None)
        except Exception as err:  # noqa: BLE001 - the solve failed: every request of it did
            fitted = [err] * len(members)
        for (i, _, _), params in zip(members, fitted):
            out[i] = params
    return out


def make_model(config: SimulationConfig, features: np.ndarray, seed: int, findings: tuple[str, ...],
               init_backbone: bytes | None = None):
    if config.mode == "embeddings":
        return HeadModel(features, config, seed)
    return FinetuneModel(features, config, seed, findings, init_backbone)
