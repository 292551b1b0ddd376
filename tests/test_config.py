"""Settings from `MAILBOX_*` variables (DESIGN.md §5): defaults, parsing, ranges, choices,
consistency checks, `MAILBOX_CONFIG_FILE`, and masking for --print-config."""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec
import pytest

from service import config
from service.config import ConfigError, Settings, env_name, from_env, from_mapping, masked, read_config_file

DEFAULTS = Settings()
INT_FIELDS = [f for f in Settings.__struct_fields__ if type(getattr(DEFAULTS, f)) is int]
RANGES = config._RANGES


def partners(field: str, value: int) -> dict[str, str]:
    """Other variables that keep the consistency checks happy for `field=value`."""
    env: dict[str, str] = {}
    if field == "lease_ms" and value <= DEFAULTS.lease_renewal_ms:
        env["MAILBOX_LEASE_RENEWAL_MS"] = str(max(RANGES["lease_renewal_ms"][0], value // 2))
    if field == "lease_renewal_ms" and value >= DEFAULTS.lease_ms:
        env["MAILBOX_LEASE_MS"] = str(value + 1)
    if field == "retry_base_ms" and value > DEFAULTS.retry_cap_ms:
        env["MAILBOX_RETRY_CAP_MS"] = str(value)
    if field == "retry_cap_ms" and value < DEFAULTS.retry_base_ms:
        env["MAILBOX_RETRY_BASE_MS"] = str(value)
    if field == "nak_base_ms" and value > DEFAULTS.nak_cap_ms:
        env["MAILBOX_NAK_CAP_MS"] = str(value)
    if field == "nak_cap_ms" and value < DEFAULTS.nak_base_ms:
        env["MAILBOX_NAK_BASE_MS"] = str(value)
    return env


# -- defaults -----------------------------------------------------------------------------


def test_defaults() -> None:
    assert from_mapping({}) == DEFAULTS
    assert from_env({}) == DEFAULTS
    assert DEFAULTS.nats_url is None  # unset: embedded nats-server
    assert DEFAULTS.nats_creds is None and DEFAULTS.nats_user is None and DEFAULTS.nats_token is None
    assert DEFAULTS.prefix == "mailbox"
    assert DEFAULTS.replicas == 1
    assert DEFAULTS.handler == "echo"
    assert DEFAULTS.concurrency == 16
    assert DEFAULTS.lease_renewal_ms < DEFAULTS.lease_ms
    assert DEFAULTS.log_level == "info"
    assert (DEFAULTS.metrics_port, DEFAULTS.health_port) == (9464, 8081)


def test_defaults_are_within_their_ranges() -> None:
    for field in INT_FIELDS:
        lo, hi = RANGES[field]
        assert lo <= getattr(DEFAULTS, field) <= hi, field


def test_every_integer_setting_has_a_range() -> None:
    assert set(INT_FIELDS) == set(RANGES)


def test_unrelated_and_empty_variables_are_ignored() -> None:
    env = {"PATH": "/bin", "MAILBOX_CONCURRENCY": "", "MAILBOX_NOT_A_SETTING": "x", "OTEL_SERVICE_NAME": "m"}
    assert from_mapping(env) == DEFAULTS


# -- integers -----------------------------------------------------------------------------


@pytest.mark.parametrize("field", INT_FIELDS)
def test_integer_parsed_from_env(field: str) -> None:
    lo, hi = RANGES[field]
    name = env_name(field)
    for value in sorted({lo, hi, min(max(getattr(DEFAULTS, field) + 1, lo), hi)}):
        settings = from_env({name: str(value), **partners(field, value)})
        assert getattr(settings, field) == value, (name, value)
        assert type(getattr(settings, field)) is int


def test_integer_with_underscores() -> None:
    assert from_mapping({"MAILBOX_GC_TTL_MS": "86_400_000"}).gc_ttl_ms == 86_400_000


@pytest.mark.parametrize("field", INT_FIELDS)
def test_integer_out_of_range(field: str) -> None:
    lo, hi = RANGES[field]
    name = env_name(field)
    for value in (lo - 1, hi + 1):
        with pytest.raises(ConfigError) as info:
            from_mapping({name: str(value)})
        message = str(info.value)
        assert name in message and f"{lo}..{hi}" in message and "out of range" in message


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("raw", ["abc", "1.5", "12ms", "0x10", "1e3"])
def test_integer_not_a_number(field: str, raw: str) -> None:
    lo, hi = RANGES[field]
    name = env_name(field)
    with pytest.raises(ConfigError) as info:
        from_mapping({name: raw})
    message = str(info.value)
    assert name in message and "not an integer" in message and f"{lo}..{hi}" in message
    assert repr(raw) in message


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# -- strings and choices ------------------------------------------------------------------


def test_strings_are_taken_as_given() -> None:
    env = {
        "MAILBOX_NATS_URL": "nats://n1:4222,nats://n2:4222",
        "MAILBOX_NATS_CREDS": "/etc/nats/pod.creds",
        "MAILBOX_NATS_USER": "pod",
        "MAILBOX_NATS_PASSWORD": "pw",
        "MAILBOX_NATS_TOKEN": "tk",
        "MAILBOX_NATS_TLS_CA": "/ca.pem",
        "MAILBOX_NATS_TLS_CERT": "/c.pem",
        "MAILBOX_NATS_TLS_KEY": "/c.key",
        "MAILBOX_DATA_DIR": "/var/lib/mailbox",
        "MAILBOX_PREFIX": "team-a_1",
        "MAILBOX_HANDLER": "mypkg.handlers:run",
    }
    s = from_mapping(env)
    assert s.nats_url == "nats://n1:4222,nats://n2:4222"
    assert (s.nats_creds, s.nats_user, s.nats_password, s.nats_token) == ("/etc/nats/pod.creds", "pod", "pw", "tk")
    assert (s.nats_tls_ca, s.nats_tls_cert, s.nats_tls_key) == ("/ca.pem", "/c.pem", "/c.key")
    assert (s.data_dir, s.prefix, s.handler) == ("/var/lib/mailbox", "team-a_1", "mypkg.handlers:run")


@pytest.mark.parametrize("raw, expected", [("debug", "debug"), ("INFO", "info"), ("Warning", "warning"), ("error", "error")])
def test_log_level_choices(raw: str, expected: str) -> None:
    assert from_mapping({"MAILBOX_LOG_LEVEL": raw}).log_level == expected


@pytest.mark.parametrize("raw", ["verbose", "warn", "trace", "0"])
def test_log_level_rejected(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"MAILBOX_LOG_LEVEL": raw})
    message = str(info.value)
    assert "MAILBOX_LOG_LEVEL" in message and repr(raw) in message
    for choice in ("debug", "info", "warning", "error"):
        assert choice in message


# -- consistency --------------------------------------------------------------------------


@pytest.mark.parametrize("renewal, lease", [(30_000, 30_000), (40_000, 30_000), (100, 100)])
def test_renewal_must_be_shorter_than_lease(renewal: int, lease: int) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"MAILBOX_LEASE_RENEWAL_MS": str(renewal), "MAILBOX_LEASE_MS": str(lease)})
    message = str(info.value)
    assert "MAILBOX_LEASE_RENEWAL_MS" in message and "MAILBOX_LEASE_MS" in message
    assert from_mapping({"MAILBOX_LEASE_RENEWAL_MS": str(lease - 1), "MAILBOX_LEASE_MS": str(lease)}).lease_ms == lease


def test_lease_alone_below_the_default_renewal() -> None:
    with pytest.raises(ConfigError, match="MAILBOX_LEASE_RENEWAL_MS=10000 must be shorter than MAILBOX_LEASE_MS=5000"):
        from_mapping({"MAILBOX_LEASE_MS": "5000"})


def test_caps_at_least_bases() -> None:
    with pytest.raises(ConfigError, match="MAILBOX_RETRY_CAP_MS.*MAILBOX_RETRY_BASE_MS"):
        from_mapping({"MAILBOX_RETRY_BASE_MS": "1000", "MAILBOX_RETRY_CAP_MS": "999"})
    with pytest.raises(ConfigError, match="MAILBOX_NAK_CAP_MS.*MAILBOX_NAK_BASE_MS"):
        from_mapping({"MAILBOX_NAK_BASE_MS": "1000", "MAILBOX_NAK_CAP_MS": "999"})
    s = from_mapping({"MAILBOX_RETRY_BASE_MS": "1000", "MAILBOX_RETRY_CAP_MS": "1000"})
    assert s.retry_base_ms == s.retry_cap_ms == 1000


@pytest.mark.parametrize("only", ["MAILBOX_NATS_TLS_CERT", "MAILBOX_NATS_TLS_KEY"])
def test_tls_cert_and_key_together(only: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({only: "/some/file.pem"})
    assert "MAILBOX_NATS_TLS_CERT" in str(info.value) and "MAILBOX_NATS_TLS_KEY" in str(info.value)
    assert from_mapping({"MAILBOX_NATS_TLS_CA": "/ca.pem"}).nats_tls_ca == "/ca.pem"  # CA alone is fine


@pytest.mark.parametrize("prefix", ["a.b", "a b", "a*", "a>", "a/b", "a:b", "$sys"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"MAILBOX_PREFIX": prefix})
    message = str(info.value)
    assert "MAILBOX_PREFIX" in message and repr(prefix) in message and "letters, digits" in message


@pytest.mark.parametrize("prefix", ["mailbox", "team-a", "team_b", "T1", "x"])
def test_good_prefix(prefix: str) -> None:
    assert from_mapping({"MAILBOX_PREFIX": prefix}).prefix == prefix


# -- MAILBOX_CONFIG_FILE ------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "mailbox.env") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_fills_the_gaps(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# mailbox settings\n"
        "\n"
        "MAILBOX_CONCURRENCY=32\n"
        "  MAILBOX_PREFIX = filed  \n"
        'MAILBOX_NATS_URL="nats://file:4222"\n'
        "MAILBOX_LOG_LEVEL='debug'\n"
        "MAILBOX_MAX_PAYLOAD=65_536\n",
    )
    s = from_env({"MAILBOX_CONFIG_FILE": path})
    assert s.concurrency == 32
    assert s.prefix == "filed"
    assert s.nats_url == "nats://file:4222"
    assert s.log_level == "debug"
    assert s.max_payload == 65_536


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "MAILBOX_CONCURRENCY=32\nMAILBOX_PREFIX=filed\n")
    s = from_env({"MAILBOX_CONFIG_FILE": path, "MAILBOX_CONCURRENCY": "4"})
    assert s.concurrency == 4
    assert s.prefix == "filed"


def test_from_env_reads_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "MAILBOX_CONCURRENCY=32\nMAILBOX_REPLICAS=3\n")
    monkeypatch.setenv("MAILBOX_CONFIG_FILE", path)
    monkeypatch.setenv("MAILBOX_REPLICAS", "5")
    s = from_env()
    assert (s.concurrency, s.replicas) == (32, 5)


def test_bad_value_in_the_file_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "MAILBOX_CONCURRENCY=0\n")
    with pytest.raises(ConfigError, match=re.escape("MAILBOX_CONCURRENCY=0 is out of range (accepted: 1..10000)")):
        from_env({"MAILBOX_CONFIG_FILE": path})
    # ...unless the environment overrides it
    assert from_env({"MAILBOX_CONFIG_FILE": path, "MAILBOX_CONCURRENCY": "2"}).concurrency == 2


def test_missing_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.env")
    with pytest.raises(ConfigError) as info:
        from_env({"MAILBOX_CONFIG_FILE": path})
    message = str(info.value)
    assert "MAILBOX_CONFIG_FILE" in message and path in message and "cannot be read" in message


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MAILBOX_CONFIG_FILE=.*cannot be read"):
        from_env({"MAILBOX_CONFIG_FILE": str(tmp_path)})


def test_unreadable_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "MAILBOX_CONCURRENCY=2\n")
    os.chmod(path, 0)
    if os.geteuid() == 0:  # root reads any file: make the read fail as it would for a pod's user
        def denied(self: Path, *args: object, **kwargs: object) -> str:
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match="MAILBOX_CONFIG_FILE=.*cannot be read.*ermission"):
        from_env({"MAILBOX_CONFIG_FILE": path})


def test_binary_config_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.env"
    path.write_bytes(b"\xff\xfe\x00MAILBOX")
    with pytest.raises(ConfigError, match="MAILBOX_CONFIG_FILE"):
        from_env({"MAILBOX_CONFIG_FILE": str(path)})


def test_malformed_config_file_line(tmp_path: Path) -> None:
    path = write(tmp_path, "MAILBOX_CONCURRENCY=2\nthis line has no equals sign\n")
    with pytest.raises(ConfigError) as info:
        read_config_file(path)
    assert f"{path}:2" in str(info.value) and "KEY=VALUE" in str(info.value)


def test_empty_config_file_variable_is_ignored() -> None:
    assert from_env({"MAILBOX_CONFIG_FILE": ""}) == DEFAULTS


# -- masked -------------------------------------------------------------------------------


def test_masked_hides_secrets() -> None:
    s = Settings(
        nats_url="nats://pod:url-secret@nats.example:4222",
        nats_user="pod",
        nats_password="pw-secret",
        nats_token="token-secret",
        nats_creds="/etc/nats/pod.creds",
    )
    out = masked(s)
    assert out["MAILBOX_NATS_PASSWORD"] == "****"
    assert out["MAILBOX_NATS_TOKEN"] == "****"
    assert out["MAILBOX_NATS_URL"] == "nats://****@nats.example:4222"
    assert out["MAILBOX_NATS_USER"] == "pod"
    assert out["MAILBOX_NATS_CREDS"] == "/etc/nats/pod.creds"  # a path, not a secret
    text = msgspec.json.encode(out).decode()
    for secret in ("url-secret", "pw-secret", "token-secret"):
        assert secret not in text


def test_masked_token_in_url() -> None:
    out = masked(Settings(nats_url="tls://s3cr3t-token@nats.example:4443"))
    assert out["MAILBOX_NATS_URL"] == "tls://****@nats.example:4443"


def test_masked_keeps_everything_else() -> None:
    s = from_mapping({"MAILBOX_CONCURRENCY": "7", "MAILBOX_NATS_URL": "nats://n1:4222"})
    out = masked(s)
    assert set(out) == {env_name(f) for f in Settings.__struct_fields__}
    assert out["MAILBOX_CONCURRENCY"] == 7
    assert out["MAILBOX_NATS_URL"] == "nats://n1:4222"
    assert out["MAILBOX_NATS_PASSWORD"] is None and out["MAILBOX_NATS_TOKEN"] is None


def test_masked_every_url_in_a_list() -> None:
    out = masked(Settings(nats_url="nats://a:first-secret@n1:4222,nats://b:second-secret@n2:4222"))
    assert "first-secret" not in out["MAILBOX_NATS_URL"]
    assert "second-secret" not in out["MAILBOX_NATS_URL"]


def test_masked_url_without_scheme() -> None:
    out = masked(Settings(nats_url="pod:url-secret@nats.example:4222"))
    assert "url-secret" not in str(out["MAILBOX_NATS_URL"])
