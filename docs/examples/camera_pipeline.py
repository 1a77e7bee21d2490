"""A camera streaming frames to two consumer processes: a display and a recorder.

The camera is a :class:`asyncdmabuf.Publisher` with a pool of four XR24
buffers. Two other processes subscribe to it:

- the **display** (``queue=1``, ``overflow="drop-oldest"``) only wants the
  newest frame: it is slower than the camera, so the publisher drops what it
  cannot show, and the camera never waits for it. It releases each frame with
  a release fence (its "scan-out" still reads the buffer for a moment), and the
  buffer is not lent again before that fence signals;
- the **recorder** (``queue=2``, ``overflow="block"``) must see every frame:
  when it falls behind, the camera's ``send`` waits for it.

Each frame is "captured" after it is sent, as a device would: ``send`` carries
an acquire fence, the camera writes the pixels, then signals it. The
subscribers' ``cpu_access("r")`` waits for that fence in their own process.
Both consumers check every byte of every frame they see. At the end the camera
takes every buffer back (so every frame was released by everyone), closes the
stream, and both consumers' iterations end.

    python docs/examples/camera_pipeline.py --frames 120 --fps 240 --backend trio

Needs numpy (``pip install 'asyncdmabuf[numpy]'``) for ``FrameLayout.arrays``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import anyio
import anyio.abc
import numpy as np
from anyio.streams.buffered import BufferedByteReceiveStream

import asyncdmabuf as dmabuf
from asyncdmabuf.exporters import MemfdExporter

# --8<-- [start:camera]
WIDTH, HEIGHT = 320, 240
LAYOUT = dmabuf.FrameLayout.for_format("XR24", WIDTH, HEIGHT)  # one (H, W, 4) plane
CONSUMERS = {  # role -> (queue, overflow)
    "display": (1, "drop-oldest"),
    "recorder": (2, "block"),
}


def expected_rows(seq: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Frame ``seq``'s pattern: every byte of row ``r`` is ``(seq + r) % 256``."""
    return ((seq + np.arange(HEIGHT)) % 256).astype(np.uint8)


async def camera(pub: dmabuf.Publisher, frames: int, fps: float) -> None:
    """Publish ``frames`` frames at ``fps`` (0: as fast as the recorder takes them)."""
    started = anyio.current_time()
    for seq in range(frames):
        if fps:  # pace the camera, as a sensor would
            await anyio.sleep_until(started + seq / fps)
        frame = await pub.loan()  # waits until a buffer is free
        captured = dmabuf.Fence()  # the acquire fence: signalled once written
        await pub.send(frame, fence=captured, metadata=f"frame {seq}".encode())
        # The "sensor" writes the frame now; the readers wait for the fence.
        async with frame.buffer.cpu_access("w") as view:
            (plane,) = LAYOUT.arrays(view)
            plane[:] = expected_rows(seq)[:, None, None]
            del plane, view
        captured.signal()
    # Every buffer back means every frame was released by every consumer and
    # every release fence has signalled: loan() lends no buffer before.
    total = pub.statistics().buffers_total
    loans = [await pub.loan() for _ in range(total)]
    stats = pub.statistics()
    for loan in loans:
        loan.release()
    print(
        f"camera: {stats.frames_sent} frames of {WIDTH}x{HEIGHT} XR24 in"
        f" {anyio.current_time() - started:.2f} s through {total} buffers,"
        f" {stats.frames_dropped} dropped for the display; every buffer came back"
    )


# --8<-- [end:camera]


# --8<-- [start:consumer]
async def consumer(role: str, path: str) -> None:
    """Subscribe as ``role``, check every byte of every frame, print a summary."""
    queue, overflow = CONSUMERS[role]
    seen: list[int] = []
    async with (
        await dmabuf.subscribe(path, queue=queue, overflow=overflow) as sub,
        anyio.create_task_group() as tg,
    ):
        print(json.dumps({"role": role, "subscribed": True}), flush=True)
        async for frame in sub:  # ends when the camera closes the stream
            async with frame.buffer.cpu_access("r") as view:  # waits for the capture
                (plane,) = LAYOUT.arrays(view)
                if not (plane == expected_rows(frame.seq)[:, None, None]).all():
                    raise RuntimeError(f"{role}: frame {frame.seq} has wrong bytes")
                if frame.metadata != f"frame {frame.seq}".encode():
                    raise RuntimeError(f"{role}: frame {frame.seq}: {frame.metadata!r}")
                del plane, view
            seen.append(frame.seq)
            if role == "display":
                scanned_out = dmabuf.Fence()  # the screen still reads the buffer...
                frame.release(fence=scanned_out)
                tg.start_soon(_scan_out, scanned_out)
                await anyio.sleep(0.01)  # a 100 Hz display: slower than the camera
            else:
                frame.release()  # the recorder is done with it at once
        stats = sub.statistics()
    print(
        json.dumps(
            {
                "role": role,
                "frames": seen,
                "received": stats.frames_received,
                "dropped": stats.frames_dropped,
                "buffers": stats.buffers,
            }
        ),
        flush=True,
    )


async def _scan_out(done: dmabuf.Fence) -> None:
    await anyio.sleep(0.002)  # ...for a moment: the buffer is reused only after
    done.signal()


# --8<-- [end:consumer]


def _run(func: Any, *args: object, backend: str) -> None:
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    name = "trio" if backend == "trio" else "asyncio"
    anyio.run(func, *args, backend=name, backend_options=options)


async def pipeline(frames: int, fps: float, backend: str) -> None:
    """Start both consumers, run the camera, and check what the consumers saw."""
    path = f"@asyncdmabuf-camera-{os.getpid()}"  # an abstract socket: no file
    procs: dict[str, anyio.abc.Process] = {}
    lines: dict[str, BufferedByteReceiveStream] = {}
    reports: dict[str, Any] = {}
    try:
        async with await dmabuf.Publisher.bind(
            path, MemfdExporter(), LAYOUT, buffers=4
        ) as pub:
            for role in CONSUMERS:
                argv = [__file__, f"--role={role}", f"--path={path}"]
                proc = procs[role] = await anyio.open_process(
                    [sys.executable, *argv, f"--backend={backend}"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=None,
                )
                assert proc.stdout is not None
                lines[role] = BufferedByteReceiveStream(proc.stdout)
            with anyio.fail_after(10):  # each says so once it has subscribed
                for role in CONSUMERS:
                    await lines[role].receive_until(b"\n", 1 << 16)
            await camera(pub, frames, fps)
        # Leaving the block closed the stream: both consumers' iterations end.
        with anyio.fail_after(10):
            for role, proc in procs.items():
                reports[role] = json.loads(
                    await lines[role].receive_until(b"\n", 1 << 20)
                )
                if await proc.wait() != 0:
                    raise RuntimeError(f"the {role} exited {proc.returncode}")
    finally:
        with anyio.CancelScope(shield=True):
            for proc in procs.values():
                if proc.returncode is None:
                    proc.kill()
                await proc.aclose()
    recorder, display = reports["recorder"], reports["display"]
    if recorder["frames"] != list(range(frames)) or recorder["dropped"]:
        raise RuntimeError(f"the recorder missed frames: {recorder}")
    shown = display["frames"]
    if shown != sorted(shown) or not shown or shown[-1] != frames - 1:
        raise RuntimeError(f"the display's frames are not the newest in order: {shown}")
    print(
        f"recorder: {len(recorder['frames'])} frames, {recorder['dropped']} dropped;"
        f" display: {len(shown)} frames, {display['dropped']} dropped (it keeps up"
        " with the newest only); every byte of every frame checked"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline (the camera starts its consumers), or one consumer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--fps", type=float, default=240, help="0: unpaced")
    parser.add_argument(
        "--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio"
    )
    parser.add_argument("--role", choices=sorted(CONSUMERS), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role is not None:
        _run(consumer, args.role, args.path, backend=args.backend)
        return 0
    if args.frames < 1 or args.fps < 0:
        parser.error("need --frames >= 1 and --fps >= 0")
    _run(pipeline, args.frames, args.fps, args.backend, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
