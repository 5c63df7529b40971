"""Object-store settings, resolved once and handed to every consumer.

Three libraries touch storage in this pipeline and each wants the same facts spelled differently:
Lance/LanceDB take a flat `storage_options` dict (keys like `endpoint`, `access_key_id`; spec §2.5),
s3fs (the read stage, model copies) takes `endpoint_url`/`key`/`secret`, pyarrow wants a filesystem object.
`StorageConfig` keeps one dict in Lance's naming and derives the other two from it.

Nothing is read at import time: `StorageConfig.from_env()` reads the environment when called, on the
driver. Ray workers do not inherit variables set on the driver after `ray.init`, so the resolved
options travel to workers explicitly (constructor arguments), never through the environment.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs

# Standard AWS variables -> Lance option names, in order of precedence (first set wins).
_ENV_TO_OPTION: dict[str, tuple[str, ...]] = {
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "access_key_id": ("AWS_ACCESS_KEY_ID",),
    "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "allow_http": ("AWS_ALLOW_HTTP",),
}

# Lance accepts the S3 keys with or without an `aws_` prefix (spec §2.5); we store the short form so
# the fsspec mapping below has one name to look for.
_ALIASES = {f"aws_{k}": k for k in _ENV_TO_OPTION}

# Lance's object-store client gives up on a transient error (503, connection reset, endpoint
# unreachable) after 3 retries, about 0.6 s of backoff: a 10 s S3 outage mid-write failed a writer
# task's list request ("after 3 retries, max_retries: 3", tests/pipeline/test_faults.py). 10 retries
# back off for tens of seconds within Lance's 180 s `client_retry_timeout`. Explicit options win.
# (s3fs needs nothing: its own retry loop over botocore's rode out the same 10 s outage on a read.)
LANCE_RETRY_DEFAULTS = {"client_max_retries": "10"}

_SECRET_KEY = re.compile(r"secret|token|password|credential|access_key_id|account_key|sas", re.IGNORECASE)
REDACTED = "***"
_S3_SCHEMES = ("s3", "s3a")
# Loggers that print request headers at DEBUG, a session token among them: botocore's request signer
# (the canonical request) and its endpoint (the request dict). Found by tests/jobs/test_secrets.py.
_HEADER_LOGGERS = ("botocore.auth", "botocore.endpoint")
MIN_SECRET = 6  # characters (see `StorageConfig.__post_init__`)


class _SecretValues(logging.Filter):
    """Replaces the credential values this process holds with "***" in the messages of `_HEADER_LOGGERS`."""

    def __init__(self) -> None:
        super().__init__()
        self.values: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(v in message for v in self.values):
            for v in self.values:
                message = message.replace(v, REDACTED)
            record.msg, record.args = message, ()
        return True


_SECRET_VALUES = _SecretValues()


def _keep_out_of_logs(values: set[str]) -> None:
    """Have `_SECRET_VALUES` redact `values` from now on (the filter is attached on first use, not at import)."""
    if values <= _SECRET_VALUES.values:
        return
    _SECRET_VALUES.values |= values
    for name in _HEADER_LOGGERS:
        logger = logging.getLogger(name)
        if _SECRET_VALUES not in logger.filters:
            logger.addFilter(_SECRET_VALUES)


def parse_storage_options(pairs: list[str]) -> dict[str, str]:
    """Parse repeated `--storage-option key=value` flags into a dict (later pairs win).

    The value may itself contain `=`; the key may not be empty.
    """
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(
                f"storage option {pair!r} is not of the form key=value "
                f"(for example endpoint=http://127.0.0.1:9000 or allow_http=true)"
            )
        options[key] = value
    return options


def _normalize_key(key: str) -> str:
    key = key.strip().lower()
    return _ALIASES.get(key, key)


def url_path(url: str) -> str:
    """The part of `url` an fsspec filesystem takes: `s3://b/k` -> `b/k`; local paths unchanged."""
    return url.split("://", 1)[1] if "://" in url else url


def _scheme(url: str) -> str:
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


@dataclass(frozen=True)
class StorageConfig:
    """Object-store options in Lance's naming (`endpoint`, `access_key_id`, `region`, ...).

    Build it with `from_env()`. Keys other than the standard S3 ones are passed through to Lance
    untouched (e.g. `dynamodb_endpoint`, `client_max_retries`, `virtual_hosted_style_request`).
    """

    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # botocore prints the session token of every request it logs at DEBUG: the credentials this config
        # holds are redacted from those records (see `_HEADER_LOGGERS`). Values under MIN_SECRET characters are
        # left alone: no real credential is that short, and redacting them would garble every record.
        _keep_out_of_logs({v for k, v in self.options.items() if len(v) >= MIN_SECRET and _SECRET_KEY.search(k)})

    @classmethod
    def from_env(
        cls, overrides: Mapping[str, str] | None = None, env: Mapping[str, str] = os.environ
    ) -> StorageConfig:
        """Resolve options from the standard AWS environment, then apply explicit `overrides`."""
        options: dict[str, str] = {}
        for option, names in _ENV_TO_OPTION.items():
            for name in names:
                if env.get(name):
                    options[option] = env[name]
                    break
        for key, value in (overrides or {}).items():
            options[_normalize_key(key)] = str(value)
        return cls(options)

    def lance_options(self) -> dict[str, str]:
        """A copy for `lancedb.connect(storage_options=...)` and the `lance` APIs, with our retry defaults."""
        return {**LANCE_RETRY_DEFAULTS, **self.options}

    def fsspec_filesystem(self, url: str) -> fsspec.AbstractFileSystem:
        """An fsspec filesystem for `url`: s3fs built from these options for s3://, fsspec's default otherwise.

        Only the S3 keys are mapped; for other schemes fsspec's own credential discovery applies.
        """
        import fsspec

        if _scheme(url) not in _S3_SCHEMES:
            return fsspec.core.url_to_fs(url)[0]
        import s3fs

        # skip_instance_cache: two configs with different endpoints must not share a cached client.
        return s3fs.S3FileSystem(skip_instance_cache=True, **self.fsspec_options(url))

    def fsspec_options(self, url: str) -> dict[str, Any]:
        """These options in fsspec's naming for `url`'s scheme (s3fs keywords for s3://)."""
        if _scheme(url) not in _S3_SCHEMES:
            return {}
        opts = self.options
        kwargs: dict[str, Any] = {}
        if "endpoint" in opts:
            kwargs["endpoint_url"] = opts["endpoint"]
        if "access_key_id" in opts:
            kwargs["key"] = opts["access_key_id"]
        if "secret_access_key" in opts:
            kwargs["secret"] = opts["secret_access_key"]
        if "session_token" in opts:
            kwargs["token"] = opts["session_token"]
        if "region" in opts:
            kwargs["client_kwargs"] = {"region_name": opts["region"]}
        return kwargs

    def pyarrow_filesystem(self, url: str) -> pyarrow.fs.FileSystem | None:
        """A pyarrow filesystem (for `pq.write_table(filesystem=...)` and the like); None for local paths.

        Remote URLs get `PyFileSystem(FSSpecHandler(...))` over `fsspec_filesystem(url)`, so read and
        write sides share one credential mapping.
        """
        if _scheme(url) in ("", "file", "local"):
            return None
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.fsspec_filesystem(url)))

    def redacted(self) -> dict[str, str]:
        """The options with credentials replaced by "***", for logs and run reports."""
        return {k: (REDACTED if _SECRET_KEY.search(k) else v) for k, v in self.options.items()}

    def __repr__(self) -> str:
        # The default dataclass repr would print credentials into any log that formats the config.
        return f"StorageConfig(options={self.redacted()!r})"
