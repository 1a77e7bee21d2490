"""The other process of a two-process test, and a line channel to it."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream


class Peer:
    """A child process and the socket it talks JSON lines over."""

    def __init__(
        self, proc: anyio.abc.Process, stream: anyio.abc.UNIXSocketStream
    ) -> None:
        self.proc = proc
        self.stream = stream
        self._reader = BufferedByteReceiveStream(stream)

    async def facts(self) -> dict[str, Any]:
        """The next JSON line the peer printed (bounded in time and size)."""
        with anyio.fail_after(60):
            line = await self._reader.receive_until(b"\n", 1 << 20)
        facts: dict[str, Any] = json.loads(line)
        return facts

    async def say(self, line: str = "go") -> None:
        """Send the peer one line."""
        await self.stream.send(line.encode() + b"\n")


@contextlib.asynccontextmanager
async def run_peer(
    script: Path, args: Sequence[str], env: Mapping[str, str]
) -> AsyncIterator[Peer]:
    """Run ``script ARG0 SOCKFD ARGS...``; it must exit 0 unless the test killed it.

    The child's end of a socketpair is passed as the fd after the first argument.
    """
    mine, theirs = socket.socketpair()
    first, *rest = args
    with theirs:
        proc = await anyio.open_process(
            [sys.executable, str(script), first, str(theirs.fileno()), *rest],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=None,
            env=dict(env),
        )
    stream = await anyio.abc.UNIXSocketStream.from_socket(mine)
    try:
        async with stream:
            yield Peer(proc, stream)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(30) as scope:
            await proc.wait()
        if scope.cancelled_caught:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        await proc.aclose()
    assert proc.returncode in (0, -signal.SIGKILL), f"{first} exited {proc.returncode}"
