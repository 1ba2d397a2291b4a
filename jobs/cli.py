"""The `sonoray` command: one subcommand per job module."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from cluster.claim import ClaimError
from cluster.redact import install_log_redaction, redact
from cluster.storage import StorageError
from jobs.output import UserError, fail
from ultrasound.checkpoint import CheckpointError
from ultrasound.manifest import ManifestError

# Job modules in the order `sonoray --help` lists them.
JOB_MODULES = [
    "jobs.demo",
    "jobs.phantom",
    "jobs.store",
    "jobs.ingest",
    "jobs.frames",
    "jobs.cache",
    "jobs.simulate",
    "jobs.pretrain",
    "jobs.evaluate",
    "jobs.submit",
    "jobs.msml",
    "jobs.sweep",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sonoray",
        description="Lung-ultrasound video pretraining, multi-symptom classification and "
        "labelling-budget simulation on Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in JOB_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    install_log_redaction()  # credentials never reach a log line, whatever logger prints it
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ManifestError, StorageError, CheckpointError, ClaimError, FileNotFoundError) as err:
        return fail(str(err))
    except KeyboardInterrupt:
        return fail("interrupted", code=130)
    except Exception as err:  # a bug or an unforeseen failure: the traceback helps, redacted
        sys.stderr.write(redact(traceback.format_exc()))
        return fail(f"{args.command} failed unexpectedly ({type(err).__name__}): {err}", code=1)


if __name__ == "__main__":
    sys.exit(main())
