"""TLS settings: the development CA's files, and config errors that name the field."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from gateway.config import load_gateway_config
from scorer.config import load_scorer_config
from services.config import ConfigError
from services.tls import ServerTls, make_dev_ca


def test_dev_ca_makes_a_chain_python_verifies(tmp_path: Path) -> None:
    from cryptography import x509

    ca = make_dev_ca(tmp_path, ("localhost", "127.0.0.1", "gateway.prefstream"))
    server = x509.load_pem_x509_certificate(ca.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gateway.prefstream" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert (ca.server_key.stat().st_mode & 0o777) == 0o600
    # Both sides' contexts load: the server's with the client CA (mTLS), the client's with its cert.
    server_ctx = ca.server(mutual=True).ssl_context()
    assert server_ctx.verify_mode == ssl.CERT_REQUIRED
    client_ctx = ca.client(with_cert=True).ssl_context()
    assert client_ctx.verify_mode == ssl.CERT_REQUIRED and client_ctx.check_hostname


def test_tls_settings_name_the_field_to_fix(tmp_path: Path) -> None:
    ca = make_dev_ca(tmp_path)
    assert ServerTls.from_fields("", "") is None
    cfg = load_gateway_config(overrides={"tls_cert_file": str(ca.server_cert), "tls_key_file": str(ca.server_key)}, env={})
    assert cfg.server_tls() == ServerTls(str(ca.server_cert), str(ca.server_key), "")
    with pytest.raises(ConfigError, match="tls_key_file.*give both"):
        load_gateway_config(overrides={"tls_cert_file": str(ca.server_cert)}, env={})
    with pytest.raises(ConfigError, match="tls_cert_file.*not a readable file"):
        load_scorer_config(overrides={"tls_cert_file": str(tmp_path / "nope.crt"), "tls_key_file": str(ca.server_key)}, env={})
    with pytest.raises(ConfigError, match="tls_client_ca_file.*needs server TLS"):
        load_scorer_config(overrides={"tls_client_ca_file": str(ca.ca_file)}, env={})
    # Keys never show in a config's repr (logs print configs).
    assert str(ca.server_key) not in repr(cfg)
