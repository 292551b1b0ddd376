"""Settings: every `MAILBOX_*` variable in one msgspec Struct (DESIGN.md §5).

`from_env()` reads the environment (and optionally a `KEY=VALUE` file named by
`MAILBOX_CONFIG_FILE`); a bad value stops the start with a message that names the variable
and the accepted range.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec


class ConfigError(ValueError):
    """An invalid setting; the message names the variable and what it accepts."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # NATS connection
    nats_url: str | None = None
    """Unset: start an embedded nats-server with JetStream under `data_dir`."""
    nats_creds: str | None = None
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    data_dir: str = ".data"
    prefix: str = "mailbox"
    replicas: int = 1
    # execution
    handler: str = "echo"
    concurrency: int = 16
    lease_ms: int = 30_000
    suspended_lease_ms: int = 600_000
    lease_renewal_ms: int = 10_000
    decision_wait_ms: int = 300_000
    """How long a handler waits in-run for a decision before the attempt ends as `waiting`."""
    drain_timeout_ms: int = 30_000
    # maintenance
    sweep_interval_ms: int = 30_000
    gc_interval_ms: int = 60_000
    gc_ttl_ms: int = 86_400_000
    republish_after_ms: int = 30_000
    # retries
    max_attempts: int = 5
    retry_base_ms: int = 250
    retry_cap_ms: int = 30_000
    # signals
    signal_batch: int = 32
    fetch_expires_ms: int = 500
    nak_base_ms: int = 500
    nak_cap_ms: int = 30_000
    ack_wait_ms: int = 30_000
    max_ack_pending: int = 10_000
    max_deliver: int = -1
    # API and events
    max_payload: int = 256 * 1024
    events_max_age_ms: int = 3_600_000
    # observability
    metrics_port: int = 9464
    health_port: int = 8081
    log_level: str = "info"


# variable -> (field, (min, max)) for integers; strings have no range
_RANGES: dict[str, tuple[int, int]] = {
    "replicas": (1, 5),
    "concurrency": (1, 10_000),
    "lease_ms": (100, 86_400_000),
    "suspended_lease_ms": (100, 7 * 86_400_000),
    "lease_renewal_ms": (10, 3_600_000),
    "decision_wait_ms": (0, 7 * 86_400_000),
    "drain_timeout_ms": (0, 3_600_000),
    "sweep_interval_ms": (10, 3_600_000),
    "gc_interval_ms": (10, 86_400_000),
    "gc_ttl_ms": (0, 365 * 86_400_000),
    "republish_after_ms": (10, 3_600_000),
    "max_attempts": (1, 1000),
    "retry_base_ms": (1, 3_600_000),
    "retry_cap_ms": (1, 86_400_000),
    "signal_batch": (1, 1000),
    "fetch_expires_ms": (10, 60_000),
    "nak_base_ms": (1, 3_600_000),
    "nak_cap_ms": (1, 86_400_000),
    "ack_wait_ms": (1000, 3_600_000),
    "max_ack_pending": (1, 1_000_000),
    "max_deliver": (-1, 1_000_000),
    "max_payload": (1024, 8 * 1024 * 1024),
    "events_max_age_ms": (1000, 365 * 86_400_000),
    "metrics_port": (0, 65535),
    "health_port": (0, 65535),
}
_CHOICES: dict[str, tuple[str, ...]] = {"log_level": ("debug", "info", "warning", "error")}
_SECRETS = {"nats_password", "nats_token"}


def env_name(field: str) -> str:
    return "MAILBOX_" + field.upper()


def from_mapping(values: Mapping[str, str]) -> Settings:
    """Settings from `MAILBOX_*` strings; raises ConfigError naming the bad variable."""
    kwargs: dict[str, Any] = {}
    for field in Settings.__struct_fields__:
        raw = values.get(env_name(field))
        if raw is None or raw == "":
            continue
        if field in _RANGES:
            lo, hi = _RANGES[field]
            try:
                value = int(raw.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{env_name(field)}={raw!r} is not an integer (accepted: {lo}..{hi})") from None
            if not lo <= value <= hi:
                raise ConfigError(f"{env_name(field)}={value} is out of range (accepted: {lo}..{hi})")
            kwargs[field] = value
        elif field in _CHOICES:
            if raw.lower() not in _CHOICES[field]:
                raise ConfigError(f"{env_name(field)}={raw!r} is not one of {', '.join(_CHOICES[field])}")
            kwargs[field] = raw.lower()
        else:
            kwargs[field] = raw
    settings = Settings(**kwargs)
    _check_consistency(settings)
    return settings


def _check_consistency(s: Settings) -> None:
    if s.lease_renewal_ms >= s.lease_ms:
        raise ConfigError(
            f"MAILBOX_LEASE_RENEWAL_MS={s.lease_renewal_ms} must be shorter than MAILBOX_LEASE_MS={s.lease_ms}"
        )
    if s.retry_cap_ms < s.retry_base_ms:
        raise ConfigError("MAILBOX_RETRY_CAP_MS must be at least MAILBOX_RETRY_BASE_MS")
    if s.nak_cap_ms < s.nak_base_ms:
        raise ConfigError("MAILBOX_NAK_CAP_MS must be at least MAILBOX_NAK_BASE_MS")
    if not s.prefix.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"MAILBOX_PREFIX={s.prefix!r} may contain only letters, digits, '-' and '_'")
    if bool(s.nats_tls_cert) != bool(s.nats_tls_key):
        raise ConfigError("MAILBOX_NATS_TLS_CERT and MAILBOX_NATS_TLS_KEY must be set together")


def read_config_file(path: str) -> dict[str, str]:
    """`KEY=VALUE` lines (comments with #), as in an env file."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"MAILBOX_CONFIG_FILE={path!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"MAILBOX_CONFIG_FILE={path!r} is not UTF-8 text") from None
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"{path}:{n}: expected KEY=VALUE")
        values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment; a file named by MAILBOX_CONFIG_FILE fills the gaps."""
    env = dict(os.environ if environ is None else environ)
    file = env.get("MAILBOX_CONFIG_FILE")
    merged = {**(read_config_file(file) if file else {}), **env}
    return from_mapping(merged)


def mask_url(url: str) -> str:
    """A server URL with any user info (user:password@, token@) replaced by ****."""
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    masked_rest = "****@" + rest.rsplit("@", 1)[1]
    return f"{scheme}://{masked_rest}" if sep else masked_rest


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings by variable name, secrets masked (for --print-config)."""
    out: dict[str, Any] = {}
    for field in Settings.__struct_fields__:
        value = getattr(settings, field)
        if field in _SECRETS and value:
            value = "****"
        if field == "nats_url" and value:
            value = ",".join(mask_url(u) for u in value.split(","))
        out[env_name(field)] = value
    return out
