"""`sonoray submit` and `sonoray jobs`: run any sonoray command on a Ray cluster.

    sonoray submit [--address URL] [--follow] [--json] -- sonoray pretrain --gpu --workers 4 ...
    sonoray jobs list|status|logs|stop [ID] [--address URL]

The working directory is packaged and uploaded with the job; the cluster address comes from
--address, else RAY_ADDRESS, else http://127.0.0.1:8265; the token from Ray's standard variables
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token). Credentials are never sent with a job
and are masked in everything printed (see cluster.submission and cluster.redact).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cluster.redact import install_log_redaction, redact
from jobs.output import UserError, emit_json, progress


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_submit(subparsers)
    _register_jobs(subparsers)


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        metavar="URL",
        help="the cluster's job API, i.e. its dashboard URL (default: RAY_ADDRESS, else "
        "http://127.0.0.1:8265, where `ray dashboard ray_cluster.yaml` forwards it)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON result object last on stdout")


def _register_submit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit",
        help="run a sonoray command as a job on a Ray cluster",
        description="Package the working directory, submit COMMAND through Ray's job API and print "
        "the job id. With --follow, stream its log and exit with its status (0: succeeded). "
        "Only non-secret variables (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_REGION, --env) go "
        "with the job: on the cluster, S3 credentials come from the nodes' instance profile.",
    )
    _add_address(p)
    p.add_argument("--follow", action="store_true", help="stream the job's log until it ends")
    p.add_argument("--working-dir", type=Path, default=None, metavar="DIR",
                   help="folder uploaded with the job (default: the current folder)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an extra (non-secret) environment variable for the job; repeatable")
    p.add_argument("--submission-id", default=None, metavar="ID", help="job id to use (default: generated)")
    p.add_argument("--entrypoint-num-gpus", type=float, default=None, metavar="N",
                   help="GPUs reserved for the driver command itself (default 0)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the command to run, after `--`")
    p.set_defaults(func=run_submit)


def _register_jobs(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "jobs",
        help="list, inspect, read the logs of and stop cluster jobs",
        description="Jobs on a Ray cluster (see `sonoray submit`).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="every job the cluster knows")
    _add_address(listing)
    status = actions.add_parser("status", help="a job's state and message")
    status.add_argument("job_id", metavar="ID")
    _add_address(status)
    logs = actions.add_parser("logs", help="a job's log")
    logs.add_argument("job_id", metavar="ID")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
    _add_address(logs)
    stop = actions.add_parser("stop", help="stop a job and wait until it has stopped")
    stop.add_argument("job_id", metavar="ID")
    stop.add_argument("--timeout", type=float, default=60.0, metavar="S",
                      help="seconds to wait for the job to end (default 60; 0: do not wait)")
    _add_address(stop)
    p.set_defaults(func=run_jobs)


def _client(args: argparse.Namespace):
    from cluster.submission import JobClient, SubmissionError

    try:
        return JobClient(args.address)
    except SubmissionError as err:
        raise UserError(str(err)) from None


def _parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UserError(f"--env expects NAME=VALUE, got {redact(item)!r}")
        env[name] = value
    return env


def _command(args: argparse.Namespace) -> list[str]:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("no command to submit: put it after `--`, e.g. sonoray submit -- sonoray pretrain ...")
    return command


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_submit(args: argparse.Namespace) -> int:
    from cluster.submission import SubmissionError, exit_code

    install_log_redaction()
    command = _command(args)
    env = _parse_env(args.env)
    if args.working_dir is not None and not args.working_dir.is_dir():
        raise UserError(f"--working-dir {args.working_dir} is not a folder")
    if args.entrypoint_num_gpus is not None and args.entrypoint_num_gpus < 0:
        raise UserError(f"--entrypoint-num-gpus must be >= 0, got {args.entrypoint_num_gpus}")
    client = _client(args)
    try:
        job_id = client.submit(
            command,
            working_dir=args.working_dir,
            env=env,
            submission_id=args.submission_id,
            entrypoint_num_gpus=args.entrypoint_num_gpus,
        )
    except SubmissionError as err:
        raise UserError(str(err)) from None
    progress(f"submit: job {job_id} submitted to {redact(client.address)}")
    if not args.json:
        print(job_id, flush=True)
    if not args.follow:
        if args.json:
            emit_json({"submission_id": job_id, "address": redact(client.address), "status": "SUBMITTED"})
        return 0
    state = _follow(client, job_id)
    if args.json:
        emit_json({"submission_id": job_id, "address": redact(client.address), "status": state})
    return exit_code(state)


def _follow(client, job_id: str) -> str:
    """Stream a job's log to stdout; returns its final state."""
    from cluster.submission import SubmissionError

    started = time.monotonic()
    try:
        client.follow(job_id, _write)
        state = client.status(job_id)
    except KeyboardInterrupt:
        progress(f"stopped following; job {job_id} keeps running (`sonoray jobs stop {job_id}` ends it)")
        raise
    except SubmissionError as err:
        raise UserError(str(err)) from None
    progress(f"job {job_id} {state} after {time.monotonic() - started:.1f}s")
    return state


def run_jobs(args: argparse.Namespace) -> int:
    from cluster.submission import TERMINAL_STATES, SubmissionError, exit_code

    install_log_redaction()
    client = _client(args)
    try:
        if args.action == "list":
            jobs = client.list_jobs()
            if args.json:
                emit_json({"address": redact(client.address), "jobs": jobs})
            else:
                for job in jobs:
                    print(f"{job['submission_id'] or job['job_id']}\t{job['status']}\t{job['entrypoint']}")
            return 0
        if args.action == "status":
            info = client.info(args.job_id)
            if args.json:
                emit_json(info)
            else:
                print(f"{info['status']}\t{info['message']}".rstrip())
            return 0
        if args.action == "logs":
            if args.follow:
                state = _follow(client, args.job_id)
                if args.json:
                    emit_json({"submission_id": args.job_id, "status": state})
                return exit_code(state)
            _write(client.logs(args.job_id))
            if args.json:
                emit_json({"submission_id": args.job_id, "status": client.status(args.job_id)})
            return 0
        if args.action == "stop":
            if args.timeout < 0:
                raise UserError(f"--timeout must be >= 0, got {args.timeout}")
            was_running = client.stop(args.job_id)
            state = client.wait(args.job_id, timeout_s=args.timeout) if args.timeout > 0 else client.status(args.job_id)
            progress(f"jobs stop: {args.job_id} {'stop requested' if was_running else 'was not running'}; now {state}")
            if args.json:
                emit_json({"submission_id": args.job_id, "stopped": was_running, "status": state})
            else:
                print(state)
            if args.timeout > 0 and state not in TERMINAL_STATES:
                raise UserError(f"job {args.job_id} is still {state} after {args.timeout:g}s")
            return 0
    except SubmissionError as err:
        raise UserError(str(err)) from None
    raise UserError(f"unknown jobs action {args.action!r}")
