"""Fence arrays: ``Fence.all`` / ``Fence.any``, the kernel's ``dma_fence_array``.

An array of fences signalled in this process (*active* ones) learns of each
component's signal through a link the component keeps (``_parents``), and the
signal climbs nested arrays through :func:`~asyncdmabuf._fence.settle`'s work
list, so a chain thousands of levels deep signals without recursion.

An array with a component nothing here signals by itself (an imported fence,
or an array of those) is *passive*, like its components: it keeps no links,
and whoever awaits or tests it evaluates it, bottom-up, by an explicit walk.
A task awaiting it waits for all its pending leaves at once (one epoll set
over the imported leaves' fds and an eventfd the active leaves write to at
their signal; no task per leaf). Its exported fd is finished by the fence
watcher (``_fence_watch``), which the active leaves tell of their signal.
"""

from __future__ import annotations

import itertools
import os
import select
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from typing import Final, final

import anyio

from . import _fence_watch
from ._errors import InvalidArgument, from_oserror
from ._fd import dup_cloexec
from ._fence import Fence, Notify, settle
from ._fence_fd import FenceFdKind, errno_of
from ._fence_watch import LeafKey

__all__ = ["ArrayFence", "leaves", "passive_tree"]

_ARRAY_NAMES: Final = ("dma_fence_array", "unbound")
_active_keys = itertools.count(1)


@final
class ArrayFence(Fence):
    """``Fence.all`` / ``Fence.any``: the kernel's ``dma_fence_array``."""

    __slots__ = ("_any", "_components", "_pending")

    def __init__(self, fences: tuple[Fence, ...], *, any_: bool) -> None:
        super().__init__()
        self._names = _ARRAY_NAMES
        self._any = any_
        #: The components still pending (signalled ones have been accounted for).
        self._components: tuple[Fence, ...] = ()
        pending: list[Fence] = []
        for fence in dict.fromkeys(fences):  # each fence once
            if fence._signaled:
                if self._error is None:
                    self._error = fence._error
                if any_:
                    self._mark(self._error)
                    return
            else:
                pending.append(fence)
        if not pending:
            self._mark(self._error)
            return
        self._components = tuple(pending)
        self._pending = 1 if any_ else len(pending)
        self._passive = any(fence._passive for fence in pending)
        if not self._passive:
            for fence in pending:
                fence._add_parent(self)

    def signal(self, error: Exception | int | None = None) -> None:
        """Refuse: a fence array signals when its components do.

        Raises:
            InvalidArgument: Always.
        """
        raise InvalidArgument(f"{self!r} signals when its components do")

    def _child_signaled(self, child: Fence) -> bool:
        if self._error is None:
            self._error = child._error
        self._pending -= 1
        return not self._pending

    def _release(self) -> None:
        components, self._components = self._components, ()
        for other in components:  # Fence.any: the others need not tell us
            other._remove_parent(self)

    # -- passive arrays ---------------------------------------------------------------

    def _poll(self) -> bool:
        if self._signaled:
            return True
        signalled: deque[Fence] = deque()
        try:
            for node in _post_order(self):
                still: list[Fence] = []
                done = False
                for fence in node._components:
                    if fence._signaled:
                        if node._error is None:
                            node._error = fence._error
                        done = node._any
                        if done:
                            break
                    else:
                        still.append(fence)
                if done or not still:
                    node._mark(node._error)
                    signalled.append(node)
                else:
                    node._components = tuple(still)
        finally:
            settle(signalled)
        return self._signaled

    async def _wait_ready(self) -> None:
        # One epoll set over the imported leaves' fds, plus an eventfd the
        # active leaves write to at their signal: one wait for all of them.
        links: list[tuple[Fence, Notify]] = []
        fds: list[int] = []
        try:
            wake = _eventfd()
            fds.append(wake)

            def woken(_: Fence) -> None:
                os.eventfd_write(wake, 1)

            for leaf in leaves(self):
                if leaf._passive:
                    fds.append(dup_cloexec(leaf._watch_fd()[1]))
                else:
                    link = Notify(woken)
                    leaf._add_parent(link)
                    links.append((leaf, link))
            try:
                ready = select.epoll()
            except OSError as exc:
                raise from_oserror(exc, "epoll for a fence array") from None
            with ready:
                for fd in fds:
                    ready.register(fd, select.EPOLLIN)
                await anyio.wait_readable(ready.fileno())
        finally:
            for leaf, link in links:
                leaf._remove_parent(link)
            for fd in fds:
                os.close(fd)

    def export_fd(self) -> int:
        """Return a new fd (``O_CLOEXEC``) that polls readable once the array signals.

        An array with imported components is finished by this process's one
        fence watcher (a thread that exists only while such exports are
        pending), which lets go of it as soon as every holder has closed it.

        Raises:
            DmaBufError: The process is out of fds (with the errno).
        """
        if self.signaled or not self._passive:
            return super().export_fd()
        tree, active = passive_tree(self)
        fd, done = _fence_watch.export(tree)
        for key, leaf in active.items():
            leaf._add_parent(Notify(partial(_tell, done, key)))
        return fd


def _is_passive_array(fence: Fence) -> bool:
    return type(fence) is ArrayFence and fence._passive and not fence._signaled


def _post_order(root: ArrayFence) -> list[ArrayFence]:
    """Return the pending passive arrays under ``root``, each after its components.

    Imported leaves are polled on the way, so the walk sees what they know.
    """
    order: list[ArrayFence] = []
    seen: set[int] = set()
    stack: list[tuple[ArrayFence, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for fence in node._components:
            if fence._signaled:
                continue
            if type(fence) is ArrayFence:
                if fence._passive and id(fence) not in seen:
                    stack.append((fence, False))
            elif fence._passive:
                fence._poll()
    return order


def leaves(root: ArrayFence) -> Iterator[Fence]:
    """Yield each pending fence under ``root`` that is not a passive array, once."""
    seen: set[int] = {id(root)}
    stack: list[Fence] = [root]
    while stack:
        node = stack.pop()
        assert isinstance(node, ArrayFence)
        for fence in node._components:
            if fence._signaled or id(fence) in seen:
                continue
            seen.add(id(fence))
            if _is_passive_array(fence):
                stack.append(fence)
            else:
                yield fence


def passive_tree(root: ArrayFence) -> tuple[_fence_watch.Tree, dict[LeafKey, Fence]]:
    """Return what the watcher needs of a pending passive array, and its active leaves.

    The arrays become nodes, everything else leaves: an imported fence is
    named by the identity of its fd's file and handed over as that fd; an
    active fence (signalled in this process) by a number, and returned for
    the caller to link to the watcher. No fence object is handed over (the
    watcher runs in another thread).
    """
    root._poll()
    index: dict[int, int] = {id(root): 0}
    nodes = [_fence_watch.Node(root._any, errno_of(root._error), [])]
    fds: dict[LeafKey, tuple[int, FenceFdKind]] = {}
    active: dict[LeafKey, Fence] = {}
    active_keys: dict[int, LeafKey] = {}
    stack: list[ArrayFence] = [root]
    while stack:
        node = stack.pop()
        me = nodes[index[id(node)]]
        for fence in node._components:
            if fence._signaled:
                continue
            if _is_passive_array(fence):
                assert isinstance(fence, ArrayFence)
                if id(fence) not in index:
                    index[id(fence)] = len(nodes)
                    nodes.append(
                        _fence_watch.Node(fence._any, errno_of(fence._error), [])
                    )
                    stack.append(fence)
                me.children.append(index[id(fence)])
            elif fence._passive:
                file, fd, kind = fence._watch_fd()
                fds[file] = (fd, kind)
                me.children.append(file)
            else:
                known = active_keys.get(id(fence))
                if known is None:
                    known = active_keys[id(fence)] = ("active", next(_active_keys))
                    active[known] = fence
                me.children.append(known)
    return _fence_watch.Tree(nodes, fds), active


def _tell(done: Callable[[LeafKey, int], None], key: LeafKey, fence: Fence) -> None:
    done(key, errno_of(fence._error))


def _eventfd() -> int:
    try:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    except OSError as exc:
        raise from_oserror(exc, "eventfd for a fence array") from None
