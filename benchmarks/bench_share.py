"""Hand-off latency of a buffer to another process, three ways, side by side.

Latency is measured from the moment the producer starts handing the buffer over
until the peer process has read its first and last byte and said so (a one-byte
reply):

- asyncdmabuf: ``send_buffer`` over a UNIX socket; the peer's ``receive_buffer``
  imports and maps the memfd, reads, replies, then puts it (unmaps).
- shared_memory: the segment's name through a ``multiprocessing`` Pipe; the
  peer attaches ``multiprocessing.shared_memory.SharedMemory(name)``, reads,
  replies, then closes it.
- pickle: the bytes themselves, pickled through a ``multiprocessing`` Pipe.

The buffers are filled (every page resident) before timing. Each peer is a
long-lived process, started once. Run::

    python benchmarks/bench_share.py              # 4 KiB, 1 MiB, 64 MiB, 1 GiB
    python benchmarks/bench_share.py --quick      # fewer repetitions
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import multiprocessing.connection
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing import resource_tracker, shared_memory

import anyio
import anyio.abc
from rich.console import Console
from rich.table import Table

import asyncdmabuf as dmabuf
from asyncdmabuf._backends import BACKENDS
from asyncdmabuf._bench import Row, compare
from asyncdmabuf.exporters import MemfdExporter

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
SIZES = (4 * KIB, MIB, 64 * MIB, GIB)


def human(size: int) -> str:
    """4 KiB, 1 MiB, 1 GiB."""
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= scale:
            return f"{size // scale} {unit}"
    return f"{size} B"


# -- peers (child processes) ---------------------------------------------------------


def dmabuf_peer(sock: socket.socket, backend: str) -> None:
    """Receive buffers until the stream ends; read first and last byte; reply."""

    async def serve() -> None:
        async with await anyio.abc.UNIXSocketStream.from_socket(sock) as stream:
            while True:
                try:
                    buf = await dmabuf.receive_buffer(stream)
                except anyio.EndOfStream:
                    return
                async with buf.cpu_access("r") as view:
                    first, last = view[0], view[-1]
                await stream.send(bytes(((first ^ last) | 1,)))
                await buf.put()

    name, options = BACKENDS[backend]
    anyio.run(serve, backend=name, backend_options=options)


def shm_peer(conn: multiprocessing.connection.Connection) -> None:
    """Attach segments by name; read first and last byte; reply; detach."""
    while True:
        name = conn.recv()
        if name is None:
            return
        shm = shared_memory.SharedMemory(name=name)
        buf = shm.buf
        assert buf is not None
        first, last = buf[0], buf[-1]
        conn.send_bytes(bytes(((first ^ last) | 1,)))
        # Python < 3.13 registers attached segments with the resource tracker
        # too: the parent's, shared (time_shm starts it before forking us), so
        # the name stays registered once and the parent's unlink unregisters it.
        del buf
        shm.close()


def pickle_peer(conn: multiprocessing.connection.Connection) -> None:
    """Receive pickled copies; read first and last byte; reply."""
    while True:
        data = conn.recv()
        if data is None:
            return
        conn.send_bytes(bytes(((data[0] ^ data[-1]) | 1,)))
        del data


# -- timing --------------------------------------------------------------------------


def _fill(view: memoryview) -> None:
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    ctypes.memset(address, 0xA5, len(view))


def time_dmabuf(
    sizes: list[int], reps: Callable[[int], int], backend: str
) -> list[list[float]]:
    """Latencies (seconds) of send_buffer to a peer process, per size."""
    ctx = multiprocessing.get_context("fork")
    mine, theirs = socket.socketpair()
    peer = ctx.Process(target=dmabuf_peer, args=(theirs, backend))
    peer.start()
    theirs.close()
    name, options = BACKENDS[backend]
    try:
        return anyio.run(
            _time_dmabuf, mine, sizes, reps, backend=name, backend_options=options
        )
    finally:
        peer.join()


async def _time_dmabuf(
    mine: socket.socket, sizes: list[int], reps: Callable[[int], int]
) -> list[list[float]]:
    results: list[list[float]] = []
    async with await anyio.abc.UNIXSocketStream.from_socket(mine) as stream:
        exporter = MemfdExporter()
        for size in sizes:
            async with await exporter.allocate(size, name="bench") as buf:
                async with buf.cpu_access("w") as view:
                    _fill(view)
                    del view
                samples = []
                for _ in range(reps(size) + 1):
                    start = time.perf_counter()
                    await dmabuf.send_buffer(stream, buf)
                    await stream.receive(1)
                    samples.append(time.perf_counter() - start)
                results.append(samples[1:])  # the first one warms up
        await stream.send_eof()
    return results


def time_shm(sizes: list[int], reps: Callable[[int], int]) -> list[list[float]]:
    """Latencies of handing a SharedMemory segment's name to a peer process."""
    ctx = multiprocessing.get_context("fork")
    resource_tracker.ensure_running()  # one tracker, shared with the peer
    mine, theirs = ctx.Pipe()
    peer = ctx.Process(target=shm_peer, args=(theirs,))
    peer.start()
    results: list[list[float]] = []
    for size in sizes:
        shm = shared_memory.SharedMemory(create=True, size=size)
        try:
            view = shm.buf
            assert view is not None
            _fill(view)
            del view
            samples = []
            for _ in range(reps(size) + 1):
                start = time.perf_counter()
                mine.send(shm.name)
                mine.recv_bytes()
                samples.append(time.perf_counter() - start)
            results.append(samples[1:])
        finally:
            shm.close()
            shm.unlink()
    mine.send(None)
    peer.join()
    return results


def time_pickle(sizes: list[int], reps: Callable[[int], int]) -> list[list[float]]:
    """Latencies of sending a pickled copy of the bytes to a peer process."""
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    peer = ctx.Process(target=pickle_peer, args=(theirs,))
    peer.start()
    results: list[list[float]] = []
    for size in sizes:
        payload = b"\xa5" * size
        samples = []
        for _ in range(reps(size) + 1):
            start = time.perf_counter()
            mine.send(payload)
            mine.recv_bytes()
            samples.append(time.perf_counter() - start)
        results.append(samples[1:])
        del payload
        gc.collect()
    mine.send(None)
    peer.join()
    return results


def rows(quick: bool) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark.

    Rounds alternate the three ways (each round starts its peers afresh and
    reverses the order of the last); a row's figure is the median of every
    sample of every round.
    """
    sizes = [4 << 10, 1 << 20] if quick else [4 << 10, 1 << 20, 64 << 20]
    rounds = 3 if quick else 5

    def reps(size: int) -> int:
        return 7 if quick else 20

    def copy_reps(size: int) -> int:
        return 2 if size > 1 << 20 else reps(size)

    ways: dict[str, Callable[[], list[list[float]]]] = {
        "asyncdmabuf": lambda: time_dmabuf(sizes, reps, "asyncio"),
        "shared_memory": lambda: time_shm(sizes, reps),
        "pickle": lambda: time_pickle(sizes, copy_reps),
    }
    samples: dict[str, list[list[float]]] = {way: [[] for _ in sizes] for way in ways}
    for i in range(rounds):
        for way in list(ways)[::-1] if i % 2 else list(ways):
            for mine, got in zip(samples[way], ways[way](), strict=True):
                mine.extend(got)
    result = []
    for i, size in enumerate(sizes):
        label = human(size)
        ours = samples["asyncdmabuf"][i]
        row = compare(
            "hand-off",
            f"{label}: send_buffer vs shared_memory by name",
            ours,
            samples["shared_memory"][i],
            le=2.0,
        )
        result.append(replace(row, rounds=rounds))
        row = compare(
            "hand-off",
            f"{label}: send_buffer vs pickle through a Pipe",
            ours,
            samples["pickle"][i],
        )
        result.append(replace(row, rounds=rounds))
    return result


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, and say whether the goals were met."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--no-pickle-above",
        type=int,
        default=None,
        metavar="BYTES",
        help="skip the pickled copy for sizes above this (default: run them all)",
    )
    args = parser.parse_args(argv)
    scale = 0.2 if args.quick else 1.0

    def zero_copy_reps(size: int) -> int:
        return max(5, int((200 if size <= 64 * MIB else 100) * scale))

    def copy_reps(size: int) -> int:
        full = {4 * KIB: 200, MIB: 100, 64 * MIB: 10}.get(size, 3)
        return max(2, int(full * scale))

    sizes = list(SIZES)
    ours = time_dmabuf(sizes, zero_copy_reps, args.backend)
    shm = time_shm(sizes, zero_copy_reps)
    limit = args.no_pickle_above
    pickled_sizes = [s for s in sizes if limit is None or s <= limit]
    pickled = dict(
        zip(pickled_sizes, time_pickle(pickled_sizes, copy_reps), strict=True)
    )

    def us(samples: list[float]) -> str:
        median = statistics.median(samples) * 1e6
        p90 = (
            statistics.quantiles(samples, n=10)[-1] * 1e6
            if len(samples) > 2
            else median
        )
        return f"{median:,.0f} (p90 {p90:,.0f})"

    table = Table(
        title=f"Hand-off latency to another process, µs median (backend {args.backend})"
    )
    table.add_column("size", justify="right")
    table.add_column("asyncdmabuf", justify="right")
    table.add_column("shared_memory", justify="right")
    table.add_column("pickle via Pipe", justify="right")
    table.add_column("asyncdmabuf / shm", justify="right")
    ratios = []
    for i, size in enumerate(sizes):
        ratio = statistics.median(ours[i]) / statistics.median(shm[i])
        ratios.append(ratio)
        copy = us(pickled[size]) if size in pickled else "skipped (--no-pickle-above)"
        table.add_row(human(size), us(ours[i]), us(shm[i]), copy, f"{ratio:.2f}x")
    console = Console()
    console.print(table)
    flat = statistics.median(ours[-1]) / statistics.median(ours[0])
    console.print(
        f"asyncdmabuf {human(sizes[-1])} / {human(sizes[0])}: {flat:.2f}x "
        f"(goal <= 2x: {'met' if flat <= 2 else 'NOT met'}); "
        f"worst asyncdmabuf / shared_memory: {max(ratios):.2f}x "
        f"(goal <= 2x: {'met' if max(ratios) <= 2 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
