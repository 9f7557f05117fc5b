"""A scorer call that outlives its deadline is a 504 that says which deadline and what to change.

The gateway's OpenAI-compatible routes wait for the scorer with ``scorer_timeout_s``; a best-of-N on a
busy scorer queues behind other generations, and gRPC's own text for the timeout is a bare "Deadline
Exceeded" that tells the caller nothing.  A real aio gRPC server stands in for a busy scorer here.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from prefstream.scorer.v1 import scorer_pb2, scorer_pb2_grpc
from scorer.client import ScorerClient
from services.errors import DeadlineExceeded, NotFound


class _SlowScorer(scorer_pb2_grpc.ScorerServiceServicer):
    """BestOfN answers after ``delay_s``; Score says the model does not exist."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.cancelled = asyncio.Event()

    async def BestOfN(self, request, context):  # noqa: N802 - the gRPC method name
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.set()  # the client's deadline ends the server's work too
            raise
        return scorer_pb2.BestOfNResponse()

    async def Score(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.NOT_FOUND, "model 'nope' does not exist")


async def _serve(servicer: _SlowScorer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    scorer_pb2_grpc.add_ScorerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_a_call_past_its_deadline_names_the_setting_to_raise() -> None:
    async def main() -> None:
        servicer = _SlowScorer(delay_s=5.0)
        server, address = await _serve(servicer)
        try:
            async with ScorerClient(address, timeout_s=0.3, timeout_setting="gateway scorer_timeout_s") as client:
                with pytest.raises(DeadlineExceeded) as err:
                    await client.best_of_n([{"role": "user", "content": "Hi"}], candidates=["a", "b"])
                await asyncio.wait_for(servicer.cancelled.wait(), 5.0)
        finally:
            await server.stop(None)
        e = err.value
        assert e.http_status == 504 and e.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "within 0.3s" in str(e) and "raise gateway scorer_timeout_s" in str(e) and address in str(e)

    asyncio.run(main())


def test_a_call_within_its_deadline_answers_and_other_errors_keep_their_code() -> None:
    async def main() -> None:
        server, address = await _serve(_SlowScorer(delay_s=0.0))
        try:
            async with ScorerClient(address, timeout_s=5.0) as client:
                result = await client.best_of_n([{"role": "user", "content": "Hi"}], candidates=["a", "b"])
                assert result.ranked == ()
                with pytest.raises(NotFound, match="does not exist"):
                    await client.score([{"role": "user", "content": "Hi"}], ["a"], model="nope")
        finally:
            await server.stop(None)

    asyncio.run(main())
