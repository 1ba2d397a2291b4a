"""cluster.redact: credentials out of text, log records and saved configs."""
from __future__ import annotations

import io
import logging

import pytest

from cluster import redact as redact_module
from cluster.redact import (
    MASK,
    RedactingFilter,
    install_log_redaction,
    is_secret_name,
    redact,
    redact_mapping,
    register_secret,
    remove_log_redaction,
    secret_values,
    secret_variables,
)

ENV = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG",
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEJr",
    "RAY_AUTH_TOKEN": "ray-token-abcdef",
    "HF_TOKEN": "hf_abcdefgh",
    "DB_PASSWORD": "correct horse",
    "MY_SECRET_THING": "x1y2z3",
    "SHORT_TOKEN": "abc",  # 3 characters: left alone
    "RAY_AUTH_TOKEN_PATH": "/home/me/.ray/auth_token",  # a path, not a secret
    "AWS_DEFAULT_REGION": "us-east-1",
    "HOME": "/home/me",
    "TOKENIZER": "bert",
}


def test_secret_variables_by_name():
    found = secret_variables(ENV)
    assert set(found) == {
        "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN",
        "HF_TOKEN", "DB_PASSWORD", "MY_SECRET_THING",
    }
    assert is_secret_name("github_token") and is_secret_name("PGPASSWORD")
    assert not is_secret_name("RAY_AUTH_TOKEN_PATH") and not is_secret_name("TOKENIZER")


def test_secret_values_longest_first_and_include_registered():
    register_secret("registered-value-9")
    register_secret("ab")  # too short: ignored
    values = secret_values(ENV)
    assert "registered-value-9" in values and "ab" not in values and "abc" not in values
    assert [len(v) for v in values] == sorted((len(v) for v in values), reverse=True)


def test_redact_masks_each_secret_and_url_passwords():
    secrets = secret_values(ENV)
    text = ("key wJalrXUtnFEMI/K7MDENG id AKIAIOSFODNN7 tok ray-token-abcdef pw correct horse "
            "url https://alice:p4ss-word@minio.example:9000/bucket region us-east-1 abc")
    assert redact(text, secrets) == (
        "key *** id *** tok *** pw *** url https://alice:***@minio.example:9000/bucket "
        "region us-east-1 abc"
    )
    # no userinfo, a port: untouched
    assert redact("http://127.0.0.1:8265/api/jobs/", []) == "http://127.0.0.1:8265/api/jobs/"
    assert redact("s3://bucket/key:with:colons@x", []) == "s3://bucket/key:with:colons@x"


def test_redact_masks_a_secret_containing_another_whole():
    assert redact("v=abcd-abcd-1234", ["abcd", "abcd-abcd-1234"]) == "v=***"


def test_redact_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "env-token-777")
    assert redact("got env-token-777 here") == "got *** here"


def test_redact_mapping_masks_secret_keys_recursively_and_leaves_the_input_alone():
    config = {
        "aws_access_key_id": "AKIA1",
        "AWS_SECRET_ACCESS_KEY": "zzz",
        "storage": {"endpoint_url": "http://u:pw1234@minio:9000", "session_token": None,
                    "options": [{"password": "hunter2"}, "plain", ("tuple", "ray-token-abcdef")]},
        "max_epochs": 3,
        "Credentials": {"nested": "anything"},
        "empty_token": "",
    }
    out = redact_mapping(config, secret_values(ENV))
    assert out == {
        "aws_access_key_id": MASK,
        "AWS_SECRET_ACCESS_KEY": MASK,
        "storage": {"endpoint_url": "http://u:***@minio:9000", "session_token": None,
                    "options": [{"password": MASK}, "plain", ("tuple", MASK)]},
        "max_epochs": 3,
        "Credentials": MASK,
        "empty_token": "",
    }
    assert config["aws_access_key_id"] == "AKIA1"  # not mutated


@pytest.fixture
def log_redaction(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "log-secret-value-1")
    yield install_log_redaction()
    remove_log_redaction()


def test_log_records_are_redacted_on_root_and_on_loggers_with_their_own_handlers(log_redaction):
    assert isinstance(log_redaction, RedactingFilter)
    root_stream, own_stream = io.StringIO(), io.StringIO()
    root_handler = logging.StreamHandler(root_stream)
    logging.getLogger().addHandler(root_handler)
    own = logging.getLogger("sonoray.test.own")
    own.propagate = False
    own_handler = logging.StreamHandler(own_stream)
    own.addHandler(own_handler)
    try:
        logging.getLogger().warning("root sees %s", "log-secret-value-1")
        logging.getLogger("sonoray.test.child").warning("child sees %s", "log-secret-value-1")
        own.warning("own handler sees log-secret-value-1 and s3://me:pw999@h/b")
        try:
            raise RuntimeError("boom with log-secret-value-1")
        except RuntimeError:
            logging.getLogger("sonoray.test.child").exception("failed")
    finally:
        logging.getLogger().removeHandler(root_handler)
        own.removeHandler(own_handler)
    root_text, own_text = root_stream.getvalue(), own_stream.getvalue()
    assert "log-secret-value-1" not in root_text + own_text
    assert "root sees ***" in root_text and "child sees ***" in root_text
    assert "RuntimeError: boom with ***" in root_text
    assert own_text.strip() == "own handler sees *** and s3://me:***@h/b"


def test_install_is_idempotent_and_removal_restores_plain_records(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "log-secret-value-2")
    first = install_log_redaction()
    assert install_log_redaction() is first
    assert logging.getLogger().filters.count(first) == 1
    remove_log_redaction()
    assert first not in logging.getLogger().filters
    record = logging.getLogRecordFactory()("x", logging.INFO, __file__, 1, "v=%s", ("log-secret-value-2",), None)
    assert record.getMessage() == "v=log-secret-value-2"
    assert redact_module._installed_filter is None


PASSWORD = "pa/ss@w0rd"  # a "/" and an "@": the old pattern stopped at the first of them


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["endpoint-url", "optuna-storage", "api-key-variable"])
def test_real_command_output_never_shows_a_credential(case, tmp_path, monkeypatch, capsys, ray_cluster):
    from jobs.cli import main
    from tests.conftest import run_cli

    (tmp_path / "m.csv").write_text("path\n")
    ingest = ["ingest", str(tmp_path), "--manifest", str(tmp_path / "m.csv")]
    if case == "endpoint-url":
        argv = [*ingest, "--to", "s3://b/x", "--endpoint-url", f"http://u:{PASSWORD}@127.0.0.1:9/"]
        shown = "http://u:***@127.0.0.1:9/"
    elif case == "optuna-storage":
        monkeypatch.setenv("SONORAY_OPTUNA_STORAGE", f"postgresql://:{PASSWORD}@127.0.0.1:9/db")  # empty user
        argv = ["sweep", "tsal", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "sweep"), "--trials", "1"]
        shown = "postgresql://:***@127.0.0.1:9/db"
    else:
        monkeypatch.setenv("SONORAY_TEST_API_KEY", "zz-" + PASSWORD)
        argv = [*ingest, "--to", str(tmp_path / f"zz-{PASSWORD}")]
        shown = "***"
    code, _ = run_cli(main, argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert PASSWORD not in text and "pa/ss" not in text and "w0rd" not in text, text
    assert shown in text, text
    saved = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.json"))
    assert PASSWORD not in saved  # sweep.json and friends: redacted too
    if case != "api-key-variable":
        assert code == 2


@pytest.mark.parametrize(("text", "expected"), [
    ("s3://me:a/b@c@minio:9000/bucket/x", "s3://me:***@minio:9000/bucket/x"),
    ("postgresql://:secret@db:5432/optuna", "postgresql://:***@db:5432/optuna"),
    ("'mysql://u:x@y@h/db'", "'mysql://u:***@h/db'"),
    ("s3://bucket/key:with:colons@x", "s3://bucket/key:with:colons@x"),
])
def test_url_passwords_with_slashes_ats_and_empty_users_are_masked(text, expected):
    assert redact(text, []) == expected


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "MINIO_ACCESS_KEY", "OPTUNA_DB_PASSWORD", "GH_TOKEN_X",
                                  "X_SECRET"])
def test_credential_variable_names_of_the_ecosystem(name):
    assert is_secret_name(name)


def test_an_unexpected_failure_prints_its_traceback_redacted(monkeypatch, capsys):
    """A bug's traceback is shown (it helps) but a URL password or a credential in it is masked."""
    import jobs.cli as cli
    import jobs.frames

    monkeypatch.setenv("SONORAY_TEST_TOKEN", "tok-" + PASSWORD)

    def broken(args):
        raise RuntimeError(f"boom at s3://me:{PASSWORD}@minio:9000/b with tok-{PASSWORD}")

    monkeypatch.setattr(jobs.frames, "run", broken)  # the parser binds each job's run when built
    code = cli.main(["frames", "/nowhere"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "RuntimeError" in err
    assert PASSWORD not in err and "pa/ss" not in err
    assert "s3://me:***@minio:9000/b" in err
    assert err.strip().splitlines()[-1].startswith("sonoray: error: frames failed unexpectedly (RuntimeError)")


@pytest.mark.timeout(120)
def test_what_a_worker_prints_reaches_the_driver_redacted_on_stderr_without_rays_chatter(ray_cluster, capfd):
    import time

    import ray

    @ray.remote(num_cpus=0)
    def leaky() -> None:
        print("Requesting resources: chatter of Ray's own", flush=True)
        print(f"pretrain: worker saw s3://me:{PASSWORD}@minio:9000/b", flush=True)

    ray.get(leaky.remote())
    seen = ""
    deadline = time.monotonic() + 30
    while "worker saw" not in seen and time.monotonic() < deadline:  # the log monitor forwards
        time.sleep(0.2)                                                 # asynchronously
        captured = capfd.readouterr()
        seen += captured.err
        assert "worker saw" not in captured.out  # stdout is sonoray's own
    assert "pretrain: worker saw s3://me:***@minio:9000/b" in seen
    assert PASSWORD not in seen
    assert "chatter of Ray's own" not in seen  # Ray's internals are hidden unless sonoray -v
