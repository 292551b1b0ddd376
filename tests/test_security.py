"""Secured NATS: each test runs against a real nats-server configured for it (user/password,
token, mutual TLS, decentralized JWT auth with a .creds file), JetStream on, and checks that
`service.connection.connect` gets in with the right settings and fails with a clear,
secret-free ConnectError naming the `MAILBOX_*` variables with the wrong ones."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import Client

from service.config import Settings, from_mapping
from service.connection import ConnectError, connect, connect_options, display_url, server_urls
from service.embedded import NatsServer
from service.natsclient import MailboxNatsClient
from service.model import RunDispatch
from service.store import NatsDispatchStore

from .conftest import unique_prefix

PASSWORD = "s3cr3t-Passw0rd-xyz"
TOKEN = "tok-9f8e7d6c5b4a-secret"


def settings(**env: str) -> Settings:
    return from_mapping({f"MAILBOX_{k.upper()}": v for k, v in env.items()})


async def use_jetstream(nc: Client) -> None:
    """A store on the connection, and a dispatch enqueued and read back through it."""
    store = await NatsDispatchStore.connect(nc, prefix=unique_prefix("sec"))
    try:
        d = RunDispatch.queued("d1", "t1", "run-d1", 1000)
        await store.enqueue(d)
        loaded = await store.load_dispatch("d1")
        assert loaded is not None and loaded.dispatch_id == "d1"
    finally:
        await store.close()


async def expect_connect_error(s: Settings, url: str, *secrets: str, **kw: object) -> str:
    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        nc = await connect(s, url, **kw)  # type: ignore[arg-type]
        await nc.close()
    message = str(info.value)
    shown = f"{message} {info.value.__cause__!s} {info.value.__cause__!r}"  # the traceback shows the cause too
    for secret in secrets:
        assert secret not in shown
    assert time.monotonic() - started < 20, "the first connection must be bounded"
    return message


def started(extra_config: str) -> Iterator[NatsServer]:
    server = NatsServer(extra_config=extra_config).start()
    try:
        yield server
    finally:
        server.cleanup()


# -- user/password ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_server() -> Iterator[NatsServer]:
    yield from started(f'authorization {{ users: [ {{ user: "mbx", password: "{PASSWORD}" }} ] }}')


async def test_user_password_connects_and_uses_jetstream(user_server: NatsServer) -> None:
    nc = await connect(settings(nats_user="mbx", nats_password=PASSWORD), user_server.url)
    try:
        await use_jetstream(nc)
    finally:
        await nc.close()


async def test_wrong_password_is_an_authorization_error(user_server: NatsServer) -> None:
    wrong = "not-the-" + PASSWORD
    message = await expect_connect_error(settings(nats_user="mbx", nats_password=wrong), user_server.url, wrong, PASSWORD)
    assert "authorization" in message.lower()
    assert "MAILBOX_NATS_USER" in message and "MAILBOX_NATS_PASSWORD" in message


async def test_no_credentials_against_a_secured_server(user_server: NatsServer) -> None:
    message = await expect_connect_error(settings(), user_server.url)
    assert "authorization" in message.lower()
    assert "MAILBOX_NATS_CREDS" in message and "MAILBOX_NATS_USER" in message


async def test_password_inside_the_url_is_not_shown(user_server: NatsServer) -> None:
    wrong = "wrong-url-password"
    url = f"nats://mbx:{wrong}@127.0.0.1:{user_server.port}"
    message = await expect_connect_error(settings(nats_url=url), url, wrong)
    assert "MAILBOX_NATS_URL" in message and "authorization" in message.lower()
    nc = await connect(settings(nats_url=url.replace(wrong, PASSWORD)))
    await nc.close()


# -- token --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server() -> Iterator[NatsServer]:
    yield from started(f'authorization {{ token: "{TOKEN}" }}')


async def test_token_connects_and_uses_jetstream(token_server: NatsServer) -> None:
    nc = await connect(settings(nats_token=TOKEN), token_server.url)
    try:
        await use_jetstream(nc)
    finally:
        await nc.close()


async def test_wrong_token_is_an_authorization_error(token_server: NatsServer) -> None:
    wrong = TOKEN + "-tampered"
    message = await expect_connect_error(settings(nats_token=wrong), token_server.url, wrong, TOKEN)
    assert "authorization" in message.lower()
    assert "MAILBOX_NATS_TOKEN" in message


async def test_token_inside_the_url_and_a_server_list(token_server: NatsServer) -> None:
    """MAILBOX_NATS_URL may list servers, comma-separated: a dead one does not stop the
    connection to a live one, and a token in the URL never shows in a message."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        dead = f"nats://{TOKEN}@127.0.0.1:{held.getsockname()[1]}"
        live = f"nats://{TOKEN}@127.0.0.1:{token_server.port}"
        nc = await connect(settings(nats_url=f"{dead}, {live}"))
        try:
            assert nc.connected_url is not None and nc.connected_url.port == token_server.port
        finally:
            await nc.close()
        wrong = "wrong-token-in-url"
        message = await expect_connect_error(
            settings(), f"{dead.replace(TOKEN, wrong)},{live.replace(TOKEN, wrong)}", wrong, TOKEN
        )
    assert "authorization" in message.lower() and "MAILBOX_NATS_URL" in message


def test_server_urls_and_display() -> None:
    assert server_urls(" nats://a:4222, ,tls://b:4443 ") == ["nats://a:4222", "tls://b:4443"]
    assert display_url("nats://user:pw@h:4222") == "nats://h:4222"
    assert display_url("tok@h") == "nats://h:4222"
    assert display_url("tls://h") == "tls://h:4222"


# -- unreachable --------------------------------------------------------------------------


async def test_unreachable_server_fails_fast_naming_the_url() -> None:
    with socket.socket() as held:  # bound, never listening: refused, and no one else gets the port
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        started_at = time.monotonic()
        message = await expect_connect_error(settings(), f"nats://127.0.0.1:{port}", connect_attempts=2)
    assert "MAILBOX_NATS_URL" in message and "cannot reach" in message
    assert f"nats://127.0.0.1:{port}" in message
    assert time.monotonic() - started_at < 10


async def test_unresponsive_server_times_out() -> None:
    with socket.socket() as silent:  # accepts TCP connections (backlog) but never says INFO
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        message = await expect_connect_error(settings(), url, connect_timeout=0.5)
    assert "did not complete in time" in message and "MAILBOX_NATS_URL" in message


async def test_reconnects_forever_after_the_first_connection(nats_server: NatsServer) -> None:
    errors: list[Exception] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(exc)

    nc = await connect(settings(), nats_server.url, error_cb=error_cb)
    try:
        assert isinstance(nc, MailboxNatsClient)
        assert nc.options["allow_reconnect"] is True
        assert nc.options["max_reconnect_attempts"] == -1
        nats_server.restart()
        deadline = time.monotonic() + 15
        while not (nc.is_connected and nc.stats["reconnects"] >= 1) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert nc.is_connected and nc.stats["reconnects"] >= 1
        await nc.flush(timeout=5)
        assert errors, "after the first connection, errors reach the caller's error_cb"
    finally:
        await nc.close()


# -- TLS ----------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_path = path.with_suffix(".key")
    cert_path = path.with_suffix(".pem")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str, *, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


class Pki:
    def __init__(self, root: Path) -> None:
        ca = make_ca("mailbox test CA")
        other_ca = make_ca("some other CA")
        skey, scert = make_leaf(ca, "nats-server", server=True)
        ckey, ccert = make_leaf(ca, "mailbox-pod", server=False)
        rogue_key, rogue_cert = make_leaf(other_ca, "mailbox-pod", server=False)
        self.ca, _ = _write(root / "ca", ca[0], ca[1])
        self.other_ca, _ = _write(root / "other-ca", other_ca[0], other_ca[1])
        self.server_cert, self.server_key = _write(root / "server", skey, scert)
        self.client_cert, self.client_key = _write(root / "client", ckey, ccert)
        self.rogue_cert, self.rogue_key = _write(root / "rogue-client", rogue_key, rogue_cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[NatsServer]:
    yield from started(
        f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", ca_file: "{pki.ca}", '
        "verify: true, timeout: 5 }"
    )


def tls_settings(pki: Pki, *, ca: str | None = None, cert: bool = True, rogue: bool = False) -> Settings:
    env = {"nats_tls_ca": ca or pki.ca}
    if cert:
        env["nats_tls_cert"] = pki.rogue_cert if rogue else pki.client_cert
        env["nats_tls_key"] = pki.rogue_key if rogue else pki.client_key
    return settings(**env)


async def test_tls_with_ca_and_client_certificate(tls_server: NatsServer, pki: Pki) -> None:
    for url in (tls_server.url, f"tls://localhost:{tls_server.port}"):
        nc = await connect(tls_settings(pki), url)
        try:
            await use_jetstream(nc)
        finally:
            await nc.close()


async def test_tls_without_client_certificate(tls_server: NatsServer, pki: Pki) -> None:
    message = await expect_connect_error(tls_settings(pki, cert=False), tls_server.url)
    assert "TLS" in message
    assert "MAILBOX_NATS_TLS_CERT" in message and "MAILBOX_NATS_TLS_KEY" in message


async def test_tls_client_certificate_from_an_untrusted_ca(tls_server: NatsServer, pki: Pki) -> None:
    message = await expect_connect_error(tls_settings(pki, rogue=True), tls_server.url)
    assert "TLS" in message and "MAILBOX_NATS_TLS_CERT" in message


async def test_tls_wrong_ca(tls_server: NatsServer, pki: Pki) -> None:
    message = await expect_connect_error(tls_settings(pki, ca=pki.other_ca), tls_server.url)
    assert "certificate verification failed" in message
    assert "MAILBOX_NATS_TLS_CA" in message


async def test_tls_not_configured_against_a_tls_server(tls_server: NatsServer) -> None:
    message = await expect_connect_error(settings(), tls_server.url)
    assert "TLS" in message and "MAILBOX_NATS_TLS_CA" in message


async def test_tls_configured_against_a_plain_server(nats_server: NatsServer, pki: Pki) -> None:
    message = await expect_connect_error(tls_settings(pki), nats_server.url)
    assert "does not offer TLS" in message and "MAILBOX_NATS_URL" in message


async def test_tls_files_missing_or_broken(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConnectError, match=r"MAILBOX_NATS_TLS_CA='.*nope\.pem': file not found"):
        connect_options(tls_settings(pki, ca=missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConnectError, match="MAILBOX_NATS_TLS_CA=.*not a PEM CA"):
        connect_options(tls_settings(pki, ca=str(garbage)))
    mismatched = Settings(nats_tls_ca=pki.ca, nats_tls_cert=pki.client_cert, nats_tls_key=pki.rogue_key)
    with pytest.raises(ConnectError, match="MAILBOX_NATS_TLS_CERT=.*MAILBOX_NATS_TLS_KEY=.*cannot load"):
        connect_options(mismatched)
    no_key = Settings(nats_tls_cert=pki.client_cert, nats_tls_key=missing)
    with pytest.raises(ConnectError, match="MAILBOX_NATS_TLS_KEY=.*file not found"):
        connect_options(no_key)


# -- decentralized JWT auth (.creds) ------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_nkey(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def public(kp: nkeys.KeyPair) -> str:
    return kp.public_key.decode()


def encode_jwt(
    subject: str, name: str, nats_claims: dict, signer: nkeys.KeyPair, *, issuer: str | None = None, **extra: int
) -> str:
    """A nats JWT v2: {"typ":"JWT","alg":"ed25519-nkey"} header, claims with `jti` the
    base32 SHA-512/256 of the standard claims (as nats-io/jwt computes it), ed25519
    signature by the issuer's nkey over `header.claims`, all base64url without padding."""
    standard = {"exp": extra.get("exp", 0), "jti": "", "iat": int(time.time()) - 60, "iss": issuer or public(signer),
                "name": name, "sub": subject}
    standard = {k: v for k, v in standard.items() if v}
    digest = hashlib.new("sha512_256", json.dumps(standard, separators=(",", ":")).encode()).digest()
    standard["jti"] = base64.b32encode(digest).decode().rstrip("=")
    claims = {**standard, "nats": {**nats_claims, "version": 2}}
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = signer.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64url(signature)}"


def account_jwt(account: nkeys.KeyPair, operator: nkeys.KeyPair, name: str, *, jetstream: bool = True) -> str:
    limits: dict[str, int | bool] = {
        # core NATS: unlimited
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
        "conn": -1, "leaf": -1,
    }
    if jetstream:  # JetStream enabled for the account, unlimited (0/absent = disabled)
        limits.update({"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1})
    return encode_jwt(public(account), name, {"limits": limits, "type": "account"}, operator)


def user_jwt(
    user: nkeys.KeyPair, account: nkeys.KeyPair, name: str = "pod", *, issuer: str | None = None, **extra: int
) -> str:
    claims = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user"}
    return encode_jwt(public(user), name, claims, account, issuer=issuer, **extra)


def write_creds(path: Path, jwt: str, user: nkeys.KeyPair) -> str:
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )
    path.chmod(0o600)
    return str(path)


class Trust:
    """An operator, a system account, an application account with JetStream, and users."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.operator = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
        self.system = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
        self.account = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
        self.operator_jwt = encode_jwt(
            public(self.operator), "test-operator", {"type": "operator", "system_account": public(self.system)},
            self.operator,
        )
        self.system_jwt = account_jwt(self.system, self.operator, "SYS", jetstream=False)  # not allowed on SYS
        self.account_jwt = account_jwt(self.account, self.operator, "APP")

    def server_config(self) -> str:
        return (
            f'operator: "{self.operator_jwt}"\n'
            f'system_account: "{public(self.system)}"\n'
            "resolver: MEMORY\n"
            f'resolver_preload: {{ {public(self.system)}: "{self.system_jwt}", '
            f'{public(self.account)}: "{self.account_jwt}" }}'
        )

    def creds(self, name: str, *, signer: nkeys.KeyPair | None = None, issuer: str | None = None, **extra: int) -> str:
        user = new_nkey(nkeys.PREFIX_BYTE_USER)
        jwt = user_jwt(user, signer or self.account, issuer=issuer, **extra)
        return write_creds(self.root / f"{name}.creds", jwt, user)


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> Trust:
    return Trust(tmp_path_factory.mktemp("trust"))


@pytest.fixture(scope="module")
def operator_server(trust: Trust) -> Iterator[NatsServer]:
    yield from started(trust.server_config())


async def test_creds_file_connects_and_uses_jetstream(operator_server: NatsServer, trust: Trust) -> None:
    nc = await connect(settings(nats_creds=trust.creds("good")), operator_server.url)
    try:
        await use_jetstream(nc)
    finally:
        await nc.close()


async def test_creds_signed_by_an_unknown_account(operator_server: NatsServer, trust: Trust) -> None:
    rogue_account = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    path = trust.creds("rogue", signer=rogue_account)
    seed = Path(path).read_text().split("-----BEGIN USER NKEY SEED-----\n")[1].split("\n")[0]
    message = await expect_connect_error(settings(nats_creds=path), operator_server.url, seed)
    assert "authorization" in message.lower() and "MAILBOX_NATS_CREDS" in message


async def test_creds_claiming_the_account_but_signed_by_another_key(operator_server: NatsServer, trust: Trust) -> None:
    forged = trust.creds("forged", signer=new_nkey(nkeys.PREFIX_BYTE_ACCOUNT), issuer=public(trust.account))
    message = await expect_connect_error(settings(nats_creds=forged), operator_server.url)
    assert "authorization" in message.lower() and "MAILBOX_NATS_CREDS" in message


async def test_expired_creds(operator_server: NatsServer, trust: Trust) -> None:
    path = trust.creds("expired", exp=int(time.time()) - 3600)
    message = await expect_connect_error(settings(nats_creds=path), operator_server.url)
    assert "expired" in message and "MAILBOX_NATS_CREDS" in message


async def test_expired_creds_rejected_by_the_server(
    operator_server: NatsServer, trust: Trust, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the local expiry check (a clock that disagrees with the server's), the
    server's rejection is explained as a credentials problem too."""
    path = trust.creds("expired-at-server", exp=int(time.time()) - 3600)
    monkeypatch.setattr("service.connection.check_creds_file", lambda path: None)
    message = await expect_connect_error(settings(nats_creds=path), operator_server.url)
    assert "authorization" in message.lower() and "MAILBOX_NATS_CREDS" in message
    assert "expired" in message


async def test_missing_creds_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.creds")
    message = await expect_connect_error(settings(nats_creds=path), "nats://127.0.0.1:1")
    assert "MAILBOX_NATS_CREDS" in message and path in message and "not found" in message


async def test_unreadable_or_malformed_creds_file(tmp_path: Path) -> None:
    malformed = tmp_path / "malformed.creds"
    malformed.write_text("this is not a creds file\n")
    message = await expect_connect_error(settings(nats_creds=str(malformed)), "nats://127.0.0.1:1")
    assert "MAILBOX_NATS_CREDS" in message and "not a NATS credentials file" in message
    if os.geteuid() != 0:  # root reads anything
        unreadable = tmp_path / "unreadable.creds"
        unreadable.write_text("x")
        unreadable.chmod(0)
        message = await expect_connect_error(settings(nats_creds=str(unreadable)), "nats://127.0.0.1:1")
        assert "MAILBOX_NATS_CREDS" in message and "cannot be read" in message
    directory = await expect_connect_error(settings(nats_creds=str(tmp_path)), "nats://127.0.0.1:1")
    assert "MAILBOX_NATS_CREDS" in directory
