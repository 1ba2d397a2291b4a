"""The oracle actor: answers only what is asked, inside the asker's pool, and its costs add up."""
import numpy as np
import pytest

from cluster.oracle import Oracle, OracleBook, OracleClient, OracleError, UnknownAsker

TRUTH = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=np.uint8)
VIDEOS = np.array(["a", "a", "a", "b", "b", "c"])
PUBLIC = {"answer_round", "answer_rounds", "askers", "audit", "costs", "grade", "log", "num_labels", "num_samples", "query",
          "register", "restore"}


@pytest.mark.timeout(300)
def test_actor_answers_only_the_queried_samples_and_counts_video_costs(ray_cluster):
    oracle = OracleClient(Oracle.remote(TRUTH, VIDEOS, cost_unit="video", audit_cost=0.25))
    oracle.register("exp", [0, 1, 2, 3, 4])
    assert oracle.log("exp")["index"].size == 0  # nothing revealed before a query

    labels, costs = oracle.query("exp", 0, [1, 3])
    assert labels.tolist() == TRUTH[[1, 3]].tolist() and costs.tolist() == [1.0, 1.0]
    labels, costs = oracle.query("exp", 1, [0, 4, 2])  # videos a and b already watched
    assert labels.tolist() == TRUTH[[0, 4, 2]].tolist() and costs.tolist() == [0.0, 0.0, 0.0]
    labels, costs = oracle.audit("exp", 1, [4])
    assert labels.tolist() == TRUTH[[4]].tolist() and costs.tolist() == [0.25]

    with pytest.raises(OracleError, match="outside its pool"):
        oracle.query("exp", 2, [5])  # sample 5 is someone else's (a test sample)
    with pytest.raises(OracleError, match="duplicates"):
        oracle.query("exp", 2, [0, 0])
    with pytest.raises(UnknownAsker):
        oracle.query("stranger", 1, [0])

    log = oracle.log("exp")
    assert log["index"].tolist() == [1, 3, 0, 4, 2, 4]
    assert log["round"].tolist() == [0, 0, 1, 1, 1, 1]
    assert log["kind"].tolist() == ["query"] * 5 + ["audit"]
    assert log["labels"].tolist() == TRUTH[[1, 3, 0, 4, 2, 4]].tolist()
    assert log["cost"].tolist() == [1, 1, 0, 0, 0, 0.25]
    assert oracle.costs("exp") == {"query": 2.0, "audit": 0.25, "answers": 6, "total": 2.25}

    grade = oracle.grade("exp", [0, 2], np.array([[1, 0, 0], [1, 0, 1]]))
    assert grade == {"n": 2, "vectors_correct": 1, "labels_correct": 5, "labels_total": 6}
    assert oracle.log("exp")["index"].size == 6  # grading reveals and logs nothing

    # one planned round in one call: the same answers, costs and grade as the three calls
    oracle.register("exp", [0, 1, 2, 3, 4])
    answer = oracle.answer_round("exp", 0, [1, 3], [4], [0, 2], np.array([[1, 0, 0], [1, 0, 1]]))
    assert answer["labels"].tolist() == TRUTH[[1, 3]].tolist() and answer["costs"].tolist() == [1.0, 1.0]
    assert answer["audit_labels"].tolist() == TRUTH[[4]].tolist() and answer["audit_costs"].tolist() == [0.25]
    assert answer["grade"] == grade
    assert oracle.log("exp")["index"].tolist() == [1, 3, 4]


def test_frame_costs_add_up_per_asker():
    book = OracleBook(TRUTH, VIDEOS, cost_unit="frame", audit_cost=0.5)
    book.register("one", None)
    book.register("two", None)
    book.query("one", 0, [0, 1, 2])
    book.query("two", 0, [5])
    book.query("one", 1, [3])
    book.audit("one", 1, [4, 5])
    assert book.costs("one") == {"query": 4.0, "audit": 1.0, "answers": 6, "total": 5.0}
    assert book.costs("two")["total"] == 1.0
    assert book.costs()["total"] == 6.0
    assert book.log()["asker"].tolist().count("one") == 6


def test_video_cost_within_one_query_charges_the_first_frame():
    book = OracleBook(TRUTH, VIDEOS, cost_unit="video")
    book.register("exp", None)
    assert book.query("exp", 0, [2, 0, 5, 1]).__getitem__(1).tolist() == [1, 0, 1, 0]
    book.register("other", None)  # another experiment pays for its own viewing
    assert book.query("other", 0, [1]).__getitem__(1).tolist() == [1]


def test_no_method_hands_out_the_truth():
    """Tripwire: the public surface is the documented one; anything new must be reviewed."""
    assert {name for name in dir(OracleBook) if not name.startswith("_")} == PUBLIC


def test_a_batch_of_rounds_answers_as_one_call_each_and_keeps_errors_in_place():
    """answer_rounds (one actor round trip for a batch of experiments) equals answer_round per
    asker; an unknown asker's error comes back in its slot, the others are answered."""
    from cluster.oracle import UnknownAsker

    truth = (np.random.default_rng(1).random((30, 3)) < 0.4).astype(np.uint8)
    one, many = (OracleBook(truth, np.arange(30).astype(str)) for _ in range(2))
    for book in (one, many):
        book.register("a", None)
        book.register("b", None)
    requests = [("a", 1, [1, 2], [], [], np.zeros((0, 3), np.uint8)),
                ("ghost", 1, [3], [], [], np.zeros((0, 3), np.uint8)),
                ("b", 1, [4], [5], [5], truth[[5]])]
    answers = many.answer_rounds(requests)
    assert isinstance(answers[1], UnknownAsker)
    for got, args in zip((answers[0], answers[2]), (requests[0], requests[2])):
        want = one.answer_round(*args)
        assert np.array_equal(got["labels"], want["labels"]) and np.array_equal(got["costs"], want["costs"])
        assert got["grade"] == want["grade"]
    assert many.costs() == one.costs()


def test_noise_is_seeded_per_noise_key_and_repeatable():
    rng = np.random.default_rng(0)
    truth = (rng.random((4000, 4)) < 0.3).astype(np.uint8)
    book = OracleBook(truth, np.arange(4000).astype(str), noise=0.2, noise_seed=7)
    everything = np.arange(4000)
    for asker, key in (("a", 1), ("b", 1), ("c", 2)):
        book.register(asker, None, noise_key=key)
    a, _ = book.query("a", 0, everything)
    b, _ = book.query("b", 0, everything)
    c, _ = book.query("c", 0, everything)
    assert abs((a != truth).mean() - 0.2) < 0.01
    assert np.array_equal(a, b)  # same experiment seed: same annotator errors
    assert not np.array_equal(a, c)
    again = OracleBook(truth, np.arange(4000).astype(str), noise=0.2, noise_seed=7)
    again.register("a", None, noise_key=1)
    assert np.array_equal(again.query("a", 0, everything[::-1])[0], a[::-1])  # order does not matter
    book.register("d", None, noise_key=1)
    grade = book.grade("d", everything, a)  # grading compares with the noise-free truth
    assert grade["labels_correct"] == int((a == truth).sum())


def test_restore_rebuilds_the_ledger_and_voids_unfinished_rounds():
    book = OracleBook(TRUTH, VIDEOS, cost_unit="video")
    book.register("exp", None)
    first, costs0 = book.query("exp", 0, [0, 3])
    book.query("exp", 1, [5])  # round 1 never completed (not persisted)
    saved = [{"index": i, "round": 0, "kind": "query", "labels": y, "cost": c}
             for i, y, c in zip([0, 3], first.tolist(), costs0)]

    fresh = OracleBook(TRUTH, VIDEOS, cost_unit="video")  # e.g. a new process after a crash
    for oracle in (book, fresh):
        oracle.register("exp", None)
        oracle.restore("exp", saved)
        assert oracle.log("exp")["index"].tolist() == [0, 3]
        assert oracle.costs("exp")["total"] == 2.0
        # videos a and b were paid in round 0; c was only seen in the voided round
        assert oracle.query("exp", 1, [1, 4, 5])[1].tolist() == [0.0, 0.0, 1.0]

    tampered = [dict(saved[0], labels=[0, 1, 1])]
    with pytest.raises(OracleError, match="not what this oracle answers"):
        fresh.restore("exp", tampered)


def test_video_cost_unit_charges_an_audit_once_per_video():
    """Video unit: a reviewer confirms a clip's label once, so an audit call charges one
    ``audit_cost`` per video (its first frame in the call) and the frame unit charges each frame."""
    videos = OracleBook(TRUTH, VIDEOS, cost_unit="video", audit_cost=0.5)
    videos.register("exp", None)
    assert videos.audit("exp", 1, [0, 1, 2, 3, 5])[1].tolist() == [0.5, 0.0, 0.0, 0.5, 0.5]
    assert videos.audit("exp", 2, [4])[1].tolist() == [0.5]  # a later round's audit pays again
    assert videos.costs("exp")["audit"] == 2.0
    frames = OracleBook(TRUTH, VIDEOS, cost_unit="frame", audit_cost=0.5)
    frames.register("exp", None)
    assert frames.audit("exp", 1, [0, 1, 2])[1].tolist() == [0.5, 0.5, 0.5]
