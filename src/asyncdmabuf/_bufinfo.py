"""Who is using what: the kernel's ``/sys/kernel/debug/dma_buf/bufinfo``.

Plus, for a buffer of a stream's publisher, what the stream does with it now
and which subscribers hold it (what ``pub.subscribers`` says, by buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._buffer import DmaBuf, live_buffers
from ._resv import Usage
from ._stream._publisher import buffer_uses

__all__ = [
    "AttachmentInfo",
    "BufInfo",
    "FenceInfo",
    "HolderInfo",
    "StreamInfo",
    "bufinfo",
    "format_bufinfo",
]


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """One attachment of a buffer: its device and its live mappings."""

    device: str
    dynamic: bool
    mappings: tuple[str, ...]
    """The direction of each live mapping, oldest first."""


@dataclass(frozen=True, slots=True)
class FenceInfo:
    """A pending fence of a buffer (BOOKKEEP fences are left out, as in the kernel)."""

    usage: str
    driver: str
    timeline: str
    seqno: int
    signaled: bool


@dataclass(frozen=True, slots=True)
class HolderInfo:
    """A subscriber that holds a frame in a stream's buffer: sent, not released."""

    pid: int
    uid: int
    seq: int
    """The frame's number in its stream."""
    state: str
    """``"in-flight"`` (sent; the subscriber has not said it took it),
    ``"taken"`` (received and not released) or ``"waiting"`` (a
    ``drop-oldest`` subscriber's newest frame, kept at the publisher until the
    subscriber has room)."""


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What the publisher that owns a buffer is doing with it now."""

    buffer: int
    """The buffer's number in its stream (as in ``SubscriberInfo.buffers``)."""
    state: str
    """``"free"`` (``loan`` may lend it), ``"loaned"`` (being filled) or
    ``"sent"`` (not back yet: held, in the history, or behind a fence)."""
    in_history: bool
    release_fences: int
    """Release fences that have not signalled yet: it is not free before."""
    holders: tuple[HolderInfo, ...]


@dataclass(frozen=True, slots=True)
class BufInfo:
    """A snapshot of one live buffer."""

    inode: int | None
    """The inode of its file, or None if it has never needed one."""
    size: int
    name: str | None
    exporter: str
    refcount: int
    attachments: tuple[AttachmentInfo, ...]
    fences: tuple[FenceInfo, ...] = ()
    cpu_access: tuple[str, ...] = ()
    """The modes of the CPU accesses open now (``begin_cpu_access`` not ended)."""
    stream: StreamInfo | None = None
    """For a buffer of a :class:`Publisher` in its ``async with`` block: its
    state in the stream and the subscribers holding it."""


def _fences(buf: DmaBuf) -> tuple[FenceInfo, ...]:
    resv = buf.pending_resv()
    if resv is None:
        return ()
    return tuple(
        FenceInfo(
            usage=usage.name,
            driver=fence.driver,
            timeline=fence.timeline,
            seqno=fence.seqno,
            signaled=fence.signaled,
        )
        for fence, usage in resv.fences(Usage.READ)
    )


def _streams() -> dict[DmaBuf, StreamInfo]:
    """Every buffer of every publisher in its ``async with`` block."""
    return {
        buf: StreamInfo(
            buffer=ident,
            state=state,
            in_history=in_history,
            release_fences=fences,
            holders=tuple(HolderInfo(*holder) for holder in holders),
        )
        for buf, ident, state, in_history, fences, holders in buffer_uses()
    }


def _info(buf: DmaBuf, streams: dict[DmaBuf, StreamInfo]) -> BufInfo:
    return BufInfo(
        inode=buf.inode if buf.shared else None,
        size=buf.size,
        name=buf.name,
        exporter=buf.exporter.name,
        refcount=buf.refcount,
        attachments=tuple(
            AttachmentInfo(
                device=att.device.name,
                dynamic=att.dynamic,
                mappings=tuple(sgt.direction.name for sgt in att.mappings),
            )
            for att in buf.attachments
        ),
        fences=_fences(buf),
        cpu_access=buf.cpu_access_modes,
        stream=streams.get(buf),
    )


def bufinfo() -> list[BufInfo]:
    """Return a snapshot of every live buffer of this process, oldest first."""
    streams = _streams()
    return [_info(buf, streams) for buf in live_buffers()]


def format_bufinfo(infos: list[BufInfo] | None = None) -> str:
    """Return :func:`bufinfo` as a table in the spirit of the kernel's bufinfo.

    Raises:
        TypeError: ``infos`` is not a list of :class:`BufInfo`.
    """
    infos = bufinfo() if infos is None else infos
    if not isinstance(infos, list | tuple) or not all(
        isinstance(info, BufInfo) for info in infos
    ):
        raise TypeError("format_bufinfo() takes a list of BufInfo records")
    lines = [
        "Dma-buf Objects:",
        f"{'size':<16}{'count':<8}{'exp_name':<16}{'ino':<12}name",
    ]
    attached = 0
    for info in infos:
        ino = "-" if info.inode is None else f"{info.inode:08d}"
        lines.append(
            f"{info.size:011d}     {info.refcount:<8}{info.exporter:<16}{ino:<12}"
            f"{info.name or '<none>'}"
        )
        for fence in info.fences:
            state = "signalled" if fence.signaled else "unsignalled"
            lines.append(
                f"\t{fence.usage} fence: {fence.driver} {fence.timeline} "
                f"seq {fence.seqno} {state}"
            )
        if info.cpu_access:
            lines.append(f"\tcpu access: {', '.join(info.cpu_access)}")
        if info.stream is not None:
            lines.extend(_stream_lines(info.stream))
        lines.append("\tAttached Devices:")
        for att in info.attachments:
            kind = " (dynamic)" if att.dynamic else ""
            mapped = ", ".join(att.mappings) or "not mapped"
            lines.append(f"\t{att.device}{kind}: {mapped}")
        lines.append(f"Total {len(info.attachments)} devices attached")
        lines.append("")
        attached += len(info.attachments)
    total = sum(info.size for info in infos)
    lines.append(f"Total {len(infos)} objects, {total} bytes")
    return "\n".join(lines)


def _stream_lines(stream: StreamInfo) -> list[str]:
    parts = [stream.state]
    if stream.in_history:
        parts.append("in history")
    if n := stream.release_fences:
        parts.append(f"{n} release {'fence' if n == 1 else 'fences'} pending")
    lines = [f"\tstream buffer {stream.buffer}: {', '.join(parts)}"]
    lines.extend(
        f"\t\tsubscriber pid {h.pid} uid {h.uid}: frame {h.seq} {h.state}"
        for h in stream.holders
    )
    return lines
