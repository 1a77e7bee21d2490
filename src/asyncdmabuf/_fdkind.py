"""What an fd is, decided once, from the kernel's identity of its file.

:func:`classify` looks at what the kernel says about the open file (``fstat``,
``fcntl(F_GETFL)``, the ``fstatfs`` magic of the filesystem it lives on and, for
a shmem file, its seals), never at a path or a ``/proc`` link text alone, which
any process can forge (a ramfs file named ``dmabuf:x`` on a detached mount reads
as ``/dmabuf:x``). The one link text it reads is among anonymous inodes, which
only the kernel makes: ``anon_inode:sync_file`` tells a sync_file from an
eventfd. The result is an immutable :class:`FdInfo` that callers hand down
instead of asking the kernel again.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
import stat
from typing import Final, NamedTuple

from ._errors import BadFileDescriptor, from_oserror
from ._validate import check_fd

__all__ = [
    "ANON_INODE_FS_MAGIC",
    "DMA_BUF_MAGIC",
    "HUGETLBFS_MAGIC",
    "RAMFS_MAGIC",
    "RESIZE_SEALS",
    "TMPFS_MAGIC",
    "WRITE_SEALS",
    "FdInfo",
    "FdKind",
    "classify",
]

#: ``f_type`` of the filesystems that matter (include/uapi/linux/magic.h).
DMA_BUF_MAGIC: Final = 0x444D4142
TMPFS_MAGIC: Final = 0x01021994
HUGETLBFS_MAGIC: Final = 0x958458F6
RAMFS_MAGIC: Final = 0x858458F6
ANON_INODE_FS_MAGIC: Final = 0x09041934

#: Seals that fix a file's size.
RESIZE_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
#: Seals that forbid new shared writable mappings (``F_SEAL_FUTURE_WRITE`` is 0x10).
WRITE_SEALS: Final = fcntl.F_SEAL_WRITE | 0x10

_SHMEM_MAGICS: Final = frozenset((TMPFS_MAGIC, HUGETLBFS_MAGIC))
_SYNC_FILE_LINK: Final = "anon_inode:sync_file"


class FdKind(enum.Enum):
    """What the file behind an fd is, as far as sharing memory goes."""

    MEMFD = "memfd"
    """A shmem file (tmpfs, hugetlbfs) whose size is sealed or can be sealed."""
    DMA_BUF = "dma-buf"
    """A real kernel dma-buf (``DMA_BUF_MAGIC``): its size never changes."""
    SYNC_FILE = "sync_file"
    """A kernel sync_file (a fence)."""
    SOCKET = "socket"
    PIPE = "pipe"
    DIRECTORY = "directory"
    OTHER = "other"
    """Anything else: a device, an ``O_PATH`` fd, an eventfd, a ramfs or disk
    file, a shmem file that can no longer be sealed against resizing."""


class FdInfo(NamedTuple):
    """The kernel's answer about one open file, taken once (immutable, slotted).

    A named tuple rather than a frozen dataclass: made on every hand-off, it
    costs a quarter as much to build.
    """

    kind: FdKind
    dev: int
    ino: int
    mode: int
    size: int
    """``st_size`` when classified (fixed for a dma-buf or a resize-sealed memfd)."""
    seals: int | None
    """The memfd's seals, or None where the file has none."""
    access: int
    """``O_RDONLY``, ``O_WRONLY`` or ``O_RDWR`` (``O_ACCMODE`` of the open file)."""
    magic: int | None
    """``f_type`` of the file's filesystem, or None where it was not asked."""

    @property
    def key(self) -> tuple[int, int]:
        """``(st_dev, st_ino)``: the file's identity."""
        return (self.dev, self.ino)

    @property
    def memory(self) -> bool:
        """True for memory another process can map: a memfd or a dma-buf."""
        return self.kind is FdKind.MEMFD or self.kind is FdKind.DMA_BUF

    @property
    def size_fixed(self) -> bool:
        """True when nobody can change the file's size any more."""
        if self.kind is FdKind.DMA_BUF:
            return True
        return self.seals is not None and self.seals & RESIZE_SEALS == RESIZE_SEALS

    @property
    def writable(self) -> bool:
        """True when this fd allows a shared writable mapping."""
        return self.access == os.O_RDWR and not (self.seals or 0) & WRITE_SEALS


class _StatFs(ctypes.Structure):
    """glibc's ``struct statfs`` on 64-bit Linux (x86_64, aarch64, riscv64...)."""

    _fields_ = (
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    )


_libc = ctypes.CDLL(None, use_errno=True)
_libc_fstatfs = _libc.fstatfs
_libc_fstatfs.argtypes = (ctypes.c_int, ctypes.POINTER(_StatFs))
_libc_fstatfs.restype = ctypes.c_int


def _fstatfs(fd: int) -> int:
    """Return the ``f_type`` magic of the filesystem ``fd``'s file lives on."""
    buf = _StatFs()
    if _libc_fstatfs(fd, ctypes.byref(buf)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(buf.f_type) & 0xFFFFFFFF


def _oserror(exc: OSError, fd: int, what: str) -> Exception:
    if exc.errno == errno.EBADF:
        return BadFileDescriptor(f"fd {fd} is not open")
    return from_oserror(exc, f"{what} of fd {fd}")


def classify(fd: int) -> FdInfo:
    """Return what the file behind ``fd`` is (two to five syscalls, no waiting).

    Raises:
        TypeError: ``fd`` is not an int.
        BadFileDescriptor: ``fd`` is not open.
        DmaBufError: The kernel refused to say (another errno).
    """
    fd = check_fd(fd)
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        raise _oserror(exc, fd, "fstat") from None
    mode = st.st_mode
    access = flags & os.O_ACCMODE
    kind = FdKind.OTHER
    magic: int | None = None
    seals: int | None = None
    if flags & os.O_PATH:
        pass  # no I/O, no mapping: a name, not a file
    elif stat.S_ISSOCK(mode):
        kind = FdKind.SOCKET
    elif stat.S_ISFIFO(mode):
        kind = FdKind.PIPE
    elif stat.S_ISDIR(mode):
        kind = FdKind.DIRECTORY
    elif stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0:
        # Regular files, and the anonymous inodes of dma-bufs and sync_files,
        # which have no file type bits at all.
        try:
            magic = _fstatfs(fd)
            if magic == DMA_BUF_MAGIC:
                kind = FdKind.DMA_BUF
            elif magic in _SHMEM_MAGICS and stat.S_ISREG(mode):
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                # Sealed against resizing, or still sealable: else (F_SEAL_SEAL
                # without them, as on a plain tmpfs file) its size stays free.
                fixed = seals & RESIZE_SEALS == RESIZE_SEALS
                if fixed or not seals & fcntl.F_SEAL_SEAL:
                    kind = FdKind.MEMFD
            elif (
                magic == ANON_INODE_FS_MAGIC
                and os.readlink(f"/proc/self/fd/{fd}") == _SYNC_FILE_LINK
            ):
                kind = FdKind.SYNC_FILE
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise _oserror(exc, fd, "fstatfs") from None
            # EINVAL from F_GET_SEALS (no seals), ENOENT from readlink (no
            # /proc): nothing here makes it shareable memory or a fence.
    return FdInfo(kind, st.st_dev, st.st_ino, mode, st.st_size, seals, access, magic)
