"""The `sonoray` command: one subcommand per job module."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from cluster.claim import ClaimError
from cluster.redact import install_log_redaction, redact
from cluster.storage import LocationError, StorageError
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
    "jobs.predict",
    "jobs.query",
    "jobs.sweep",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sonoray",
        description="Lung-ultrasound video pretraining, multi-symptom classification and "
        "labelling-budget simulation on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"sonoray {package_version()}")
    add_verbosity_args(parser, False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in JOB_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in subparsers.choices.values():  # `sonoray -v pretrain ...` and `sonoray pretrain -v ...`
        add_verbosity_args(sub, argparse.SUPPRESS)
    return parser


def add_verbosity_args(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="also show Ray's own log lines (hidden by default)")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="no progress lines; errors and the result still print")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sonoray")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def apply_verbosity(args: argparse.Namespace) -> None:
    """-v shows Ray's log lines, -q hides progress; through the environment, so the jobs the
    demo or a local run starts in other processes behave the same."""
    import os

    from jobs.output import QUIET_VARIABLE

    if getattr(args, "verbose", False):
        from cluster.runtime import RAY_LOGS_VARIABLE  # imports Ray: only when asked for

        os.environ[RAY_LOGS_VARIABLE] = "1"
    if getattr(args, "quiet", False):
        os.environ[QUIET_VARIABLE] = "1"


def main(argv: list[str] | None = None) -> int:
    install_log_redaction()  # credentials never reach a log line, whatever logger prints it
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_verbosity(args)
    try:
        return int(args.func(args) or 0)
    except (UserError, ManifestError, StorageError, LocationError, CheckpointError, ClaimError,
            FileNotFoundError) as err:
        return fail(str(err))
    except KeyboardInterrupt:
        return fail("interrupted", code=130)
    except Exception as err:  # a bug or an unforeseen failure: the traceback helps, redacted
        sys.stderr.write(redact(traceback.format_exc()))
        return fail(f"{args.command} failed unexpectedly ({type(err).__name__}): {err}", code=1)


if __name__ == "__main__":
    sys.exit(main())
