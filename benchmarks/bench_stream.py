"""Streams across processes: frame latency and throughput, side by side.

Latency (steady state, one buffer, so the publisher's next ``loan()`` returns
exactly when the subscriber's release has come back): the publisher's
``send`` → the subscriber process takes the frame, reads its first and last
byte through ``cpu_access("r")`` and releases it → the release is seen by the
publisher. Measured against, between the same two processes and in
alternating rounds:

- a bare anyio UNIX-socket round trip of a 16-byte message (the floor of any
  async design: one message each way, one wake-up each side);
- iceoryx2's Python bindings (a benchmark-only extra, ``pip install
  'asyncdmabuf[bench]'``): a loaned sample sent, an event to wake the
  subscriber, which reads the first and last byte, drops the sample and
  notifies back; both sides block in the listener's wait;
- ``multiprocessing.shared_memory`` by name with a blocking pipe: the segment
  attached once by name, then per frame a small message each way through a
  ``multiprocessing`` Pipe, the peer reading the first and last byte.

Throughput: 1920x1080 XR24 frames (``FrameLayout.for_format``), 4 buffers
pipelined, to 1 and to 4 subscriber processes (``queue=4``, ``"block"``),
the publisher writing and each subscriber reading the first and last byte of
every frame through ``cpu_access``; each subscriber's frames/s, and the
publisher's CPU time per frame (``resource.getrusage``). Run::

    python benchmarks/bench_stream.py                 # every backend, 7 rounds
    python benchmarks/bench_stream.py --backend uvloop --rounds 9
    python benchmarks/bench_stream.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import multiprocessing
import multiprocessing.connection
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from rich.console import Console
from rich.table import Table

from asyncdmabuf import FrameLayout, Publisher, subscribe
from asyncdmabuf._backends import BACKENDS
from asyncdmabuf._bench import Row, backend_available, compare, fmt_us
from asyncdmabuf.exporters import MemfdExporter

KIB = 1 << 10
MIB = 1 << 20
SIZES = (4 * KIB, 8 * MIB)
#: The latency streams: (size, whether the subscriber touches the bytes, key).
#: The untouched one splits the stream's own cost from ``cpu_access``'s.
STREAMS = (
    *((size, True, f"stream {size}") for size in SIZES),
    (4 * KIB, False, "untouched"),
)
BARE = 16  # bytes of the bare round trip's message
LATENCY_GOAL = 1.3
RATE_GOAL = 5000.0  # frames/s to one subscriber, on uvloop
FANOUT_GOAL = 0.35  # each of 4 subscribers' rate against the 1-subscriber rate
ALL_BACKENDS = ("asyncio", "uvloop", "trio")


def human(size: int) -> str:
    """4 KiB, 8 MiB."""
    if size >= MIB:
        return f"{size // MIB} MiB"
    return f"{size // KIB} KiB"


def _fill(view: memoryview) -> None:
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    ctypes.memset(address, 0xA5, len(view))


def _run(backend: str, func: Callable[..., Any], *args: Any) -> Any:
    name, options = BACKENDS[backend]
    return anyio.run(func, *args, backend=name, backend_options=options)


def _fork(
    target: Callable[..., None], *args: Any
) -> multiprocessing.process.BaseProcess:
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


# -- latency: the subscriber's process -------------------------------------------------


def latency_peer(
    bare: socket.socket,
    streams: list[socket.socket],
    backend: str,
    theirs: list[socket.socket],
) -> None:
    """Echo the bare messages; take, read and release every frame of each stream."""
    for sock in theirs:  # the publisher's ends: their close must reach us as EOF
        sock.close()

    async def echo() -> None:
        async with await anyio.abc.UNIXSocketStream.from_socket(bare) as stream:
            pending = b""
            while True:
                try:
                    pending += await stream.receive()
                except anyio.EndOfStream:
                    return
                while len(pending) >= BARE:
                    message, pending = pending[:BARE], pending[BARE:]
                    await stream.send(message)

    async def frames(sock: socket.socket, touch: bool) -> None:
        stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
        async with await subscribe(stream, queue=1) as sub:
            async for frame in sub:
                if not touch:
                    frame.release()
                    continue
                async with frame, frame.buffer.cpu_access("r") as view:
                    view[0] ^ view[-1]

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(echo)
            for sock, (_, touch, _) in zip(streams, STREAMS, strict=True):
                tg.start_soon(frames, sock, touch)

    _run(backend, serve)


def shm_peer(conn: multiprocessing.connection.Connection) -> None:
    """Attach each segment once by name, then read first and last byte per message."""
    shm: shared_memory.SharedMemory | None = None
    while True:
        message = conn.recv_bytes()
        if message == b"":
            break
        if message.startswith(b"attach "):
            if shm is not None:
                shm.close()
            shm = shared_memory.SharedMemory(name=message[7:].decode())
            conn.send_bytes(b"ok")
            continue
        assert shm is not None
        buf = shm.buf
        assert buf is not None
        conn.send_bytes(bytes(((buf[0] ^ buf[-1]) | 1,)))
        del buf
    if shm is not None:
        shm.close()


def _iox_services(
    iox: Any, node: Any, prefix: str, size: int, *, owner: bool
) -> tuple[Any, Any, Any]:
    """Open or create the iceoryx2 services of ``size``: samples, ping, pong.

    The publisher's side (``owner``) gives the sample service its limits: one
    publisher, one subscriber, one sample queued, no history.
    """
    samples = node.service_builder(
        iox.ServiceName.new(f"{prefix}-{size}")
    ).publish_subscribe(iox.Slice[ctypes.c_uint8])
    if owner:
        samples = (
            samples.max_publishers(1)
            .max_subscribers(1)
            .subscriber_max_buffer_size(1)
            .history_size(0)
        )
    service = samples.open_or_create()
    ping, pong = (
        node.service_builder(iox.ServiceName.new(f"{prefix}-{size}-{event}"))
        .event()
        .open_or_create()
        for event in ("ping", "pong")
    )
    return service, ping, pong


def iox_peer(prefix: str, sizes: tuple[int, ...], ready: Any) -> None:
    """Wait for each sample, read its first and last byte, drop it, notify back."""
    if ready.recv_bytes() != b"go":  # the publisher made the services
        return
    import iceoryx2 as iox

    iox.set_log_level(iox.LogLevel.Error)
    node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
    ports = []
    for size in sizes:
        service, ping, pong = _iox_services(iox, node, prefix, size, owner=False)
        ports.append(
            (
                service.subscriber_builder().create(),
                ping.listener_builder().create(),
                pong.notifier_builder().create(),
                service,
                ping,
                pong,
            )
        )
    ready.send_bytes(b"ok")
    while True:
        which = ready.recv_bytes()
        if which == b"":
            return
        sub, listener, notifier = ports[int(which)][:3]
        count = int(ready.recv_bytes())
        done = 0
        while done < count:  # one notification back per sample, not per wake-up
            listener.blocking_wait()
            while (sample := sub.receive()) is not None:
                payload = sample.payload()
                payload[0] ^ payload[payload.len() - 1]
                sample.delete()
                notifier.notify()
                done += 1
        ready.send_bytes(b"done")


# -- latency: the publisher's process --------------------------------------------------


class _Shm:
    """The blocking-pipe side of the shared_memory baseline."""

    __slots__ = ("conn", "peer", "segments")

    def __init__(self) -> None:
        # The peer shares this process's resource tracker: what it attaches
        # is registered once, and unregistered by our unlink.
        resource_tracker.ensure_running()
        ctx = multiprocessing.get_context("fork")
        self.conn, theirs = ctx.Pipe()
        self.peer = _fork(shm_peer, theirs)
        theirs.close()
        self.segments: dict[int, shared_memory.SharedMemory] = {}
        for size in SIZES:
            shm = shared_memory.SharedMemory(create=True, size=size)
            view = shm.buf
            assert view is not None
            _fill(view)
            del view
            self.segments[size] = shm

    def time(self, size: int, count: int) -> list[float]:
        conn = self.conn
        conn.send_bytes(b"attach " + self.segments[size].name.encode())
        conn.recv_bytes()
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            conn.send_bytes(b"f")
            conn.recv_bytes()
            samples.append(time.perf_counter() - start)
        return samples

    def close(self) -> None:
        self.conn.send_bytes(b"")
        self.peer.join(10)
        for shm in self.segments.values():
            shm.close()
            shm.unlink()


class _Iox:
    """The publishing side of the iceoryx2 baseline, or why there is none."""

    __slots__ = ("conn", "error", "peer", "ports")

    def __init__(self) -> None:
        self.error: str | None = None
        self.ports: list[Any] = []
        self.peer: multiprocessing.process.BaseProcess | None = None
        try:
            import iceoryx2 as iox
        except ImportError as exc:
            self.error = (
                f"iceoryx2 not installed ({exc}): pip install 'asyncdmabuf[bench]'"
            )
            return
        prefix = f"asyncdmabuf-bench-{os.getpid()}"
        ctx = multiprocessing.get_context("fork")
        self.conn, theirs = ctx.Pipe()
        self.peer = _fork(iox_peer, prefix, SIZES, theirs)
        theirs.close()
        try:
            iox.set_log_level(iox.LogLevel.Error)
            node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
            for size in SIZES:
                service, ping, pong = _iox_services(iox, node, prefix, size, owner=True)
                publisher = (
                    service.publisher_builder().initial_max_slice_len(size).create()
                )
                self.ports.append(
                    (
                        publisher,
                        ping.notifier_builder().create(),
                        pong.listener_builder().create(),
                        service,
                        ping,
                        pong,
                        node,
                    )
                )
            self.conn.send_bytes(b"go")
            if self.conn.recv_bytes() != b"ok":
                self.error = "iceoryx2 did not start in the subscriber's process"
        except Exception as exc:  # the row says why; the rest still runs
            self.error = f"iceoryx2 failed: {type(exc).__name__}: {exc}"

    def time(self, size: int, count: int) -> list[float]:
        index = SIZES.index(size)
        publisher, notifier, listener = self.ports[index][:3]
        self.conn.send_bytes(str(index).encode())
        self.conn.send_bytes(str(count).encode())
        samples = []
        for i in range(count):
            sample = publisher.loan_slice_uninit(size)
            payload = sample.payload()
            payload[0] = payload[size - 1] = i & 0xFF
            sample = sample.assume_init()
            start = time.perf_counter()
            sample.send()
            notifier.notify()
            listener.blocking_wait()
            samples.append(time.perf_counter() - start)
        self.conn.recv_bytes()
        return samples

    def close(self) -> None:
        if self.peer is not None:
            with contextlib.suppress(OSError):
                self.conn.send_bytes(b"")
                if self.error is not None:
                    self.conn.send_bytes(b"")
            self.peer.join(10)
        self.ports.clear()


@dataclass(slots=True)
class Latency:
    """The medians of one backend's latency run, in seconds (None: not measured)."""

    backend: str
    bare: float
    stream: dict[int, float]
    untouched: float
    """4 KiB frames released without ``cpu_access``: the stream's own cost."""
    iox: dict[int, float] | None
    iox_error: str | None
    shm: dict[int, float]


async def _time_latency(
    bare_sock: socket.socket,
    stream_socks: list[socket.socket],
    shm: _Shm,
    iox: _Iox,
    rounds: int,
    reps: int,
) -> dict[str, list[float]]:
    exporter = MemfdExporter()
    samples: dict[str, list[float]] = {"bare": []}
    async with contextlib.AsyncExitStack() as stack:
        bare = await anyio.abc.UNIXSocketStream.from_socket(bare_sock)
        stack.push_async_callback(bare.aclose)
        pubs = []
        for (size, _, key), sock in zip(STREAMS, stream_socks, strict=True):
            stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
            pub = await Publisher.over(stream, exporter, size, buffers=1)
            await stack.enter_async_context(pub)
            frame = await pub.loan()
            async with frame.buffer.cpu_access("w") as view:
                _fill(view)
                del view
            frame.release()
            pubs.append(pub)
            samples[key] = []
        for size in SIZES:
            samples[f"shm {size}"] = []
            if iox.error is None:
                samples[f"iox {size}"] = []

        message = b"x" * BARE

        async def time_bare() -> None:
            for _ in range(reps):
                start = time.perf_counter()
                await bare.send(message)
                got = 0
                while got < BARE:
                    got += len(await bare.receive())
                samples["bare"].append(time.perf_counter() - start)

        async def time_stream(index: int) -> None:
            pub = pubs[index]
            out = samples[STREAMS[index][2]]
            frame = await pub.loan()
            for i in range(reps):
                async with frame.buffer.cpu_access("w") as view:
                    view[0] = view[-1] = i & 0xFF
                    del view
                start = time.perf_counter()
                await pub.send(frame)
                frame = await pub.loan()  # back once the subscriber released it
                out.append(time.perf_counter() - start)
            frame.release()

        jobs: list[Callable[[], Any]] = [time_bare]
        jobs.extend(functools.partial(time_stream, i) for i in range(len(STREAMS)))
        for size in SIZES:

            async def shm_job(size: int = size) -> None:
                samples[f"shm {size}"] += shm.time(size, reps)

            jobs.append(shm_job)
            if iox.error is None:

                async def iox_job(size: int = size) -> None:
                    samples[f"iox {size}"] += iox.time(size, reps)

                jobs.append(iox_job)
        for job in jobs:  # warm up every path once
            await job()
        for values in samples.values():
            values.clear()
        for r in range(rounds):
            shift = r % len(jobs)
            for job in jobs[shift:] + jobs[:shift]:
                await job()
    return samples


def measure_latency(backend: str, rounds: int, reps: int) -> Latency:
    """One backend's latency run: every path alternating, ``rounds`` x ``reps``."""
    # The baselines' peers first: they must not inherit the stream's sockets.
    shm = _Shm()
    iox = _Iox()
    mine_bare, theirs_bare = socket.socketpair()
    pairs = [socket.socketpair() for _ in STREAMS]
    peer = _fork(
        latency_peer,
        theirs_bare,
        [b for _, b in pairs],
        backend,
        [mine_bare, *(a for a, _ in pairs)],
    )
    theirs_bare.close()
    for _, b in pairs:
        b.close()
    try:
        samples = _run(
            backend,
            _time_latency,
            mine_bare,
            [a for a, _ in pairs],
            shm,
            iox,
            rounds,
            reps,
        )
    finally:
        shm.close()
        iox.close()
        peer.join(10)
        if peer.is_alive():
            peer.kill()
    med = statistics.median
    return Latency(
        backend,
        med(samples["bare"]),
        {s: med(samples[f"stream {s}"]) for s in SIZES},
        med(samples["untouched"]),
        None if iox.error else {s: med(samples[f"iox {s}"]) for s in SIZES},
        iox.error,
        {s: med(samples[f"shm {s}"]) for s in SIZES},
    )


# -- throughput ------------------------------------------------------------------------

LAYOUT = FrameLayout.for_format("XR24", 1920, 1080)


def throughput_peer(conn: multiprocessing.connection.Connection, backend: str) -> None:
    """On each path sent, subscribe, read every frame's first and last byte."""

    async def consume(path: str) -> tuple[int, float]:
        async with await subscribe(path, queue=4) as sub:
            conn.send_bytes(b"subscribed")
            count = 0
            start = 0.0
            async for frame in sub:
                if not count:
                    start = time.perf_counter()
                async with frame, frame.buffer.cpu_access("r") as view:
                    view[0] ^ view[-1]
                count += 1
            return count, time.perf_counter() - start

    async def echo(path: str) -> tuple[int, float]:
        async with await anyio.connect_unix(path) as stream:
            count = 0
            pending = 0
            start = time.perf_counter()
            while True:
                try:
                    pending += len(await stream.receive())
                except anyio.EndOfStream:
                    return count, time.perf_counter() - start
                while pending >= BARE:  # one "release" per "frame" message
                    pending -= BARE
                    count += 1
                    await stream.send(b"r" * BARE)

    while True:
        path = conn.recv_bytes()
        if not path:
            return
        if path.startswith(b"bare:"):
            count, elapsed = _run(backend, echo, "\0" + path[6:].decode())
        else:
            count, elapsed = _run(backend, consume, path.decode())
        conn.send_bytes(f"{count} {elapsed}".encode())


@dataclass(slots=True)
class Throughput:
    """Frames/s each subscriber received and the publisher's CPU s per frame."""

    subscribers: int
    rate: float
    cpu: float


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _publish(path: str, conns: list[Any], frames: int) -> tuple[float, float]:
    async with await Publisher.bind(path, MemfdExporter(), LAYOUT, buffers=4) as pub:
        for conn in conns:
            conn.send_bytes(path.encode())
        for conn in conns:  # each has its welcome: the publisher counts it
            await anyio.to_thread.run_sync(conn.recv_bytes)
        assert len(pub.subscribers) == len(conns)
        warm = 16
        for i in range(frames + warm):
            if i == warm:
                t0, c0 = time.perf_counter(), _cpu()
            frame = await pub.loan()
            async with frame.buffer.cpu_access("w") as view:
                view[0] = view[-1] = i & 0xFF
                del view
            await pub.send(frame)
        for _ in range(4):  # every buffer back: every frame released
            await pub.loan()
        t1, c1 = time.perf_counter(), _cpu()
    return frames / (t1 - t0), (c1 - c0) / frames


async def _publish_bare(path: str, conn: Any, frames: int) -> tuple[float, float]:
    """The floor: a 16-byte message each way per frame, 4 in flight, no buffers."""
    async with await anyio.create_unix_listener("\0" + path[1:]) as listener:
        conn.send_bytes(b"bare:" + path.encode())
        async with await listener.accept() as stream:
            message = b"f" * BARE
            total = frames + 16
            sent = done = pending = 0
            t0, c0 = time.perf_counter(), _cpu()
            while done < total:
                if done == 16:
                    t0, c0 = time.perf_counter(), _cpu()
                while sent < total and sent - done < 4:
                    await stream.send(message)
                    sent += 1
                pending += len(await stream.receive())
                done += pending // BARE
                pending %= BARE
            t1, c1 = time.perf_counter(), _cpu()
    return frames / (t1 - t0), (c1 - c0) / frames


def measure_throughput(
    backend: str, rounds: int, frames: int
) -> tuple[Throughput, Throughput, Throughput]:
    """1 → 1 and 1 → 4 subscriber processes, and the bare floor, alternating."""
    ctx = multiprocessing.get_context("fork")
    conns = []
    peers = []
    for _ in range(4):
        mine, theirs = ctx.Pipe()
        peers.append(_fork(throughput_peer, theirs, backend))
        theirs.close()
        conns.append(mine)
    results: dict[int, list[tuple[float, float]]] = {0: [], 1: [], 4: []}
    try:
        for r in range(rounds + 1):  # the first round warms up
            order = (0, 1, 4)[r % 3 :] + (0, 1, 4)[: r % 3]
            for n in order:
                path = f"@asyncdmabuf-bench-{os.getpid()}-{r}-{n}"
                if n:
                    rate, cpu = _run(backend, _publish, path, conns[:n], frames)
                else:
                    rate, cpu = _run(backend, _publish_bare, path, conns[0], frames)
                got = [conn.recv_bytes().split() for conn in conns[: n or 1]]
                assert all(int(c) == frames + 16 for c, _ in got), got
                if r:
                    results[n].append((rate, cpu))
    finally:
        for conn in conns:
            conn.send_bytes(b"")
        for peer in peers:
            peer.join(10)
    med = statistics.median
    return tuple(  # type: ignore[return-value]
        Throughput(
            n, med(rate for rate, _ in results[n]), med(cpu for _, cpu in results[n])
        )
        for n in (1, 4, 0)
    )


# -- reporting -------------------------------------------------------------------------


def latency_rows(lat: Latency) -> list[Row]:
    """Rows: the stream against the bare round trip, iceoryx2 and shared_memory.

    Each figure is already a median: :func:`compare` gets it as one round.
    """
    group = f"stream latency ({lat.backend})"
    rows = []
    for size in SIZES:
        ours = [lat.stream[size]]
        label = human(size)
        rows.append(
            compare(
                group,
                f"{label}: frame vs bare 16-byte round trip",
                ours,
                [lat.bare],
                le=LATENCY_GOAL,
            )
        )
        if lat.iox is not None:
            rows.append(
                compare(
                    group,
                    f"{label}: frame vs iceoryx2 sample+event",
                    ours,
                    [lat.iox[size]],
                )
            )
        else:
            rows.append(
                Row(
                    group,
                    f"{label}: vs iceoryx2: {lat.iox_error}",
                    fmt_us(ours[0]),
                    "-",
                    0.0,
                    "",
                    None,
                )
            )
        rows.append(
            compare(
                group,
                f"{label}: frame vs shared_memory + Pipe",
                ours,
                [lat.shm[size]],
            )
        )
    rows.append(
        compare(
            group,
            "4 KiB, released untouched (no cpu_access): frame vs bare",
            [lat.untouched],
            [lat.bare],
        )
    )
    return rows


def throughput_rows(
    backend: str, one: Throughput, four: Throughput, bare: Throughput
) -> list[Row]:
    """Rows: frames/s to 1 subscriber, each of 4 against 1, CPU per frame."""
    group = f"stream throughput ({backend})"
    rate_ratio = one.rate / RATE_GOAL
    met = rate_ratio >= 1 if backend == "uvloop" else None
    fan = four.rate / one.rate
    return [
        Row(
            group,
            "1080p XR24, 4 buffers: frames/s to 1 subscriber vs 5,000/s",
            f"{one.rate:,.0f}/s",
            f"{RATE_GOAL:,.0f}/s",
            rate_ratio,
            ">= 1x" if backend == "uvloop" else "",
            met,
        ),
        Row(
            group,
            "each of 4 subscribers vs 1 subscriber",
            f"{four.rate:,.0f}/s",
            f"{one.rate:,.0f}/s",
            fan,
            f">= {FANOUT_GOAL:g}x",
            fan >= FANOUT_GOAL,
        ),
        Row(
            group,
            "publisher CPU per frame: 4 subscribers vs 1",
            fmt_us(four.cpu),
            fmt_us(one.cpu),
            four.cpu / one.cpu,
            "",
            None,
        ),
        Row(
            group,
            "publisher CPU per frame per extra subscriber vs per bare message",
            fmt_us((four.cpu - one.cpu) / 3),
            fmt_us(bare.cpu),
            (four.cpu - one.cpu) / 3 / bare.cpu,
            "",
            None,
        ),
        Row(
            group,
            "frames/s to 1 subscriber vs bare 16-byte messages, 4 in flight",
            f"{one.rate:,.0f}/s",
            f"{bare.rate:,.0f}/s",
            one.rate / bare.rate,
            "",
            None,
        ),
        Row(
            group,
            "publisher CPU per frame vs per bare message",
            fmt_us(one.cpu),
            fmt_us(bare.cpu),
            one.cpu / bare.cpu,
            "",
            None,
        ),
    ]


def run(
    backends: list[str], rounds: int, reps: int, frames: int, throughput_on: list[str]
) -> list[Row]:
    """Measure every backend; return the rows."""
    rows: list[Row] = []
    for backend in backends:
        rows += latency_rows(measure_latency(backend, rounds, reps))
    for backend in throughput_on:
        one, four, bare = measure_throughput(backend, max(3, rounds // 2), frames)
        rows += throughput_rows(backend, one, four, bare)
    return rows


def _available(backends: Iterator[str] | tuple[str, ...]) -> list[str]:
    return [b for b in backends if backend_available(b)]


def rows(quick: bool) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark."""
    backends = _available(ALL_BACKENDS)
    on = [b for b in ("uvloop",) if b in backends] or backends[:1]
    if quick:
        return run(backends, 3, 100, 1000, on)
    return run(backends, 7, 200, 3000, on)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table of ratios; 1 if a goal was missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=ALL_BACKENDS, action="append")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--no-throughput", action="store_true", help="measure latency only"
    )
    args = parser.parse_args(argv)
    backends = _available(tuple(args.backend or ALL_BACKENDS))
    reps = 100 if args.quick else 200
    frames = 1000 if args.quick else 3000
    rounds = max(1, 3 if args.quick and args.rounds == 7 else args.rounds)
    on = [] if args.no_throughput else backends
    table = Table(title="Streams across processes: medians of alternating rounds")
    for column in ("group", "measurement", "ours", "baseline", "ratio", "goal", "met"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    result = run(backends, rounds, reps, frames, on)
    for row in result:
        table.add_row(
            row.group,
            row.what,
            row.ours,
            row.baseline,
            f"{row.ratio:.3g}x",
            row.goal,
            "" if row.met is None else ("yes" if row.met else "NO"),
        )
    console = Console(width=160)
    console.print(table)
    return 1 if any(row.met is False for row in result) else 0


if __name__ == "__main__":
    sys.exit(main())
