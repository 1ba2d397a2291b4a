"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR, as USCL uses it.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (SimCLR,
ICML 2020), eq. 1; USCL (Chen et al., MICCAI 2021) trains with it at temperature 0.5 on cosine
similarity. For the 2N views of a batch (N positive pairs), with ``sim`` the cosine similarity::

    l(a, b) = -log( exp(sim(z_a, z_b) / t) / sum_{k != a} exp(sim(z_a, z_k) / t) )
    L = 1 / (2N) * sum_{pairs (i, j)} [ l(i, j) + l(j, i) ]

so the negatives of a view are the other 2N - 2 views of the batch.

Across workers (``torch.distributed`` initialised, world size > 1) the views of every worker are
gathered and each worker computes the loss of its own rows against the global batch. The gather
passes gradients back to the worker that owns each row (the incoming gradients are summed over
workers), so after DistributedDataParallel averages the gradients, both the loss (averaged over
workers) and the gradient equal those of one process holding the whole global batch: the loss
does not depend on the worker count. Workers may hold different numbers of pairs; each worker's
loss is then scaled by ``world_size * n_local / N_global`` so that the invariance still holds.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """all_gather of ``(n_r, D)`` row blocks of possibly different ``n_r``; the backward sums the
    gradient over workers and hands each worker the slice of the rows it contributed."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        largest = max(sizes)
        padded = rows.new_zeros((largest,) + tuple(rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded.contiguous())
        ctx.start = sum(sizes[:rank])
        ctx.count = sizes[rank]
        return torch.cat([block[:size] for block, size in zip(blocks, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start: ctx.start + ctx.count], None, None


def gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every worker's ``rows`` (in rank order), gradients flowing back to their owner.

    Returns the global tensor and the offset of this worker's rows in it.
    """
    rank, world = distributed_world()
    if world == 1:
        return rows, 0
    count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    return _GatherRows.apply(rows, sizes, rank), sum(sizes[:rank])


class NTXentLoss(nn.Module):
    """NT-Xent loss over two batches of projections (module docstring for the formula).

    Args:
        temperature: t > 0 (USCL: 0.5).
        gather: negatives from all workers. ``None`` (default): gather whenever a process group
            with more than one worker is initialised; ``False``: local negatives only; ``True``:
            gather, and raise if no process group is initialised.

    Shape:
        - out0, out1: ``(N, D)``; row ``n`` of ``out0`` and of ``out1`` are the two views of item
          ``n`` (any float dtype; computed in float32).
        - Output: scalar, the mean over this worker's ``2N`` views.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> z_i, z_j = torch.randn(8, 256), torch.randn(8, 256)
        >>> loss_fn(z_i, z_j).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.5, gather: bool | None = None) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if gather not in (None, True, False):
            raise ValueError(f"gather must be None, True or False, got {gather!r}")
        self.temperature = float(temperature)
        self.gather = gather

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather={self.gather}"

    def _use_gather(self) -> bool:
        rank, world = distributed_world()
        if self.gather is True and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("NTXentLoss(gather=True) needs an initialised torch.distributed "
                               "process group")
        return self.gather is not False and world > 1

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        if out0.ndim != 2 or out0.shape != out1.shape:
            raise ValueError("out0 and out1 must both be (N, D) with equal shapes, got "
                             f"{tuple(out0.shape)} and {tuple(out1.shape)}")
        if out0.shape[0] == 0:
            raise ValueError("NT-Xent needs at least one pair")
        local = out0.shape[0]
        z0 = F.normalize(out0.float(), dim=1)
        z1 = F.normalize(out1.float(), dim=1)
        if self._use_gather():
            _, world = distributed_world()
            z0_all, offset = gather_rows(z0)
            z1_all, _ = gather_rows(z1)
        else:
            world, z0_all, z1_all, offset = 1, z0, z1, 0
        total = z0_all.shape[0]
        rows = torch.arange(local, device=z0.device)
        own = offset + rows  # column of each local view (and of its partner) in the global batch
        logits_00 = z0 @ z0_all.T / self.temperature
        logits_01 = z0 @ z1_all.T / self.temperature
        logits_10 = z1 @ z0_all.T / self.temperature
        logits_11 = z1 @ z1_all.T / self.temperature
        self_mask = torch.zeros_like(logits_00, dtype=torch.bool)
        self_mask[rows, own] = True  # a view is never its own negative
        logits_00 = logits_00.masked_fill(self_mask, float("-inf"))
        logits_11 = logits_11.masked_fill(self_mask, float("-inf"))
        logits = torch.cat([torch.cat([logits_01, logits_00], dim=1),
                            torch.cat([logits_10, logits_11], dim=1)], dim=0)
        loss = F.cross_entropy(logits, own.repeat(2))
        if world > 1:
            loss = loss * (world * local / total)
        return loss
