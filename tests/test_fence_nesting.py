"""Nested fence arrays thousands of levels deep (issue 12.4).

The kernel's ``st-dma-fence-chain`` builds 4,096-link chains and igt's
``sync_random_merge`` 1,024 nested merges: signalling climbs them through a
work list, and nothing that reads, waits for or exports a deep nest recurses.
The default recursion limit (1,000) stays in force throughout.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import select
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import pytest

from asyncdmabuf import Fence, FenceContext, _fence_watch

from .helpers import imported_from, wait_all_blocked

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_socket_leaks")]

LINKS = 4096
MERGES = 1024


@pytest.fixture(autouse=True)
def _default_recursion_limit() -> Iterator[None]:
    """Depth beyond the recursion limit is the point: keep it at its default."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@contextmanager
def no_collection() -> Iterator[None]:
    """Whatever is freed in the block is freed by refcounting alone: no cycles."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def is_signaled(fence: Fence) -> bool:
    return fence.signaled


def test_fence_chain_of_4096_links_signals_with_the_last() -> None:
    """st-dma-fence-chain's shape: chain[i] = all(chain[i-1], link[i]), one timeline."""
    ctx = FenceContext("chain")
    links = [ctx.fence() for _ in range(LINKS)]
    chain = links[0]
    for link in links[1:]:
        chain = Fence.all(chain, link)
    assert not is_signaled(chain)
    assert "pending" in repr(chain)
    links[LINKS // 2].signal()  # the timeline signals every earlier link
    assert all(link.signaled for link in links[: LINKS // 2 + 1])
    assert not is_signaled(chain)
    links[-1].signal(errno.ETIMEDOUT)
    assert chain.signaled
    assert isinstance(chain.error, OSError)
    assert chain.error.errno == errno.ETIMEDOUT


@pytest.mark.parametrize("seed", range(3))
def test_fence_chain_signalled_in_random_order(seed: int) -> None:
    rng = random.Random(seed)
    links = [Fence() for _ in range(LINKS)]
    chain = links[0]
    for link in links[1:]:
        chain = Fence.all(chain, link)
    order = list(range(LINKS))
    rng.shuffle(order)
    failing = order[LINKS // 3]
    for i in order:
        assert not is_signaled(chain)
        links[i].signal(errno.EIO if i == failing else None)
    assert chain.signaled
    assert chain.error is links[failing].error


def test_signalling_the_innermost_signals_the_outermost_and_frees_the_chain() -> None:
    innermost = Fence()
    chain = innermost
    others = []
    for _ in range(LINKS):
        other = Fence()
        others.append(other)
        chain = Fence.any(chain, other)
    middle = weakref.ref(chain._components[0])  # type: ignore[attr-defined]
    calls: list[Fence] = []
    chain.add_callback(calls.append)
    with no_collection():
        innermost.signal(errno.ENOSPC)
        assert chain.signaled
        assert chain.error is innermost.error
        assert calls == [chain]
        # Signalled arrays let go of their components and the others of them.
        assert all(not other._parents for other in others)
        outer = weakref.ref(chain)
        del chain, calls
        assert outer() is None
        assert middle() is None


def test_sync_random_merge() -> None:
    """igt's sync_random_merge: 1,024 nested merges of fences on random timelines."""
    rng = random.Random(1024)
    timelines = [FenceContext(f"t{i}") for i in range(32)]
    leaves: list[Fence] = []
    merged = Fence.all()
    for _ in range(MERGES):
        ctx = rng.choice(timelines)
        fence = Fence(context=ctx, seqno=rng.randint(1, 64))
        leaves.append(fence)
        merged = Fence.all(merged, fence)
    heads = dict.fromkeys(timelines, 0)
    while not all(f.signaled for f in leaves):
        ctx = rng.choice(timelines)
        heads[ctx] += rng.randint(1, 8)
        Fence(context=ctx, seqno=heads[ctx]).signal()
        assert merged.signaled == all(f.signaled for f in leaves)
    assert merged.signaled
    assert merged.error is None


def test_nested_merges_carry_the_first_error() -> None:
    fences = [Fence() for _ in range(MERGES)]
    merged = fences[0]
    for fence in fences[1:]:
        merged = Fence.all(fence, merged)
    for i, fence in enumerate(fences):
        fence.signal(errno.EIO if i in (100, 200) else None)
    assert merged.error is fences[100].error


# -- deep nests of imported fences: polled, never recursed ---------------------


def passive_chain(owner: Fence, links: list[Fence]) -> Fence:
    chain = imported_from(owner)
    for link in links:
        chain = Fence.all(link, chain)
    return chain


def test_deep_nest_of_an_imported_fence_polls_without_recursion() -> None:
    owner = Fence()
    links = [Fence() for _ in range(LINKS)]
    chain = passive_chain(owner, links)
    assert "pending" in repr(chain)
    assert not is_signaled(chain)
    for link in links:
        link.signal()
    assert not is_signaled(chain)
    owner.signal(errno.EPIPE)
    assert chain.signaled
    assert isinstance(chain.error, OSError)
    assert chain.error.errno == errno.EPIPE


async def test_waiting_for_a_deep_nest_of_an_imported_fence() -> None:
    owner = Fence()
    links = [Fence() for _ in range(LINKS)]
    chain = Fence.any(passive_chain(owner, links), Fence.all(*links[:2]))
    woke = anyio.Event()

    async def waiter() -> None:
        await chain.wait()
        woke.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await wait_all_blocked()
        for link in links:
            link.signal()  # Fence.any: its second component signals
        with anyio.fail_after(10):
            await woke.wait()
    assert chain.signaled
    owner.signal()


async def test_exporting_a_deep_nest_of_an_imported_fence() -> None:
    owner = Fence()
    links = [Fence() for _ in range(LINKS)]
    chain = passive_chain(owner, links)
    out = chain.export_fd()
    try:
        for link in links:
            link.signal()
        assert not select.select([out], [], [], 0)[0]
        owner.signal(errno.ENOMEM)
        with anyio.fail_after(10):
            await anyio.wait_readable(out)
        assert Fence.import_fd(out).error is not None
    finally:
        os.close(out)
    thread = _fence_watch.watcher_thread()
    if thread is not None:
        thread.join(timeout=10)
    assert not _fence_watch.statistics().running
