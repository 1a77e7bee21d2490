"""Every async test runs on asyncio, asyncio+uvloop and trio."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

import asyncdmabuf
from asyncdmabuf._backends import BACKENDS as _BACKENDS
from asyncdmabuf._buffer import live_buffers

from .helpers import fd_targets

BACKENDS = [pytest.param(backend, id=label) for label, backend in _BACKENDS.items()]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    backend: tuple[str, dict[str, object]] = request.param
    return backend


def _open_fds() -> set[int]:
    return set(fd_targets())


def _leaks(
    before_buffers: set[int], before_fds: set[int]
) -> tuple[list[object], dict[int, str]]:
    leaked: list[object] = [b for b in live_buffers() if id(b) not in before_buffers]
    memfds = {
        fd: target
        for fd, target in fd_targets().items()
        if fd not in before_fds and "asyncdmabuf" in target
    }
    return leaked, memfds


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail a test that leaves a live buffer or a memfd open behind."""
    before_fds = _open_fds()
    before = set(map(id, live_buffers()))
    yield
    leaked, memfds = _leaks(before, before_fds)
    if leaked or memfds:
        # Cycles (a buffer and its attachments) go only with a collection: make
        # it, which also runs the ResourceWarning of a buffer never put, here.
        gc.collect()
        leaked, memfds = _leaks(before, before_fds)
    assert not leaked, f"buffers left live: {leaked}\n{asyncdmabuf.format_bufinfo()}"
    assert not memfds, f"fds left open: {memfds}"


def _sockets() -> set[str]:
    return {t for t in fd_targets().values() if t.startswith("socket:")}


@pytest.fixture
def no_socket_leaks() -> Iterator[None]:
    """Fail a test that leaves a fence's socket open (or a watcher thread running)."""
    before = _sockets()
    yield
    for thread in threading.enumerate():
        if thread.name == "fence-watch":
            thread.join(timeout=10)
            assert not thread.is_alive(), "a fence watcher thread never finished"
    if _sockets() - before:
        gc.collect()  # only when needed: fences in cycles close their fds here
        assert not _sockets() - before
