"""`sonoray query`'s science: the next videos to label on a pool whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from ultrasound.active.query import HUMAN, MACHINE, next_videos
from ultrasound.manifest import ManifestError, parse_label_sheet


def knowable_pool(seed: int = 0):
    """Two findings that agree, one feature that decides them. Labelled: 10 videos at +-3.
    Unlabelled: 6 videos at 0 (the head cannot tell: the ones to ask about) and 10 at +-6
    (the head is sure: machine-label material, + -> [1, 1], - -> [0, 0]). 4 frames each."""
    rng = np.random.default_rng(seed)
    centres = {**{f"lab{i}": 3.0 * (1 if i % 2 else -1) for i in range(10)},
               **{f"edge{i}": 0.0 for i in range(6)},
               **{f"sure{i}": 6.0 * (1 if i % 2 else -1) for i in range(10)}}
    ids, rows = [], []
    for video, centre in centres.items():
        for _ in range(4):
            ids.append(video)
            rows.append([centre + rng.normal(0, 0.3), rng.normal(0, 1), rng.normal(0, 1)])
    labelled = {v: np.array([1, 1] if centres[v] > 0 else [0, 0]) for v in centres if v.startswith("lab")}
    return np.array(rows, np.float32), np.array(ids), labelled, centres


def test_tsal_asks_about_the_uncertain_videos_and_proposes_the_sure_ones():
    features, ids, labelled, centres = knowable_pool()
    picks = next_videos(features, ids, labelled, 6, "tsal")
    human = [p for p in picks if p.stream == HUMAN]
    machine = [p for p in picks if p.stream == MACHINE]
    assert sorted(p.video_id for p in human) == [f"edge{i}" for i in range(6)]
    assert [p.rank for p in human] == [1, 2, 3, 4, 5, 6]
    assert 0 < len(machine) <= 6 and all(p.video_id.startswith("sure") for p in machine)
    for p in machine:  # the proposal is the side the video sits on, for both findings
        assert p.labels.tolist() == ([1, 1] if centres[p.video_id] > 0 else [0, 0])
    assert [p.score for p in machine] == sorted((p.score for p in machine), reverse=True)


@pytest.mark.parametrize("strategy", ["tsal", "random", "least_margin", "mlm", "self_training"])
def test_a_query_is_budget_distinct_unlabelled_videos(strategy):
    features, ids, labelled, _ = knowable_pool()
    human = [p for p in next_videos(features, ids, labelled, 5, strategy, seed=3) if p.stream == HUMAN]
    chosen = [p.video_id for p in human]
    assert len(chosen) == 5 == len(set(chosen)) and not set(chosen) & set(labelled)


def test_random_picks_differ_from_tsal_on_the_knowable_pool():
    features, ids, labelled, _ = knowable_pool()
    tsal = {p.video_id for p in next_videos(features, ids, labelled, 6, "tsal") if p.stream == HUMAN}
    rand = {p.video_id for p in next_videos(features, ids, labelled, 6, "random") if p.stream == HUMAN}
    assert rand != tsal and not all(v.startswith("edge") for v in rand)


def test_bad_queries_are_refused_naming_why():
    features, ids, labelled, _ = knowable_pool()
    with pytest.raises(ValueError, match="unknown strategy 'tsa'"):
        next_videos(features, ids, labelled, 3, "tsa")
    with pytest.raises(ValueError, match="no frame in the data set"):
        next_videos(features, ids, {**labelled, "ghost": np.array([0, 1])}, 3)
    everything = {v: np.array([0, 0]) for v in set(ids.tolist())}
    with pytest.raises(ValueError, match="nothing left to query"):
        next_videos(features, ids, everything, 3)


def test_label_sheet_reads_answers_and_names_the_bad_cell(tmp_path):
    sheet = tmp_path / "labelled.csv"
    sheet.write_text("video_id,a_lines,b_lines,notes\nv1,yes,0,ok\nv2,1,True,\n")
    assert parse_label_sheet(sheet, ["a_lines", "b_lines"], {"v1", "v2", "v3"}) == {"v1": [1, 0], "v2": [1, 1]}
    sheet.write_text("video_id,a_lines,b_lines\nv1,yes,maybe\n")
    with pytest.raises(ManifestError, match=r"row 2, column 'b_lines': value 'maybe' is not a finding value"):
        parse_label_sheet(sheet, ["a_lines", "b_lines"], {"v1"})
    sheet.write_text("video_id,a_lines,b_lines\nv9,1,1\n")
    with pytest.raises(ManifestError, match=r"row 2, column 'video_id': 'v9' is not a video of the data set"):
        parse_label_sheet(sheet, ["a_lines", "b_lines"], {"v1"})
    sheet.write_text("video_id,a_lines\nv1,1\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['b_lines'\]"):
        parse_label_sheet(sheet, ["a_lines", "b_lines"], {"v1"})
