"""A subscriber process of ``asyncdmabuf stress --stream``.

``python -m asyncdmabuf._stress.stream_child FD SPEC``: ``FD`` is a socket to
the stress run (JSON lines: ``ready``, ``holding``, ``done``), ``SPEC`` a JSON
object (``path``, ``backend``, ``queue``, ``overflow``, ``hold_after``). It
subscribes, checks every byte of every frame against :func:`.stream.frame_bytes`,
releases it with a fence, reads it once more and signals the fence; at the end
of the stream it closes, then reports what it saw and whether it left an fd or
a buffer behind. It ignores SIGINT: a Ctrl-C reaches the whole process group,
and the stress run ends the stream for it.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from array import array
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from .._backends import BACKENDS
from .._buffer import live_buffers
from .._errors import DmaBufError
from .._fence import Fence
from .._stream import Frame, subscribe
from .report import LatencySummary
from .stream import (
    TILE,
    fd_table,
    fds_left,
    fill_pattern,
    first_difference,
    frame_tile,
)

__all__ = ["main"]


class Seen:
    """What the subscriber counted."""

    __slots__ = (
        "bytes_verified",
        "errors",
        "first_mismatch",
        "gaps",
        "last",
        "late_checks",
        "late_mismatches",
        "latency",
        "mismatches",
        "out_of_order",
        "pattern",
        "received",
        "verified",
    )

    def __init__(self) -> None:
        self.received = self.verified = self.bytes_verified = 0
        self.mismatches = self.late_checks = self.late_mismatches = 0
        self.gaps = self.out_of_order = 0
        self.last = -1
        self.first_mismatch: str | None = None
        self.latency: array[float] = array("d")
        self.errors: list[str] = []
        self.pattern = bytearray()

    def expected(self, size: int) -> bytearray:
        """The scratch buffer a frame's pattern is built in (made once)."""
        if len(self.pattern) != size:
            self.pattern = bytearray(size)
        return self.pattern

    def facts(self) -> dict[str, Any]:
        summary = LatencySummary.of(self.latency)
        return {
            "received": self.received,
            "gaps": self.gaps,
            "verified": self.verified,
            "bytes_verified": self.bytes_verified,
            "mismatches": self.mismatches,
            "first_mismatch": self.first_mismatch,
            "late_checks": self.late_checks,
            "late_mismatches": self.late_mismatches,
            "out_of_order": self.out_of_order,
            "latency": [
                summary.count,
                summary.mean,
                summary.p50,
                summary.p90,
                summary.p99,
                summary.max,
                list(summary.quantiles),
            ],
            "errors": self.errors[:10],
        }


async def check(frame: Frame, seen: Seen) -> None:
    """Compare every byte of ``frame`` with its pattern (after the acquire fence)."""
    buf = frame.buffer
    seq = frame.seq
    if seq <= seen.last:
        seen.out_of_order += 1
    elif seen.last >= 0:
        seen.gaps += seq - seen.last - 1
    else:
        seen.gaps += seq
    seen.last = max(seen.last, seq)
    seen.received += 1
    expected = seen.expected(buf.size)
    fill_pattern(expected, seq)
    async with buf.cpu_access("r") as view:
        same = expected == view  # one memcmp on the mapping: no copy
        data = b"" if same else view.tobytes()
        del view
    seen.verified += 1
    seen.bytes_verified += len(expected)
    if not same:
        seen.mismatches += 1
        if seen.first_mismatch is None:
            at = first_difference(data, bytes(expected))
            seen.first_mismatch = (
                f"frame {seq} in {buf.name}: byte {at} is {data[at]:#04x}, "
                f"expected {expected[at]:#04x}"
            )


async def late_check(frame: Frame, seen: Seen) -> None:
    """Read a released frame's first, middle and last tiles, as a device still might."""
    buf = frame.buffer
    tile = frame_tile(frame.seq)
    size = buf.size
    middle = size // 2
    spans = {(0, min(TILE.size, size)), (middle, min(middle + TILE.size, size))}
    spans.add((max(0, size - TILE.size), size))
    async with buf.cpu_access("r") as view:
        same = all(view[a:b] == pattern_at(tile, a, b) for a, b in spans)
        del view
    seen.late_checks += 1
    if not same:
        seen.late_mismatches += 1


def pattern_at(tile: bytes, start: int, stop: int) -> bytes:
    """Bytes ``start:stop`` of a pattern that repeats ``tile``."""
    return bytes(tile[i % len(tile)] for i in range(start, stop))


async def subscriber(
    control: anyio.abc.SocketStream, spec: dict[str, Any], before: dict[str, str]
) -> None:
    seen = Seen()
    hold_after: int | None = spec["hold_after"]
    held: list[Frame] = []
    hold_count: int = spec["hold_count"]
    async with await subscribe(
        spec["path"], queue=spec["queue"], overflow=spec["overflow"]
    ) as sub:
        await say(control, ready=True)
        async for frame in sub:
            if hold_after is not None and seen.received >= hold_after:
                await check(frame, seen)  # then held, never released
                held.append(frame)
                if len(held) == hold_count:
                    await say(control, holding=[f.seq for f in held], **seen.facts())
                continue
            await check(frame, seen)
            done = Fence()
            frame.release(fence=done)
            await (
                anyio.lowlevel.checkpoint()
            )  # the publisher may run (it must not reuse)
            await late_check(frame, seen)
            done.signal()
            seen.latency.append((time.monotonic_ns() - frame.timestamp) / 1e9)
    leftover = [b for b in live_buffers() if not b.released]
    await say(
        control,
        done=True,
        fds_left=fds_left(before, fd_table()),
        buffers_left=len(leftover),
        **seen.facts(),
    )


async def say(control: anyio.abc.SocketStream, **facts: Any) -> None:
    await control.send(json.dumps(facts).encode() + b"\n")


async def run(fd: int, spec: dict[str, Any]) -> bool:
    """Subscribe and check to the end; False (said to the run) when it failed."""
    sock = socket.socket(fileno=fd)
    async with await anyio.abc.UNIXSocketStream.from_socket(sock) as control:
        before = fd_table()
        try:
            await subscriber(control, spec, before)
        except DmaBufError as exc:  # a finding: reported, not a traceback
            await say(control, failed=f"{type(exc).__name__}: {exc}")
            return False
        except Exception as exc:  # a bug: reported, and the traceback shown
            await say(control, failed=f"{type(exc).__name__}: {exc}")
            raise
    return True


def main(argv: list[str] | None = None) -> int:
    """Run one subscriber; 0 when it ran to the end of the stream, 1 if not."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd_text, spec_text = (sys.argv[1:] if argv is None else argv)[:2]
    spec = json.loads(spec_text)
    backend, options = BACKENDS[spec["backend"]]
    ok: bool = anyio.run(
        run, int(fd_text), spec, backend=backend, backend_options=options
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
