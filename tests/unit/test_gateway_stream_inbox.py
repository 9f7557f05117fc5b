"""The stream read-ahead buffer: order, batching, backpressure and end of stream."""

from __future__ import annotations

import asyncio

from gateway.server import _Inbox


def test_take_returns_buffered_items_in_order_and_none_at_the_end() -> None:
    async def scenario() -> list:
        inbox = _Inbox(limit=100)
        for i in range(5):
            await inbox.put(i)
        first = await inbox.take(3)
        second = await inbox.take(3)
        inbox.close()
        return [first, second, await inbox.take(3)]

    assert asyncio.run(scenario()) == [[0, 1, 2], [3, 4], None]


def test_take_waits_for_the_first_item_and_put_waits_when_full() -> None:
    async def scenario() -> tuple[list, bool, list]:
        inbox = _Inbox(limit=2)
        waiter = asyncio.create_task(inbox.take(10))
        await asyncio.sleep(0)
        assert not waiter.done()
        await inbox.put("a")
        got = await waiter
        await inbox.put("b")
        blocked = asyncio.create_task(inbox.put("c"))  # the buffer holds 2: this put waits
        await asyncio.sleep(0.01)
        was_blocked = not blocked.done()
        rest = await inbox.take(10)
        await asyncio.wait_for(blocked, 1)
        return got, was_blocked, rest

    got, was_blocked, rest = asyncio.run(scenario())
    assert got == ["a"] and was_blocked and rest == ["b", "c"]
