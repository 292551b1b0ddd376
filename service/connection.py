"""The NATS connection for a pod, from Settings (DESIGN.md §5).

`connect_options(settings)` turns the `MAILBOX_NATS_*` settings into `nats.connect` keyword
arguments: a `.creds` file (`MAILBOX_NATS_CREDS`), user/password, token, TLS (CA, optional
client certificate and key) and the reconnect policy.

`connect(settings, url)` connects with a *bounded* first attempt (each server is tried a few
times with a connect timeout, and reconnecting is only switched on once the first connection
is up, so a wrong address or a rejected credential fails the start instead of retrying
forever) and turns every failure into a `ConnectError` whose message says what failed and
which `MAILBOX_*` variable to check. The messages never contain a password, token, seed or
JWT.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client

from .config import Settings
from .natsclient import MailboxNatsClient

log = logging.getLogger("mailbox.connection")

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_CONNECT_TIMEOUT = 5.0
"""Seconds for one TCP connect + TLS handshake + CONNECT/PING round trip."""
DEFAULT_CONNECT_ATTEMPTS = 3
"""Tries per server for the first connection (with `reconnect_time_wait` between them)."""

_CREDS = "MAILBOX_NATS_CREDS"
_USER = "MAILBOX_NATS_USER"
_PASSWORD = "MAILBOX_NATS_PASSWORD"
_TOKEN = "MAILBOX_NATS_TOKEN"
_URL = "MAILBOX_NATS_URL"
_CA = "MAILBOX_NATS_TLS_CA"
_CERT = "MAILBOX_NATS_TLS_CERT"
_KEY = "MAILBOX_NATS_TLS_KEY"


class ConnectError(RuntimeError):
    """The pod could not connect to NATS; the message names the variable to check."""


# -- options ------------------------------------------------------------------------------


def connect_options(settings: Settings) -> dict[str, Any]:
    """nats.connect keyword arguments for the configured credentials, TLS and reconnects.

    Checks that the files named by the settings exist and are usable first, raising
    ConnectError naming the variable and path (a missing .creds file would otherwise only
    fail inside the client's signature callback)."""
    options: dict[str, Any] = {
        "name": f"mailbox-{settings.prefix}",
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "allow_reconnect": True,
        "connect_timeout": DEFAULT_CONNECT_TIMEOUT,
    }
    if settings.nats_creds:
        check_creds_file(settings.nats_creds)
        _require_nkeys()
        options["user_credentials"] = settings.nats_creds
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password or ""
    if settings.nats_token:
        options["token"] = settings.nats_token
    if settings.nats_tls_ca or settings.nats_tls_cert or settings.nats_tls_key:
        options["tls"] = tls_context(settings)
    return options


def _readable(variable: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConnectError(f"{variable}={path!r}: file not found") from None
    except IsADirectoryError:
        raise ConnectError(f"{variable}={path!r}: is a directory, not a file") from None
    except OSError as exc:
        raise ConnectError(f"{variable}={path!r}: cannot be read ({exc.strerror or exc})") from None


def _require_nkeys() -> None:
    """nats-py signs the server's nonce with the `nkeys` package, imported only while
    connecting; without it a .creds file fails there with a bare ImportError."""
    try:
        import nkeys  # noqa: F401
    except ImportError:
        raise ConnectError(
            f"{_CREDS} is set but the 'nkeys' package is not installed (install 'nats-py[nkeys]')"
        ) from None


def _jwt_claims(token: str) -> dict[str, Any] | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def check_creds_file(path: str, now: float | None = None) -> None:
    """A readable NATS `.creds` file with a user JWT that has not expired, else ConnectError.

    (nats-py reads the file only while connecting, and loops forever on a file without the
    `BEGIN NATS USER JWT` line, so this is checked up front.)"""
    text = _readable(_CREDS, path).decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines()]
    jwt = seed = None
    for i, line in enumerate(lines):
        if "BEGIN NATS USER JWT" in line and i + 1 < len(lines):
            jwt = lines[i + 1]
        elif "BEGIN USER NKEY SEED" in line and i + 1 < len(lines):
            seed = lines[i + 1]
    if not jwt or not seed:
        missing = "the user JWT" if not jwt else "the user NKEY seed"
        raise ConnectError(
            f"{_CREDS}={path!r} is not a NATS credentials file: {missing} section "
            "('-----BEGIN NATS USER JWT-----' / '-----BEGIN USER NKEY SEED-----') is missing"
        )
    if not seed.startswith("SU"):
        raise ConnectError(f"{_CREDS}={path!r}: the NKEY seed section does not hold a user seed")
    claims = _jwt_claims(jwt)
    if claims is None:
        raise ConnectError(f"{_CREDS}={path!r}: the user JWT cannot be decoded")
    exp = claims.get("exp")
    if isinstance(exp, int | float) and exp > 0 and exp <= (time.time() if now is None else now):
        when = datetime.fromtimestamp(exp, UTC).isoformat(timespec="seconds")
        raise ConnectError(
            f"{_CREDS}={path!r}: the user JWT expired at {when}; issue new credentials for {_CREDS}"
        )


def tls_context(settings: Settings) -> ssl.SSLContext:
    """An SSLContext trusting MAILBOX_NATS_TLS_CA (system CAs when unset) and presenting the
    client certificate MAILBOX_NATS_TLS_CERT/KEY when set."""
    if bool(settings.nats_tls_cert) != bool(settings.nats_tls_key):
        raise ConnectError(f"{_CERT} and {_KEY} must be set together")
    if settings.nats_tls_ca:
        _readable(_CA, settings.nats_tls_ca)
        try:
            ctx = ssl.create_default_context(cafile=settings.nats_tls_ca)
        except ssl.SSLError as exc:
            raise ConnectError(
                f"{_CA}={settings.nats_tls_ca!r} is not a PEM CA certificate bundle ({_ssl_reason(exc)})"
            ) from None
    else:
        ctx = ssl.create_default_context()
    if settings.nats_tls_cert and settings.nats_tls_key:
        _readable(_CERT, settings.nats_tls_cert)
        _readable(_KEY, settings.nats_tls_key)
        try:
            ctx.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
        except ssl.SSLError as exc:
            raise ConnectError(
                f"{_CERT}={settings.nats_tls_cert!r} / {_KEY}={settings.nats_tls_key!r}: cannot load the client "
                f"certificate and key ({_ssl_reason(exc)}; is the key the one for this certificate, and unencrypted?)"
            ) from None
    return ctx


# -- connect --------------------------------------------------------------------------------


def server_urls(url: str) -> list[str]:
    """`MAILBOX_NATS_URL` may list several servers, comma-separated."""
    return [u.strip() for u in url.split(",") if u.strip()]


def display_url(url: str) -> str:
    """scheme://host:port, without any user, password or token in the URL."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}:{port or 4222}"


ErrorCallback = Callable[[Exception], Awaitable[None]]


async def connect(
    settings: Settings,
    url: str | None = None,
    *,
    connect_timeout: float | None = None,
    connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
    client_class: type[Client] = MailboxNatsClient,
    **overrides: Any,
) -> Client:
    """Connect to NATS as configured; raise ConnectError (secret-free, naming the variable)
    when that fails.

    The first connection is bounded: each server is tried `connect_attempts` times with
    `connect_timeout` seconds per try, and a rejected credential or TLS handshake stops it at
    once. Once connected, the client reconnects forever (`max_reconnect_attempts=-1`).
    `overrides` are further `nats.connect` keyword arguments (callbacks etc.); an `error_cb`
    among them sees the errors after the first connection (before it, they go into the
    ConnectError). Without one, errors are logged once per distinct message (30 s).
    The client is a `MailboxNatsClient` (the faster header parser) unless `client_class` says
    otherwise."""
    target = url or settings.nats_url or DEFAULT_URL
    servers = server_urls(target)
    if not servers:
        raise ConnectError(f"{_URL}={target!r} names no server")
    shown = ", ".join(display_url(s) for s in servers)

    options = connect_options(settings)
    options.update(overrides)
    if connect_timeout is not None:
        options["connect_timeout"] = connect_timeout
    steady = {
        "allow_reconnect": options.pop("allow_reconnect", True),
        "max_reconnect_attempts": options.pop("max_reconnect_attempts", -1),
    }
    user_error_cb: ErrorCallback | None = options.pop("error_cb", None)
    seen: list[Exception] = []
    connected = False
    last_logged: list[Any] = ["", 0.0]

    async def error_cb(exc: Exception) -> None:
        if not connected:  # summarized in the ConnectError, if the first connection fails
            seen.append(exc)
        elif user_error_cb is not None:
            await user_error_cb(exc)
        else:  # while reconnecting the same error repeats every reconnect_time_wait
            text = _scrub(_describe(exc), settings, servers)
            now = time.monotonic()
            if text != last_logged[0] or now - last_logged[1] > 30:
                last_logged[:] = [text, now]
                log.warning("event=nats_error error=%r", text)

    nc = client_class()
    try:
        await nc.connect(
            servers,
            error_cb=error_cb,
            # Bounded first connection: a failure on a reachable server (auth, TLS) raises
            # at once; unreachable servers are dropped after `connect_attempts` tries
            # (max_reconnect_attempts=0 would mean "never drop" to nats-py, hence >= 1).
            allow_reconnect=False,
            max_reconnect_attempts=max(1, connect_attempts - 1),
            **options,
        )
        if not nc.is_connected:
            # The server closed the connection right after CONNECT (nats-py then returns
            # without a PONG): the cause, if any, reached the error callback.
            raise nats.errors.UnexpectedEOF()
        if "tls" in options and not _uses_tls(nc):
            await _close_quietly(nc)
            raise ConnectError(
                f"TLS is configured ({_CA}/{_CERT}) but the NATS server at {shown} does not offer TLS; "
                f"point {_URL} at a TLS listener or unset the TLS variables"
            )
    except ConnectError:
        raise
    except Exception as exc:
        # NoServersError: no TCP connection could be made. Anything else was raised while
        # talking to a server that answered (TLS handshake, CONNECT, first PING).
        reached = not isinstance(exc, nats.errors.NoServersError)
        server_info = getattr(nc, "_server_info", None) or {}
        tls = "tls" in options or bool(server_info.get("tls_required"))
        await _close_quietly(nc)
        cause = _root_cause(exc, seen)
        explained = _explain(cause, settings, shown, reached=reached, tls=tls, url_auth=_url_has_auth(servers))
        message = _scrub(explained, settings, servers)
        raise ConnectError(message) from cause
    connected = True
    nc.options.update(steady)
    return nc


async def _close_quietly(nc: Client) -> None:
    """Close a client whose first connection failed. After a failed TLS upgrade nats-py's
    own close() waits forever for the plain stream (its protocol was handed to the TLS
    layer), so the sockets are aborted and dropped first."""
    transport = getattr(nc, "_transport", None)
    for name in ("_io_writer", "_bare_io_writer"):
        writer = getattr(transport, name, None)
        if writer is not None:
            writer.transport.abort()
    if transport is not None and hasattr(transport, "_io_writer"):
        nc._transport = None  # type: ignore[attr-defined]
    try:
        await asyncio.wait_for(nc.close(), 5)
    except Exception:
        pass


def _uses_tls(nc: Client) -> bool:
    transport = getattr(nc, "_transport", None)
    writer = getattr(transport, "_io_writer", None)
    if writer is None:  # another transport (websocket): cannot tell, trust the client
        return True
    return writer.get_extra_info("ssl_object") is not None


# -- explaining failures --------------------------------------------------------------------


def _root_cause(exc: Exception, seen: list[Exception]) -> Exception:
    """The error that explains the failure: NoServersError and a bare EOF say little, the
    last specific error the client reported says more."""
    if isinstance(exc, nats.errors.NoServersError | nats.errors.UnexpectedEOF):
        for earlier in reversed(seen):
            if not isinstance(earlier, nats.errors.NoServersError | nats.errors.UnexpectedEOF):
                return earlier
    return exc


def _ssl_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return exc.verify_message
    return exc.reason or str(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return _ssl_reason(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).removeprefix("nats: ").strip().strip("'")
    if isinstance(exc, TimeoutError) or not text:
        return "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
    return text


def _url_has_auth(servers: list[str]) -> bool:
    return any(urlsplit(u if "://" in u else f"nats://{u}").username for u in servers)


def _auth_hint(settings: Settings, url_auth: bool) -> str:
    if settings.nats_creds:
        return (
            f"the user JWT in {_CREDS}={settings.nats_creds!r} was not accepted (expired or revoked, "
            f"or issued by an account or operator this server does not trust); check {_CREDS}"
        )
    if settings.nats_user:
        return f"user {settings.nats_user!r} or its password was not accepted; check {_USER} and {_PASSWORD}"
    if settings.nats_token:
        return f"the token was not accepted; check {_TOKEN}"
    if url_auth:
        return f"the user/password or token inside {_URL} was not accepted; check {_URL}"
    return f"the server requires credentials: set {_CREDS}, {_USER} and {_PASSWORD}, or {_TOKEN}"


_TLS_VARIABLES = f"{_CA}, {_CERT} and {_KEY}"


def _explain(
    exc: BaseException, settings: Settings, shown: str, *, reached: bool, tls: bool, url_auth: bool = False
) -> str:
    reason = _describe(exc)
    lower = str(exc).lower()
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in lower:
        return f"NATS authorization violation at {shown}: {_auth_hint(settings, url_auth)}"
    if "authentication expired" in lower or "authentication revoked" in lower:
        return f"NATS rejected the credentials at {shown} ({reason}): {_auth_hint(settings, url_auth)}"
    if isinstance(exc, nats.errors.InvalidUserCredentialsError):
        return f"{_CREDS}={settings.nats_creds!r}: invalid credentials file ({reason})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        if "mismatch" in reason.lower():
            return (
                f"TLS certificate verification failed for {shown} ({reason}): the host in {_URL} must be "
                f"one of the names in the server certificate"
            )
        if settings.nats_tls_ca:
            hint = f"check that {_CA}={settings.nats_tls_ca!r} is the CA that signed the server certificate"
        else:
            hint = f"set {_CA} to the CA that signed the server certificate"
        return f"TLS certificate verification failed for {shown} ({reason}): {hint}"
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS handshake with {shown} failed ({reason}): check {_TLS_VARIABLES} "
            "(the server may reject the client certificate, or require one)"
        )
    if reached and isinstance(exc, TimeoutError) and not isinstance(exc, nats.errors.Error):
        step = "the TLS handshake or " if tls else ""
        return (
            f"NATS at {shown} accepted the connection but {step}its greeting did not complete in time "
            f"({reason}): check {_URL} (is it a NATS client port?) and whether the server is overloaded"
        )
    if reached and tls and isinstance(exc, OSError | TimeoutError | nats.errors.Error):
        # With TLS 1.3 the client's side of the handshake completes before the server
        # checks the client certificate; a rejection then shows as a closed connection.
        return (
            f"NATS at {shown} closed the TLS connection during the handshake ({reason}): the server "
            f"probably rejected the client certificate or requires one; check {_TLS_VARIABLES}"
        )
    if reached and isinstance(exc, OSError | TimeoutError | nats.errors.Error):
        return (
            f"NATS at {shown} closed the connection while connecting ({reason}): check {_URL} (is it a "
            "NATS client port?) and the credentials"
        )
    if isinstance(exc, OSError | TimeoutError | nats.errors.NoServersError):
        return f"cannot reach NATS at {shown} ({reason}): check {_URL}"
    return f"cannot connect to NATS at {shown} ({reason}): check {_URL} and the MAILBOX_NATS_* settings"


def _scrub(message: str, settings: Settings, servers: list[str]) -> str:
    """Belt and braces: no configured secret survives into a message."""
    secrets = [settings.nats_password, settings.nats_token]
    for s in servers:
        parts = urlsplit(s if "://" in s else f"nats://{s}")
        secrets += [parts.password] if parts.password else [parts.username]  # nats://TOKEN@host
    for secret in secrets:
        if secret and len(secret) >= 3:
            message = message.replace(secret, "****")
    return message


__all__ = [
    "DEFAULT_URL",
    "ConnectError",
    "check_creds_file",
    "connect",
    "connect_options",
    "display_url",
    "server_urls",
    "tls_context",
]
