"""Every buffer on the machine, read from ``/proc`` as ``dmabuf_dump`` does.

The scan needs no cooperation from the processes it looks at: it reads
``/proc/PID/fd`` (which file each fd is), ``/proc/PID/fdinfo/FD`` (a kernel
dma-buf's size, exporter and name) and ``/proc/PID/maps`` (who maps what), and
keys every buffer by its file's ``(st_dev, st_ino)``. Processes come and go while
it reads: a file that disappears part way (``ENOENT``, ``ESRCH``) means the
process or its fd has gone, and the process is counted as vanished; one it may
not read is counted as denied; a zombie has nothing left to read. None of these
is an error.

Buffers are recognised by the text of their ``/proc`` links: an asyncdmabuf
memfd reads ``/memfd:asyncdmabuf:...`` (see :func:`memfd_label`), a kernel
dma-buf ``/dmabuf:NAME`` or ``anon_inode:dmabuf``. Anybody can create a memfd
with any label, so this is good for a report and nothing else: no decision of
the framework's rests on it (``_fd.is_shareable_memory`` and ``_share`` decide
what may be shared, from the file itself).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ._label import _DELETED, parse_memfd_label

__all__ = [
    "FdHolder",
    "Mapping",
    "ProcessUsage",
    "SysBuffer",
    "SysInfo",
    "Uninspected",
    "scan",
]

#: errnos that mean the process (or its fd) went away while we read it.
_GONE = frozenset({errno.ENOENT, errno.ESRCH})
_DENIED = frozenset({errno.EACCES, errno.EPERM})

Kind = Literal["memfd", "dma-buf"]
Reason = Literal["permission", "vanished", "zombie"]


def classify_link(target: str) -> tuple[Kind, str | None, str | None] | None:
    """Return ``(kind, exporter, name)`` for a ``/proc`` fd link, or None if no buffer.

    For reporting only: a link's text says what the file claims to be.
    """
    if target.startswith("/memfd:"):
        parsed = parse_memfd_label(target)
        return None if parsed is None else ("memfd", parsed[0], parsed[1])
    if target.startswith("/dmabuf:"):
        return "dma-buf", None, target[len("/dmabuf:") :].removesuffix(_DELETED) or None
    if target == "anon_inode:dmabuf":
        return "dma-buf", None, None
    return None


def parse_fdinfo(text: str) -> dict[str, str]:
    """Return the ``key: value`` lines of an fdinfo file, skipping any other line."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and key not in fields:
            fields[key] = value.strip()
    return fields


@dataclass(frozen=True, slots=True)
class _MapLine:
    start: int
    end: int
    perms: str
    offset: int
    dev: int
    inode: int
    path: str


def parse_maps_line(line: str) -> _MapLine | None:
    """Return one line of ``/proc/PID/maps`` parsed, or None if it is not one."""
    parts = line.split(None, 5)
    if len(parts) < 6:
        return None  # anonymous memory: no path, no buffer
    span, perms, offset, dev, inode, path = parts
    lo, sep, hi = span.partition("-")
    major, sep2, minor = dev.partition(":")
    try:
        if not (sep and sep2):
            return None
        return _MapLine(
            start=int(lo, 16),
            end=int(hi, 16),
            perms=perms,
            offset=int(offset, 16),
            dev=os.makedev(int(major, 16), int(minor, 16)),
            inode=int(inode),
            path=path.rstrip("\n"),
        )
    except (ValueError, OverflowError):
        return None


# -- records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FdHolder:
    """A process holding a buffer by an fd."""

    pid: int
    fd: int
    writable: bool | None
    """Whether the fd was opened for writing (None: its fdinfo was unreadable)."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """One mapping of a buffer in a process's address space."""

    pid: int
    start: int
    end: int
    perms: str
    """As in ``/proc/PID/maps``: ``rw-s`` and the like."""

    @property
    def size(self) -> int:
        """The bytes mapped."""
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class SysBuffer:
    """One buffer, as the processes that use it show it."""

    dev: int
    inode: int
    kind: Kind
    size: int | None
    """Bytes, or None if only a mapping of it was seen and its size is unknown."""
    name: str | None
    exporter: str | None
    """The asyncdmabuf exporter, or the kernel's ``exp_name``; None if unknown."""
    holders: tuple[FdHolder, ...]
    mappings: tuple[Mapping, ...]

    @property
    def key(self) -> tuple[int, int]:
        """``(st_dev, st_ino)``: the identity of its file."""
        return self.dev, self.inode

    @property
    def holder_pids(self) -> tuple[int, ...]:
        """The processes holding it by fd, ascending."""
        return tuple(sorted({h.pid for h in self.holders}))

    @property
    def mapper_pids(self) -> tuple[int, ...]:
        """The processes mapping it, ascending."""
        return tuple(sorted({m.pid for m in self.mappings}))


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """What one process holds and maps."""

    pid: int
    command: str
    fds: int
    """Buffer fds it holds."""
    buffers: int
    """Distinct buffers it holds or maps."""
    held_bytes: int
    """Sizes of the distinct buffers it holds by fd."""
    mapped_bytes: int
    """Bytes of its mappings of buffers."""
    total_bytes: int
    """Sizes of the distinct buffers it holds or maps (unknown sizes count 0)."""


@dataclass(frozen=True, slots=True)
class Uninspected:
    """A process whose fds or maps could not be read (what could be is reported)."""

    pid: int
    reason: Reason
    """``permission`` (not ours to read), ``vanished`` (exited during the scan),
    ``zombie`` (exited, not yet reaped: it holds nothing)."""
    detail: str


@dataclass(frozen=True, slots=True)
class SysInfo:
    """A scan of the machine: its buffers, per-process totals, what was not seen."""

    buffers: tuple[SysBuffer, ...]
    """memfds first, then kernel dma-bufs; each by inode."""
    processes: tuple[ProcessUsage, ...]
    """Processes holding or mapping a buffer, by pid."""
    uninspected: tuple[Uninspected, ...]
    """By pid."""
    scanned: int
    """Processes looked at."""

    @property
    def total_bytes(self) -> int:
        """The sizes of every buffer (unknown sizes count 0)."""
        return sum(b.size or 0 for b in self.buffers)


# -- the scan --------------------------------------------------------------------------


class _Skip(Exception):
    """This process cannot be read further; the reason is recorded."""

    __slots__ = ()


@dataclass(slots=True)
class _Builder:
    kind: Kind
    size: int | None = None
    name: str | None = None
    exporter: str | None = None
    holders: list[FdHolder] = field(default_factory=list)
    mappings: list[Mapping] = field(default_factory=list)


@dataclass(slots=True)
class _Scan:
    root: str
    buffers: dict[tuple[int, int], _Builder] = field(default_factory=dict)
    commands: dict[int, str] = field(default_factory=dict)
    uninspected: dict[int, Uninspected] = field(default_factory=dict)
    scanned: int = 0

    def skip(self, pid: int, reason: Reason, detail: str) -> None:
        self.uninspected.setdefault(pid, Uninspected(pid, reason, detail))

    def failed(self, pid: int, exc: OSError, what: str) -> _Skip:
        """Record why ``what`` of ``pid`` could not be read; return what to raise."""
        if exc.errno in _GONE:
            self.skip(pid, "vanished", f"exited while reading its {what}")
        elif exc.errno in _DENIED:
            self.skip(pid, "permission", f"may not read its {what}")
        else:
            self.skip(pid, "vanished", f"its {what}: {os.strerror(exc.errno or 0)}")
        return _Skip()

    def process(self, pid: int) -> None:
        base = os.path.join(self.root, str(pid))
        self.scanned += 1
        try:
            state = _state(_read(os.path.join(base, "stat")))
        except OSError as exc:
            raise self.failed(pid, exc, "stat") from None
        self.commands[pid] = _command(base)
        if state == "Z":
            self.skip(pid, "zombie", "exited, not yet reaped: holds nothing")
            return
        with contextlib.suppress(_Skip):  # recorded: the maps may still be readable
            self.fds(pid, base)
        self.maps(pid, base)

    def fds(self, pid: int, base: str) -> None:
        fd_dir = os.path.join(base, "fd")
        try:
            names = os.listdir(fd_dir)
        except OSError as exc:
            raise self.failed(pid, exc, "fds") from None
        for entry in names:
            if not entry.isdigit():
                continue
            path = os.path.join(fd_dir, entry)
            try:
                # The link's text says what the file is (reporting only).
                found = classify_link(os.readlink(path))
                if found is None:
                    continue
                st = os.stat(path)
            except OSError as exc:
                if exc.errno in _GONE or exc.errno == errno.EINVAL:
                    continue  # the fd closed under us, or not a link at all
                self.failed(pid, exc, f"fd {entry}")  # recorded; read the others
                continue
            kind, exporter, name = found
            info = _fdinfo(os.path.join(base, "fdinfo", entry))
            buf = self.buffers.setdefault((st.st_dev, st.st_ino), _Builder(kind))
            if kind == "dma-buf":
                buf.size = _int(info.get("size"), st.st_size)
                buf.exporter = info.get("exp_name") or buf.exporter
                name = info.get("name") or name
            else:
                buf.size = st.st_size
                buf.exporter = exporter or buf.exporter
            buf.name = name or buf.name
            flags = _int(info.get("flags"), None, base=8)
            writable = None if flags is None else flags & os.O_ACCMODE != os.O_RDONLY
            buf.holders.append(FdHolder(pid, int(entry), writable))

    def maps(self, pid: int, base: str) -> None:
        try:
            text = _read(os.path.join(base, "maps"))
        except OSError as exc:
            raise self.failed(pid, exc, "maps") from None
        for line in text.splitlines():
            m = parse_maps_line(line)
            if m is None:
                continue
            buf = self.buffers.get((m.dev, m.inode))
            if buf is None:
                found = classify_link(m.path)
                if found is None:
                    continue
                # Mapped, its fd closed: the name is in the path, the size is not.
                kind, exporter, name = found
                buf = _Builder(kind, _mapped_size(base, m), name, exporter)
                self.buffers[m.dev, m.inode] = buf
            buf.mappings.append(Mapping(pid, m.start, m.end, m.perms))

    def result(self) -> SysInfo:
        buffers = tuple(
            SysBuffer(
                dev=dev,
                inode=ino,
                kind=b.kind,
                size=b.size,
                name=b.name,
                exporter=b.exporter,
                holders=tuple(sorted(b.holders, key=lambda h: (h.pid, h.fd))),
                mappings=tuple(sorted(b.mappings, key=lambda m: (m.pid, m.start))),
            )
            for (dev, ino), b in sorted(
                self.buffers.items(),
                key=lambda kv: (kv[1].kind != "memfd", kv[0][1], kv[0][0]),
            )
        )
        return SysInfo(
            buffers=buffers,
            processes=_usage(buffers, self.commands),
            uninspected=tuple(v for _, v in sorted(self.uninspected.items())),
            scanned=self.scanned,
        )


def _order(item: tuple[tuple[int, int], _Builder]) -> tuple[bool, int, int]:
    (dev, ino), b = item
    return b.kind != "memfd", ino, dev


def _usage(
    buffers: tuple[SysBuffer, ...], commands: dict[int, str]
) -> tuple[ProcessUsage, ...]:
    pids = sorted({p for b in buffers for p in (*b.holder_pids, *b.mapper_pids)})
    usage = []
    for pid in pids:
        held = [b for b in buffers if pid in b.holder_pids]
        used = [b for b in buffers if pid in b.holder_pids or pid in b.mapper_pids]
        usage.append(
            ProcessUsage(
                pid=pid,
                command=commands.get(pid, ""),
                fds=sum(1 for b in held for h in b.holders if h.pid == pid),
                buffers=len(used),
                held_bytes=sum(b.size or 0 for b in held),
                mapped_bytes=sum(
                    m.size for b in used for m in b.mappings if m.pid == pid
                ),
                total_bytes=sum(b.size or 0 for b in used),
            )
        )
    return tuple(usage)


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def _state(stat: str) -> str:
    """The state letter of ``/proc/PID/stat`` (the command before it may hold ``)``)."""
    _, _, rest = stat.rpartition(")")
    return rest.split(None, 1)[0] if rest.strip() else "?"


def _command(base: str) -> str:
    try:
        return _read(os.path.join(base, "comm")).strip()
    except OSError:
        return ""


def _fdinfo(path: str) -> dict[str, str]:
    try:
        return parse_fdinfo(_read(path))
    except OSError:  # gone or refused after the link was read: report without it
        return {}


def _int(text: str | None, default: int | None, *, base: int = 10) -> int | None:
    if text is None:
        return default
    try:
        return int(text, base)
    except ValueError:
        return default


def _mapped_size(base: str, m: _MapLine) -> int | None:
    """The size of a mapped file via ``map_files`` (needs privilege), else None."""
    try:
        return os.stat(
            os.path.join(base, "map_files", f"{m.start:x}-{m.end:x}")
        ).st_size
    except OSError:
        return None


def _pids(root: str) -> list[int]:
    return sorted(int(e) for e in os.listdir(root) if e.isdigit())


def scan(pids: Iterable[int] | None = None, *, root: str = "/proc") -> SysInfo:
    """Read every buffer the processes under ``root`` hold or map.

    Args:
        pids: Look at these processes only (their other holders are not
            looked for); all of ``root``'s by default.
        root: Where ``/proc`` is (a test points it at a tree of its own).

    Returns:
        The buffers, by ``(st_dev, st_ino)``, with their holders and mappings;
        per-process totals; the processes that could not be read, and why.

    Raises:
        OSError: ``root`` itself cannot be listed.
    """
    state = _Scan(os.fspath(root))
    for pid in _pids(state.root) if pids is None else sorted(set(pids)):
        with contextlib.suppress(_Skip):  # recorded in state.uninspected
            state.process(pid)
    return state.result()
