"""Integration fixtures: one real Kafka, Redis and Ray head per test session, on free ports.

Starting the stack costs seconds (the JVM, Ray's head), so it happens once per session and every
integration test shares it through these fixtures.  The run dir is a pytest temp dir; Ray's
temp dir is kept short automatically (see ``StackConfig.ray_temp_dir``).  Kafka jars come from the
usual cache (``PREFSTREAM_CACHE_DIR`` or ``~/.cache/prefstream``), so only the very first run
downloads them.

Set ``PREFSTREAM_TEST_STACK_RUN_DIR`` to the run dir of a stack you already started with
``prefstream stack up`` to reuse it instead (fast iteration; it is left running).

Subprocesses started by tests find the stack through ``services.endpoints.load_stack_endpoints()``,
because the fixture exports ``PREFSTREAM_STACK_RUN_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from services.stack import Endpoints, Stack, StackConfig, free_stack_config, load_endpoints, load_stack_config


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The running session stack (Kafka + topics, Redis, Ray head); torn down after the session."""
    reuse = os.environ.get("PREFSTREAM_TEST_STACK_RUN_DIR")
    if reuse:
        load_endpoints(reuse)  # fails early with a clear message when nothing runs there
        yield _ExistingStack(reuse)
        return
    cfg = free_stack_config(tmp_path_factory.mktemp("stack"))
    st = Stack(cfg)
    old = os.environ.get("PREFSTREAM_STACK_RUN_DIR")
    os.environ["PREFSTREAM_STACK_RUN_DIR"] = str(cfg.run_path)
    try:
        st.up()
        yield st
    finally:
        st.down()
        if old is None:
            os.environ.pop("PREFSTREAM_STACK_RUN_DIR", None)
        else:
            os.environ["PREFSTREAM_STACK_RUN_DIR"] = old


class _ExistingStack(Stack):
    """A stack someone else started: usable like ours, but never stopped by the fixture."""

    def __init__(self, run_dir: str) -> None:
        ep = load_endpoints(run_dir)
        super().__init__(load_stack_config(overrides={"run_dir": run_dir}))
        self._ep = ep

    @property
    def endpoints(self) -> Endpoints:
        return self._ep


@pytest.fixture(scope="session")
def stack_endpoints(stack: Stack) -> Endpoints:
    return stack.endpoints


@pytest.fixture(scope="session")
def kafka_bootstrap(stack_endpoints: Endpoints) -> str:
    """``127.0.0.1:<port>`` of the session broker; the prefstream topics exist."""
    assert stack_endpoints.kafka_bootstrap
    return stack_endpoints.kafka_bootstrap


@pytest.fixture(scope="session")
def redis_url(stack_endpoints: Endpoints) -> str:
    assert stack_endpoints.redis_url
    return stack_endpoints.redis_url


@pytest.fixture
def project() -> str:
    """A fresh project name per test (keys, rate limits and criteria are per project)."""
    import uuid

    return f"proj-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def key(redis_client, project: str) -> str:
    """An API key of ``project`` with every scope."""
    from gateway.auth import create_key

    k, _ = create_key(redis_client, project, pepper="")
    return k


@pytest.fixture
def redis_client(redis_url: str):
    """A ``redis.Redis`` on the session server (db 0, not flushed: namespace your keys per test)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def ray_address(stack_endpoints: Endpoints) -> str:
    """GCS address ``127.0.0.1:<port>`` for ``ray.init(address=...)``; call ``ray.shutdown()`` after."""
    assert stack_endpoints.ray_address
    return stack_endpoints.ray_address
