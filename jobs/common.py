"""Flags shared by several jobs, and turning them into cluster/ objects."""
from __future__ import annotations

import argparse

from cluster.storage import Storage, StorageConfig


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        default=None,
        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL, else AWS S3)",
    )


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray on this machine)",
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")


def add_stream_args(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """The frame-stream flags: the decoded-frame cache, and for training jobs the share of
    unreadable videos that stops the job."""
    parser.add_argument("--no-cache", action="store_true",
                        help="decode every video again instead of reading (and filling) the decoded-frame "
                             "cache beside the data set (URI/cache/)")
    if training:
        from cluster.train import MAX_FAILED_FRACTION

        parser.add_argument("--max-failed-fraction", type=float, default=MAX_FAILED_FRACTION, metavar="F",
                            help="stop when an epoch cannot read more than this share of its videos "
                                 "(default: %(default)g)")


def add_embedding_args(parser: argparse.ArgumentParser, cache_default: str) -> None:
    """How frames are sampled and embedded by a frozen trunk (simulate, query): one group, one
    set of defaults (:class:`cluster.embeddings.SampleSpec`'s)."""
    group = parser.add_argument_group("frames and embeddings")
    group.add_argument("--init", default=None, metavar="CKPT",
                       help="backbone checkpoint URI: model.pt or backbone.safetensors (default: random init)")
    group.add_argument("--fps", type=float, default=3.0, help="frames kept per second (default 3; 0 = all)")
    group.add_argument("--max-per-video", type=int, default=30, help="frames per video at most (30; 0 = no cap)")
    group.add_argument("--size", type=int, default=224, help="frame side for the trunk (224)")
    group.add_argument("--channels", type=int, choices=[1, 3], default=3, help="trunk input channels (3)")
    group.add_argument("--embed-seed", type=int, default=0, help="seed of a random-init trunk (0)")
    group.add_argument("--embed-workers", type=int, default=None, help="embedding actors at most")
    group.add_argument("--embed-gpu", action="store_true", help="embed on GPUs")
    group.add_argument("--cache", default=None, metavar="URI", help=f"embeddings cache (default {cache_default})")


def sample_spec_from(args: argparse.Namespace):
    """The :class:`cluster.embeddings.SampleSpec` of :func:`add_embedding_args`' flags."""
    from cluster.embeddings import SampleSpec
    from jobs.output import UserError

    try:
        return SampleSpec(fps=args.fps or None, max_per_video=args.max_per_video or None, size=args.size,
                          channels=args.channels, init=args.init, seed=args.embed_seed,
                          workers=args.embed_workers, gpu=args.embed_gpu, frame_cache=not args.no_cache)
    except ValueError as err:
        raise UserError(str(err)) from err


def add_tracker_args(parser: argparse.ArgumentParser) -> None:
    """``--tracker mlflow|tensorboard`` and ``--tracking-uri`` (pretrain, msml, sweep, simulate)."""
    group = parser.add_argument_group("tracking")
    group.add_argument("--tracker", choices=["mlflow", "tensorboard"], default=None,
                       help="log settings, per-epoch metrics and final files to MLflow or TensorBoard")
    group.add_argument("--tracking-uri", default=None, metavar="URI",
                       help="MLflow tracking URI (default ./mlruns, a local file store) or TensorBoard log "
                            "folder (default ./tensorboard)")


def tracker_from(args: argparse.Namespace, job: str):
    """The :class:`cluster.tracking.TrackerSpec` of the tracking flags (None without --tracker)."""
    from cluster.tracking import TrackerSpec, TrackingError
    from jobs.output import UserError

    try:
        return TrackerSpec.of(getattr(args, "tracker", None), getattr(args, "tracking_uri", None), f"sonoray-{job}")
    except TrackingError as err:
        raise UserError(str(err)) from None


def add_job_args(parser: argparse.ArgumentParser, *, training: bool = False, tracker: bool = False) -> None:
    """The groups every frame-reading job on Ray shares, in one order: the frame stream (and for
    training jobs its failure share), storage, Ray, tracking (``tracker``), ``--json``."""
    add_stream_args(parser, training=training)
    add_storage_args(parser)
    add_ray_args(parser)
    if tracker:
        add_tracker_args(parser)
    add_json_arg(parser)


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON result object last on stdout")


def storage_from(args: argparse.Namespace) -> Storage:
    return Storage(StorageConfig.from_env(getattr(args, "endpoint_url", None)))


def connect_ray(args: argparse.Namespace) -> str:
    from cluster.runtime import connect

    return connect(getattr(args, "address", None), num_cpus=getattr(args, "num_cpus", None))


def csv_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    return [item for item in items if item]


def add_config_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``--config FILE|s3://...`` and ``--set KEY=VALUE`` (repeatable), declared once for every job
    (read by :func:`cluster.job_config.layered`: defaults, file, --set, flags)."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"YAML file (path or s3://) of {what}; keys are the setting names")
    parser.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (a YAML value), after --config and before the flags; repeatable")


_NOT_SETTABLE = {"help", "config", "set_items", "json", "verbose", "quiet", "version"}


def add_flag_config_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``--config`` / ``--set`` for a job whose settings are its flags (evaluate, predict, query):
    the keys are the flag names (``max_per_video`` or ``max-per-video``). Call it after every
    other flag of the job is declared; :func:`apply_flag_config` reads them."""
    add_config_args(parser, what)
    settable = {a.dest: (a.default, a.type, a.choices, isinstance(a, argparse._StoreTrueAction))
                for a in parser._actions if a.option_strings and a.dest not in _NOT_SETTABLE and not a.required}
    parser.set_defaults(_settable=settable, _config_what=what)


def apply_flag_config(args: argparse.Namespace, storage: Storage | None = None) -> None:
    """Fill ``args`` from ``--config`` then ``--set``, where the flag itself was not given (a
    flag given on the command line always wins). An unknown key names the valid ones; a value of
    the wrong type names the key and the value."""
    from cluster.job_config import ConfigError, layered
    from jobs.output import UserError
    from ultrasound.config import did_you_mean

    settable, what = getattr(args, "_settable", {}), getattr(args, "_config_what", "settings")
    try:
        values = layered(args.config, args.set_items, {}, storage=storage, what=what)
    except ConfigError as err:
        raise UserError(str(err)) from err
    keys = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(keys) - set(settable))
    if unknown:
        raise UserError(f"unknown {what} key(s) {unknown}{did_you_mean(unknown, settable)}; "
                        f"valid keys: {sorted(settable)}")
    for dest, value in keys.items():
        default, convert, choices, is_switch = settable[dest]
        if getattr(args, dest) != default:
            continue
        try:
            if is_switch:
                text = str(value).strip().lower()
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("expected true or false")
                value = text in ("true", "1", "yes")
            elif convert is not None and value is not None:
                value = convert(value)  # "3e-4" (what YAML reads 3e-4 as) -> 0.0003
            if choices is not None and value not in choices:
                raise ValueError(f"expected one of {list(choices)}")
        except (TypeError, ValueError) as err:
            raise UserError(f"{what}: key {dest!r}: value {value!r}: {err}") from None
        setattr(args, dest, value)
