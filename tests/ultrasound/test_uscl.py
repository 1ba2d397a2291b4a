"""USCL wiring: config, model, loss composition, schedule, and training steps (plain and DDP)."""
from __future__ import annotations

import pydantic
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ultrasound.losses import NTXentLoss, SemiSupervisedCE
from ultrasound.uscl import (USCLConfig, USCLModel, lr_at_epoch, make_augment, make_losses,
                             make_optimizer, set_learning_rate, train_step, unwrap, uscl_loss)

torch.set_num_threads(1)


def test_config_defaults_are_the_authors():
    cfg = USCLConfig()
    assert (cfg.epochs, cfg.batch_videos, cfg.image_size, cfg.lr, cfg.weight_decay) == \
        (300, 32, 224, 3e-4, 1e-4)
    assert (cfg.warmup_epochs, cfg.temperature, cfg.mixup_alpha, cfg.ce_weight) == \
        (10, 0.5, 0.5, 0.2)
    assert cfg.pairs == "uscl" and cfg.semi_supervised and not cfg.uses_labels  # no classes known yet
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.lr = 1.0


def test_from_dict_converts_and_rejects_unknown_keys():
    cfg = USCLConfig.from_dict({"lr": "3e-3", "epochs": 5.0, "pairs": "image", "channels": 1})
    assert cfg.lr == 3e-3 and cfg.epochs == 5 and cfg.pairs == "image" and cfg.channels == 1
    # the mixup switch of earlier runs' saved configs
    assert USCLConfig.from_dict({"mixup": "false"}).pairs == "frames"
    assert USCLConfig.from_dict({"mixup": True}).pairs == "uscl"
    with pytest.raises(ValueError, match="pairs must be one of uscl, frames, image"):
        USCLConfig.from_dict({"pairs": "video"})
    unknown = r"unknown USCL config key\(s\) \['learning_rate'\].*valid keys.*'lr'"
    with pytest.raises(ValueError, match=unknown):
        USCLConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="'epochs' needs an int"):
        USCLConfig.from_dict({"epochs": 2.5})
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        USCLConfig.from_dict({"channels": 2})
    assert USCLConfig.from_dict(USCLConfig(seed=4).to_dict()) == USCLConfig(seed=4)


def test_plain_simclr_turns_off_the_two_switches_only():
    cfg = USCLConfig(num_classes=3, image_size=64)
    simclr = cfg.plain_simclr()
    assert simclr.pairs == "image" and not simclr.semi_supervised and not simclr.uses_labels
    assert simclr.replace(pairs="uscl", semi_supervised=True) == cfg
    assert USCLModel.from_config(simclr).classifier is None
    assert USCLModel.from_config(cfg).classifier.out_features == 3


def test_model_shapes_and_head_sizes():
    model = USCLModel(in_channels=1, num_classes=3)
    z, logits = model(torch.zeros(2, 1, 32, 32))
    assert z.shape == (2, 256) and logits.shape == (2, 3)
    linears = [m for m in model.projection if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 256)]
    assert model.classifier.in_features == 256
    assert USCLModel(in_channels=3)(torch.zeros(2, 3, 32, 32))[1] is None


def test_lr_schedule_values():
    cfg = USCLConfig(epochs=30, warmup_epochs=10, lr=1e-3)
    assert [lr_at_epoch(e, cfg) for e in (0, 5, 9, 10)] == [1e-3] * 4
    assert lr_at_epoch(20, cfg) == pytest.approx(0.5e-3)  # half way through the cosine
    assert lr_at_epoch(15, cfg) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at_epoch(30, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at_epoch(29, cfg) > 0
    assert lr_at_epoch(3, USCLConfig(epochs=5, warmup_epochs=10, lr=1e-3)) == 1e-3
    optimizer = make_optimizer(USCLModel(1), cfg)
    set_learning_rate(optimizer, 2e-4)
    assert all(g["lr"] == 2e-4 for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["weight_decay"] == cfg.weight_decay
    with pytest.raises(ValueError):
        lr_at_epoch(-1, cfg)


def test_loss_is_ntxent_plus_weighted_ce_on_both_views():
    torch.manual_seed(0)
    cfg = USCLConfig(image_size=32, channels=1, num_classes=2, ce_weight=0.3)
    model = USCLModel.from_config(cfg).eval()  # eval: one joint pass == two separate passes
    x_i, x_j = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    labels = torch.tensor([1, -1, 0, -1])
    ntxent, ce = NTXentLoss(0.5), SemiSupervisedCE(0.3)
    total, parts = uscl_loss(model, x_i, x_j, labels, cfg, ntxent, ce)
    with torch.no_grad():
        (z_i, l_i), (z_j, l_j) = model(x_i), model(x_j)
        expected_nt = ntxent(z_i, z_j)
        expected_ce = ce(l_i, l_j, labels)
    assert parts["ntxent"].item() == pytest.approx(expected_nt.item(), rel=1e-4)
    assert parts["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-4)
    assert total.item() == pytest.approx((expected_nt + expected_ce).item(), rel=1e-4)
    # plain SimCLR on the same model: contrastive term only
    total, parts = uscl_loss(model, x_i, x_j, labels, cfg.plain_simclr(), ntxent, ce)
    assert parts["ce"].item() == 0.0
    assert total.item() == pytest.approx(expected_nt.item(), rel=1e-4)


def tiny_batch(seed: int = 0, labels=(0, 1, -1, 0, -1, 1)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(labels)
    return {"frames": rng.integers(0, 256, (n, 3, 40, 40, 1), dtype=np.uint8),
            "n_frames": np.array([3, 3, 3, 2, 1, 3][:n]), "class_index": np.array(labels)}


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    cfg = USCLConfig(image_size=32, channels=1, num_classes=2, batch_videos=6)
    torch.manual_seed(0)
    model = USCLModel.from_config(cfg)
    optimizer = make_optimizer(model, cfg)
    augment = make_augment(cfg)
    batch = tiny_batch()
    # the same rng seed every step: the same views, so the loss must go down
    losses = [train_step(model, optimizer, batch, augment, cfg, np.random.default_rng(1))
              for _ in range(15)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])


def test_train_step_without_labels_and_plain_simclr():
    cfg = USCLConfig(image_size=32, channels=1, batch_videos=4).plain_simclr()
    model = USCLModel.from_config(cfg)
    batch = tiny_batch(labels=(-1, -1, -1, -1))
    del batch["class_index"]
    loss = train_step(model, make_optimizer(model, cfg), batch, make_augment(cfg), cfg,
                      np.random.default_rng(0))
    assert math.isfinite(loss) and loss > 0


# ---- inside DistributedDataParallel ------------------------------------------------------

def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = USCLConfig(image_size=32, channels=1, num_classes=2, batch_videos=3)
        torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's
        model = nn.parallel.DistributedDataParallel(USCLModel.from_config(cfg))
        optimizer = make_optimizer(model, cfg)
        ntxent, ce = make_losses(cfg)
        # rank 1 holds no labelled video: its CE is a connected zero, so DDP still sees a
        # gradient for the classifier on every rank
        labels = (0, 1, -1) if rank == 0 else (-1, -1, -1)
        losses = [train_step(model, optimizer, tiny_batch(seed=rank, labels=labels),
                             make_augment(cfg), cfg, np.random.default_rng(step), ntxent=ntxent,
                             ce=ce) for step in range(2)]
        # parameters only: BatchNorm running statistics are local until the next forward
        # broadcasts rank 0's
        state = {k: v.detach().clone() for k, v in unwrap(model).named_parameters()}
        torch.save({"losses": losses, "state": state}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_train_step_inside_ddp_keeps_workers_in_step(tmp_path):
    # fork: the workers need no fresh interpreter (a spawn re-imports torch, ~5 s per worker)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(math.isfinite(v) for r in ranks for v in r["losses"])
    assert ranks[0]["losses"] != ranks[1]["losses"]  # different local data
    assert len(ranks[0]["state"]) == len(list(USCLModel(1, 2).parameters()))
    for key, value in ranks[0]["state"].items():  # yet identical parameters after two steps
        assert torch.allclose(value, ranks[1]["state"][key], atol=1e-6), key
