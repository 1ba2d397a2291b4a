"""The labelling-budget report: learning curves, area under them, labels needed, machine labels.

Input: one row per evaluated round of every experiment (the simulator writes them as Parquet
metadata), each a mapping with at least ``experiment_id, strategy, seed, reference_id, round,
fraction, cost_total, map, macro_f1`` and the cumulative machine-label counts ``machine,
machine_vectors_correct, audited, audit_agreed``; and the full-data reference of each split
(``reference_id -> {"map": ..., "macro_f1": ...}``: the same model trained on every training
label).

Definitions (docs/tsal.md, "Simulator"):

- **labelled fraction** (x axis): the human labelling cost so far over the cost of labelling the
  whole pool (frames, or videos with per-video costs); audits count at their cost.
- **AULC**: the area under the mAP-vs-fraction curve (piecewise linear through the evaluated
  rounds) over the fraction range every experiment of the report covers, divided by that range's
  width: the mean mAP over the shared budget range, in mAP units.
- **labels to 95%**: the first evaluated round from which mAP stays at or above 95% of the
  split's full-data mAP to the last round (a single noisy crossing does not count); its cost
  and fraction. Censored, not survivor-averaged: a seed that never gets there counts with its
  final budget, so the mean over every seed is a lower bound whenever one is censored (the
  count that reached it is reported beside).
- **machine precision**: the share of accepted machine label vectors that equal the noise-free
  truth (pooled over experiments); **audit agreement**: the share of audited machine labels the
  oracle confirmed, the estimate a real deployment would see.
- **95% band**: percentile bootstrap over seeds of the mean at each round, clipped to the
  metric's range [0, 1]; the difference to random is the same over per-seed paired
  differences (same seed = same split, initial set and annotator).
- **vs random**: the paired per-seed AULC difference with its bootstrap CI and sign test
  (:func:`ultrasound.stats.paired_difference`).

Pure: numpy, scipy and matplotlib (Agg) only.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ultrasound.stats import paired_difference

TARGET_SHARE = 0.95
REQUIRED = ("experiment_id", "strategy", "seed", "reference_id", "round", "fraction", "cost_total", "map",
            "macro_f1")


@dataclass(frozen=True, eq=False)
class Curve:
    """One experiment's evaluated rounds ``0..R`` (arrays of length R + 1)."""

    experiment_id: str
    strategy: str
    seed: int
    reference_id: str
    rounds: np.ndarray
    fraction: np.ndarray
    cost: np.ndarray
    map: np.ndarray
    macro_f1: np.ndarray
    machine: int = 0
    machine_correct: int = 0
    audited: int = 0
    audit_agreed: int = 0
    machine_accepted: int = 0
    human_per_round: np.ndarray | None = None
    machine_per_round: np.ndarray | None = None

    def metric(self, name: str) -> np.ndarray:
        if name not in ("map", "macro_f1"):
            raise ValueError(f"metric must be map or macro_f1, got {name!r}")
        return self.map if name == "map" else self.macro_f1


def curves_from_rows(rows: Iterable[Mapping[str, Any]], label: Mapping[str, str] | None = None) -> list[Curve]:
    """Group per-round rows into curves (sorted by strategy, seed, id). ``label`` optionally maps
    an experiment id to the strategy name shown in the report. Only rounds ``0..k`` without a
    gap are used."""
    by_id: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"round row lacks {missing}; rows need {list(REQUIRED)}")
        by_id.setdefault(str(row["experiment_id"]), []).append(row)
    curves = []
    for exp_id, items in by_id.items():
        items = sorted(items, key=lambda r: int(r["round"]))
        rounds = [int(r["round"]) for r in items]
        if rounds[0] != 0:
            continue
        n = next((i for i, r in enumerate(rounds) if r != i), len(rounds))
        if len({int(r["round"]) for r in items}) != len(items):
            raise ValueError(f"{exp_id}: a round appears twice")
        items = items[:n]
        last = items[-1]
        curves.append(Curve(
            experiment_id=exp_id,
            strategy=str(label.get(exp_id, items[0]["strategy"]) if label else items[0]["strategy"]),
            seed=int(items[0]["seed"]),
            reference_id=str(items[0]["reference_id"]),
            rounds=np.arange(n),
            fraction=np.array([float(r["fraction"]) for r in items]),
            cost=np.array([float(r["cost_total"]) for r in items]),
            map=np.array([_num(r["map"]) for r in items]),
            macro_f1=np.array([_num(r["macro_f1"]) for r in items]),
            machine=int(last.get("machine", 0)),
            machine_correct=int(last.get("machine_vectors_correct", 0)),
            audited=int(last.get("audited", 0)),
            audit_agreed=int(last.get("audit_agreed", 0)),
            machine_accepted=int(last.get("machine_accepted_total", last.get("machine", 0))),
            human_per_round=np.array([int(r.get("queried_new", 0)) for r in items]),
            machine_per_round=np.array([int(r.get("machine_new", 0)) for r in items]),
        ))
    return sorted(curves, key=lambda c: (c.strategy, c.seed, c.experiment_id))


def round_metrics(y_true: np.ndarray, scores: np.ndarray, names: Sequence[str], threshold: float = 0.5) -> dict:
    """The keys of :func:`ultrasound.multilabel_metrics.multilabel_report` computed in plain numpy.

    Same definitions (sklearn's uninterpolated average precision over distinct score thresholds,
    F1 with zero_division=0, findings without a positive excluded from ``map`` and ``macro_f1``)
    and the same values up to float rounding (a test compares them; with a single finding sklearn
    scores the one column as a binary problem, where "micro" F1 is accuracy, while this keeps
    the multi-label definition), without sklearn's per-call
    input validation, which costs far more than the arithmetic on the small arrays the simulator
    evaluates after every round of every experiment.

    Shape: ``y_true (N, L)`` 0/1, ``scores (N, L)`` in [0, 1], ``names`` L strings.
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    names = list(names)
    if y.ndim != 2 or s.shape != y.shape or y.shape[0] == 0 or len(names) != y.shape[1]:
        raise ValueError(f"y_true and scores must be the same (N, L) with N >= 1 and L names, got "
                         f"{y.shape}, {s.shape}, {len(names)} names")
    y = y.astype(np.int64)
    pred = (s >= threshold).astype(np.int64)
    positives = y.sum(axis=0)
    kept = np.flatnonzero(positives > 0)
    ap = {names[j]: _average_precision(y[:, j], s[:, j]) for j in kept}
    tp = (pred * y).sum(axis=0)
    fp = (pred * (1 - y)).sum(axis=0)
    fn = ((1 - pred) * y).sum(axis=0)
    f1 = [2 * tp[j] / (2 * tp[j] + fp[j] + fn[j]) if (2 * tp[j] + fp[j] + fn[j]) else 0.0 for j in kept]
    micro_denominator = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "map": float(np.mean(list(ap.values()))) if kept.size else float("nan"),
        "per_finding_ap": ap,
        "macro_f1": float(np.mean(f1)) if kept.size else float("nan"),
        "micro_f1": float(2 * tp.sum() / micro_denominator) if micro_denominator else 0.0,
        "hamming_loss": float((pred != y).mean()),
        "excluded": [names[j] for j in np.flatnonzero(positives == 0)],
        "threshold": float(threshold),
        "n_samples": int(y.shape[0]),
    }


def _average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds, highest first."""
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    precision = tps / (last_of_tie + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def area_under_curve(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    """Normalised area of the piecewise-linear curve through ``(x, y)`` over ``[lo, hi]``:
    ``integral / (hi - lo)`` (``y`` at ``lo`` when ``hi == lo``). ``x`` must increase and cover
    the range.

    Example:
        >>> area_under_curve(np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.7, 0.8]), 0.1, 0.3)
        0.675
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"x and y must be equal-length 1-d arrays, got {x.shape} and {y.shape}")
    if np.any(np.diff(x) < 0):
        raise ValueError("x must be non-decreasing")
    if lo > hi or lo < x[0] - 1e-12 or hi > x[-1] + 1e-12:
        raise ValueError(f"[{lo}, {hi}] is not inside the curve's range [{x[0]}, {x[-1]}]")
    if hi - lo <= 0:
        return float(np.interp(lo, x, y))
    inside = (x > lo) & (x < hi)
    grid = np.concatenate([[lo], x[inside], [hi]])
    values = np.interp(grid, x, y)
    return round(float(np.sum((values[1:] + values[:-1]) * np.diff(grid)) / 2.0 / (hi - lo)), 12)


def first_reaching(curve: Curve, target: float) -> tuple[float, float] | None:
    """``(fraction, cost)`` of the first evaluated round from which ``map >= target`` holds to
    the last round, else None (never, or not any more at the end).

    Example:
        >>> c = Curve("e", "s", 0, "r", np.arange(4), np.array([.1, .2, .3, .4]), np.arange(4.0),
        ...           np.array([.5, .8, .6, .9]), np.zeros(4))
        >>> first_reaching(c, 0.75)  # 0.8 at 0.2 dips again: the lasting crossing is at 0.4
        (0.4, 3.0)
    """
    below = np.flatnonzero(curve.map < target - 1e-12)
    i = 0 if below.size == 0 else int(below[-1]) + 1
    if i >= curve.map.size:
        return None
    return float(curve.fraction[i]), float(curve.cost[i])


def labels_to_target(group: Sequence[Curve], targets: Sequence[float]) -> dict[str, Any]:
    """Censored labels-to-target over a strategy's seeds: ``reached`` of ``of`` seeds get there;
    ``fraction`` and ``cost`` are means over EVERY seed, a censored one at its final budget
    (``censored`` > 0 makes them lower bounds). ``targets``: each curve's target mAP (NaN: no
    reference, censored)."""
    hits = [first_reaching(c, t) if np.isfinite(t) else None for c, t in zip(group, targets)]
    values = [hit if hit is not None else (float(c.fraction[-1]), float(c.cost[-1])) for c, hit in zip(group, hits)]
    reached = sum(hit is not None for hit in hits)
    return {"reached": reached, "of": len(group), "censored": len(group) - reached,
            "fraction": float(np.mean([v[0] for v in values])), "cost": float(np.mean([v[1] for v in values]))}


def band(values: np.ndarray, *, low: float = 0.0, high: float = 1.0, n_boot: int = 2000,
         seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over the first axis (seeds) and its 95% percentile-bootstrap band (seeds resampled
    with replacement), clipped to ``[low, high]``, the metric's range; the band is the mean
    itself for a single seed.

    Shape: values ``(S, R)`` -> three ``(R,)`` arrays (mean, lower, upper).
    """
    values = np.asarray(values, float)
    mean = values.mean(axis=0)
    if values.shape[0] < 2:
        return mean, mean.copy(), mean.copy()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.shape[0], size=(int(n_boot), values.shape[0]))
    means = values[idx].mean(axis=1)  # (n_boot, R)
    lower, upper = np.quantile(means, [0.025, 0.975], axis=0)
    return mean, np.clip(lower, low, high), np.clip(upper, low, high)


def summarize(
    curves: Sequence[Curve],
    references: Mapping[str, Mapping[str, float]],
    *,
    target_share: float = TARGET_SHARE,
    at_fractions: Sequence[float] = (0.2,),
    baseline: str = "random",
) -> dict:
    """The report table as a dict: ``{"range": [lo, hi], "strategies": {name: {...}}}``.

    Per strategy: ``seeds``, ``aulc`` (mean), ``aulc_std``, ``aulc_ci95`` ([low, high],
    bootstrap over seeds), ``aulc_per_seed``, ``vs_random`` (paired AULC difference to the
    ``baseline`` strategy over the seeds both ran: mean, CI, sign test; None for the baseline
    itself or under 2 shared seeds), ``final_map``, ``final_macro_f1``, ``final_fraction``,
    ``full_map`` (mean reference), ``map_share_at`` ({fraction: mean of map(fraction) /
    full-data map, or None past the curve}), ``labels_to_target`` (censored, see
    :func:`labels_to_target`), ``human_labels_per_round`` and ``machine_labels_per_round`` (new
    labels of rounds 0..R, means over seeds), ``machine_precision`` and ``machine``
    ({"accepted_mean", "precision", "audited", "audit_agreement"}).
    """
    if not curves:
        raise ValueError("no experiment with a completed round 0")
    if not 0 < target_share <= 1:
        raise ValueError(f"target_share must be in (0, 1], got {target_share}")
    lo = max(float(c.fraction[0]) for c in curves)
    hi = min(float(c.fraction[-1]) for c in curves)
    hi = max(hi, lo)
    out: dict[str, Any] = {"range": [lo, hi], "target_share": target_share, "baseline": baseline,
                           "strategies": {}}
    aulc_of = {c.experiment_id: area_under_curve(c.fraction, c.map, lo, hi) for c in curves}
    base_by_seed = {c.seed: aulc_of[c.experiment_id] for c in curves if c.strategy == baseline}
    for name in sorted({c.strategy for c in curves}):
        group = [c for c in curves if c.strategy == name]
        aulcs = np.array([aulc_of[c.experiment_id] for c in group])
        refs = []
        shares: dict[str, list[float | None]] = {f"{f:g}": [] for f in at_fractions}
        for c in group:
            ref = references.get(c.reference_id)
            ref_map = float(ref["map"]) if ref is not None else float("nan")
            refs.append(ref_map)
            for f in at_fractions:
                inside = c.fraction[0] - 1e-12 <= f <= c.fraction[-1] + 1e-12
                shares[f"{f:g}"].append(float(np.interp(f, c.fraction, c.map)) / ref_map
                                        if inside and np.isfinite(ref_map) and ref_map > 0 else None)
        accepted = sum(c.machine_accepted for c in group)
        audited = sum(c.audited for c in group)
        precision = sum(c.machine_correct for c in group) / accepted if accepted else None
        shared = [c for c in group if c.seed in base_by_seed]
        vs = None
        if name != baseline and len(shared) >= 2:
            vs = paired_difference([aulc_of[c.experiment_id] for c in shared],
                                   [base_by_seed[c.seed] for c in shared]).as_dict()
        _, aulc_low, aulc_high = band(aulcs[:, None])
        out["strategies"][name] = {
            "seeds": len(group),
            "aulc": float(aulcs.mean()),
            "aulc_std": float(aulcs.std(ddof=1)) if len(group) > 1 else 0.0,
            "aulc_ci95": [float(aulc_low[0]), float(aulc_high[0])],
            "aulc_per_seed": {str(c.seed): float(a) for c, a in zip(group, aulcs)},
            "vs_random": vs,
            "final_map": float(np.mean([c.map[-1] for c in group])),
            "final_macro_f1": float(np.mean([c.macro_f1[-1] for c in group])),
            "final_fraction": float(np.mean([c.fraction[-1] for c in group])),
            "full_map": float(np.nanmean(refs)) if np.isfinite(refs).any() else None,
            "map_share_at": {k: (float(np.mean(v)) if v and all(x is not None for x in v) else None)
                             for k, v in shares.items()},
            "labels_to_target": labels_to_target(group, [target_share * r for r in refs]),
            "human_labels_per_round": _mean_per_round([c.human_per_round for c in group]),
            "machine_labels_per_round": _mean_per_round([c.machine_per_round for c in group]),
            "machine_precision": precision,
            "machine": {
                "accepted_mean": accepted / len(group),
                "precision": precision,
                "audited": audited,
                "audit_agreement": sum(c.audit_agreed for c in group) / audited if audited else None,
            },
        }
    return out


# what each strategy's ``--json`` entry carries
JSON_KEYS = ("aulc", "aulc_ci95", "vs_random", "final_map", "labels_to_target", "machine_labels_per_round",
             "human_labels_per_round", "machine_precision")


def strategy_entries(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-strategy part of a ``--json`` result: :data:`JSON_KEYS` of :func:`summarize`'s rows."""
    return {name: {key: s[key] for key in JSON_KEYS} for name, s in summary["strategies"].items()}


def _mean_per_round(series: Sequence[np.ndarray | None]) -> list[float]:
    series = [s for s in series if s is not None]
    if not series:
        return []
    n = min(s.size for s in series)
    return [round(float(v), 3) for v in np.mean([s[:n] for s in series], axis=0)]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The summary as a markdown table, one row per strategy, best AULC first."""
    lo, hi = summary["range"]
    share = summary["target_share"]
    baseline = summary.get("baseline", "random")
    lines = [
        f"AULC: mean mAP over labelled fractions {lo:.3f}-{hi:.3f}; vs {baseline}: paired per-seed AULC "
        f"difference, 95% bootstrap CI. Labels to {share:.0%}: first round from which mAP stays at "
        f"{share:.0%} of the full-data mAP; a seed that never gets there counts at its final budget "
        f"(then the mean is a lower bound, marked >=).",
        "",
        f"| strategy | seeds | AULC (mean ± sd) | vs {baseline} [95% CI] | final mAP | final macro-F1 "
        f"| final fraction | full-data mAP | labels to {share:.0%} (reached) | machine labels (mean) "
        f"| machine precision | audit agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ranked = sorted(summary["strategies"].items(), key=lambda kv: -kv[1]["aulc"])
    for name, s in ranked:
        reach = s["labels_to_target"]
        bound = ">=" if reach.get("censored") else ""
        reach_text = f"{bound}{_fmt(reach['fraction'])} ({reach['reached']}/{reach['of']})"
        vs = s.get("vs_random")
        vs_text = (f"{vs['mean']:+.4f} [{vs['low']:+.4f}, {vs['high']:+.4f}]" if vs else "-")
        m = s["machine"]
        lines.append(
            f"| {name} | {s['seeds']} | {s['aulc']:.4f} ± {s['aulc_std']:.4f} | {vs_text} | {_fmt(s['final_map'])} | "
            f"{_fmt(s['final_macro_f1'])} | {_fmt(s['final_fraction'])} | {_fmt(s['full_map'])} | {reach_text} | "
            f"{m['accepted_mean']:.1f} | {_fmt(m['precision'])} | {_fmt(m['audit_agreement'])} |"
        )
    return "\n".join(lines) + "\n"


def mean_curves(curves: Sequence[Curve], metric: str, baseline: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per strategy, over its seeds and the rounds all of them reached: mean ``fraction``, the
    metric's ``mean`` and its 95% bootstrap band ``low``/``high`` (clipped to [0, 1]).

    With ``baseline``, the curves are per-seed paired differences ``strategy - baseline`` at the
    same labelled fraction (the baseline's curve interpolated at the strategy's fractions, up to
    where the baseline's curve ends; seeds both ran; band clipped to [-1, 1]), as ``vs_random``
    compares AULC at equal fractions; the baseline itself is left out.
    """
    base = {c.seed: c for c in curves if c.strategy == baseline} if baseline else {}
    out = {}
    for name in sorted({c.strategy for c in curves}):
        group = [c for c in curves if c.strategy == name]
        if baseline:
            group = [c for c in group if c.seed in base]
            if name == baseline or not group:
                continue
        n = min(c.rounds.size for c in group)
        if baseline:  # the leading rounds inside every paired baseline curve's fraction range
            n = min(n, *(int(np.sum(c.fraction[:n] <= base[c.seed].fraction[-1] + 1e-12)) for c in group))
            if n == 0:
                continue
            values = np.array([c.metric(metric)[:n] - np.interp(c.fraction[:n], base[c.seed].fraction,
                                                                base[c.seed].metric(metric)) for c in group])
            mean, low, high = band(values, low=-1.0, high=1.0)
        else:
            mean, low, high = band(np.array([c.metric(metric)[:n] for c in group]))
        out[name] = {"fraction": np.mean([c.fraction[:n] for c in group], axis=0), "mean": mean,
                     "low": low, "high": high}
    return out


def learning_curves_png(curves: Sequence[Curve], summary: Mapping[str, Any] | None = None, title: str = "",
                        baseline: str = "random") -> bytes:
    """mAP and macro-F1 vs labelled fraction: per strategy the mean over seeds and its 95%
    bootstrap band (top row; the mAP panel marks 95% of the mean full-data mAP) and, when the
    ``baseline`` ran, each strategy's paired difference to it (bottom row), where strategies
    whose bands overlap on top can still be told apart. Returns PNG bytes (1320 x 960 px)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    has_base = any(c.strategy == baseline for c in curves)
    rows = 2 if has_base else 1
    fig = Figure(figsize=(12, 4.4 * rows), dpi=110)
    axes = np.asarray(fig.subplots(rows, 2)).reshape(rows, 2)
    colors = matplotlib.colormaps["tab10"]
    names = sorted({c.strategy for c in curves})
    color_of = {name: colors(i % 10) for i, name in enumerate(names)}
    for col, (metric, label) in enumerate((("map", "mAP"), ("macro_f1", "macro-F1"))):
        panels = [(axes[0, col], mean_curves(curves, metric), f"test {label}")]
        if has_base:
            panels.append((axes[1, col], mean_curves(curves, metric, baseline), f"{label} - {baseline} (paired)"))
        for ax, series, ylabel in panels:
            for name, c in series.items():
                ax.plot(c["fraction"], c["mean"], marker="o", markersize=3, color=color_of[name], label=name)
                ax.fill_between(c["fraction"], c["low"], c["high"], color=color_of[name], alpha=0.15)
            ax.set_xlabel("labelled fraction (human labelling cost / pool)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        if has_base:
            axes[1, col].axhline(0.0, color="gray", linewidth=1)
    if summary is not None:
        refs = [s["full_map"] for s in summary["strategies"].values() if s.get("full_map") is not None]
        if refs:
            level = summary["target_share"] * float(np.mean(refs))
            axes[0, 0].axhline(level, color="gray", linestyle="--", linewidth=1,
                               label=f"{summary['target_share']:.0%} of full-data mAP")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    sink = io.BytesIO()
    fig.savefig(sink, format="png")
    return sink.getvalue()
