import re
import subprocess
import sys

import pytest

from jobs.cli import build_parser, main


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_console_script_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, check=True)
    for name in subcommands():
        assert name in out.stdout
    for expected in ("demo", "phantom", "ingest", "frames", "store", "submit", "jobs"):
        assert expected in subcommands()


@pytest.mark.parametrize("name", subcommands())
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: sonoray " + name in capsys.readouterr().out


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_version_names_the_installed_distribution(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sonoray {version('sonoray')}"


@pytest.mark.parametrize("argv", [["-q", "phantom"], ["phantom", "-q"]])
def test_quiet_drops_progress_lines_either_side_of_the_command(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SONORAY_QUIET", "0")  # restored after the test: -q sets it for the process
    assert main(["phantom", str(tmp_path / "loud"), "--videos", "2", "--frames", "4", "--size", "32"]) == 0
    assert "[sonoray " in capsys.readouterr().err
    quiet = [*argv, str(tmp_path / "quiet"), "--videos", "2", "--frames", "4", "--size", "32"]
    assert main(quiet) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "quiet" / "manifest.csv").is_file()


@pytest.mark.parametrize("uri", ["gs://bucket/x", "s3:///no-bucket", "ftp://host/x"])
def test_an_unsupported_uri_is_one_line_and_exit_2(uri, capsys):
    assert main(["frames", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sonoray: error: ") and "Traceback" not in err[0]


def test_counted_progress_is_a_line_with_an_eta_and_a_bar_on_a_terminal(capsys, monkeypatch):
    import io
    import time

    from cluster.progress import Count
    from jobs import output

    started = time.perf_counter() - 10.0
    line = Count("simulate", 4, 10, "experiments", "3.0 rounds/s", started=started)
    assert isinstance(line, str) and line.startswith("simulate: 4/10 experiments, 3.0 rounds/s, ETA 1")
    output.progress(line)  # not a terminal: the plain, stamped line
    assert capsys.readouterr().err.rstrip().endswith("simulate: 4/10 experiments, 3.0 rounds/s, ETA 15s")
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(output.sys, "stderr", terminal)
    for done in (4, 10):
        output.progress(Count("simulate", done, 10, "experiments", started=started))
    drawn = terminal.getvalue()
    assert "40%" in drawn and "100%" in drawn and "10/10" in drawn and not output._BARS


def _job_parser(name: str):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def _flag(parser, option: str):
    return next(a for a in parser._actions if option in a.option_strings)


@pytest.mark.parametrize("name", ["frames", "cache", "evaluate", "msml", "pretrain", "simulate", "query"])
def test_frame_format_and_sampling_flags_are_one_declaration(name):
    """--image-size (alias --size), --channels, --fps and --max-per-video are the shared groups
    in every frame-reading job: the same names, the same destination, help built from the default."""
    parser = _job_parser(name)
    size = _flag(parser, "--image-size")
    assert size.option_strings == ["--image-size", "--size"] and size.dest == "image_size"
    assert _flag(parser, "--channels").choices == [1, 3]
    if name not in ("pretrain",):  # pretrain samples clips, not frames per second
        fps, cap = _flag(parser, "--fps"), _flag(parser, "--max-per-video")
        assert "frames kept per second of video" in fps.help and "frames per video at most" in cap.help
        assert (f"{fps.default:g}" if fps.default else "every frame") in fps.help


@pytest.mark.parametrize("name, config_path, flags", [
    ("msml", "ultrasound.msml:MSMLConfig", {"--epochs": "epochs", "--lr": "lr", "--batch-size": "batch_size",
                                           "--image-size": "image_size", "--channels": "channels"}),
    ("pretrain", "ultrasound.uscl:USCLConfig", {"--epochs": "epochs", "--batch-videos": "batch_videos",
                                               "--image-size": "image_size", "--pairs": "pairs"}),
    ("simulate", "ultrasound.active.sim_config:SimulationConfig",
     {"--seeds": "seeds", "--per-round": "per_round", "--rounds": "rounds", "--audit": "audit",
      "--max-machine-per-round": "max_machine_per_round"}),
])
def test_help_defaults_come_from_the_config_fields(name, config_path, flags):
    """The flags that override a config are declared from its fields: the default in the help
    is the field's, and an unset flag is None, so the config file's value stands."""
    import importlib

    module, cls = config_path.split(":")
    model = getattr(importlib.import_module(module), cls)
    defaults = {name: model.default_of(name) for name in model.valid_keys()}
    parser = _job_parser(name)
    for option, field in flags.items():
        value = defaults[field]
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        assert re.search(rf"default: (the config's, else )?{re.escape(shown)}\)", _flag(parser, option).help), option
        assert _flag(parser, option).default is None  # unset flags leave the config's value
