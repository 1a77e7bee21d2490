"""A zero-copy frame pipeline between two processes, with back-pressure.

The producer owns a small pool of buffers. For each frame it takes a free buffer
(waiting while every buffer is in flight: that is the back-pressure), fills it,
and sends it to the consumer with :func:`asyncdmabuf.send_buffer`, the frame
number riding in the share's format string. The consumer maps each pooled
buffer once (a buffer that comes back is the same object, so its mapping is
reused), checksums the frame and acknowledges it; the acknowledgement returns
the buffer to the pool. No frame's bytes are ever copied between processes.

    python docs/examples/frame_pipeline.py --frames 1000 --size 1048576 --pool 4
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import time
import zlib

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

import asyncdmabuf as dmabuf
from asyncdmabuf.exporters import MemfdExporter

#: consumer -> producer: frame number, pool slot, CRC-32 of the frame's bytes.
ACK = struct.Struct("<QII")


def _run(main: object, *args: object, backend: str) -> None:
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    name = "trio" if backend == "trio" else "asyncio"
    anyio.run(main, *args, backend=name, backend_options=options)  # type: ignore[arg-type]


async def produce(frames: int, size: int, pool_size: int, backend: str) -> None:
    """Send ``frames`` frames through ``pool_size`` buffers; check every ack."""
    mine, theirs = socket.socketpair()
    with theirs:
        consumer = await anyio.open_process(
            [
                sys.executable,
                __file__,
                f"--consumer={theirs.fileno()}",
                f"--backend={backend}",
            ],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=None,
        )
    exporter = MemfdExporter()
    pool: list[dmabuf.DmaBuf] = []
    expected: dict[int, int] = {}  # frame number -> CRC-32 the consumer must see
    free_send, free_receive = anyio.create_memory_object_stream[int](pool_size)
    in_flight = 0
    max_in_flight = 0
    started = time.perf_counter()

    async def collect_acks(stream: anyio.abc.UNIXSocketStream) -> None:
        nonlocal in_flight
        reader = BufferedByteReceiveStream(stream)
        for _ in range(frames):
            frame, slot, crc = ACK.unpack(await reader.receive_exactly(ACK.size))
            if expected.pop(frame) != crc:
                raise RuntimeError(f"frame {frame}: the consumer saw other bytes")
            in_flight -= 1
            await free_send.send(slot)  # back to the pool

    try:
        for slot in range(pool_size):
            pool.append(await exporter.allocate(size, name=f"frame-slot-{slot}"))
            free_send.send_nowait(slot)
        async with (
            await anyio.abc.UNIXSocketStream.from_socket(mine) as stream,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(collect_acks, stream)
            for frame in range(frames):
                slot = await free_receive.receive()  # waits while all are in flight
                buf = pool[slot]
                async with buf.cpu_access("w") as view:
                    view[:] = bytes((frame % 251,)) * size
                    view[:8] = frame.to_bytes(8, "little")
                    expected[frame] = zlib.crc32(view)
                in_flight += 1
                max_in_flight = max(max_in_flight, in_flight)
                await dmabuf.send_buffer(
                    stream, buf, writable=False, format=f"frame={frame} slot={slot}"
                )
            # No more frames: the consumer acks what it has, then sees the end.
            await stream.send_eof()
    finally:
        with anyio.CancelScope(shield=True):
            for buf in pool:
                await buf.put()
            free_send.close()
            free_receive.close()
            if await consumer.wait() != 0:
                raise RuntimeError(f"the consumer exited {consumer.returncode}")
            await consumer.aclose()
    elapsed = time.perf_counter() - started
    print(
        f"{frames} frames of {size} bytes through {pool_size} pooled buffers "
        f"in {elapsed:.3f} s ({frames / elapsed:.0f} frames/s), "
        f"at most {max_in_flight} in flight; every checksum matched"
    )


async def consume(fd: int) -> None:
    """Checksum every frame received on socket ``fd`` and acknowledge it."""
    mapped: dict[int, dmabuf.DmaBuf] = {}  # inode -> buffer: one mapping per slot
    sock = socket.socket(fileno=fd)
    async with await anyio.abc.UNIXSocketStream.from_socket(sock) as stream:
        try:
            while True:
                try:
                    buf, info = await dmabuf.receive_buffer_with_info(
                        stream, require_same_uid=True
                    )
                except anyio.EndOfStream:
                    break
                if mapped.setdefault(buf.inode, buf) is not buf or buf.refcount > 1:
                    await buf.put()  # a slot we have already mapped: keep one ref
                fields = dict(item.split("=") for item in (info.format or "").split())
                async with buf.cpu_access("r") as view:
                    if int.from_bytes(view[:8], "little") != int(fields["frame"]):
                        raise RuntimeError(f"{info.format}: wrong frame in the buffer")
                    crc = zlib.crc32(view)
                await stream.send(
                    ACK.pack(int(fields["frame"]), int(fields["slot"]), crc)
                )
        finally:
            with anyio.CancelScope(shield=True):
                for buf in mapped.values():
                    await buf.put()


def main(argv: list[str] | None = None) -> int:
    """Run the producer (which starts its consumer), or the consumer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes per frame")
    parser.add_argument("--pool", type=int, default=4, help="buffers in the pool")
    parser.add_argument(
        "--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio"
    )
    parser.add_argument("--consumer", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.consumer is not None:
        _run(consume, args.consumer, backend=args.backend)
        return 0
    if args.frames < 1 or args.size < 8 or args.pool < 1:
        parser.error("need --frames >= 1, --size >= 8 and --pool >= 1")
    _run(produce, args.frames, args.size, args.pool, args.backend, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
