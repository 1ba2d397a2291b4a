"""Keep credentials out of log lines, error messages, job logs and saved configs.

Three kinds of secret are masked as ``***``:

- the values of credential variables in the environment (``secret_variables``): the AWS keys,
  ``RAY_AUTH_TOKEN``, and any variable whose name ends in ``_TOKEN`` or contains ``SECRET`` or
  ``PASSWORD``; values of 3 characters or fewer are left alone (masking "1" or "yes" would mangle
  every line and protect nothing);
- values registered at run time with ``register_secret`` (e.g. a Ray token read from a file);
- the password part of ``scheme://user:password@host`` URLs.

Example::

    >>> redact("s3://me:hunter22@minio:9000/b", secrets=[])
    's3://me:***@minio:9000/b'
    >>> redact("key=abcd1234", secrets=["abcd1234"])
    'key=***'
"""
from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

MASK = "***"

# Always secret, whatever the naming rules below say.
SECRET_VARIABLE_NAMES = frozenset(
    {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN"}
)
# A credential by its name, as the boto3 / Ray / Optuna ecosystems spell them: *_SECRET*,
# *_TOKEN*, *_PASSWORD*, *_API_KEY*, *_ACCESS_KEY* (and the same words leading the name, PGPASSWORD).
# A name ending in _PATH or _DIR names where a secret lives (RAY_AUTH_TOKEN_PATH), not the secret.
_SECRET_WORDS = r"(SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|ACCESS_KEY)"
_SECRET_NAME = re.compile(rf"(_{_SECRET_WORDS}|^{_SECRET_WORDS}(_|$)|^PG{_SECRET_WORDS}$|SECRET)", re.IGNORECASE)
_LOCATION_NAME = re.compile(r"_(PATH|DIR)$", re.IGNORECASE)
# Values this short are not masked: they are too common to be worth hiding and masking them
# would garble unrelated text.
MIN_SECRET_LENGTH = 4

# scheme://user:password@host  ->  scheme://user:***@host. The user may be empty; the password
# runs to the LAST "@" that is followed by a host (no "@", "/" or space up to the path), so a
# password holding "/" or "@" is masked whole.
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]*:)(?P<password>[^\s]*)@(?=[^\s@/]+(?:[/?#\s'\"]|$))"
)

# Keys of a saved config whose values are masked whole.
_SECRET_KEY = re.compile(r"(secret|token|password|passwd|key_id|credential)", re.IGNORECASE)

_registered: set[str] = set()
_registered_lock = threading.Lock()


def is_secret_name(name: str) -> bool:
    """True when an environment variable called ``name`` holds a credential."""
    if name.upper() in SECRET_VARIABLE_NAMES:
        return True
    return bool(_SECRET_NAME.search(name)) and not _LOCATION_NAME.search(name)


def secret_variables(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The credential variables of ``environ`` (default ``os.environ``) worth masking: name -> value."""
    environ = os.environ if environ is None else environ
    return {
        name: value
        for name, value in environ.items()
        if is_secret_name(name) and len(value) >= MIN_SECRET_LENGTH
    }


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values to mask: credential variables of ``environ`` plus registered secrets.

    Longest first, so that a secret containing another is masked whole.
    """
    with _registered_lock:
        values = set(_registered)
    values.update(secret_variables(environ).values())
    return sorted(values, key=lambda value: (-len(value), value))


def register_secret(value: str | None) -> None:
    """Mask ``value`` from now on in this process (ignored when None or too short)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        with _registered_lock:
            _registered.add(value)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every secret and every URL password replaced by ``***``.

    ``secrets`` defaults to ``secret_values()`` (the environment plus registered values).
    """
    if not text:
        return text
    values = secret_values() if secrets is None else sorted(set(secrets), key=len, reverse=True)
    for value in values:
        if value and value in text:
            text = text.replace(value, MASK)
    return _URL_PASSWORD.sub(_mask_password, text)


def _mask_password(match: re.Match) -> str:
    """``scheme://user:***@``, once ``urllib.parse`` agrees the match is a URL with userinfo."""
    head = match.group("head")
    candidate = f"{head}x@host"
    if urlsplit(candidate).password is None:  # not a URL authority after all: leave it
        return match.group(0)
    return f"{head}{MASK}@"


def redact_mapping(data: Any, secrets: Iterable[str] | None = None) -> Any:
    """A copy of a config (nested dicts / lists / tuples) safe to save or print.

    The value of every key that names a credential (secret, token, password, key_id,
    credential) becomes ``***``; every other string goes through ``redact``.
    """
    values = secret_values() if secrets is None else list(secrets)
    return _redact_any(data, values)


def _redact_any(data: Any, values: list[str]) -> Any:
    if isinstance(data, Mapping):
        return {
            key: (MASK if isinstance(key, str) and _SECRET_KEY.search(key) and data[key] not in (None, "")
                  else _redact_any(data[key], values))
            for key in data
        }
    if isinstance(data, list):
        return [_redact_any(item, values) for item in data]
    if isinstance(data, tuple):
        return tuple(_redact_any(item, values) for item in data)
    if isinstance(data, str):
        return redact(data, values)
    return data


class RedactingFilter(logging.Filter):
    """A logging filter that rewrites each record's message (and traceback) with ``redact``.

    It never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Render the record's message and traceback once, redacted, in place."""
    if getattr(record, "_sonoray_redacted", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: leave it for the handler to report
        return record
    record.msg = redact(message)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._sonoray_redacted = True
    return record


_installed_filter: RedactingFilter | None = None
_previous_factory = None


def install_log_redaction() -> RedactingFilter:
    """Redact every log record of this process from now on; idempotent.

    The filter is added to the root logger and its handlers, and the log-record factory is
    wrapped so that records of loggers with their own handlers (Ray's, for one) are redacted
    too: a filter on the root logger alone sees only records logged on the root logger itself.
    """
    global _installed_filter, _previous_factory
    root = logging.getLogger()
    if _installed_filter is None:
        _installed_filter = RedactingFilter()
        previous = logging.getLogRecordFactory()
        _previous_factory = previous

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return redact_record(previous(*args, **kwargs))

        logging.setLogRecordFactory(factory)
    if _installed_filter not in root.filters:
        root.addFilter(_installed_filter)
    for handler in root.handlers:
        if _installed_filter not in handler.filters:
            handler.addFilter(_installed_filter)
    return _installed_filter


def remove_log_redaction() -> None:
    """Undo ``install_log_redaction`` (for tests)."""
    global _installed_filter, _previous_factory
    if _installed_filter is None:
        return
    root = logging.getLogger()
    root.removeFilter(_installed_filter)
    for handler in root.handlers:
        handler.removeFilter(_installed_filter)
    if _previous_factory is not None:
        logging.setLogRecordFactory(_previous_factory)
    _installed_filter = None
    _previous_factory = None
