"""API-key parsing, hashing and authorization rules (the Redis round trips are integration-tested)."""

from __future__ import annotations

import pytest

from gateway.auth import ANONYMOUS, Principal, hash_secret, key_from_metadata, parse_key
from services.errors import PermissionDenied, Unauthenticated


def test_parse_key() -> None:
    assert parse_key("psk_0a1b2c_se_cr-et") == ("0a1b2c", "se_cr-et")
    for bad in ("", "psk_", "psk_xyz_secret", "sk_0a1b_secret", "psk_0a1b"):
        with pytest.raises(Unauthenticated):
            parse_key(bad)


def test_key_from_metadata() -> None:
    assert key_from_metadata({"authorization": "Bearer psk_1_x"}) == "psk_1_x"
    assert key_from_metadata({"Authorization": "bearer  psk_1_x "}) == "psk_1_x"
    assert key_from_metadata({"x-api-key": "psk_1_x"}) == "psk_1_x"
    assert key_from_metadata({"X-API-Key": "psk_1_x"}) == "psk_1_x"
    assert key_from_metadata({}) is None
    with pytest.raises(Unauthenticated, match="Bearer"):
        key_from_metadata({"authorization": "Basic abc"})


def test_hash_depends_on_salt_and_pepper() -> None:
    h = hash_secret("secret", b"salt", "pepper")
    assert h == hash_secret("secret", b"salt", "pepper") and len(h) == 64
    assert h != hash_secret("secret", b"salt2", "pepper")
    assert h != hash_secret("secret", b"salt", "pepper2")
    assert h != hash_secret("secret2", b"salt", "pepper")


def test_principal_authorization() -> None:
    Principal("a").authorize("a", "completion.project")
    ANONYMOUS.authorize("anything", "completion.project")
    with pytest.raises(PermissionDenied) as err:
        Principal("a").authorize("b", "feedback.project")
    assert err.value.field == "feedback.project" and "'b'" in err.value.message


def test_scopes() -> None:
    from gateway import http, openai_compat
    from gateway.auth import SCOPES, check_scopes
    from services.errors import InvalidArgument

    assert SCOPES == ("ingest", "score")
    Principal("a").require("ingest")
    ANONYMOUS.require("score")  # auth disabled: everything
    with pytest.raises(PermissionDenied, match="may not score.*--scope score") as e:
        Principal("a", key_id="k1", scopes=frozenset({"ingest"})).require("score")
    assert e.value.field == "authorization"
    assert check_scopes(["score", "ingest", "score"]) == ("ingest", "score")
    for bad in ([], ["admin"]):
        with pytest.raises(InvalidArgument, match="scope"):
            check_scopes(bad)
    # The auth middleware and the OpenAI routes agree on where the caller's rights are kept.
    assert (http.PROJECT_KEY, http.MAY_INGEST_KEY) == (openai_compat.PROJECT_KEY, openai_compat.MAY_INGEST_KEY)


def test_store_needs_the_ingest_scope_before_any_work() -> None:
    from gateway.openai_compat import MAY_INGEST_KEY, OpenAICompat, parse_chat_request

    async def log(_c):  # pragma: no cover - never reached
        return "x"

    api = OpenAICompat(scorer=None, log_completion=log)  # type: ignore[arg-type]
    req = parse_chat_request({"model": "policy", "messages": [{"role": "user", "content": "hi"}], "store": True})
    api._check_store({MAY_INGEST_KEY: True}, req)  # type: ignore[arg-type]
    api._check_store({}, req)  # type: ignore[arg-type]  # auth disabled
    with pytest.raises(PermissionDenied) as e:
        api._check_store({MAY_INGEST_KEY: False}, req)  # type: ignore[arg-type]
    assert e.value.field == "store"
