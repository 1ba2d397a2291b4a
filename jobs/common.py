"""Flags shared by several jobs, declared once in groups, and turning them into cluster/ objects.

Groups: frame sampling (``--fps``, ``--max-per-video``), frame format (``--image-size``,
``--channels``), scale (``--workers``, ``--gpu``, ``--max-failures``), the frame stream,
storage, Ray, tracking and ``--json``. A job passes its own defaults; the help text is built
from them (or from the config model's field defaults, :func:`add_settings_flags`), never typed
twice.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

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


def default_help(cls: type, name: str, source: str = "config") -> str:
    """``"default: the config's, else 30"``: the help text of a flag that overrides field
    ``name`` of config model ``cls``."""
    return _default_text(cls.default_of(name), source, "none")


def _default_text(value: Any, source: str | None, none: str) -> str:
    shown = none if value is None else f"{value:g}" if isinstance(value, float) else \
        ",".join(value) if isinstance(value, tuple) else str(value)
    return f"default: the {source}'s, else {shown}" if source else f"default: {shown}"


def _flag_type(annotation: Any):
    """The argparse ``type`` of a config field: tuples are comma-separated lists, a union with
    a word (``int | str | None``) stays text for the model to convert."""
    from ultrasound.config import field_types

    kinds = field_types(annotation)
    if tuple in kinds:
        return csv_list
    if str in kinds:
        return str
    return int if int in kinds else float if float in kinds else str


def add_settings_flags(parser, model: type, names, *, choices: Mapping[str, Any] | None = None,
                       metavars: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """One flag per field of the config ``model`` in ``names`` (``per_round`` -> ``--per-round``):
    its type from the field's annotation, its help the field's description and default, and
    default None, so an unset flag leaves the config file's (or the model's) value. Returns the
    names (the keys :func:`settings_from_flags` reads)."""
    names = tuple(names)
    for name in names:
        info = model.model_fields[name]
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_flag_type(info.annotation), default=None,
                            choices=(choices or {}).get(name), metavar=(metavars or {}).get(name),
                            help=info.description if "(default" in info.description
                            else f"{info.description} ({_default_text(info.default, None, 'none')})")
    return names


def settings_from_flags(args: argparse.Namespace, names) -> dict[str, Any]:
    """The values of the :func:`add_settings_flags` flags that were given."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def add_sampling_args(parser, *, fps: float | None = None, max_per_video: int | None = None,
                      zero_is_none: bool = False, fps_into=None) -> None:
    """``--fps`` and ``--max-per-video`` with this job's defaults. ``zero_is_none``: 0 means
    every frame / no cap (the flags then default to numbers). ``fps_into``: the (mutually
    exclusive) group ``--fps`` goes in, else ``parser``."""
    zero = "; 0: all" if zero_is_none else ""
    (fps_into or parser).add_argument(
        "--fps", type=float, default=fps, metavar="F",
        help=f"frames kept per second of video ({_default_text(fps, None, 'every frame')}{zero})")
    parser.add_argument("--max-per-video", type=int, default=max_per_video, metavar="N",
                        help=f"frames per video at most ({_default_text(max_per_video, None, 'no cap')}"
                             f"{'; 0: no cap' if zero_is_none else ''})")


def add_format_args(parser, *, image_size: int | None = None, channels: int | None = None,
                    source: str | None = None) -> None:
    """``--image-size`` (also ``--size``) and ``--channels``. With ``source`` ("config",
    "checkpoint") the flags default to None, the value then comes from that source, and
    ``image_size`` / ``channels`` are what the help says it falls back to. No ``image_size``:
    the video's own size."""
    parser.add_argument("--image-size", "--size", dest="image_size", type=int,
                        default=None if source else image_size, metavar="S",
                        help=f"square frame side in pixels ({_default_text(image_size, source, 'native size')})")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=None if source else channels,
                        help=f"1 = grayscale, 3 = RGB ({_default_text(channels, source, '?')})")


def add_scale_args(parser, *, gpu_help: str = "one GPU per worker") -> None:
    """``--workers``, ``--gpu`` and ``--max-failures`` of a Ray Train job (``cluster.train.ScaleSpec``)."""
    from cluster.train import ScaleSpec

    group = parser.add_argument_group("scale")
    group.add_argument("--workers", type=int, default=ScaleSpec.workers,
                       help="data-parallel training workers (default: %(default)s)")
    group.add_argument("--gpu", action="store_true", help=gpu_help)
    group.add_argument("--max-failures", type=int, default=ScaleSpec.max_failures,
                       help="times a failed worker group restarts from the last checkpoint (default: %(default)s)")


def add_embedding_args(parser: argparse.ArgumentParser, cache_default: str) -> None:
    """How frames are sampled and embedded by a frozen trunk (simulate, query): one group, one
    set of defaults (:class:`cluster.embeddings.SampleSpec`'s)."""
    from cluster.embeddings import SampleSpec

    group = parser.add_argument_group("frames and embeddings")
    group.add_argument("--init", default=None, metavar="CKPT",
                       help="backbone checkpoint URI: model.pt or backbone.safetensors (default: random init)")
    add_sampling_args(group, fps=SampleSpec.fps, max_per_video=SampleSpec.max_per_video, zero_is_none=True)
    add_format_args(group, image_size=SampleSpec.size, channels=SampleSpec.channels)
    group.add_argument("--embed-seed", type=int, default=0, help="seed of a random-init trunk (0)")
    group.add_argument("--embed-workers", type=int, default=None, help="embedding actors at most")
    group.add_argument("--embed-gpu", action="store_true", help="embed on GPUs")
    group.add_argument("--cache", default=None, metavar="URI", help=f"embeddings cache (default {cache_default})")


def sample_spec_from(args: argparse.Namespace):
    """The :class:`cluster.embeddings.SampleSpec` of :func:`add_embedding_args`' flags."""
    from cluster.embeddings import SampleSpec
    from jobs.output import UserError

    try:
        return SampleSpec(fps=args.fps or None, max_per_video=args.max_per_video or None, size=args.image_size,
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
    """``"a, b,"`` -> ``["a", "b"]`` (the config models' rule, :func:`ultrasound.config.split_names`)."""
    from ultrasound.config import split_names

    return None if text is None else list(split_names(text))


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
    other flag of the job is declared: the job's settings model is built from its flags here
    (:func:`flag_settings_model`) and :func:`apply_flag_config` reads it."""
    add_config_args(parser, what)
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in _NOT_SETTABLE and not a.required}
    parser.set_defaults(_settings_model=flag_settings_model(flags, what), _settable=flags, _config_what=what)


def flag_settings_model(flags: Mapping[str, argparse.Action], what: str) -> type:
    """The typed settings model (an :class:`ultrasound.config.Settings`, like USCL's, MSML's and
    the simulator's) of a job whose settings are its flags: one field per flag, typed by the
    flag's ``type`` (a switch is a bool; a flag without a number type keeps its text), its
    default the flag's; choices are checked as the flag checks them."""
    from typing import Any as AnyValue

    from pydantic import create_model, field_validator

    from ultrasound.config import Settings

    fields: dict[str, Any] = {}
    for dest, action in flags.items():
        kind = bool if isinstance(action, argparse._StoreTrueAction) else \
            action.type if action.type in (int, float) else AnyValue
        fields[dest] = (kind | None if action.default is None and kind is not AnyValue else kind, action.default)

    def check(cls, value, info):
        action = flags[info.field_name]
        if callable(action.type) and action.type not in (int, float) and isinstance(value, str):
            value = action.type(value)  # e.g. a comma-separated list
        if action.choices is not None and value is not None and value not in action.choices:
            raise ValueError(f"expected one of {list(action.choices)}")
        return value

    validators = {"_flag_rules": field_validator("*", mode="after")(check)}
    model = create_model(f"{what.title().replace(' ', '')}", __base__=Settings, __validators__=validators, **fields)
    model.what = what.removesuffix(" settings")  # "evaluation": "evaluation config key 'folds' ..."
    return model


def apply_flag_config(args: argparse.Namespace, storage: Storage | None = None) -> None:
    """Fill ``args`` from ``--config`` then ``--set``, where the flag itself was not given (a
    flag given on the command line always wins), through the job's settings model: an unknown
    key names the valid ones, a value of the wrong type names the key and the value."""
    from cluster.job_config import ConfigError, layered
    from jobs.output import UserError

    model, flags = getattr(args, "_settings_model", None), getattr(args, "_settable", {})
    try:
        values = layered(args.config, args.set_items, {}, storage=storage, what=getattr(args, "_config_what", "settings"))
    except ConfigError as err:
        raise UserError(str(err)) from err
    if model is None or not values:
        return
    keys = {str(key).replace("-", "_"): value for key, value in values.items()}
    try:
        settings = model.parse(keys)
    except ValueError as err:
        raise UserError(str(err)) from None
    for dest in keys:
        if getattr(args, dest) == flags[dest].default:  # not given on the command line
            setattr(args, dest, getattr(settings, dest))
