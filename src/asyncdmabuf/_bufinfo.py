"""Who is using what: the kernel's ``/sys/kernel/debug/dma_buf/bufinfo``."""

from __future__ import annotations

from dataclasses import dataclass

from ._buffer import DmaBuf, live_buffers
from ._resv import Usage

__all__ = ["AttachmentInfo", "BufInfo", "bufinfo", "format_bufinfo"]


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


def _info(buf: DmaBuf) -> BufInfo:
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
    )


def bufinfo() -> list[BufInfo]:
    """Return a snapshot of every live buffer of this process, oldest first."""
    return [_info(buf) for buf in live_buffers()]


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
