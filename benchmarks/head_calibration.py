"""How strongly to regularise the simulator's head: held-out calibration and machine-label
precision on POCUS embeddings, over a grid of L2 penalties (the choice behind ``head_l2``).

For each seed's patient split (the simulator's, :func:`cluster.simulate.make_splits`), a random
labelled set of 5%, 10%, 20% and 50% of the pool (the simulator's budgets), heads are fitted for
every penalty of ``--grid`` in one batched solve (``train_heads``, to convergence) and scored on
the rest of the pool, the samples a machine label would be proposed for (the test split is not
looked at):

- log loss: mean binary cross-entropy of the held-out pool (calibration, lower is better);
- mAP of the held-out pool;
- machine precision: the share of TSAL's machine proposals that equal the truth, proposals made
  as in a round (confidence validation at the default threshold with the labelled set's rules,
  then the 5%-of-pool cap of the most confident), and how many are accepted before the cap.

Usage: python benchmarks/head_calibration.py --init simclr/model.pt --size 64 --channels 1
       [--work DIR] [--seeds 5] [--dims full,32]
Writes benchmarks/results/head_calibration.json and prints the table (markdown) on stderr.
The embeddings are cached under ``--work`` (shared with benchmarks/simulate_pocus.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.pocus_s3 import add_embedding_args, log, pocus_embeddings  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
FRACTIONS = (0.05, 0.1, 0.2, 0.5)


def study(table, features: np.ndarray, seeds: int, grid: tuple[float, ...]) -> list[dict]:
    from cluster.simulate import SimulationConfig, make_splits
    from ultrasound.active.confidence import confidence_validate
    from ultrasound.active.head import head_problem, predict_head, train_heads
    from ultrasound.active.learners import human_positive_weights
    from ultrasound.active.strategies import select_top
    from ultrasound.al_report import round_metrics

    config = SimulationConfig(seeds=seeds)
    splits = make_splits(table, config)
    cells, problems, penalties = [], [], []
    for seed, split in splits.items():
        rng = np.random.default_rng([seed, 7])
        for fraction in FRACTIONS:
            n = max(2, int(round(fraction * split.train.size)))
            labelled = np.sort(rng.choice(split.train, size=n, replace=False))
            held_out = np.setdiff1d(split.train, labelled)
            labels = table.labels[labelled]
            for l2 in grid:
                cells.append({"seed": seed, "fraction": fraction, "l2": l2, "labelled": labelled, "held": held_out})
                problems.append(head_problem(features[labelled], labels, None, human_positive_weights(labels, None)))
                penalties.append(l2)
    started = time.perf_counter()
    heads = train_heads(problems, l2=penalties, max_iter=2000)
    log(f"{len(heads)} heads in {time.perf_counter() - started:.1f} s; "
        f"converged {sum(h.converged for h in heads)}, iterations median {np.median([h.iterations for h in heads]):.0f}")
    confidence = config.confidence_config()
    rows = []
    for cell, head in zip(cells, heads):
        held, labelled = cell["held"], cell["labelled"]
        truth = table.labels[held]
        probs = np.clip(predict_head(head, features[held]).astype(np.float64), 1e-7, 1 - 1e-7)
        log_loss = float(-(truth * np.log(probs) + (1 - truth) * np.log(1 - probs)).mean())
        check = confidence_validate(probs, table.labels[labelled], confidence)
        accepted = np.flatnonzero(check.accepted)
        cap = max(1, int(round(0.05 * (held.size + labelled.size))))
        if accepted.size > cap:
            accepted = accepted[select_top(check.confidence[accepted], cap, np.random.default_rng(0))]
        correct = (check.labels[accepted] == truth[accepted]).all(axis=1)
        rows.append({"seed": cell["seed"], "fraction": cell["fraction"], "l2": cell["l2"],
                     "converged": head.converged, "iterations": head.iterations, "log_loss": log_loss,
                     "map": round_metrics(truth, probs, list(table.findings))["map"],
                     "accepted_before_cap": int(check.accepted.sum()), "proposed": int(accepted.size),
                     "proposals_correct": int(correct.sum())})
    return rows


def summarise(rows: list[dict], grid) -> list[dict]:
    out = []
    for l2 in grid:
        for fraction in (None, *FRACTIONS):
            part = [r for r in rows if r["l2"] == l2 and (fraction is None or r["fraction"] == fraction)]
            proposed = sum(r["proposed"] for r in part)
            out.append({"l2": l2, "fraction": fraction, "log_loss": float(np.mean([r["log_loss"] for r in part])),
                        "map": float(np.nanmean([r["map"] for r in part])),
                        "accepted_before_cap": float(np.mean([r["accepted_before_cap"] for r in part])),
                        "machine_precision": sum(r["proposals_correct"] for r in part) / proposed if proposed else None,
                        "proposed": proposed, "converged": all(r["converged"] for r in part)})
    return out


def markdown(summary: list[dict], dims_name: str) -> str:
    lines = [f"Embeddings {dims_name}: held-out pool, mean over seeds and labelled shares (5/10/20/50%)", "",
             "| head_l2 | log loss | mAP | machine precision | accepted before cap | log loss at 5% / 50% |",
             "|---|---|---|---|---|---|"]
    for l2 in sorted({s["l2"] for s in summary}):
        every = next(s for s in summary if s["l2"] == l2 and s["fraction"] is None)
        first = next(s for s in summary if s["l2"] == l2 and s["fraction"] == FRACTIONS[0])
        last = next(s for s in summary if s["l2"] == l2 and s["fraction"] == FRACTIONS[-1])
        prec = "-" if every["machine_precision"] is None else f"{every['machine_precision']:.3f}"
        lines.append(f"| {l2:g} | {every['log_loss']:.3f} | {every['map']:.3f} | {prec} | "
                     f"{every['accepted_before_cap']:.0f} | {first['log_loss']:.3f} / {last['log_loss']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_embedding_args(parser)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--dims", default="full,32", help="embedding projections: 'full' and/or PCA sizes")
    args = parser.parse_args()

    from cluster.embeddings import principal_components
    from cluster.storage import Storage

    table, _ = pocus_embeddings(args, Storage())
    report = {"trunk": args.init or "ResNet-18, random init", "frames": len(table), "grid": list(GRID),
              "fractions": list(FRACTIONS), "seeds": args.seeds, "results": {}}
    for name in args.dims.split(","):
        features = table.features if name == "full" else principal_components(table.features, int(name))
        key = "full" if name == "full" else f"pca{name}"
        rows = study(table, features, args.seeds, GRID)
        summary = summarise(rows, GRID)
        overall = [s for s in summary if s["fraction"] is None]
        best = min(overall, key=lambda s: s["log_loss"])
        report["results"][key] = {"dims": features.shape[1], "summary": summary, "rows": rows,
                                  "best_log_loss_l2": best["l2"], "markdown": markdown(summary, key)}
        print(report["results"][key]["markdown"], file=sys.stderr)
        log(f"{key}: lowest held-out log loss at head_l2={best['l2']:g}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / "head_calibration.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=float))
    tmp.replace(target)
    print(json.dumps({k: {"best_log_loss_l2": v["best_log_loss_l2"]} for k, v in report["results"].items()}))


if __name__ == "__main__":
    main()
