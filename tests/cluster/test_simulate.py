"""The labelling-budget simulator on a real local Ray, phantom clips and the loopback S3 server.

Tiny sizes: 8 phantom clips, 12 frames each at 32 px, 2-3 strategies x 2 seeds x 3 rounds.
"""
import json

import numpy as np
import pytest
import torch

from cluster.dataset import load_dataset
from cluster.embeddings import SampleSpec, load_samples
from cluster.simulate import (
    FaultInjection,
    SimulationConfig,
    completed_rounds,
    make_splits,
    plan_experiments,
    simulate,
    simulate_table,
)
from cluster.storage import parse_uri
from jobs.cli import main
from tests.conftest import run_cli
from ultrasound.backbone import ResNet18Backbone
from ultrasound.msml import prepare_images

TIMING = {"fit_seconds", "round_seconds"}
SAMPLING = ["--fps", "0", "--max-per-video", "12", "--size", "32", "--channels", "1"]
SETTINGS = ["--strategies", "tsal,random,least_margin", "--seeds", "2", "--rounds", "3", "--initial", "0.1",
            "--per-round", "0.1", "--confidence", "0.7"]
CONFIG = SimulationConfig(strategies=("tsal", "random", "least_margin"), seeds=2, rounds=3, initial=0.1,
                          per_round=0.1, confidence=0.7)
SPEC = SampleSpec(fps=None, max_per_video=12, size=32, channels=1)


@pytest.fixture(scope="module")
def cache_uri(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sim-cache"))


@pytest.fixture(scope="module")
def clean_run(ray_cluster, phantom_uri, cache_uri, storage):
    """One uninterrupted simulation into S3 through the CLI; (out URI, its JSON)."""
    out = "s3://sonoray-test/sim-clean"
    code, result = run_cli(main, ["simulate", "--data", phantom_uri, "--out", out, "--cache", cache_uri,
                                  *SAMPLING, *SETTINGS, "--json"])
    assert code == 0
    return out, result


def snapshot(storage, out_uri: str) -> dict:
    """Every round of every experiment: (records, metadata without timings), and the references."""
    out = parse_uri(out_uri)
    found: dict = {}
    for path in storage.list_files(out.join("experiments")):
        exp_id, _, name = path.partition("/")
        if name.startswith("round_"):
            table = storage.read_parquet(out.join("experiments", path))
            meta = json.loads(table.schema.metadata[b"sonoray.round"])
            found[(exp_id, name)] = (table.to_pylist(), {k: v for k, v in meta.items() if k not in TIMING})
    for name in storage.list_files(out.join("reference")):
        row = storage.read_parquet(out.join("reference", name)).to_pylist()[0]
        found[("reference", name)] = {k: v for k, v in row.items() if k != "seconds"}
    return found


@pytest.mark.timeout(600)
def test_simulation_writes_every_round_and_the_oracle_saw_only_its_queries(clean_run, storage, phantom_uri,
                                                                           cache_uri):
    out_uri, result = clean_run
    assert (result["experiments"], result["rounds"], result["resumed_rounds"], result["failed"]) == (6, 24, 0, 0)
    assert set(result["strategies"]) == {"tsal", "random", "least_margin"}
    assert result["report"] == f"{out_uri}/report/report.md"
    out = parse_uri(out_uri)
    assert storage.read_bytes(out.join("report", "learning_curves.png"))[:4] == b"\x89PNG"

    table, cached = load_samples(load_dataset(phantom_uri, storage), SPEC, parse_uri(cache_uri), storage)
    assert cached and table.features.shape == (len(table), 512)
    splits = make_splits(table, CONFIG)
    rows = snapshot(storage, out_uri)
    for spec in plan_experiments(table, CONFIG):
        split = splits[spec.seed]
        names = [f"round_{r}.parquet" for r in range(4)]
        records = [rec for name in names for rec in rows[(spec.experiment_id, name)][0]]
        metas = [rows[(spec.experiment_id, name)][1] for name in names]
        pool = split.train
        assert [m["round"] for m in metas] == [0, 1, 2, 3]
        assert all(np.isfinite(m["map"]) and 0 <= m["map"] <= 1 for m in metas)
        assert metas[0]["labelled"] == metas[0]["budget_initial"] == round(0.1 * pool.size)
        human = [r for r in records if r["source"] != "machine" or r["audit"] != "none"]
        assert sum(r["cost"] for r in records) == pytest.approx(metas[-1]["cost_total"])
        if spec.strategy != "tsal":
            assert len(records) == metas[0]["budget_initial"] + 3 * metas[0]["budget_per_round"]
            assert not [r for r in records if r["source"] == "machine"]
        # global indices are the pool's, never a test sample
        assert all(pool[r["index"]] == r["global_index"] for r in records)
        assert not set(r["global_index"] for r in records) & set(split.test.tolist())
        # the oracle's log of this experiment = exactly the human-labelled samples, costs included
        log = storage.read_parquet(out.join("experiments", spec.experiment_id, "oracle_log.parquet")).to_pylist()
        assert sorted(e["index"] for e in log) == sorted(r["global_index"] for r in human)
        assert sum(e["cost"] for e in log) == pytest.approx(metas[-1]["cost_total"])
        truth = {int(i): y for i, y in zip(pool, table.labels[pool].tolist())}
        assert all(e["labels"] == truth[e["index"]] for e in log)  # noise 0: the truth, asked for


@pytest.mark.timeout(600)
def test_rerun_does_no_work_and_report_rebuilds_the_same_table(clean_run, storage, phantom_uri, cache_uri):
    out_uri, first = clean_run
    before = snapshot(storage, out_uri)
    code, again = run_cli(main, ["simulate", "--data", phantom_uri, "--out", out_uri, "--cache", cache_uri,
                                 *SAMPLING, *SETTINGS, "--json"])
    assert code == 0
    assert (again["rounds"], again["resumed_rounds"], again["skipped"]) == (0, 24, 6)
    assert again["strategies"] == first["strategies"]
    assert snapshot(storage, out_uri) == before

    report_json = json.loads(storage.read_bytes(parse_uri(out_uri).join("report", "report.json")))
    code, rebuilt = run_cli(main, ["report", out_uri, "--json"])
    assert code == 0
    assert rebuilt["strategies"] == first["strategies"] and rebuilt["experiments"] == 6 and rebuilt["rounds"] == 24
    assert json.loads(storage.read_bytes(parse_uri(out_uri).join("report", "report.json"))) == report_json


@pytest.mark.timeout(600)
def test_killed_experiment_resumes_from_its_last_round_with_the_same_result(clean_run, storage, phantom_uri,
                                                                          cache_uri, tmp_path):
    out_uri, _ = clean_run
    data = load_dataset(phantom_uri, storage)
    table, _ = load_samples(data, SPEC, parse_uri(cache_uri), storage)
    victim = next(s for s in plan_experiments(table, CONFIG) if s.strategy == "tsal" and s.seed == 1)

    # 1. the worker running the experiment dies right after round 1 is written; no retry
    crashed = str(tmp_path / "crashed")
    fault = FaultInjection(victim.experiment_id, after_round=1, marker_uri=str(tmp_path / "marker1"))
    result = simulate(phantom_uri, CONFIG, crashed, storage, SPEC, cache_uri=cache_uri, fault=fault, max_retries=0)
    assert [f["experiment_id"] for f in result.failed] == [victim.experiment_id]
    files = storage.list_files(parse_uri(crashed).join("experiments", victim.experiment_id))
    assert completed_rounds(files) == 2 and "oracle_log.parquet" not in files
    # 2. the same command again resumes it from round 2 and recomputes nothing else
    code, rerun = run_cli(main, ["simulate", "--data", phantom_uri, "--out", crashed, "--cache", cache_uri,
                                 *SAMPLING, *SETTINGS, "--json"])
    assert code == 0
    assert (rerun["rounds"], rerun["resumed_rounds"], rerun["skipped"], rerun["failed"]) == (2, 22, 5, 0)
    assert snapshot(storage, crashed) == snapshot(storage, out_uri)

    # 3. with retries the crash is absorbed in the same run: Ray retries the task, which resumes
    retried = str(tmp_path / "retried")
    fault = FaultInjection(victim.experiment_id, after_round=2, marker_uri=str(tmp_path / "marker2"))
    result = simulate(phantom_uri, CONFIG, retried, storage, SPEC, cache_uri=cache_uri, fault=fault, max_retries=1)
    assert result.failed == [] and result.rounds == 24 - 3 and result.resumed_rounds == 3
    assert snapshot(storage, retried) == snapshot(storage, out_uri)


@pytest.mark.timeout(600)
def test_the_oracle_killed_mid_simulation_gives_the_uninterrupted_result(clean_run, storage, phantom_uri,
                                                                        cache_uri, tmp_path):
    """`ray.kill` of the oracle actor while experiments run: it restarts with empty ledgers, the
    experiments that talk to it next are retried and resume from their persisted rounds."""
    import threading
    import time

    import ray
    from ray.util.state import list_actors

    from cluster.simulate import ORACLE_ACTOR_PREFIX

    out_uri, _ = clean_run
    table, _ = load_samples(load_dataset(phantom_uri, storage), SPEC, parse_uri(cache_uri), storage)
    killed = str(tmp_path / "oracle-killed")
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=simulate_table(table, CONFIG, killed, storage)))
    runner.start()
    rounds_dir = tmp_path / "oracle-killed" / "experiments"
    deadline = time.monotonic() + 300
    while len(list(rounds_dir.glob("*/round_*.parquet"))) < 6 and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    oracles = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
               if (a.name or "").startswith(ORACLE_ACTOR_PREFIX)]
    assert runner.is_alive() and len(oracles) == 1  # mid-simulation: its oracle is alive, work is left
    written_before_kill = len(list(rounds_dir.glob("*/round_*.parquet")))
    ray.kill(ray.get_actor(oracles[0].name), no_restart=False)
    runner.join(timeout=400)
    result = outcome["result"]
    assert written_before_kill < 24
    assert result.failed == [] and result.resumed_rounds >= 1  # someone was interrupted and resumed
    assert result.rounds + result.resumed_rounds >= 24
    assert snapshot(storage, killed) == snapshot(storage, out_uri)


@pytest.mark.timeout(600)
def test_serial_run_in_one_process_gives_the_ray_results(clean_run, storage, phantom_uri, cache_uri, tmp_path):
    out_uri, first = clean_run
    table, _ = load_samples(load_dataset(phantom_uri, storage), SPEC, parse_uri(cache_uri), storage)
    result = simulate_table(table, CONFIG, str(tmp_path / "serial"), storage, executor="serial")
    assert result.rounds == 24 and not result.failed
    assert snapshot(storage, str(tmp_path / "serial")) == snapshot(storage, out_uri)


def test_bad_config_key_fails_naming_the_valid_keys(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("confidence: 0.95\nthreshhold: 0.9\n")
    code, _ = run_cli(main, ["simulate", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                             "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert "threshhold" in err and "valid keys" in err and "correlation_weight" in err and "confidence" in err


def test_config_file_then_flags(tmp_path):
    from jobs.cli import build_parser
    from jobs.simulate import config_from_args
    from cluster.storage import Storage

    config = tmp_path / "sweep.yaml"
    config.write_text("confidence: 0.95\ncorrelation_weight: 0.2\nper_round: 0.2\nstrategies: tsal,random\n")
    args = build_parser().parse_args(["simulate", "--data", "d", "--out", "o", "--config", str(config),
                                      "--per-round", "0.1"])
    cfg = config_from_args(args, Storage())
    assert (cfg.confidence, cfg.correlation_weight, cfg.per_round, cfg.strategies) == (0.95, 0.2, 0.1,
                                                                                        ("tsal", "random"))
    assert cfg.confidence_config().threshold == 0.95 and cfg.strategy("tsal").correlation_weight == 0.2
    # the TSAL settings are part of TSAL's experiment id, not of the baselines'
    a, b = SimulationConfig(confidence=0.9), SimulationConfig(confidence=0.95)
    assert a.experiment_settings("tsal") != b.experiment_settings("tsal")
    assert a.experiment_settings("random") == b.experiment_settings("random")


@pytest.mark.timeout(600)
def test_embeddings_are_the_trunk_features_of_the_streamed_frames(ray_cluster, phantom_uri, storage, tmp_path):
    """A USCL-style checkpoint (``{"model": {"backbone.*": ...}}``) is loaded by the embedding
    actors: their output equals the same trunk applied here to the same (sorted) frames."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        backbone = ResNet18Backbone(in_channels=1)
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, checkpoint)
    data = load_dataset(phantom_uri, storage).select([f"phantom_{i:04d}" for i in range(3)])
    spec = SampleSpec(fps=None, max_per_video=5, size=32, channels=1, init=str(checkpoint))
    cache = parse_uri(str(tmp_path / "cache"))
    table, cached = load_samples(data, spec, cache, storage)
    images, _ = load_samples(data, SampleSpec(kind="images", fps=None, max_per_video=5, size=32, channels=1),
                             cache, storage)
    assert not cached and table.features.shape == (15, 512) and images.features.shape == (15, 32, 32, 1)
    assert table.video_id.tolist() == images.video_id.tolist() == sorted(table.video_id.tolist())
    assert all(np.all(np.diff(table.frame_index[table.video_id == v]) > 0) for v in set(table.video_id))
    truth = {r["video_id"]: [r[f] for f in data.findings] for r in data.rows}
    assert table.labels.tolist() == [truth[v] for v in table.video_id]
    backbone.eval()
    with torch.no_grad():
        expected = backbone(prepare_images(images.features, 32, 1)).numpy()
    assert np.allclose(table.features, expected, atol=1e-4)
    again, cached = load_samples(data, spec, cache, storage)  # cache hit: no Ray Data
    assert cached and np.array_equal(again.features, table.features)
    random_init, _ = load_samples(data, SampleSpec(fps=None, max_per_video=5, size=32, channels=1), cache, storage)
    assert random_init.key != table.key and not np.allclose(random_init.features, table.features)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_finetune_mode_retrains_msml_each_round(ray_cluster, phantom_uri, storage, cache_uri, tmp_path):
    """Finetune mode at a tiny size: MSML on 32 px frames, 1 epoch, 1 strategy x 1 seed x 1 round."""
    config = SimulationConfig(strategies=("least_margin",), seeds=1, rounds=1, initial=0.3, per_round=0.2,
                              mode="finetune", finetune_epochs=1, finetune_batch_size=8)
    out = str(tmp_path / "finetune")
    result = simulate(phantom_uri, config, out, storage, SPEC, cache_uri=cache_uri)
    assert not result.failed and result.rounds == 2
    rows = snapshot(storage, out)
    metas = [v[1] for k, v in sorted(rows.items()) if k[0] != "reference"]
    assert [m["round"] for m in metas] == [0, 1] and all(np.isfinite(m["map"]) for m in metas)
    assert metas[1]["labelled"] == metas[0]["labelled"] + metas[0]["budget_per_round"]
    refs = [v for k, v in rows.items() if k[0] == "reference"]
    assert len(refs) == 1 and np.isfinite(refs[0]["map"])


def test_principal_components_match_the_svd_and_repeat_exactly():
    from cluster.embeddings import principal_components

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 3)) @ rng.normal(size=(3, 16)) + 0.01 * rng.normal(size=(200, 16))).astype(np.float32)
    got = principal_components(x, 3)
    centred = x.astype(np.float64) - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:3].T
    assert np.allclose(np.abs(got), np.abs(expected), atol=1e-4)  # the same axes, up to sign
    assert np.array_equal(principal_components(x, 3), got)
    # the projection is part of an experiment's id only when it is used
    assert "embedding_dims" not in SimulationConfig().experiment_settings("random")
    assert SimulationConfig(embedding_dims=8).experiment_settings("random")["embedding_dims"] == 8


@pytest.mark.timeout(600)
def test_a_corrupt_round_file_is_recomputed_on_rerun_not_trusted(ray_cluster, storage, phantom_uri, cache_uri,
                                                                 tmp_path):
    table, _ = load_samples(load_dataset(phantom_uri, storage), SPEC, parse_uri(cache_uri), storage)
    out_uri = str(tmp_path / "sim")
    assert simulate_table(table, CONFIG, out_uri, storage, executor="serial").rounds == 24
    before = snapshot(storage, out_uri)
    victims = [s.experiment_id for s in plan_experiments(table, CONFIG)][:2]
    torn = tmp_path / "sim" / "experiments" / victims[0] / "round_2.parquet"
    torn.write_bytes(torn.read_bytes()[: len(torn.read_bytes()) // 2])  # a write cut short
    (tmp_path / "sim" / "experiments" / victims[1] / "round_0.parquet").write_bytes(b"not parquet")

    again = simulate_table(table, CONFIG, out_uri, storage, executor="serial")
    assert not again.failed
    assert again.rounds == 2 + 4  # rounds 2-3 of the first victim, all 4 of the second
    assert snapshot(storage, out_uri) == before


def test_positive_weights_count_only_the_human_labels():
    from cluster.simulate import human_positive_weights

    labels = np.array([[1], [0], [0], [0], [1], [1], [1], [1]], np.uint8)
    verified = np.array([True] * 4 + [False] * 4)  # a flood of positive machine labels
    assert human_positive_weights(labels, verified).tolist() == [3.0]  # 3 negatives / 1 positive
    assert human_positive_weights(labels, None) == "auto"


def test_machine_cap_defaults_to_the_round_budget():
    config = SimulationConfig()
    assert config.confidence_config(7).max_per_round == 7
    assert SimulationConfig.from_mapping({"max_machine_per_round": "none"}).confidence_config(7).max_per_round is None
    assert SimulationConfig.from_mapping({"max_machine_per_round": "12"}).confidence_config(7).max_per_round == 12
    with pytest.raises(ValueError, match="max_machine_per_round"):
        SimulationConfig.from_mapping({"max_machine_per_round": "lots"})
    # the machine stream alone, and the query stream alone, are arms of their own
    assert config.strategy("self_training").name == "random" and config.strategy("mlm").name == "mlm"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_query_writes_the_next_videos_never_a_labelled_one(ray_cluster, phantom_uri, cache_uri, storage, tmp_path):
    """`sonoray query` on the phantom pool with 3 videos labelled: next.csv holds the budget's
    distinct unlabelled videos as human rows, and the answers sheet round-trips as --labelled."""
    import pandas as pd

    from ultrasound import phantom

    data = load_dataset(phantom_uri, storage)
    ids = [r["video_id"] for r in data.rows]
    sheet = tmp_path / "labelled.csv"
    pd.DataFrame([{"video_id": v, **{f: int(r[f]) for f in phantom.FINDINGS}}
                  for v, r in zip(ids[:3], data.rows[:3])]).to_csv(sheet, index=False)
    out = tmp_path / "next.csv"
    code, result = run_cli(main, ["query", "--data", phantom_uri, "--labelled", str(sheet), "--budget", "3",
                                  "--out", str(out), "--cache", cache_uri, *SAMPLING, "--json"])
    assert code == 0
    table = pd.read_csv(out)
    human = table[table["stream"] == "human"]
    assert human["rank"].tolist() == [1, 2, 3] and human["video_id"].is_unique
    assert not set(human["video_id"]) & set(ids[:3]) and set(human["video_id"]) <= set(ids)
    assert human["video_id"].tolist() == result["next"]
    assert set(table.columns) >= {"video_id", "key", "score", "rank", "confidence",
                                  *phantom.FINDINGS, *(f"{f}_p" for f in phantom.FINDINGS)}
    assert (table[table["stream"] == "machine"]["video_id"].isin(ids[3:])).all()
    code, _ = run_cli(main, ["query", "--data", phantom_uri, "--labelled", str(tmp_path / "none.csv"),
                             "--budget", "3", "--out", str(out), "--cache", cache_uri, *SAMPLING])
    assert code == 2
