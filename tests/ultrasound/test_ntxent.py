"""NT-Xent against a slow transcription of SimCLR eq. 1, SGD descent, and worker-count
invariance (2 gloo processes on CPU vs 1 process on the same global batch)."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ultrasound.losses import NTXentLoss

torch.set_num_threads(1)


def slow_ntxent(z_i: torch.Tensor, z_j: torch.Tensor, t: float) -> float:
    """SimCLR eq. 1, term by term: views are ordered z_i[0..N-1], z_j[0..N-1]."""
    views = [v.double() for v in list(z_i) + list(z_j)]
    n = len(z_i)

    def sim(a, b):
        return float(torch.dot(a, b) / (a.norm() * b.norm()))

    total = 0.0
    for a in range(2 * n):
        positive = a + n if a < n else a - n
        numerator = math.exp(sim(views[a], views[positive]) / t)
        denominator = sum(math.exp(sim(views[a], views[k]) / t) for k in range(2 * n) if k != a)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("n,d,t", [(1, 3, 0.5), (2, 4, 0.5), (5, 8, 0.1), (7, 3, 1.0)])
def test_matches_slow_transcription(n, d, t):
    g = torch.Generator().manual_seed(n * 100 + d)
    z_i, z_j = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    got = NTXentLoss(temperature=t)(z_i, z_j)
    assert float(got) == pytest.approx(slow_ntxent(z_i, z_j, t), rel=1e-5, abs=1e-6)


def test_scale_invariant_and_symmetric():
    g = torch.Generator().manual_seed(0)
    z_i, z_j = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss = NTXentLoss()
    assert float(loss(3 * z_i, 0.5 * z_j)) == pytest.approx(float(loss(z_i, z_j)), rel=1e-5)
    assert float(loss(z_j, z_i)) == pytest.approx(float(loss(z_i, z_j)), rel=1e-5)
    # half precision input is computed in float32
    assert float(loss(z_i.half(), z_j.half())) == pytest.approx(float(loss(z_i, z_j)), rel=1e-2)


def test_decreases_under_sgd():
    torch.manual_seed(0)
    net = nn.Linear(6, 4)
    x = torch.randn(8, 6)
    x_i, x_j = x + 0.3 * torch.randn(8, 6), x + 0.3 * torch.randn(8, 6)
    loss_fn = NTXentLoss(temperature=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    losses = []
    for _ in range(40):
        loss = loss_fn(net(x_i), net(x_j))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2


def test_argument_validation():
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0)
    with pytest.raises(ValueError, match="gather"):
        NTXentLoss(gather="yes")
    with pytest.raises(ValueError, match="equal shapes"):
        NTXentLoss()(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="equal shapes"):
        NTXentLoss()(torch.zeros(3), torch.zeros(3))
    with pytest.raises(RuntimeError, match="process group"):
        NTXentLoss(gather=True)(torch.ones(2, 4), torch.ones(2, 4))


# ---- worker-count invariance -------------------------------------------------------------

def global_problem(sizes):
    g = torch.Generator().manual_seed(11)
    total = sum(sizes)
    z_i, z_j = torch.randn(total, 5, generator=g), torch.randn(total, 5, generator=g)
    x_i, x_j = torch.randn(total, 6, generator=g), torch.randn(total, 6, generator=g)
    return z_i, z_j, x_i, x_j


def tiny_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Linear(6, 4)


def _worker(rank: int, world: int, init_file: str, out_dir: str,
            cases: dict[str, list[int]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, sizes in cases.items():
            start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
            z_i, z_j, x_i, x_j = global_problem(sizes)
            loss_fn = NTXentLoss(temperature=0.5)
            # (1) the loss on raw projections and the gradient each worker gets for its rows
            local_i = z_i[start:stop].clone().requires_grad_(True)
            local_j = z_j[start:stop].clone().requires_grad_(True)
            loss = loss_fn(local_i, local_j)
            loss.backward()
            # (2) a DDP-wrapped model: averaged parameter gradients
            model = nn.parallel.DistributedDataParallel(tiny_net())
            model_loss = loss_fn(model(x_i[start:stop]), model(x_j[start:stop]))
            model_loss.backward()
            torch.save({"loss": loss.detach(), "grad_i": local_i.grad, "grad_j": local_j.grad,
                        "model_loss": model_loss.detach(),
                        "param_grads": [p.grad for p in model.parameters()]},
                       os.path.join(out_dir, f"{name}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_workers_equal_one_process(tmp_path):
    cases = {"equal": [4, 4], "unequal": [3, 5]}
    # fork: the workers need no fresh interpreter (a spawn re-imports torch, ~5 s per worker)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), cases),
                       nprocs=2, join=True, start_method="fork")
    for name, sizes in cases.items():
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(2)]

        z_i, z_j, x_i, x_j = global_problem(sizes)
        z_i.requires_grad_(True)
        z_j.requires_grad_(True)
        single = NTXentLoss(temperature=0.5, gather=False)(z_i, z_j)
        single.backward()
        # workers' losses average to the single-process loss over the global batch
        mean_loss = sum(float(r["loss"]) for r in ranks) / 2
        assert mean_loss == pytest.approx(single.item(), rel=1e-5), name
        # and their gradients, averaged as DDP does, are the single-process gradient
        grad_i = torch.cat([r["grad_i"] for r in ranks]) / 2
        grad_j = torch.cat([r["grad_j"] for r in ranks]) / 2
        assert torch.allclose(grad_i, z_i.grad, atol=1e-6), name
        assert torch.allclose(grad_j, z_j.grad, atol=1e-6), name

        net = tiny_net()
        single_model = NTXentLoss(temperature=0.5)(net(x_i), net(x_j))
        single_model.backward()
        mean_model = sum(float(r["model_loss"]) for r in ranks) / 2
        assert mean_model == pytest.approx(single_model.item(), rel=1e-5), name
        for rank in ranks:  # DDP has already averaged: every worker holds the same gradient
            for got, want in zip(rank["param_grads"], net.parameters()):
                assert torch.allclose(got, want.grad, atol=1e-5), name
