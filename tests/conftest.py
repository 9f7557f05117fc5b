"""Test-suite wide rules: unit tests must not touch the network.

``tests/unit`` is meant to run in seconds anywhere, so a unit test that connects a TCP socket
(to Kafka, Redis, Ray, a gRPC server, the internet) fails, as Ray Serve's suite enforces.  Real
services belong in ``tests/integration``, which starts them on free ports.  Unix sockets stay
allowed (multiprocessing and friends use them locally).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

_UNIT_DIR = Path(__file__).parent / "unit"
_INET = (socket.AF_INET, socket.AF_INET6)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "network_guard_selftest: the test checks the guard itself; a blocked attempt is expected"
    )


def _is_unit_test(request: pytest.FixtureRequest) -> bool:
    return _UNIT_DIR in Path(str(request.node.path)).parents


@pytest.fixture(autouse=True)
def _no_network_in_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    if not _is_unit_test(request):
        yield
        return
    attempts: list[object] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guard(sock: socket.socket, address: object) -> None:
        if sock.family in _INET:
            attempts.append(address)
            raise ConnectionRefusedError(
                f"unit tests must not open network connections (tried {address!r}); "
                "move this test to tests/integration or fake the client"
            )

    def connect(sock: socket.socket, address: object):
        guard(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: object):
        guard(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield
    # Client libraries often swallow connection errors and retry; fail the test anyway.
    if attempts and request.node.get_closest_marker("network_guard_selftest") is None:
        pytest.fail(f"unit test tried to connect to {attempts[:3]}; unit tests must not use the network")
