"""The labelling-budget report of a simulation folder: learning curves (PNG), the table
(markdown + JSON), from the round files alone, so ``sonoray report URI`` rebuilds it any time.
The numbers are :mod:`ultrasound.al_report`'s; this module reads and writes them."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from cluster.round_store import completed_rounds, json_default, progress_files, read_references, read_round_meta
from cluster.storage import Location, Storage, parse_uri


def read_rounds(storage: Storage, out: Location, experiment_ids: list[str] | None = None,
                threads: int = 16) -> list[dict]:
    """The metadata row of every completed round (rounds ``0..k`` without a gap) under ``out``."""
    files = progress_files(storage, out)
    wanted = experiment_ids if experiment_ids is not None else sorted(files)
    locations = []
    for exp_id in wanted:
        for r in range(completed_rounds(files.get(exp_id, []))):
            locations.append(out.join("experiments", exp_id, f"round_{r}.parquet"))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda loc: read_round_meta(storage, loc), locations))



def strategy_labels(rows: list[dict]) -> dict[str, str]:
    """Experiment id -> the name shown in the report: the strategy, plus a settings digest when
    one folder holds the same strategy under several settings (a sweep)."""
    digests: dict[str, set[str]] = {}
    for row in rows:
        digests.setdefault(row["strategy"], set()).add(row["experiment_id"].rsplit("-", 1)[-1])
    return {row["experiment_id"]: (row["strategy"] if len(digests[row["strategy"]]) == 1
                                   else f"{row['strategy']}@{row['experiment_id'].rsplit('-', 1)[-1][:6]}")
            for row in rows}


def build_report(storage: Storage, out: Location | str, experiment_ids: list[str] | None = None,
                 on_progress: Callable[[str], None] = lambda message: None) -> dict:
    """Learning curves (PNG), table (markdown + JSON) from the Parquet files under ``out``;
    writes ``<out>/report/{learning_curves.png,report.md,report.json}``."""
    from ultrasound.al_report import curves_from_rows, learning_curves_png, markdown_table, summarize

    out = parse_uri(out) if isinstance(out, str) else out
    rows = read_rounds(storage, out, experiment_ids)
    if not rows:
        raise FileNotFoundError(f"no completed experiment round under {out.join('experiments').uri}")
    references = read_references(storage, out)
    curves = curves_from_rows(rows, strategy_labels(rows))
    summary = summarize(curves, references)
    table = markdown_table(summary)
    png = learning_curves_png(curves, summary, title=f"{len(curves)} experiments")
    report_dir = out.join("report")
    storage.write_bytes(report_dir.join("learning_curves.png"), png)
    document = ("# Labelling-budget simulation\n\n"
                f"{len(curves)} experiments, {len(rows)} evaluated rounds, from {out.uri}.\n\n"
                f"{table}\n![learning curves](learning_curves.png)\n")
    storage.write_bytes(report_dir.join("report.md"), document.encode())
    storage.write_bytes(report_dir.join("report.json"),
                        json.dumps({"summary": summary, "experiments": len(curves), "rounds": len(rows)},
                                   indent=2, default=json_default).encode())
    on_progress(f"report: {report_dir.join('report.md').uri}")
    return {"report_uri": report_dir.join("report.md").uri, "png_uri": report_dir.join("learning_curves.png").uri,
            "summary": summary, "markdown": table, "experiments": len(curves), "rounds": len(rows)}


