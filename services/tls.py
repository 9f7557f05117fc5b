"""TLS for the gRPC and HTTP servers and their clients, and a development CA.

A server gets TLS from three files (every service config has the same three fields): a certificate
chain, its key, and optionally a client CA, which turns on mutual TLS (clients must present a
certificate signed by it).  Clients take the CA that signed the server's certificate and, for mTLS,
their own certificate and key.

``prefstream tls dev-ca --out DIR`` (or :func:`make_dev_ca`) writes a throwaway CA, a server
certificate for localhost / 127.0.0.1 (plus any names given) and a client certificate, for
development and tests; production certificates come from cert-manager or your own CA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from services.errors import InvalidArgument


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key (PEM files); ``client_ca_file`` set means mutual TLS."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    @classmethod
    def from_fields(cls, cert_file: str, key_file: str, client_ca_file: str = "", *,
                    prefix: str = "tls") -> "ServerTls | None":
        """The TLS settings of a service config, or None when TLS is off (no cert and no key).

        Raises InvalidArgument naming the field when only one of cert/key is set or a file is missing."""
        if not cert_file and not key_file:
            if client_ca_file:
                raise InvalidArgument(f"{prefix}_client_ca_file", "mutual TLS needs server TLS too; set "
                                      f"{prefix}_cert_file and {prefix}_key_file")
            return None
        for name, value in ((f"{prefix}_cert_file", cert_file), (f"{prefix}_key_file", key_file)):
            if not value:
                raise InvalidArgument(name, f"is empty but the other of {prefix}_cert_file / {prefix}_key_file is "
                                      "set; give both (PEM files) or neither")
        for name, value in ((f"{prefix}_cert_file", cert_file), (f"{prefix}_key_file", key_file),
                            (f"{prefix}_client_ca_file", client_ca_file)):
            if value and not Path(value).is_file():
                raise InvalidArgument(name, f"{value!r} is not a readable file")
        return cls(cert_file, key_file, client_ca_file)

    def grpc_credentials(self):
        import grpc

        return grpc.ssl_server_credentials(
            [(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
            root_certificates=Path(self.client_ca_file).read_bytes() if self.client_ca_file else None,
            require_client_auth=bool(self.client_ca_file),
        )

    def ssl_context(self) -> ssl.SSLContext:
        """For aiohttp's site: TLS 1.2+, the client certificate required when ``client_ca_file`` is set."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            ctx.load_verify_locations(self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass(frozen=True)
class TlsSettings:
    """The three TLS fields every server's config has (GatewayConfig and ScorerConfig inherit them)."""

    tls_cert_file: str = field(default="", metadata={"help": (
        "PEM certificate chain: with tls_key_file, the servers speak TLS only (`prefstream tls dev-ca` makes a "
        "development CA)")})
    tls_key_file: str = field(default="", repr=False, metadata={"help": "PEM private key of tls_cert_file"})
    tls_client_ca_file: str = field(default="", metadata={"help": (
        "PEM CA: set, clients must present a certificate it signed (mutual TLS)")})

    def server_tls(self) -> ServerTls | None:
        """The servers' TLS settings, or None for plaintext."""
        return ServerTls.from_fields(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)

    def validate_tls(self) -> None:
        """ConfigError naming the TLS field to fix (what every config's ``validate`` calls)."""
        from services.config import require

        try:
            self.server_tls()
        except InvalidArgument as e:
            require(False, e.field or "tls_cert_file", e.message)


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts (``ca_file``) and, for mutual TLS, what it presents."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""

    def grpc_credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes(),
            private_key=Path(self.key_file).read_bytes() if self.key_file else None,
            certificate_chain=Path(self.cert_file).read_bytes() if self.cert_file else None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


# ------------------------------------------------------------------------------------------------
# a development CA


@dataclass(frozen=True)
class DevCa:
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server(self, *, mutual: bool = False) -> ServerTls:
        return ServerTls(str(self.server_cert), str(self.server_key), str(self.ca_file) if mutual else "")

    def client(self, *, with_cert: bool = False) -> ClientTls:
        return ClientTls(str(self.ca_file), str(self.client_cert) if with_cert else "",
                         str(self.client_key) if with_cert else "")


def make_dev_ca(out: str | Path, hosts: Iterable[str] = ("localhost", "127.0.0.1"), *, days: int = 30) -> DevCa:
    """A CA, a server certificate for ``hosts`` and a client certificate, as PEM files in ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "prefstream dev"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(path: Path, key, cert) -> None:
        path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        path.with_suffix(".key").chmod(0o600)
        path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("prefstream dev CA")).issuer_name(name("prefstream dev CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write(out / "ca", ca_key, ca)

    def leaf(cn: str, usage, sans: list) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    write(out / "server", *leaf("prefstream server", ExtendedKeyUsageOID.SERVER_AUTH, sans))
    write(out / "client", *leaf("prefstream client", ExtendedKeyUsageOID.CLIENT_AUTH, []))
    return DevCa(out / "ca.crt", out / "server.crt", out / "server.key", out / "client.crt", out / "client.key")


def register(subparsers: argparse._SubParsersAction) -> None:
    """``prefstream tls dev-ca --out DIR [--host NAME ...]``."""
    tls = subparsers.add_parser("tls", help="TLS helpers")
    sub = tls.add_subparsers(dest="tls_command", metavar="COMMAND", required=True)
    p = sub.add_parser("dev-ca", help="write a development CA, a server and a client certificate (PEM)")
    p.add_argument("--out", required=True, help="folder for ca.crt, server.crt/.key, client.crt/.key")
    p.add_argument("--host", action="append", default=None,
                   help="a name or IP the server certificate is valid for (repeatable; default localhost, 127.0.0.1)")
    p.add_argument("--days", type=int, default=30)

    def run(args: argparse.Namespace) -> int:
        ca = make_dev_ca(args.out, args.host or ("localhost", "127.0.0.1"), days=args.days)
        print(f"CA {ca.ca_file}\nserver {ca.server_cert} {ca.server_key}\nclient {ca.client_cert} {ca.client_key}")
        return 0

    p.set_defaults(handler=run)
