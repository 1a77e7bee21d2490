"""The fence watcher: who finishes an exported fd of fences nobody here signals.

An fd exported from an array with imported components (``export_sync_fd`` of
a buffer holding another process's fences, say) must become readable when
those components signal, whether or not anything in this process is awaiting
them: the peer polling it cannot poke this process. The kernel's
``sync_file_merge`` gets that from its fences' callbacks; here the components'
signals arrive as fds becoming readable, so something must be watching them.

That is one daemon thread per process, named ``fence-watch``, with one epoll
set, and only while there is something to watch: it starts with the first
such export and ends as soon as the last one is finished or abandoned. Each
component's file is watched once however many exports share it (one
duplicate fd), each export costs one fd (its write end), and no export adds
anything to an imported component. A component signalled in this process
tells the watcher at its signal, through a link it keeps until then (as a
kernel fence keeps a callback). An export is finished with its record when
its components signal, and dropped, with its fds closed, as soon as every
holder of the exported fd has closed it (its write end then polls
``EPOLLHUP``). The thread never touches a fence object or the event loop:
only the fds and the shape of the array, handed over at export.

It survives ``fork`` as fork allows: the child holds no watcher and closes the
fds it inherited from it.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Final, final

from . import _fence_fd
from ._errors import from_oserror
from ._fd import dup_cloexec
from ._fence_fd import FenceFdKind

__all__ = ["LeafKey", "Node", "Tree", "WatcherStatistics", "export", "statistics"]

#: A leaf's identity: the file its fd refers to.
LeafKey = Hashable

_THREAD_NAME: Final = "fence-watch"


@dataclass(slots=True)
class Node:
    """An array of the exported tree."""

    any_: bool
    """``Fence.any`` (True) or ``Fence.all``."""
    code: int
    """The first error (an errno) among its components signalled so far."""
    children: list[int | LeafKey]
    """Its pending components: node indices (int) or leaf keys (tuples)."""


@dataclass(slots=True)
class Tree:
    """What an export watches: its arrays (``nodes[0]`` is the root) and leaves."""

    nodes: list[Node]
    leaves: dict[LeafKey, tuple[int, FenceFdKind]]
    """Each imported leaf's fd (the caller's: the watcher duplicates it) and kind.

    Leaves of ``nodes`` not in here are active: the caller reports them."""


@dataclass(frozen=True, slots=True)
class WatcherStatistics:
    """A snapshot of the process's fence watcher."""

    exports: int
    """Exported fds not yet finished or abandoned."""
    watched_fds: int
    """Component fds held (one per distinct component file)."""
    running: bool
    """Whether the watcher thread exists."""


@final
class _Leaf:
    __slots__ = ("fd", "key", "kind", "watches")

    def __init__(self, key: LeafKey, fd: int, kind: FenceFdKind) -> None:
        self.key = key
        self.fd = fd
        self.kind = kind
        self.watches: set[_Watch] = set()


@final
class _Watch:
    """One exported fd: its write end and the evaluation state of its tree."""

    __slots__ = ("code", "leaf_parents", "node_parents", "pending", "wfd")

    def __init__(self, wfd: int, tree: Tree) -> None:
        self.wfd = wfd
        nodes = tree.nodes
        self.code = [node.code for node in nodes]
        self.pending = [1 if node.any_ else len(set(node.children)) for node in nodes]
        self.node_parents: list[list[int]] = [[] for _ in nodes]
        self.leaf_parents: dict[LeafKey, list[int]] = {}
        for index, node in enumerate(nodes):
            for child in dict.fromkeys(node.children):
                if isinstance(child, int):
                    self.node_parents[child].append(index)
                else:
                    self.leaf_parents.setdefault(child, []).append(index)

    def leaf_done(self, key: LeafKey, code: int) -> int | None:
        """Account for a leaf's signal; return the root's errno once it is done."""
        work = [(parent, code) for parent in self.leaf_parents.pop(key, ())]
        while work:
            index, child_code = work.pop()
            if self.pending[index] <= 0:
                continue
            if not self.code[index]:
                self.code[index] = child_code
            self.pending[index] -= 1
            if self.pending[index] == 0:
                if index == 0:
                    return self.code[0]
                work.extend(
                    (parent, self.code[index]) for parent in self.node_parents[index]
                )
        return None


@final
class _Watcher:
    __slots__ = ("_by_fd", "_epoll", "_leaves", "_lock", "_thread", "_wake", "_watches")

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._epoll: select.epoll | None = None
        #: An eventfd in the set, to wake the thread when an export is undone.
        self._wake = -1
        self._thread: threading.Thread | None = None
        self._leaves: dict[LeafKey, _Leaf] = {}
        self._watches: set[_Watch] = set()
        self._by_fd: dict[int, _Leaf | _Watch] = {}

    def statistics(self) -> WatcherStatistics:
        with self._lock:
            return WatcherStatistics(
                exports=len(self._watches),
                watched_fds=len(self._leaves),
                running=self._thread is not None,
            )

    def thread(self) -> threading.Thread | None:
        return self._thread

    # -- the loop's side ------------------------------------------------------------

    def export(self, tree: Tree) -> tuple[int, Callable[[LeafKey, int], None]]:
        rfd, wfd = _fence_fd.socketpair()
        watch = _Watch(wfd, tree)
        try:
            with self._lock:
                self._add(watch, tree)
        except BaseException:
            os.close(rfd)
            raise
        return rfd, partial(self._leaf_signaled, watch)

    def _leaf_signaled(self, watch: _Watch, key: LeafKey, code: int) -> None:
        """An active leaf signalled (told by the loop's thread, at its signal)."""
        with self._lock:
            if watch not in self._watches:
                return  # finished or abandoned already
            root = watch.leaf_done(key, code)
            if root is not None:
                self._drop(watch, root)
                self._wake_if_idle()

    def _wake_if_idle(self) -> None:
        if not self._watches and self._thread is not None:
            os.eventfd_write(self._wake, 1)  # let the thread see it is idle

    def _add(self, watch: _Watch, tree: Tree) -> None:
        try:
            epoll = self._epoll or self._open()
            self._watches.add(watch)
            for key, (fd, kind) in tree.leaves.items():
                leaf = self._leaves.get(key)
                if leaf is None:
                    leaf = _Leaf(key, dup_cloexec(fd), kind)
                    try:
                        epoll.register(leaf.fd, select.EPOLLIN)
                    except OSError as exc:
                        os.close(leaf.fd)
                        raise from_oserror(exc, "watching a fence fd") from None
                    self._leaves[key] = leaf
                    self._by_fd[leaf.fd] = leaf
                leaf.watches.add(watch)
            try:
                # No events asked: EPOLLHUP (every holder closed it) always comes,
                # and a holder shutting its end for writing wakes nobody.
                epoll.register(watch.wfd, 0)
            except OSError as exc:
                raise from_oserror(exc, "watching an exported fence fd") from None
            self._by_fd[watch.wfd] = watch
            if self._thread is None:
                thread = threading.Thread(
                    target=self._run, args=(epoll,), name=_THREAD_NAME, daemon=True
                )
                thread.start()
                self._thread = thread
        except BaseException:
            self._drop(watch, None)
            if self._thread is None:
                self._stop_if_idle()
            else:
                self._wake_if_idle()
            raise

    def _open(self) -> select.epoll:
        try:
            epoll = select.epoll()
        except OSError as exc:
            raise from_oserror(exc, "epoll for the fence watcher") from None
        try:
            wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError as exc:
            epoll.close()
            raise from_oserror(exc, "eventfd for the fence watcher") from None
        epoll.register(wake, select.EPOLLIN)
        self._epoll, self._wake = epoll, wake
        return epoll

    # -- the thread's side ------------------------------------------------------------

    def _run(self, epoll: select.epoll) -> None:
        try:
            while True:
                events = epoll.poll()
                with self._lock:
                    for fd, _ in events:
                        self._handle(fd)
                    if self._stop_if_idle():
                        return
        except BaseException:
            with self._lock:  # something went badly wrong: let every export go
                for watch in list(self._watches):
                    self._drop(watch, None)
                self._stop_if_idle()
            raise

    def _handle(self, fd: int) -> None:
        if fd == self._wake:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
            return
        target = self._by_fd.get(fd)
        if isinstance(target, _Watch):
            if _hung_up(fd):  # every holder of the exported fd closed it
                self._drop(target, None)
            return
        if target is None:
            return  # already let go of in this batch
        code = _fence_fd.read_status(target.fd, target.kind)
        if code is None:
            return
        for watch in list(target.watches):
            root = watch.leaf_done(target.key, code)
            if root is not None:
                self._drop(watch, root)
        self._forget_leaf(target)

    def _drop(self, watch: _Watch, code: int | None) -> None:
        """Finish ``watch`` with ``code`` (None: no record) and let go of its fds."""
        if watch not in self._watches:
            return
        self._watches.discard(watch)
        if self._by_fd.get(watch.wfd) is watch:
            del self._by_fd[watch.wfd]
            self._unregister(watch.wfd)
        _fence_fd.finish(watch.wfd, code)
        for key in list(watch.leaf_parents):
            leaf = self._leaves.get(key)
            if leaf is not None:
                leaf.watches.discard(watch)
                if not leaf.watches:
                    self._forget_leaf(leaf)

    def _forget_leaf(self, leaf: _Leaf) -> None:
        if self._leaves.get(leaf.key) is not leaf:
            return
        del self._leaves[leaf.key]
        del self._by_fd[leaf.fd]
        self._unregister(leaf.fd)
        os.close(leaf.fd)

    def _unregister(self, fd: int) -> None:
        if self._epoll is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _stop_if_idle(self) -> bool:
        """With nothing left to watch, close the epoll set and end (under the lock)."""
        if self._watches:
            return False
        if self._epoll is not None:
            self._epoll.close()
            os.close(self._wake)
            self._epoll, self._wake = None, -1
        self._thread = None
        return True

    def _after_fork_in_child(self) -> None:
        # The thread does not exist here: close what the parent's watcher held.
        fds = [*self._by_fd]
        if self._epoll is not None:
            self._epoll.close()
            fds.append(self._wake)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._reset()


def _hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, 0)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


_WATCHER: Final = _Watcher()
os.register_at_fork(after_in_child=_WATCHER._after_fork_in_child)


def export(tree: Tree) -> tuple[int, Callable[[LeafKey, int], None]]:
    """Return a new fd (``O_CLOEXEC``) finished by the watcher when ``tree`` signals.

    Also returns what to call with ``(key, errno)`` when an active leaf of
    the tree (one not in ``tree.leaves``) signals.

    Raises:
        DmaBufError: Out of fds or memory (with the errno).
    """
    return _WATCHER.export(tree)


def statistics() -> WatcherStatistics:
    """Return what the watcher holds now."""
    return _WATCHER.statistics()


def watcher_thread() -> threading.Thread | None:
    """Return the watcher thread, if it runs (for tests that wait for it to end)."""
    return _WATCHER.thread()
