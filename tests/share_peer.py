"""The other process of tests/test_share.py: ``python share_peer.py COMMAND ARGS``.

Every command talks to the test over a UNIX socket whose fd it inherits (or an
abstract address it connects to), in lines of JSON, and exits 0 when all went as
the test expected. The test reads the facts the peer reports and asserts on them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import socket
import struct
import sys
import zlib
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

import asyncdmabuf as dmabuf
from asyncdmabuf.exporters import MemfdExporter

PATTERN_SEED = 0x5A


def pattern(size: int, seed: int = PATTERN_SEED) -> bytes:
    """The bytes both sides expect: a cheap, position-dependent pattern."""
    block = bytes((seed + i) % 251 for i in range(4096))
    return (block * (size // 4096 + 1))[:size]


def _attempt(fn: Any, *args: Any) -> int:
    """Run ``fn(*args)``; return 0 if it worked, else the errno it failed with."""
    try:
        result = fn(*args)
    except OSError as exc:
        return exc.errno or -1
    if isinstance(result, mmap.mmap):
        result.close()
    elif isinstance(result, int) and fn is os.open:
        os.close(result)
    return 0


class Channel:
    """JSON lines over the share socket, next to the shares themselves."""

    def __init__(self, stream: anyio.abc.UNIXSocketStream) -> None:
        self.stream = stream
        self._reader = BufferedByteReceiveStream(stream)

    async def send(self, **facts: Any) -> None:
        await self.stream.send(json.dumps(facts).encode() + b"\n")

    async def receive(self) -> str:
        line = await self._reader.receive_until(b"\n", 4096)
        return line.decode()


async def inspect(stream: anyio.abc.UNIXSocketStream) -> None:
    """Receive a buffer, probe what this process may do with it, then obey."""
    chan = Channel(stream)
    buf, info = await dmabuf.receive_buffer_with_info(stream)
    async with buf:
        fd = buf.fd()
        try:
            async with buf.cpu_access("r") as view:
                crc = zlib.crc32(view)
                first, last = view[0], view[-1]
            facts: dict[str, Any] = {
                "pid": os.getpid(),
                "size": buf.size,
                "name": buf.name,
                "exporter": info.exporter,
                "format": info.format,
                "writable": info.writable,
                "refcount": buf.refcount,
                "inode": buf.inode,
                "crc": crc,
                "first": first,
                "last": last,
                "ftruncate_shrink": _attempt(os.ftruncate, fd, 0),
                "ftruncate_grow": _attempt(os.ftruncate, fd, buf.size * 2),
                "add_seals": _attempt(
                    fcntl.fcntl, fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE
                ),
                "pwrite": _attempt(os.pwrite, fd, b"!", 0),
                "mmap_write": _attempt(
                    mmap.mmap, fd, buf.size, mmap.MAP_SHARED, mmap.PROT_WRITE
                ),
                "reopen_rw": _attempt(os.open, f"/proc/self/fd/{fd}", os.O_RDWR),
            }
            try:
                async with buf.cpu_access("w") as view:
                    view[:8] = b"peerdone"
                facts["cpu_write"] = "ok"
            except dmabuf.InvalidArgument:
                facts["cpu_write"] = "InvalidArgument"
            await chan.send(**facts)
            while True:
                command = (await chan.receive()).strip()
                if command == "crc":
                    async with buf.cpu_access("r") as view:
                        await chan.send(crc=zlib.crc32(view))
                elif command == "hold":
                    await chan.send(holding=True)
                    await anyio.sleep_forever()  # until the test kills us
                else:
                    break
        finally:
            os.close(fd)


async def send_memfd(stream: anyio.abc.UNIXSocketStream) -> None:
    """Share a plain memfd (not made by asyncdmabuf) twice with raw SCM_RIGHTS."""
    fd = os.memfd_create("peer-raw", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, pattern(8192))
        await stream.send_fds(b"1", [fd])
        await stream.send_fds(b"2", [fd])
        await Channel(stream).receive()  # the test is done with it
    finally:
        os.close(fd)


async def hold_memfd(stream: anyio.abc.UNIXSocketStream) -> None:
    """Keep a memfd open and tell the test its number, for pidfd_getfd."""
    fd = os.memfd_create("peer-held", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, pattern(4096, seed=7))
        chan = Channel(stream)
        await chan.send(fd=fd)
        await chan.receive()
    finally:
        os.close(fd)


async def inherited(fd: int) -> None:
    """Import an fd inherited at exec with get(), check it, write back a marker."""
    buf = dmabuf.get(fd)
    async with buf:
        assert buf.exporter.name == "import", buf.exporter
        async with buf.cpu_access("rw") as view:
            assert bytes(view[8:]) == pattern(buf.size)[8:], "not the parent's bytes"
            view[:8] = b"childsaw"
    os.close(fd)


async def send_from(address: str, uid: int) -> None:
    """Become ``uid``, connect to abstract ``address``, share a buffer of our own."""
    os.setuid(uid)
    address = "\0" + address
    async with (
        await anyio.connect_unix(address) as stream,
        await MemfdExporter().allocate(4096) as buf,
    ):
        await dmabuf.send_buffer(stream, buf)
        # Wait for the test to hang up, so the message is surely read.
        with contextlib.suppress(anyio.EndOfStream, anyio.IncompleteRead):
            await Channel(stream).receive()


def _become(uid: int) -> None:
    os.setuid(uid)
    # setuid() makes the process undumpable, which would make /proc/self/fd
    # root's: give it back so the probes test the memfd's permissions.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 1, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl")


def forge_ramfs(sock_fd: int, size: int) -> None:
    """The ramfs forgery: a file that reads as ``/dmabuf:x``, sent as a share.

    As uid 65534, in a user and mount namespace of its own, mount a ramfs,
    create ``dmabuf:x`` on it, detach the mount (so ``/proc/<pid>/fd`` reads
    ``/dmabuf:x``, like a kernel dma-buf's name) and send the fd with a share
    record of ``size`` bytes. Then, on the line ``truncate``, truncate it to 0
    (under the receiver's mapping, were there one) and answer ``truncated``.
    Where this machine cannot do it, say ``skip: why`` instead.
    """
    sock = socket.socket(fileno=sock_fd)
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            raise OSError(
                ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}"
            )

    try:
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(65534)
            _become(65534)
        uid, gid = os.geteuid(), os.getegid()
        check(
            libc.unshare(0x10000000 | 0x00020000), "unshare(CLONE_NEWUSER|CLONE_NEWNS)"
        )
        for name, line in (
            ("setgroups", "deny"),
            ("uid_map", f"0 {uid} 1\n"),
            ("gid_map", f"0 {gid} 1\n"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(line)
        target = next(d for d in ("/mnt", "/tmp", "/srv", "/") if os.path.isdir(d))
        check(libc.mount(b"none", target.encode(), b"ramfs", 0, None), "mount ramfs")
        fd = os.open(os.path.join(target, "dmabuf:x"), os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        check(libc.umount2(target.encode(), 2), "umount2(MNT_DETACH)")  # MNT_DETACH
    except OSError as exc:
        sock.sendall(f"skip: {exc}\n".encode())
        return
    sock.sendall(b"ready " + os.readlink(f"/proc/self/fd/{fd}").encode() + b"\n")
    body = struct.pack("<Q", size) + struct.pack("<H", 0) * 3
    record = struct.pack("<4sBBHI", b"ADMB", 1, 1, 0, len(body)) + body
    socket.send_fds(sock, [record], [fd])
    command = b""
    while not command.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            return
        command += chunk
    os.ftruncate(fd, 0)
    sock.sendall(b"truncated\n")


async def main(argv: list[str]) -> None:
    command, arg = argv[0], argv[1]
    if command == "inherited":
        await inherited(int(arg))
        return
    if command == "send-from":
        await send_from(arg, int(argv[2]))
        return
    if command == "inspect-as":
        _become(int(argv[2]))
        command = "inspect"
    sock = socket.socket(fileno=int(arg))
    async with await anyio.abc.UNIXSocketStream.from_socket(sock) as stream:
        if command == "inspect":
            await inspect(stream)
        elif command == "send-memfd":
            await send_memfd(stream)
        elif command == "hold-memfd":
            await hold_memfd(stream)
        else:
            raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    if sys.argv[1] == "forge-ramfs":
        forge_ramfs(int(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    backend = os.environ.get("PEER_BACKEND", "asyncio")
    try:
        anyio.run(main, sys.argv[1:], backend=backend)
    except anyio.EndOfStream:
        sys.exit(errno.EPIPE)
