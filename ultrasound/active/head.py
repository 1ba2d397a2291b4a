"""Fast multi-label head on frozen embeddings: the model the embeddings-mode simulator retrains
every round.

A linear layer with one sigmoid per finding on standardised features, fitted full-batch by
L-BFGS (scipy) on the weighted, positive-weighted binary cross-entropy with an L2 penalty:

``J(W, b) = sum_n w_n * mean_l BCE_pw(x_n W + b, y_n) / sum_n w_n + l2/2 * ||W||^2``

The problem is convex and starts from zero, so a fit is deterministic (no seed needed) and
independent of sample order. It is the MSML head without the attention pooling (embeddings are
already pooled); at N = 3000, D = 512, L = 6 one fit takes a few tens of milliseconds on one CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from ultrasound.active.correlation import check_label_matrix
from ultrasound.multilabel_metrics import positive_balance


@dataclass(frozen=True, eq=False)
class HeadParams:
    """A fitted head. ``weight (D, L)``, ``bias (L,)``, ``mean (D,)``, ``scale (D,)`` float32;
    ``iterations`` and ``loss`` describe the fit."""

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    iterations: int = 0
    loss: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist(), "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "iterations": self.iterations, "loss": self.loss}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HeadParams":
        arrays = {k: np.asarray(values[k], dtype=np.float32) for k in ("weight", "bias", "mean", "scale")}
        return cls(**arrays, iterations=int(values.get("iterations", 0)), loss=float(values.get("loss", "nan")))


def train_head(
    emb: np.ndarray,
    labels: np.ndarray,
    sample_weight: np.ndarray | None = None,
    *,
    pos_weight: str | np.ndarray | None = None,
    l2: float = 1e-3,
    max_iter: int = 100,
    tol: float = 1e-5,
    max_pos_weight: float = 50.0,
    blas_threads: int | None = 1,
) -> HeadParams:
    """Fit the head.

    Args:
        emb: ``(N, D)`` float embeddings.
        labels: ``(N, L)`` 0/1.
        sample_weight: ``(N,)`` non-negative, e.g. 1 for human labels and 0.5 for machine ones.
        pos_weight: ``None`` (1 for every finding), ``"auto"`` (``#neg/#pos`` per finding from
            ``labels``, clipped to ``[1/max_pos_weight, max_pos_weight]``) or an ``(L,)`` array.
        l2: L2 penalty on the weights (not the bias).
        max_iter, tol: L-BFGS iteration cap and gradient tolerance.
        blas_threads: BLAS threads during the fit (``None`` leaves the setting alone). 1 by
            default: the simulator runs many fits side by side and these thin matrix products
            only lose time to threads on a busy machine.

    Returns:
        :class:`HeadParams` for :func:`predict_head`.

    Example:
        >>> x = np.array([[-2.0], [-1.0], [1.0], [2.0]], np.float32)
        >>> head = train_head(x, np.array([[0], [0], [1], [1]]))
        >>> (predict_head(head, x)[:, 0] > 0.5).tolist()
        [False, False, True, True]
    """
    x = np.asarray(emb, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"emb must be (N, D) with N, D >= 1, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("emb must be finite")
    y = check_label_matrix(labels, "labels").astype(np.float32)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} rows, emb {x.shape[0]}")
    n, d = x.shape
    num = y.shape[1]
    if sample_weight is None:
        w = np.ones(n, dtype=np.float32)
    else:
        w = np.asarray(sample_weight, dtype=np.float32).ravel()
        if w.shape[0] != n or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"sample_weight must be (N,)=({n},), finite, >= 0, with a positive sum")
    pw = positive_weights(pos_weight, y, max_pos_weight)
    if blas_threads is not None and blas_threads < 1:
        raise ValueError(f"blas_threads must be >= 1 or None, got {blas_threads}")
    if l2 < 0 or max_iter < 1 or tol <= 0:
        raise ValueError(f"need l2 >= 0, max_iter >= 1, tol > 0, got {l2}, {max_iter}, {tol}")

    # weighted statistics, so a sample with weight 0 is exactly absent
    share = (w / w.sum())[:, None]
    mean = (share * x).sum(axis=0)
    scale = np.sqrt((share * (x - mean) ** 2).sum(axis=0))
    scale = np.where(scale > 1e-6, scale, 1.0).astype(np.float32)
    row_scale = (w / (w.sum() * num))[:, None]  # per-element factor of the weighted mean
    pos_term = pw[None, :] * y  # pw * y
    all_term = pos_term + (1.0 - y)  # pw * y + (1 - y)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weight = theta[: d * num].reshape(d, num).astype(np.float32)
        bias = theta[d * num:].astype(np.float32)
        # standardisation folded into the weights: ((x - mean) / scale) @ W = x @ (W / scale) - c
        folded = weight / scale[:, None]
        z = x @ folded + (bias - mean @ folded)
        # BCE_pw = pw*y*softplus(-z) + (1-y)*softplus(z), softplus(-z) = softplus(z) - z
        softplus = np.logaddexp(0.0, z)
        loss_terms = all_term * softplus - pos_term * z
        sig = 0.5 * (1.0 + np.tanh(0.5 * z))
        grad_z = (sig * all_term - pos_term) * row_scale
        grad_b = grad_z.sum(axis=0)
        grad_w = (x.T @ grad_z - np.outer(mean, grad_b)) / scale[:, None] + l2 * weight
        loss = float((loss_terms * row_scale).sum()) + 0.5 * l2 * float((weight * weight).sum())
        return loss, np.concatenate([grad_w.ravel(), grad_b]).astype(np.float64)

    with threadpool_limits(limits=blas_threads, user_api="blas"):
        result = minimize(objective, np.zeros(d * num + num), jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "gtol": tol})
    theta = result.x
    return HeadParams(
        weight=theta[: d * num].reshape(d, num).astype(np.float32),
        bias=theta[d * num:].astype(np.float32),
        mean=mean.astype(np.float32),
        scale=scale,
        iterations=int(result.nit),
        loss=float(result.fun),
    )


def predict_head(params: HeadParams, emb: np.ndarray) -> np.ndarray:
    """Probabilities. Shape: emb ``(N, D)`` -> ``(N, L)`` float32 in [0, 1]."""
    x = np.asarray(emb, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != params.weight.shape[0]:
        raise ValueError(f"emb must be (N, {params.weight.shape[0]}), got shape {x.shape}")
    z = ((x - params.mean) / params.scale) @ params.weight + params.bias
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def positive_weights(pos_weight: str | np.ndarray | None, y: np.ndarray, max_pos_weight: float = 50.0) -> np.ndarray:
    """``(L,)`` BCE positive weights of :func:`train_head`'s ``pos_weight`` rule over labels ``(N, L)``."""
    num = y.shape[1]
    if pos_weight is None:
        return np.ones(num, dtype=np.float32)
    if isinstance(pos_weight, str):
        if pos_weight != "auto":
            raise ValueError(f"pos_weight must be None, 'auto' or an (L,) array, got {pos_weight!r}")
        return positive_balance(y, max_pos_weight)
    pw = np.asarray(pos_weight, dtype=np.float32).ravel()
    if pw.shape[0] != num or not np.isfinite(pw).all() or (pw <= 0).any():
        raise ValueError(f"pos_weight array must be (L,)=({num},), finite and > 0")
    return pw
