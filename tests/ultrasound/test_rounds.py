"""The two-stream round: exactly budget_k oracle queries outside the labelled set, machine labels
only from unlabelled non-queried samples that pass validation, audits drawn from them; applying
the answers; and a short embeddings-mode loop that resumes from records to the same result."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ultrasound.active.confidence import ConfidenceConfig, confidence_validate
from ultrasound.active.head import predict_head, train_head
from ultrasound.active.rounds import RoundPlan, apply_answers, round_rng, tsal_round
from ultrasound.active.state import ALState
from ultrasound.active.strategies import StrategyContext, make_strategy

POOL, L = 40, 3


def setup(seed=0):
    rng = np.random.default_rng(seed)
    truth = (rng.random((POOL, L)) < 0.4).astype(np.uint8)
    state = ALState(L).with_labels(np.arange(8), truth[:8], source="initial", round=0)
    unlabelled = state.unlabelled_indices(POOL)
    probs = rng.uniform(0.2, 0.8, size=(unlabelled.size, L))
    confident = rng.random(unlabelled.size) < 0.5  # half the pool is confidently predicted
    probs[confident] = np.where(rng.random((confident.sum(), L)) < 0.5, 0.03, 0.97)
    return truth, state, unlabelled, probs


def plan_for(state, unlabelled, probs, confidence=ConfidenceConfig(), audit=0.3, k=5, seed=1, strategy="mlm"):
    ctx = StrategyContext(labelled_labels=state.labels_of(state.verified_indices()), rng=np.random.default_rng(seed))
    return tsal_round(probs, unlabelled, state, k, make_strategy(strategy), ctx, confidence, audit,
                      np.random.default_rng(seed + 100))


def test_queries_and_machine_labels_come_from_the_right_places():
    truth, state, unlabelled, probs = setup()
    plan = plan_for(state, unlabelled, probs)
    assert plan.round == 1
    assert plan.queries.size == 5 and np.unique(plan.queries).size == 5
    assert set(plan.queries) <= set(unlabelled)
    assert not set(plan.queries) & set(state.labelled_indices())
    # the queries are the 5 best MLM scores
    ctx = StrategyContext(state.labels_of(state.verified_indices()), np.random.default_rng(0))
    scores = make_strategy("mlm").score(probs, ctx)
    assert plan.queries.tolist() == unlabelled[np.argsort(-scores)[:5]].tolist()
    assert plan.query_scores == pytest.approx(np.sort(scores)[::-1][:5])
    # machine labels: exactly the validated samples among the unlabelled, non-queried ones
    rest = np.setdiff1d(unlabelled, plan.queries)
    position = {int(i): p for p, i in enumerate(unlabelled)}
    rows = [position[int(i)] for i in rest]
    check = confidence_validate(probs[rows], state.labels_of(state.verified_indices()))
    assert plan.machine_indices.tolist() == rest[check.accepted].tolist()
    assert plan.machine_indices.size > 0
    assert not set(plan.machine_indices) & set(plan.queries)
    assert not set(plan.machine_indices) & set(state.labelled_indices())
    assert plan.machine_labels.tolist() == check.labels[check.accepted].tolist()
    # audits: ceil(0.3 * m) of the machine labels
    assert plan.audits.size == math.ceil(0.3 * plan.machine_indices.size)
    assert set(plan.audits) <= set(plan.machine_indices)


def test_baselines_switch_the_machine_stream_off():
    _, state, unlabelled, probs = setup()
    for name in ("random", "least_margin", "mean_entropy", "lci", "adaptive"):
        plan = plan_for(state, unlabelled, probs, confidence=None, strategy=name)
        assert plan.queries.size == 5 and plan.machine_indices.size == 0 and plan.audits.size == 0


def test_same_seed_same_plan_and_pool_exhaustion():
    _, state, unlabelled, probs = setup()
    a = plan_for(state, unlabelled, probs, strategy="random")
    b = plan_for(state, unlabelled, probs, strategy="random")
    assert a.queries.tolist() == b.queries.tolist() and a.audits.tolist() == b.audits.tolist()
    everything = plan_for(state, unlabelled, probs, k=1000)
    assert sorted(everything.queries.tolist()) == unlabelled.tolist()
    assert everything.machine_indices.size == 0


def test_machine_cap_keeps_the_most_confident():
    _, state, unlabelled, probs = setup()
    probs = probs.copy()
    full = plan_for(state, unlabelled, probs, audit=0.0)
    favourite = full.machine_indices[0]
    probs[np.flatnonzero(unlabelled == favourite)[0]] = np.where(full.machine_labels[0] == 1, 0.999, 0.001)
    capped = plan_for(state, unlabelled, probs, ConfidenceConfig(max_per_round=1), audit=0.0)
    assert capped.machine_indices.tolist() == [favourite]


def test_apply_answers_records_sources_costs_and_corrections():
    truth, state, unlabelled, probs = setup()
    plan = plan_for(state, unlabelled, probs, audit=1.0)
    audit_answers = plan.machine_labels.copy()
    audit_answers[0] = 1 - audit_answers[0]  # the oracle disagrees with the first machine label
    new = apply_answers(state, plan, truth[plan.queries], audit_answers, query_costs=2.0, audit_costs=0.5)
    assert len(state) == 8  # untouched
    assert new.labelled_indices().size == 8 + 5 + plan.machine_indices.size
    assert new.total_cost == pytest.approx(8 + 5 * 2.0 + plan.audits.size * 0.5)
    first = new.record(plan.machine_indices[0])
    assert first.audit == "corrected" and first.labels == tuple(audit_answers[0])
    assert first.machine_labels == tuple(plan.machine_labels[0])
    assert all(new.record(i).audit == "agreed" for i in plan.machine_indices[1:])
    assert new.record(plan.queries[0]).labels == tuple(truth[plan.queries[0]])
    summary = new.round_summary(1)
    assert (summary["oracle"], summary["corrected"]) == (5, 1)
    with pytest.raises(ValueError, match="already applied"):
        apply_answers(new, plan, truth[plan.queries], audit_answers)


def test_audit_gate_drops_unaudited_machine_labels():
    truth, state, unlabelled, probs = setup()
    plan = plan_for(state, unlabelled, probs, audit=0.3)
    assert plan.machine_indices.size > plan.audits.size
    wrong = 1 - plan.machine_labels_of(plan.audits)  # every audited label was wrong
    gated = apply_answers(state, plan, truth[plan.queries], wrong, audit_gate=0.5)
    assert gated.machine_indices().tolist() == plan.audits.tolist()
    kept = apply_answers(state, plan, truth[plan.queries], wrong)  # no gate: all kept
    assert kept.machine_indices().tolist() == plan.machine_indices.tolist()


def test_invalid_plans_are_rejected():
    truth, state, unlabelled, probs = setup()
    with pytest.raises(ValueError, match="already labelled"):
        plan_for(state, np.r_[unlabelled[1:], 0], probs)
    plan = plan_for(state, unlabelled, probs)
    with pytest.raises(ValueError, match="oracle_labels must be"):
        apply_answers(state, plan, truth[:2], plan.machine_labels_of(plan.audits))
    bad = RoundPlan(1, plan.queries, plan.query_scores, plan.queries[:1], np.zeros((1, L), np.uint8),
                    np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="both queried and machine-labelled"):
        apply_answers(state, bad, truth[plan.queries])


def run_loop(truth, emb, seed, rounds, state=None):
    """Embeddings-mode loop with a perfect oracle; rngs derived from (seed, round)."""
    if state is None:
        start = np.random.default_rng([seed, 0]).choice(len(emb), 6, replace=False)
        state = ALState(truth.shape[1]).with_labels(start, truth[start], source="initial", round=0)
    strategy = make_strategy("mlm", correlation_weight=0.5)
    while state.next_round <= rounds:
        rng = round_rng(seed, state.next_round)
        indices, labels, verified = state.training_arrays()
        head = train_head(emb[indices], labels, np.where(verified, 1.0, 0.5))
        unlabelled = state.unlabelled_indices(len(emb))
        probs = predict_head(head, emb[unlabelled])
        ctx = StrategyContext(state.labels_of(state.verified_indices()), rng)
        plan = tsal_round(probs, unlabelled, state, 4, strategy, ctx, ConfidenceConfig(threshold=0.8), 0.5, rng)
        state = apply_answers(state, plan, truth[plan.queries], truth[plan.audits])
    return state


def test_a_resumed_loop_ends_where_an_uninterrupted_one_does():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(80, 6)).astype(np.float32)
    truth = np.stack([emb[:, 0] > 0, emb[:, 0] + 0.2 * emb[:, 1] > 0, emb[:, 2] > 0.5], axis=1).astype(np.uint8)
    straight = run_loop(truth, emb, seed=3, rounds=3)
    halfway = ALState.from_records(run_loop(truth, emb, seed=3, rounds=2).to_records())
    resumed = run_loop(truth, emb, seed=3, rounds=3, state=halfway)
    assert resumed == straight
    assert straight.last_round == 3 and len(straight.machine_indices()) > 0
    assert straight.round_summary(3)["oracle"] == 4


def test_machine_labels_per_round_never_exceed_the_cap_and_are_the_most_confident():
    truth, state, unlabelled, probs = setup()
    uncapped = plan_for(state, unlabelled, probs, audit=0.0)
    assert uncapped.machine_indices.size > 4
    capped = plan_for(state, unlabelled, probs, ConfidenceConfig(max_per_round=4), audit=0.0)
    assert capped.machine_indices.size == 4
    assert set(capped.machine_indices) <= set(uncapped.machine_indices)
    position = {int(i): p for p, i in enumerate(unlabelled)}
    margin = {int(i): np.abs(probs[position[int(i)]] - 0.5).min() for i in uncapped.machine_indices}
    kept = sorted(margin[int(i)] for i in capped.machine_indices)
    dropped = [margin[int(i)] for i in set(uncapped.machine_indices.tolist()) - set(capped.machine_indices.tolist())]
    assert min(kept) >= max(dropped)


def test_a_machine_label_that_stops_being_confident_is_revoked_and_returns_to_the_pool():
    truth, state, unlabelled, probs = setup()
    plan = plan_for(state, unlabelled, probs, audit=0.0)
    state = apply_answers(state, plan, truth[plan.queries])
    held = state.unverified_indices()
    assert held.tolist() == plan.machine_indices.tolist() and held.size >= 3
    labels = state.labels_of(held).astype(float)
    still = np.where(labels == 1, 0.97, 0.03)
    still[0] = 0.6  # no longer confident
    still[1] = 1.0 - still[1]  # confident, but now the opposite labels
    unlabelled = state.unlabelled_indices(POOL)
    rng = np.random.default_rng(5)
    rest = rng.uniform(0.3, 0.7, size=(unlabelled.size, L))  # nothing new is confident
    ctx = StrategyContext(state.labels_of(state.verified_indices()), np.random.default_rng(0))
    plan2 = tsal_round(rest, unlabelled, state, 3, make_strategy("random"), ctx,
                       ConfidenceConfig(min_dependence=1.0), 0.0, rng, probs_machine=still)
    assert plan2.revoked.tolist() == sorted(held[:2].tolist())
    after = apply_answers(state, plan2, truth[plan2.queries])
    assert set(held[:2]) & set(after.labelled_indices()) == set()
    assert set(held[2:]) <= set(after.unverified_indices())
    assert set(held[:2]) <= set(after.unlabelled_indices(POOL))
    # a human label is never revoked
    with pytest.raises(ValueError, match="only unaudited machine labels"):
        state.without([0])


def test_machine_labels_are_revalidated_when_the_pool_is_spent():
    """Every sample labelled (humans and machine): the round queries nothing but still takes back
    the machine labels that stopped being confident; they are the next round's pool, and that
    round is numbered by the loop, not by the records (the spent round added none)."""
    truth, state, unlabelled, probs = setup()
    plan = plan_for(state, unlabelled, probs, audit=0.0, confidence=ConfidenceConfig(max_per_round=None))
    state = apply_answers(state, plan, truth[plan.queries])
    rest = state.unlabelled_indices(POOL)
    state = state.with_labels(rest, truth[rest], source="oracle", round=2)  # the humans label the rest
    assert state.unlabelled_indices(POOL).size == 0
    held = state.unverified_indices()
    still = np.where(state.labels_of(held) == 1, 0.97, 0.03)
    still[[0, 2]] = 0.5  # two are no longer confident
    ctx = StrategyContext(state.labels_of(state.verified_indices()), np.random.default_rng(0))
    empty = np.zeros((0, L))
    spent = tsal_round(empty, np.zeros(0, np.int64), state, 5, make_strategy("mlm"), ctx,
                       ConfidenceConfig(min_dependence=1.0), 0.3, np.random.default_rng(1),
                       probs_machine=still, round=3)
    assert spent.round == 3 and spent.queries.size == spent.machine_indices.size == spent.audits.size == 0
    assert spent.revoked.tolist() == sorted(held[[0, 2]].tolist())
    after = apply_answers(state, spent, np.zeros((0, L), np.uint8))
    assert sorted(after.unlabelled_indices(POOL).tolist()) == sorted(held[[0, 2]].tolist())
    assert after.next_round == 3  # no records in round 3: the loop names the next round itself
    again = tsal_round(np.full((2, L), 0.5), after.unlabelled_indices(POOL), after, 5, make_strategy("mlm"), ctx,
                       ConfidenceConfig(min_dependence=1.0), 0.0, np.random.default_rng(2),
                       probs_machine=np.where(after.labels_of(after.unverified_indices()) == 1, 0.97, 0.03),
                       round=4)
    assert again.round == 4 and sorted(again.queries.tolist()) == sorted(held[[0, 2]].tolist())
    with pytest.raises(ValueError, match="before the state's next round"):
        tsal_round(empty, np.zeros(0, np.int64), state, 5, make_strategy("mlm"), ctx, None, 0.0,
                   np.random.default_rng(1), round=2)


def test_no_two_frames_of_one_video_are_queried_in_one_round():
    truth, state, unlabelled, probs = setup()
    groups = unlabelled // 4  # 4 consecutive frames per video: 8 videos among the unlabelled
    for strategy in ("mlm", "least_margin", "random"):
        ctx = StrategyContext(state.labels_of(state.verified_indices()), np.random.default_rng(2))
        plan = tsal_round(probs, unlabelled, state, 6, make_strategy(strategy), ctx, None, 0.0,
                          np.random.default_rng(3), groups=groups)
        videos = plan.queries // 4
        assert plan.queries.size == 6 and np.unique(videos).size == 6, strategy
    # more queries than videos: every video once before any video twice
    ctx = StrategyContext(state.labels_of(state.verified_indices()), np.random.default_rng(2))
    plan = tsal_round(probs, unlabelled, state, 10, make_strategy("mlm"), ctx, None, 0.0,
                      np.random.default_rng(3), groups=groups)
    counts = np.bincount(plan.queries[:8] // 4 - 2)
    assert (counts == 1).all()


def test_video_query_unit_asks_for_every_frame_of_the_best_videos():
    truth, state, unlabelled, probs = setup()
    groups = unlabelled // 4
    ctx = StrategyContext(state.labels_of(state.verified_indices()), np.random.default_rng(2))
    strategy = make_strategy("least_margin")
    plan = tsal_round(probs, unlabelled, state, 2, strategy, ctx, None, 0.0, np.random.default_rng(3),
                      groups=groups, whole_groups=True)
    scores = strategy.score(probs, ctx)
    video_mean = {g: scores[groups == g].mean() for g in np.unique(groups)}
    best = sorted(video_mean, key=lambda g: -video_mean[g])[:2]
    assert sorted(plan.queries.tolist()) == sorted(unlabelled[np.isin(groups, best)].tolist())
    assert set(plan.queries[:4] // 4) == {best[0]}  # the best video's frames first


def test_video_query_unit_labels_caps_audits_and_revokes_whole_videos():
    """With the video as the query unit the machine stream works on videos: a video is accepted
    on its frames' mean probabilities (one frame at 0.75 does not keep a video whose mean is
    confident out), every remaining frame carries the video's label vector, the cap and the
    audits count videos, and re-validation takes a video back whole."""
    truth, state, unlabelled, _ = setup()
    groups = unlabelled // 4  # videos 2..9, four frames each
    sides = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 0]])  # label vectors of videos 4..8
    probs = np.full((unlabelled.size, L), 0.5)  # videos 2, 3: unsure (the query goes there)
    for video, side, high in zip(range(4, 9), sides, (0.99, 0.99, 0.99, 0.97, 0.97)):
        rows = np.flatnonzero(groups == video)
        probs[rows] = np.where(side == 1, high, 1 - high)
    probs[np.flatnonzero(groups == 8)[-1]] = np.where(sides[4] == 1, 0.75, 0.25)  # mean 0.915: still confident
    probs[np.flatnonzero(groups == 9)] = [[0.97, 0.03, 0.03]] * 2 + [[0.6, 0.4, 0.4]] * 2  # mean 0.785: not
    no_rules = dict(min_dependence=1.0)
    ctx = StrategyContext(state.labels_of(state.verified_indices()), np.random.default_rng(2))

    def plan(confidence, audit=0.0, frames=False):
        return tsal_round(probs, unlabelled, state, 1, make_strategy("least_margin"), ctx, confidence, audit,
                          np.random.default_rng(3), groups=groups, whole_groups=not frames)

    every = plan(ConfidenceConfig(**no_rules))
    assert set(every.queries // 4) <= {2, 3} and every.queries.size == 4
    assert every.machine_indices.tolist() == unlabelled[np.isin(groups, [4, 5, 6, 7, 8])].tolist()
    for video, side in zip(range(4, 9), sides):
        assert (every.machine_labels[every.machine_indices // 4 == video] == side).all()
    # frame by frame the 0.75 frame would stay out
    assert unlabelled[groups == 8][-1] not in plan(ConfidenceConfig(**no_rules), frames=True).machine_indices

    capped = plan(ConfidenceConfig(max_per_round=3, **no_rules), audit=0.34)
    assert capped.machine_indices.tolist() == unlabelled[np.isin(groups, [4, 5, 6])].tolist()  # most confident
    assert np.unique(capped.audits // 4).size == 2 and capped.audits.size == 8  # ceil(0.34 * 3) whole videos

    unaudited = plan(ConfidenceConfig(max_per_round=3, **no_rules))
    state2 = apply_answers(state, unaudited, truth[unaudited.queries])
    held = state2.unverified_indices()
    still = np.where(state2.labels_of(held) == 1, 0.99, 0.01)
    still[np.flatnonzero(held // 4 == 5)[0]] = np.where(sides[1] == 1, 0.7, 0.3)  # video 5 mean 0.92: kept
    still[np.flatnonzero(held // 4 == 6)[:2]] = np.where(sides[2] == 1, 0.6, 0.4)  # video 6 mean 0.795
    rest = state2.unlabelled_indices(POOL)
    ctx2 = StrategyContext(state2.labels_of(state2.verified_indices()), np.random.default_rng(0))
    again = tsal_round(np.full((rest.size, L), 0.5), rest, state2, 1, make_strategy("random"), ctx2,
                       ConfidenceConfig(**no_rules), 0.0, np.random.default_rng(4), groups=rest // 4,
                       whole_groups=True, probs_machine=still, machine_groups=held // 4)
    assert again.revoked.tolist() == held[held // 4 == 6].tolist()
    with pytest.raises(ValueError, match="machine_groups"):
        tsal_round(np.full((rest.size, L), 0.5), rest, state2, 1, make_strategy("random"), ctx2,
                   ConfidenceConfig(**no_rules), 0.0, np.random.default_rng(4), groups=rest // 4,
                   whole_groups=True, probs_machine=still)
