"""MSML: config parsing, the attention head against a slow transcription, positive weights by
hand, input preparation, forward shapes, and a few steps lowering the loss on a tiny batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ultrasound.losses.multilabel import AsymmetricLoss, WeightedBCE
from ultrasound.msml import (
    MSMLConfig,
    MSMLNet,
    SymptomAttentionHead,
    build_loss,
    build_optimizer,
    msml_predict,
    msml_train_step,
    positive_weights,
    prepare_images,
)

torch.set_num_threads(1)
FINDINGS = ("a_lines", "b_lines", "effusion")


def test_config_from_dict_rejects_unknown_keys():
    config = MSMLConfig.from_dict({"findings": "a_lines, b_lines", "lr": 3e-4, "loss": "asymmetric"})
    assert config.findings == ("a_lines", "b_lines") and config.lr == 3e-4
    assert MSMLConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown MSML config key\\(s\\) \\['learning_rate'\\]; valid keys: .*'lr'"):
        MSMLConfig.from_dict({"findings": ["a"], "learning_rate": 1.0})
    with pytest.raises(ValueError, match="loss must be one of"):
        MSMLConfig(findings=("a",), loss="focal")
    with pytest.raises(ValueError, match="unique"):
        MSMLConfig(findings=("a", "a"))


def test_positive_weights_by_hand():
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1], [1, 0, 1]])
    pw = positive_weights(labels, max_weight=10)
    # finding 0: 3 neg / 2 pos; finding 1: no positive -> 1.0 and reported; finding 2: 1/4
    assert pw.weights.tolist() == pytest.approx([1.5, 1.0, 0.25])
    assert pw.no_positives == (1,)
    assert positive_weights(np.array([[1], [0], [0], [0]]), max_weight=2).weights.tolist() == [2.0]


def test_build_loss_follows_the_config():
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]])
    loss = build_loss(MSMLConfig(findings=FINDINGS), labels)
    assert isinstance(loss, WeightedBCE) and loss.pos_weight.tolist() == [3.0, 3.0, 1.0]
    assert isinstance(build_loss(MSMLConfig(findings=FINDINGS, loss="asymmetric")), AsymmetricLoss)
    assert build_loss(MSMLConfig(findings=FINDINGS, pos_weight="none")).pos_weight is None
    with pytest.raises(ValueError, match="needs the training labels"):
        build_loss(MSMLConfig(findings=FINDINGS))


def test_attention_head_matches_slow_transcription():
    torch.manual_seed(0)
    head = SymptomAttentionHead(4, 2, attention_lambda=0.3, temperature=2.0).eval()
    fmap = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        out = head(fmap)
    w, b = head.classifier.weight[:, :, 0, 0].detach(), head.classifier.bias.detach()
    for n in range(2):
        for label in range(2):
            scores = [float(w[label] @ fmap[n, :, i, j]) for i in range(3) for j in range(3)]
            exps = [np.exp(2.0 * s) for s in scores]
            attended = sum(e * s for e, s in zip(exps, scores)) / sum(exps)
            expected = np.mean(scores) + 0.3 * attended + float(b[label])
            assert float(out[n, label]) == pytest.approx(expected, abs=1e-5)
    # lambda 0: a linear layer on the average-pooled feature
    plain = SymptomAttentionHead(4, 2, attention_lambda=0.0).eval()
    pooled = fmap.mean(dim=(2, 3))
    linear = pooled @ plain.classifier.weight[:, :, 0, 0].T + plain.classifier.bias
    assert torch.allclose(plain(fmap), linear, atol=1e-6)


def test_prepare_images():
    frames = np.zeros((2, 40, 48, 1), np.uint8)
    frames[0] = 255
    x = prepare_images(frames, 32, channels=3)
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(x[0], torch.full((3, 32, 32), 2.0))  # (1 - 0.5) / 0.25
    assert torch.allclose(x[1], torch.full((3, 32, 32), -2.0))
    rgb = np.zeros((1, 32, 32, 3), np.uint8)
    rgb[..., 0] = 255  # channel mean 1/3
    assert torch.allclose(prepare_images(rgb, 32, channels=1), torch.full((1, 1, 32, 32), (1 / 3 - 0.5) / 0.25))
    ramp = np.tile(np.arange(32, dtype=np.uint8) * 8, (4, 32, 1))[..., None]
    a = prepare_images(ramp, 32, 1, np.random.default_rng(5))
    b = prepare_images(ramp, 32, 1, np.random.default_rng(5))
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="uint8"):
        prepare_images(frames.astype(np.float32), 32, 3)


def test_forward_shapes_and_seeded_init():
    config = MSMLConfig(findings=FINDINGS, image_size=32, channels=1, seed=4)
    net = MSMLNet(config)
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
    assert net.embed(torch.zeros(2, 1, 32, 32)).shape == (2, 512)
    twin = MSMLNet(config)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))
    other = MSMLNet(MSMLConfig(findings=FINDINGS, image_size=32, channels=1, seed=5))
    assert not torch.equal(net.head.classifier.weight, other.head.classifier.weight)


def test_a_few_steps_lower_the_loss_on_a_tiny_batch():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, size=(8, 32, 32, 1), dtype=np.uint8)
    targets = np.zeros((8, 2), np.float32)
    for i in range(8):  # finding 0: bright top half; finding 1: bright left half
        if i % 2:
            images[i, :16] += 150
            targets[i, 0] = 1
        if i // 2 % 2:
            images[i, :, :16] += 90
            targets[i, 1] = 1
    config = MSMLConfig(findings=("top", "left"), image_size=32, channels=1, lr=1e-3, dropout=0.0)
    model = MSMLNet(config)
    optimizer = build_optimizer(model, config)
    loss_fn = build_loss(config, targets.astype(int))
    losses = [msml_train_step(model, optimizer, images, targets, loss_fn, 32) for _ in range(12)]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])
    weighted = msml_train_step(model, optimizer, images, targets, loss_fn, 32, sample_weight=np.ones(8),
                               augment_rng=np.random.default_rng(1))
    assert np.isfinite(weighted)
    probs = msml_predict(model, images, 32, batch_size=3)
    assert probs.shape == (8, 2) and probs.min() >= 0 and probs.max() <= 1
    with pytest.raises(ValueError, match="targets must be"):
        msml_train_step(model, optimizer, images, targets[:, :1], loss_fn, 32)


def test_numbers_written_as_yaml_text_are_converted_for_every_job_config(tmp_path):
    """PyYAML reads ``lr: 3e-4`` as the string "3e-4"; each job's config converts it."""
    import yaml

    from cluster.simulate import SimulationConfig
    from ultrasound.uscl import USCLConfig

    values = yaml.safe_load("lr: 3e-4\nepochs: 2\n")
    assert values["lr"] == "3e-4"  # the trap
    assert MSMLConfig.from_dict({"findings": "a,b", **values}).lr == 3e-4
    assert USCLConfig.from_dict(values).lr == 3e-4
    sim = SimulationConfig.from_mapping(yaml.safe_load("confidence: 8e-1\nrounds: '3'\n"))
    assert (sim.confidence, sim.rounds) == (0.8, 3)
    with pytest.raises(ValueError, match="MSML config key 'epochs' needs an int, got 'two'"):
        MSMLConfig.from_dict({"findings": "a", "epochs": "two"})
