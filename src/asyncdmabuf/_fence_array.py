"""Fence arrays: ``Fence.all`` / ``Fence.any``, the kernel's ``dma_fence_array``.

An array of fences signalled in this process (*active* ones) learns of each
component's signal through a link the component keeps (``_parents``), and the
signal climbs nested arrays through :func:`~asyncdmabuf._fence.settle`'s work
list, so a chain thousands of levels deep signals without recursion.

An array with a component nothing here signals by itself (an imported fence,
or an array of those) is *passive*, like its components: it keeps no links,
and whoever awaits or tests it evaluates it, bottom-up, by an explicit walk.
A task awaiting it waits for all its pending leaves at once (one epoll set
over their fds, no task per leaf). Its exported fd is finished by the fence
watcher (``_fence_watch``).
"""

from __future__ import annotations

import os
import select
from collections import deque
from collections.abc import Iterator
from typing import Final, final

import anyio

from . import _fence_watch
from ._errors import InvalidArgument, from_oserror
from ._fd import dup_cloexec
from ._fence import Fence, settle
from ._fence_fd import FdKind, errno_of

__all__ = ["ArrayFence", "leaves", "passive_tree"]

_ARRAY_NAMES: Final = ("dma_fence_array", "unbound")


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
            if other._parents:
                other._parents.pop(self, None)

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
        fds: list[int] = []
        try:
            fds.extend(dup_cloexec(leaf._watch_fd()[1]) for leaf in leaves(self))
            if not fds:  # pragma: no cover: a pending passive array has leaves
                await anyio.lowlevel.checkpoint()
                return
            if len(fds) == 1:
                await anyio.wait_readable(fds[0])
                return
            try:
                ready = select.epoll()
            except OSError as exc:
                raise from_oserror(exc, "epoll for a fence array") from None
            with ready:
                for fd in fds:
                    ready.register(fd, select.EPOLLIN)
                await anyio.wait_readable(ready.fileno())
        finally:
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
        return _fence_watch.export(passive_tree(self))


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


def passive_tree(root: ArrayFence) -> _fence_watch.Tree:
    """Return what the watcher needs of a pending passive array: its shape and fds.

    The arrays become nodes, everything else leaves, each named by the
    identity of its fd's file. No fence object is handed over (the watcher
    runs in another thread).
    """
    root._poll()
    index: dict[int, int] = {}
    nodes: list[_fence_watch.Node] = []
    leaf_fds: dict[_fence_watch.LeafKey, tuple[int, FdKind]] = {}
    stack: list[ArrayFence] = [root]
    index[id(root)] = 0
    nodes.append(_fence_watch.Node(root._any, _fence_watch_code(root), []))
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
                        _fence_watch.Node(fence._any, _fence_watch_code(fence), [])
                    )
                    stack.append(fence)
                me.children.append(index[id(fence)])
            else:
                key, fd, kind = fence._watch_fd()
                leaf_fds[key] = (fd, kind)
                me.children.append(key)
    return _fence_watch.Tree(nodes, leaf_fds)


def _fence_watch_code(node: ArrayFence) -> int:
    return errno_of(node._error)
