"""Fast multi-label head on frozen embeddings: the model the embeddings-mode simulator retrains
every round, many experiments at once.

A linear layer with one sigmoid per finding on standardised features, fitted full-batch by
L-BFGS on the weighted, positive-weighted binary cross-entropy with an L2 penalty:

``J(W, b) = sum_n w_n * mean_l BCE_pw(x_n W + b, y_n) / sum_n w_n + l2/2 * ||W||^2``

The problem is strictly convex (``l2 > 0``) and starts from zero, so a fit is deterministic (no
seed needed), independent of sample order, and solved to a gradient tolerance (``tol`` on the
largest gradient entry, float64), not stopped at an iteration cap: ``HeadParams.converged``
says whether it got there.

:func:`train_heads` solves E such problems (one per simulated experiment) as one batched
problem: rows padded with weight 0 to the next multiple of :data:`ROW_BUCKET` (problems of
one bucket are solved together), every product a batched matmul ``(E, M, D) @ (E, D, L)``, one
L-BFGS history and one backtracking line search per problem, a problem leaving the batch once
it converges. Each problem's iterates are its own and every sum has the length and order it
has alone, so a fit in a batch equals the fit alone bit for bit (on one thread).
:func:`train_head` is the batch of one. A bucket is split into chunks that fit ``max_bytes``;
the solve runs on the GPU when there is one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ultrasound.active.correlation import check_label_matrix
from ultrasound.multilabel_metrics import positive_balance

HISTORY = 10  # L-BFGS memory (pairs), as scipy's L-BFGS-B default
ARMIJO = 1e-4  # sufficient-decrease constant of the backtracking line search
MAX_HALVINGS = 40
ROW_BUCKET = 64  # rows are padded to a multiple of this (see train_heads)


@dataclass(frozen=True, eq=False)
class HeadParams:
    """A fitted head. ``weight (D, L)``, ``bias (L,)``, ``mean (D,)``, ``scale (D,)`` float32;
    ``iterations``, ``loss`` and ``converged`` (largest gradient entry <= ``tol``) describe the fit."""

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    iterations: int = 0
    loss: float = float("nan")
    converged: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist(), "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "iterations": self.iterations, "loss": self.loss,
                "converged": self.converged}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HeadParams":
        arrays = {k: np.asarray(values[k], dtype=np.float32) for k in ("weight", "bias", "mean", "scale")}
        return cls(**arrays, iterations=int(values.get("iterations", 0)), loss=float(values.get("loss", "nan")),
                   converged=bool(values.get("converged", True)))


@dataclass(frozen=True, eq=False)
class HeadProblem:
    """One head to fit: ``emb (N, D)``, ``labels (N, L)`` 0/1, ``sample_weight (N,)`` >= 0 and
    ``pos_weight (L,)`` > 0, checked by :func:`head_problem`."""

    emb: np.ndarray
    labels: np.ndarray
    sample_weight: np.ndarray
    pos_weight: np.ndarray


def head_problem(emb: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray | None = None,
                 pos_weight: str | np.ndarray | None = None, max_pos_weight: float = 50.0) -> HeadProblem:
    """A checked :class:`HeadProblem` (``pos_weight`` as in :func:`train_head`); raises
    ``ValueError`` naming the argument at fault."""
    x = np.asarray(emb, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"emb must be (N, D) with N, D >= 1, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("emb must be finite")
    y = check_label_matrix(labels, "labels").astype(np.float32)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} rows, emb {x.shape[0]}")
    n = x.shape[0]
    if sample_weight is None:
        w = np.ones(n, dtype=np.float32)
    else:
        w = np.asarray(sample_weight, dtype=np.float32).ravel()
        if w.shape[0] != n or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"sample_weight must be (N,)=({n},), finite, >= 0, with a positive sum")
    return HeadProblem(x, y, w, positive_weights(pos_weight, y, max_pos_weight))


def train_head(
    emb: np.ndarray,
    labels: np.ndarray,
    sample_weight: np.ndarray | None = None,
    *,
    pos_weight: str | np.ndarray | None = None,
    l2: float = 1e-3,
    max_iter: int = 1000,
    tol: float = 1e-6,
    max_pos_weight: float = 50.0,
    threads: int | None = 1,
) -> HeadParams:
    """Fit one head (:func:`train_heads` with a batch of one).

    Args:
        emb: ``(N, D)`` float embeddings.
        labels: ``(N, L)`` 0/1.
        sample_weight: ``(N,)`` non-negative, e.g. 1 for human labels and 0.5 for machine ones.
        pos_weight: ``None`` (1 for every finding), ``"auto"`` (``#neg/#pos`` per finding from
            ``labels``, clipped to ``[1/max_pos_weight, max_pos_weight]``) or an ``(L,)`` array.
        l2: L2 penalty on the weights (not the bias).
        max_iter, tol: L-BFGS iteration cap and tolerance on the largest gradient entry.
        threads: torch intra-op threads during the fit (``None`` leaves the setting alone).

    Returns:
        :class:`HeadParams` for :func:`predict_head`.

    Example:
        >>> x = np.array([[-2.0], [-1.0], [1.0], [2.0]], np.float32)
        >>> head = train_head(x, np.array([[0], [0], [1], [1]]))
        >>> (predict_head(head, x)[:, 0] > 0.5).tolist(), head.converged
        ([False, False, True, True], True)
    """
    problem = head_problem(emb, labels, sample_weight, pos_weight, max_pos_weight)
    return train_heads([problem], l2=l2, max_iter=max_iter, tol=tol, threads=threads)[0]


def train_heads(problems: Sequence[HeadProblem], *, l2: float | Sequence[float] = 1e-3, max_iter: int = 1000,
                tol: float = 1e-6, threads: int | None = 1, device: str | None = None,
                max_bytes: int | None = None) -> list[HeadParams]:
    """Fit E heads in one batched L-BFGS solve (see the module docstring).

    Args:
        problems: E :class:`HeadProblem` (:func:`head_problem`) with one D and one L; row counts
            may differ.
        l2: one penalty, or one per problem (a grid search is one call).
        max_iter, tol: iteration cap and tolerance on each problem's largest gradient entry.
        threads: torch intra-op threads (``None``: leave alone); device: ``None`` picks CUDA
            when available.
        max_bytes: memory for one chunk's padded float64 features (about a quarter of its peak);
            larger batches are solved chunk by chunk. ``None``: 4 MiB on CPU (a chunk that stays
            in cache: at D = 512, 48 fits of ~220 rows take 22 ms each in 4 MiB chunks and 33 ms
            in one 256 MiB chunk), 256 MiB on a GPU.

    Returns:
        E :class:`HeadParams`, in order.
    """
    import torch

    problems = list(problems)
    if not problems:
        return []
    d, num = problems[0].emb.shape[1], problems[0].labels.shape[1]
    for i, p in enumerate(problems):
        if p.emb.shape[1] != d or p.labels.shape[1] != num:
            raise ValueError(f"problem {i} is (D, L)=({p.emb.shape[1]}, {p.labels.shape[1]}), problem 0 ({d}, {num})")
    penalties = np.broadcast_to(np.asarray(l2, dtype=np.float64), (len(problems),))
    if (penalties < 0).any() or max_iter < 1 or tol <= 0:
        raise ValueError(f"need l2 >= 0, max_iter >= 1, tol > 0, got {l2}, {max_iter}, {tol}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if max_bytes is None:
        max_bytes = (1 << 28) if device.startswith("cuda") else (1 << 22)
    # problems are solved with others padded to the same row count (a multiple of ROW_BUCKET):
    # every reduction then has the same length and order as when the problem is solved alone, so
    # a fit does not depend on its companions to the last bit
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(problems):
        buckets.setdefault(padded_rows(p.emb.shape[0]), []).append(i)
    out: list[HeadParams | None] = [None] * len(problems)
    with torch_threads(threads):
        for rows, members in sorted(buckets.items()):
            chunk = max(1, int(max_bytes // (rows * d * 8)))
            for start in range(0, len(members), chunk):
                part = members[start:start + chunk]
                fitted = _solve([problems[i] for i in part], penalties[part], rows, max_iter, tol, torch.device(device))
                for i, params in zip(part, fitted):
                    out[i] = params
    return out  # type: ignore[return-value]


def padded_rows(n: int) -> int:
    """The row count a problem of ``n`` rows is padded to: the next multiple of :data:`ROW_BUCKET`."""
    return -(-n // ROW_BUCKET) * ROW_BUCKET


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Hold torch's intra-op threads at ``threads`` inside the block (``None``: leave alone)."""
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _solve(problems: list[HeadProblem], penalties: np.ndarray, rows: int, max_iter: int, tol: float,
           device) -> list[HeadParams]:
    """One chunk: pad to ``rows``, standardise with each problem's weighted statistics, run
    batched L-BFGS."""
    import torch

    e, d, num = len(problems), problems[0].emb.shape[1], problems[0].labels.shape[1]
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.zeros((e, rows, d), **f64)
    y = torch.zeros((e, rows, num), **f64)
    w = torch.zeros((e, rows), **f64)
    pw = torch.empty((e, num), **f64)
    for i, p in enumerate(problems):
        n = p.emb.shape[0]
        x[i, :n] = torch.from_numpy(p.emb).to(**f64)
        y[i, :n] = torch.from_numpy(p.labels).to(**f64)
        w[i, :n] = torch.from_numpy(p.sample_weight).to(**f64)
        pw[i] = torch.from_numpy(p.pos_weight).to(**f64)
    # weighted statistics, so a sample with weight 0 (padding included) is exactly absent
    share = w / w.sum(dim=1, keepdim=True)
    mean = torch.einsum("en,end->ed", share, x)
    scale = torch.sqrt(torch.einsum("en,end->ed", share, (x - mean[:, None]) ** 2))
    scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
    xs = (x - mean[:, None]) / scale[:, None] * (w > 0)[..., None]
    del x
    pos_term = pw[:, None, :] * y
    batch = _HeadBatch(xs, pos_term, pos_term + (1.0 - y), (share / num)[..., None],
                       torch.tensor(np.array(penalties), **f64))
    theta, loss, iterations, converged = lbfgs(batch, torch.zeros((e, d * num + num), **f64), max_iter, tol)
    theta = theta.cpu().numpy()
    mean, scale = mean.cpu().numpy().astype(np.float32), scale.cpu().numpy().astype(np.float32)
    return [HeadParams(weight=theta[i, : d * num].reshape(d, num).astype(np.float32),
                       bias=theta[i, d * num:].astype(np.float32), mean=mean[i], scale=scale[i],
                       iterations=int(iterations[i]), loss=float(loss[i]), converged=bool(converged[i]))
            for i in range(e)]


class _HeadBatch:
    """E head objectives on padded, standardised rows: ``xs (E, M, D)``, ``pos_term = pw * y``
    and ``all_term = pw * y + (1 - y)`` ``(E, M, L)``, ``row_scale (E, M, 1)`` (a row's factor
    of the weighted mean, 0 for padding), ``lam (E,)``; ``theta (E, D*L + L)`` is ``[W, b]``.

    The preconditioner is the Hessian at the start (z = 0, sigmoid' = 1/4): one ``(D, D)``
    block shared by the findings (their row factors averaged) and one scalar per bias, scaled
    each iteration by L-BFGS. The embeddings' features are strongly correlated: on POCUS at
    D = 512 it cuts the iterations to a 1e-5 gradient from 530-880 to 95-150 (none on 32 PCs).
    """

    def __init__(self, xs, pos_term, all_term, row_scale, lam, factor=None, hessian_b=None) -> None:
        import torch

        self.xs, self.pos_term, self.all_term, self.row_scale, self.lam = xs, pos_term, all_term, row_scale, lam
        self.e, _, self.d = xs.shape
        self.num = pos_term.shape[2]
        if factor is None:
            row_curvature = row_scale[..., 0] * all_term.mean(dim=2) / 4.0  # (E, M)
            hessian_w = torch.einsum("em,emd,emf->edf", row_curvature, xs, xs)
            eye = torch.eye(self.d, dtype=xs.dtype, device=xs.device)
            # a relative jitter keeps the factor defined at l2 = 0 with fewer rows than features
            jitter = 1e-8 * hessian_w.diagonal(dim1=1, dim2=2).mean(dim=1) + 1e-12
            factor = torch.linalg.cholesky(hessian_w + (lam + jitter)[:, None, None] * eye)
            hessian_b = (row_scale * all_term).sum(dim=1) / 4.0  # (E, L)
        self.factor, self.hessian_b = factor, hessian_b

    def objective(self, theta):
        import torch

        e, d, num = self.e, self.d, self.num
        weight = theta[:, : d * num].reshape(e, d, num)
        z = torch.baddbmm(theta[:, None, d * num:], self.xs, weight)
        loss = ((self.all_term * torch.nn.functional.softplus(z) - self.pos_term * z) * self.row_scale).sum(dim=(1, 2))
        loss = loss + 0.5 * self.lam * (weight * weight).sum(dim=(1, 2))
        grad_z = (torch.sigmoid(z) * self.all_term - self.pos_term) * self.row_scale
        grad_w = torch.bmm(self.xs.transpose(1, 2), grad_z) + self.lam[:, None, None] * weight
        return loss, torch.cat([grad_w.reshape(e, -1), grad_z.sum(dim=1)], dim=1)

    def precondition(self, q):
        import torch

        e, d, num = self.e, self.d, self.num
        solved = torch.cholesky_solve(q[:, : d * num].reshape(e, d, num), self.factor)
        return torch.cat([solved.reshape(e, -1), q[:, d * num:] / self.hessian_b], dim=1)

    def subset(self, keep) -> "_HeadBatch":
        return _HeadBatch(self.xs[keep], self.pos_term[keep], self.all_term[keep], self.row_scale[keep],
                          self.lam[keep], self.factor[keep], self.hessian_b[keep])


def lbfgs(problem, theta, max_iter: int, tol: float):
    """Batched, preconditioned L-BFGS: minimise E independent functions of ``theta (E, P)``.

    ``problem`` has ``objective(theta) -> (loss (E,), grad (E, P))``, ``precondition(q) ->
    (E, P)`` (the initial inverse Hessian applied to ``q``) and ``subset(keep)`` (the same
    problem for rows ``keep``). Per problem: two-loop recursion over its own last
    :data:`HISTORY` curvature pairs (a pair with ``s.y <= 0`` is not stored) with ``H0 = gamma *
    precondition``, ``gamma = s.y / y.H0(y)`` of the newest pair, a backtracking (Armijo) line
    search from step 1, and a stop once ``max |grad| <= tol``. Once at most half the rows still
    move, the finished ones leave the batch, so a batch costs about its slowest problem's
    iterations times the problems still running. Returns ``(theta, loss, iterations (E,),
    converged (E,) bool)``, the last three as numpy.
    """
    import torch

    e, p = theta.shape
    out_theta, out_loss = theta.clone(), theta.new_zeros(e)
    out_iterations = torch.zeros(e, dtype=torch.long, device=theta.device)
    index = torch.arange(e, device=theta.device)  # original position of each row still in the batch
    loss, grad = problem.objective(theta)
    s_hist = theta.new_zeros((HISTORY, e, p))
    y_hist = theta.new_zeros((HISTORY, e, p))
    rho = theta.new_zeros((HISTORY, e))  # 0 marks an empty or skipped slot
    scaling = theta.new_zeros(e)  # gamma of each problem's newest stored pair; 0: none yet
    iterations = torch.zeros(e, dtype=torch.long, device=theta.device)
    active = grad.abs().amax(dim=1) > tol
    slot = 0  # ring-buffer position of the next pair (shared; a problem's skipped pair has rho 0)

    out_converged = torch.zeros(e, dtype=torch.bool, device=theta.device)

    def retire(rows):
        out_theta[index[rows]] = theta[rows]
        out_loss[index[rows]] = loss[rows]
        out_iterations[index[rows]] = iterations[rows]
        out_converged[index[rows]] = grad[rows].abs().amax(dim=1) <= tol

    for _ in range(max_iter):
        if not bool(active.any()):
            break
        if 2 * int(active.sum()) <= active.numel():
            retire(~active)
            keep = torch.nonzero(active).ravel()
            problem, theta, loss, grad = problem.subset(keep), theta[keep], loss[keep], grad[keep]
            s_hist, y_hist, rho = s_hist[:, keep], y_hist[:, keep], rho[:, keep]
            scaling, iterations, index, active = scaling[keep], iterations[keep], index[keep], active[keep]
        n = theta.shape[0]
        # two-loop recursion, newest pair first
        q = grad.clone()
        alpha = theta.new_zeros((HISTORY, n))
        order = [(slot - 1 - j) % HISTORY for j in range(HISTORY)]
        for k in order:
            alpha[k] = rho[k] * (s_hist[k] * q).sum(dim=1)
            q -= alpha[k][:, None] * y_hist[k]
        r = torch.where(scaling > 0, scaling, torch.ones_like(scaling))[:, None] * problem.precondition(q)
        for k in reversed(order):
            beta = rho[k] * (y_hist[k] * r).sum(dim=1)
            r += s_hist[k] * (alpha[k] - beta)[:, None]
        direction = -r
        slope = (grad * direction).sum(dim=1)
        not_descent = slope >= 0
        direction = torch.where(not_descent[:, None], -grad, direction)
        slope = torch.where(not_descent, -(grad * grad).sum(dim=1), slope)
        direction = direction * active[:, None]
        # backtracking line search, per problem
        step = torch.ones(n, dtype=theta.dtype, device=theta.device)
        done = ~active
        new_loss, new_grad = loss.clone(), grad.clone()
        for _ in range(MAX_HALVINGS):
            trial_loss, trial_grad = problem.objective(theta + step[:, None] * direction)
            ok = ~done & (trial_loss <= loss + ARMIJO * step * slope)
            new_loss = torch.where(ok, trial_loss, new_loss)
            new_grad = torch.where(ok[:, None], trial_grad, new_grad)
            done = done | ok
            if bool(done.all()):
                break
            step = torch.where(done, step, 0.5 * step)
        moved = active & done  # a problem whose line search failed stops where it is
        s = step[:, None] * direction * moved[:, None]
        yv = (new_grad - grad) * moved[:, None]
        sy = (s * yv).sum(dim=1)
        keep_pair = moved & (sy > 1e-12 * s.norm(dim=1) * yv.norm(dim=1))
        s_hist[slot] = torch.where(keep_pair[:, None], s, s_hist[slot])
        y_hist[slot] = torch.where(keep_pair[:, None], yv, y_hist[slot])
        rho[slot] = torch.where(keep_pair, 1.0 / torch.where(keep_pair, sy, torch.ones_like(sy)), rho[slot] * 0)
        slot = (slot + 1) % HISTORY
        y_metric = (yv * problem.precondition(yv)).sum(dim=1)
        usable = keep_pair & (y_metric > 0)
        scaling = torch.where(usable, sy / torch.where(usable, y_metric, torch.ones_like(sy)), scaling)
        theta = theta + s
        loss = torch.where(moved, new_loss, loss)
        grad = torch.where(moved[:, None], new_grad, grad)
        iterations = iterations + moved.long()
        active = moved & (grad.abs().amax(dim=1) > tol)
    retire(torch.ones_like(active))
    return out_theta, out_loss.cpu().numpy(), out_iterations.cpu().numpy(), out_converged.cpu().numpy()


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
