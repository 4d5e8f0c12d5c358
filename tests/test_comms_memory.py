"""The in-memory transport keeps the Endpoint contract (clusterfs.comms.interface)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trioutil import trio_test, wait_until

from clusterfs.comms.interface import Envelope
from clusterfs.comms.memory import MemoryNetwork
from clusterfs.errors import PeerUnreachable
from clusterfs.wire.types import MsgType

T = MsgType.BARRIER


@trio_test
async def test_send_nowait_delivers_in_call_order_and_refuses_cut_links():
    async with MemoryNetwork().running() as net:
        a, b = net.endpoint(1), net.endpoint(2)
        got: list[Envelope] = []

        async def handler(env: Envelope) -> None:
            got.append(env)

        b.register([T], handler)
        a.generation = 3
        for i in range(100):
            a.send_nowait(2, T, i)
        await a.send(2, T, 100)
        await wait_until(lambda: len(got) == 101)
        assert [e.body for e in got] == list(range(101))
        assert {(e.sender, e.generation) for e in got} == {(1, 3)}
        net.cut(1, 2)
        with pytest.raises(PeerUnreachable):
            a.send_nowait(2, T, "cut")
        with pytest.raises(PeerUnreachable):
            a.send_nowait(9, T, "nobody")
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 101


@trio_test
async def test_inline_handlers_run_in_order_with_async_ones():
    async with MemoryNetwork().running() as net:
        a, b = net.endpoint(1), net.endpoint(2)
        order: list[int] = []

        async def slow(env: Envelope) -> None:
            await trio.sleep(0.001)
            order.append(env.body)

        b.register([T], slow)
        b.register_inline([MsgType.DLM_QUERY], lambda env: order.append(env.body))
        for i in range(50):
            a.send_nowait(2, T if i % 3 else MsgType.DLM_QUERY, i)
        await wait_until(lambda: len(order) == 50)
        assert order == list(range(50))


@trio_test
async def test_a_held_node_gets_and_sends_nothing_until_released_then_all_in_order():
    """hold() is a SIGSTOP over TCP: messages both ways wait, none is lost, and on
    release() each pair's arrive in the order they were sent, before later ones."""
    async with MemoryNetwork().running() as net:
        a, b = net.endpoint(1), net.endpoint(2)
        to_b: list[int] = []
        to_a: list[int] = []

        async def at_b(env: Envelope) -> None:
            to_b.append(env.body)

        async def at_a(env: Envelope) -> None:
            to_a.append(env.body)

        b.register([T], at_b)
        a.register([T], at_a)
        net.hold(2)
        for i in range(5):
            a.send_nowait(2, T, i)
            b.send_nowait(1, T, 100 + i)
        await trio.testing.wait_all_tasks_blocked()
        assert to_b == [] and to_a == []
        net.release(2)
        a.send_nowait(2, T, 5)
        await wait_until(lambda: len(to_b) == 6 and len(to_a) == 5)
        assert to_b == list(range(6)) and to_a == [100 + i for i in range(5)]
