"""Simulator v2's fidelity rules, end to end on a hand-built embeddings table, in-process
(``executor="serial"``: the same experiment code as the Ray path, no cluster needed).

24 videos x 6 frames, 2 findings that the features reveal with noise, so the head becomes
confident and the machine stream has something to accept."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cluster.embeddings import SampleTable
from cluster.simulate import SimulationConfig, make_splits, simulate_table
from cluster.storage import Storage, parse_uri

VIDEOS, FRAMES = 24, 6


def table() -> SampleTable:
    rng = np.random.default_rng(0)
    video_labels = np.array([[v % 2, (v // 2) % 2] for v in range(VIDEOS)], np.uint8)
    labels = np.repeat(video_labels, FRAMES, axis=0)
    centre = np.repeat(rng.normal(size=(VIDEOS, 8)), FRAMES, axis=0)  # frames of a video look alike
    features = (centre + 0.3 * rng.normal(size=centre.shape)).astype(np.float32)
    features[:, :2] += 3.0 * (labels.astype(np.float32) - 0.5)
    video_id = np.repeat([f"v{v:02d}" for v in range(VIDEOS)], FRAMES)
    return SampleTable(key="hand", findings=("a_lines", "b_lines"), video_id=video_id,
                       patient_id=np.full(video_id.shape, "", dtype=object).astype(str),
                       frame_index=np.tile(np.arange(FRAMES), VIDEOS).astype(np.int64), labels=labels,
                       features=features)


def rounds_of(out, exp_id: str, storage: Storage) -> list[tuple[list[dict], dict]]:
    location = parse_uri(str(out)).join("experiments", exp_id)
    names = sorted((n for n in storage.list_files(location) if n.startswith("round_")),
                   key=lambda n: int(n[6:-8]))
    found = []
    for name in names:
        t = storage.read_parquet(location.join(name))
        found.append((t.to_pylist(), json.loads(t.schema.metadata[b"sonoray.round"])))
    return found


@pytest.fixture(scope="module")
def frame_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim-fidelity")
    config = SimulationConfig(strategies=("tsal", "self_training", "mlm", "random"), seeds=2, rounds=4,
                              initial=0.1, per_round=0.08, confidence=0.8, audit=0.0)
    result = simulate_table(table(), config, str(out), Storage(), executor="serial")
    return out, config, result


def test_frame_rounds_query_one_frame_per_video_and_cap_the_machine_stream(frame_run):
    out, config, result = frame_run
    assert not result.failed
    storage = Storage()
    video_of = table().video_id
    machine_seen = 0
    for exp_id in result.experiment_ids:
        rounds = rounds_of(out, exp_id, storage)
        assert len(rounds) == config.rounds + 1
        for rows, meta in rounds[1:]:
            queried = [video_of[row["global_index"]] for row in rows if row["source"] == "oracle"]
            assert len(queried) == len(set(queried)) == meta["budget_per_round"]  # one frame per video
            machine_new = [row for row in rows if row["source"] == "machine"]
            assert len(machine_new) <= meta["budget_per_round"]  # the default cap: the human budget
            machine_seen += len(machine_new)
            if meta["strategy"] in ("mlm", "random"):
                assert not machine_new and not meta["revoked"]
    assert machine_seen > 0  # the machine stream ran
    entries = result.as_json()["strategies"]
    assert set(entries) == {"tsal", "self_training", "mlm", "random"}
    for entry in entries.values():
        assert {"aulc", "final_map", "machine_labels_per_round", "human_labels_per_round",
                "machine_precision"} <= set(entry)
    assert sum(entries["self_training"]["machine_labels_per_round"]) > 0
    assert entries["mlm"]["machine_labels_per_round"] == [0.0] * (config.rounds + 1)


def test_a_rerun_rebuilds_revocations_and_does_no_work(frame_run):
    out, config, result = frame_run
    again = simulate_table(table(), config, str(out), Storage(), executor="serial")
    assert again.rounds == 0 and again.skipped == result.experiments


def test_video_query_unit_labels_whole_videos_at_one_video_each(tmp_path):
    config = SimulationConfig(strategies=("least_margin", "random"), seeds=1, rounds=3, initial=0.1,
                              per_round=0.1, query_unit="video", cost_unit="video")
    data = table()
    result = simulate_table(data, config, str(tmp_path), Storage(), executor="serial")
    assert not result.failed
    split = make_splits(data, config)[0]
    pool_videos = split.pool_videos
    for exp_id in result.experiment_ids:
        for r, (rows, meta) in enumerate(rounds_of(tmp_path, exp_id, Storage())):
            videos = {data.video_id[row["global_index"]] for row in rows}
            frames = sum(1 for row in rows)
            assert len(videos) == max(1, round(0.1 * pool_videos)) and frames == len(videos) * FRAMES
            assert meta["cost_round"] == pytest.approx(len(videos))  # one video's cost each


def test_video_query_unit_machine_stream_labels_caps_and_audits_whole_videos(tmp_path):
    """TSAL with whole videos: each round's machine labels are whole videos (every frame), at most
    the round's human budget of them, and an audit checks a whole video at one audit's cost."""
    config = SimulationConfig(strategies=("tsal",), seeds=2, rounds=4, initial=0.1, per_round=0.1,
                              query_unit="video", cost_unit="video", confidence=0.8, audit=0.5, audit_cost=0.5)
    data = table()
    result = simulate_table(data, config, str(tmp_path), Storage(), executor="serial")
    assert not result.failed
    frames_of = {v: int((data.video_id == v).sum()) for v in set(data.video_id)}
    machine_videos = 0
    for exp_id in result.experiment_ids:
        for rows, meta in rounds_of(tmp_path, exp_id, Storage())[1:]:
            machine = [row for row in rows if row["source"] == "machine"]
            by_video: dict[str, list[dict]] = {}
            for row in machine:
                by_video.setdefault(data.video_id[row["global_index"]], []).append(row)
            assert len(by_video) <= meta["budget_per_round"]
            for video, video_rows in by_video.items():
                assert len(video_rows) == frames_of[video]  # every frame of the video
                assert len({tuple(row["machine_labels"]) for row in video_rows}) == 1  # one label vector
                assert len({row["audit"] == "none" for row in video_rows}) == 1  # audited whole or not
            audited = [v for v, video_rows in by_video.items() if video_rows[0]["audit"] != "none"]
            assert len(audited) == -(-len(by_video) // 2)  # ceil(0.5 x videos)
            assert sum(row["cost"] for row in machine) == pytest.approx(0.5 * len(audited))
            machine_videos += len(by_video)
    assert machine_videos > 0


def test_query_unit_video_needs_video_costs():
    with pytest.raises(ValueError, match="cost_unit video"):
        SimulationConfig(query_unit="video")


@dataclasses.dataclass(frozen=True)
class FirstFinding:
    """A strategy defined here, not in sonoray: most uncertain on the first finding only."""

    name: str = dataclasses.field(default="first_finding", init=False)
    sharpness: float = 1.0

    def score(self, probs, context):
        return -self.sharpness * np.abs(np.asarray(probs)[:, 0] - 0.5)


def test_a_strategy_registered_here_runs_end_to_end_with_its_parameters_in_the_id(tmp_path):
    from cluster.simulate import plan_experiments, register_strategy

    register_strategy(FirstFinding, sharpness=2.0)
    with pytest.raises(ValueError, match="no parameter"):
        register_strategy(FirstFinding, steepness=2.0)  # parameters are validated at registration
    register_strategy(FirstFinding, sharpness=2.0)
    config = SimulationConfig(strategies=("first_finding", "random"), seeds=1, rounds=2, initial=0.1, per_round=0.1)
    data = table()
    result = simulate_table(data, config, str(tmp_path), Storage(), executor="serial")
    assert not result.failed and result.rounds == 2 * (config.rounds + 1)
    assert "first_finding" in result.as_json()["strategies"]
    spec = next(s for s in plan_experiments(data, config) if s.strategy == "first_finding")
    assert spec.settings["strategy_params"] == {"sharpness": 2.0}
    register_strategy(FirstFinding, sharpness=3.0)
    other = next(s for s in plan_experiments(data, config) if s.strategy == "first_finding")
    assert other.experiment_id != spec.experiment_id  # its parameters are part of the id


def test_an_extended_run_resumes_to_the_rounds_of_an_uninterrupted_one(tmp_path):
    """Rounds 0-2 stored, then the run asked for 5: the restored state (revocations included)
    must continue exactly where a run of 5 from scratch goes."""
    config = SimulationConfig(strategies=("tsal", "self_training"), seeds=1, rounds=5, initial=0.1,
                              per_round=0.08, confidence=0.75, audit=0.2)
    data = table()
    short = config.replace(rounds=2)
    simulate_table(data, short, str(tmp_path / "resumed"), Storage(), executor="serial", report=False)
    resumed = simulate_table(data, config, str(tmp_path / "resumed"), Storage(), executor="serial")
    fresh = simulate_table(data, config, str(tmp_path / "fresh"), Storage(), executor="serial")
    assert resumed.resumed_rounds == 2 * 3 and resumed.rounds == 2 * 3
    timing = {"fit_seconds", "round_seconds", "rounds_target"}  # the target was 2 for the first rounds
    revoked = 0
    for exp_id in fresh.experiment_ids:
        a = rounds_of(tmp_path / "resumed", exp_id, Storage())
        b = rounds_of(tmp_path / "fresh", exp_id, Storage())
        assert len(a) == len(b) == config.rounds + 1
        for (rows_a, meta_a), (rows_b, meta_b) in zip(a, b):
            assert rows_a == rows_b
            assert {k: v for k, v in meta_a.items() if k not in timing} == \
                {k: v for k, v in meta_b.items() if k not in timing}
            revoked += meta_b["machine_revoked"]
    assert fresh.as_json()["strategies"]["tsal"]["machine_precision"] is not None
    assert revoked > 0  # the resumed rounds had machine labels to take back


def test_a_batch_of_experiments_gives_the_rounds_of_one_at_a_time_runs(tmp_path, monkeypatch):
    """Eight experiments (four kinds x two seeds) in one lockstep batch, their heads fitted as
    one batched solve, against the same eight run one at a time: every round's records are
    equal and every metric agrees to 1e-6."""
    from ultrasound.active import learners

    batch_sizes: list[int] = []
    solve = learners.train_heads

    def recording(problems, **kwargs):
        batch_sizes.append(len(problems))
        return solve(problems, **kwargs)

    monkeypatch.setattr(learners, "train_heads", recording)
    config = SimulationConfig(strategies=("tsal", "self_training", "mlm", "random"), seeds=2, rounds=5,
                              initial=0.1, per_round=0.08, confidence=0.75, audit=0.2)
    data = table()
    together = simulate_table(data, config, str(tmp_path / "batch"), Storage(), executor="serial", batch_size=8,
                              report=False)
    assert max(batch_sizes) == 8
    batch_sizes.clear()
    alone = simulate_table(data, config, str(tmp_path / "alone"), Storage(), executor="serial", batch_size=1,
                           report=False)
    assert set(batch_sizes) == {1}
    assert not together.failed and not alone.failed and together.rounds == alone.rounds == 8 * 6
    timing = {"fit_seconds", "round_seconds"}
    revoked = machine = 0
    for exp_id in together.experiment_ids:
        a = rounds_of(tmp_path / "batch", exp_id, Storage())
        b = rounds_of(tmp_path / "alone", exp_id, Storage())
        assert len(a) == len(b) == config.rounds + 1
        for (rows_a, meta_a), (rows_b, meta_b) in zip(a, b):
            assert rows_a == rows_b
            for key in meta_b.keys() - timing:
                if isinstance(meta_b[key], float):
                    assert meta_a[key] == pytest.approx(meta_b[key], abs=1e-6), key
                elif key == "per_finding_ap":
                    assert meta_a[key] == pytest.approx(meta_b[key], abs=1e-6)
                else:
                    assert meta_a[key] == meta_b[key], key
            revoked += meta_b["machine_revoked"]
            machine += meta_b["machine_new"]
    assert machine > 0 and revoked > 0  # both streams and the re-validation ran
