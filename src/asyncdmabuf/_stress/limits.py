"""What this machine can hold: the bounds a run is checked against up front.

A run that cannot fit is refused before it starts, with the bound named,
rather than growing until the kernel kills it.
"""

from __future__ import annotations

import os
import resource

from .._errors import InvalidArgument
from .config import StressConfig
from .stream import StreamConfig

__all__ = [
    "PROCESS_BYTES",
    "TASK_BYTES",
    "available_memory",
    "check_fits",
    "check_stream_fits",
]

#: A generous estimate of what one worker task costs (its coroutine frames,
#: the backend's task object, its record), in bytes.
TASK_BYTES = 32 << 10

#: What one device record costs, generously, in bytes.
DEVICE_BYTES = 4 << 10

#: A generous estimate of one subscriber process (an interpreter, asyncdmabuf,
#: an event loop), in bytes.
PROCESS_BYTES = 64 << 20

#: File descriptors a stream run uses per subscriber (its socket, its control
#: socket, fences in flight), generously.
SUBSCRIBER_FDS = 8

#: File descriptors kept for everything but the buffers (the event loop,
#: stdio, imports).
SPARE_FDS = 64


def available_memory() -> int:
    """Bytes the kernel says can be allocated now (``MemAvailable``).

    Falls back to physical memory when ``/proc/meminfo`` cannot be read.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(config: StressConfig, memory: int | None = None) -> None:
    """Refuse a configuration this machine cannot hold.

    Args:
        config: The run.
        memory: Bytes available (default: :func:`available_memory`).

    Raises:
        InvalidArgument: The tasks, devices or buffers need more memory than
            is available, or the buffers more fds than ``RLIMIT_NOFILE``
            allows; the message names the bound.
    """
    if memory is None:
        memory = available_memory()
    for name, count, each in (
        ("tasks", config.tasks, TASK_BYTES),
        ("devices", config.devices, DEVICE_BYTES),
    ):
        if count * each > memory:
            raise InvalidArgument(
                f"--{name} {count:,} needs about {_size(count * each)}; "
                f"{_size(memory)} is available: at most {memory // each:,}"
            )
    needed = config.buffers * config.buffer_size
    if needed > memory:
        raise InvalidArgument(
            f"--buffers {config.buffers:,} of --buffer-size {_size(config.buffer_size)}"
            f" need {_size(needed)}; {_size(memory)} is available"
        )
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and config.buffers + SPARE_FDS > soft:
        raise InvalidArgument(
            f"--buffers {config.buffers:,} may need one fd each, but RLIMIT_NOFILE "
            f"is {soft:,} (ulimit -n): at most {max(soft - SPARE_FDS, 0):,}"
        )


def check_stream_fits(config: StreamConfig, memory: int | None = None) -> None:
    """Refuse a stream run this machine cannot hold.

    Args:
        config: The run.
        memory: Bytes available (default: :func:`available_memory`).

    Raises:
        InvalidArgument: The buffers or the subscriber processes need more
            memory than is available, or more fds than ``RLIMIT_NOFILE``
            allows; the message names the bound.
    """
    if memory is None:
        memory = available_memory()
    needed = config.buffers * config.buffer_size
    if needed > memory:
        raise InvalidArgument(
            f"--buffers {config.buffers:,} of {_size(config.buffer_size)} frames "
            f"need {_size(needed)}; {_size(memory)} is available"
        )
    processes = config.subscribers * PROCESS_BYTES
    if needed + processes > memory:
        raise InvalidArgument(
            f"--subscribers {config.subscribers:,} need about {_size(processes)} "
            f"(processes of about {_size(PROCESS_BYTES)}); {_size(memory)} is "
            "available"
        )
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds = config.buffers + config.subscribers * SUBSCRIBER_FDS + SPARE_FDS
    if soft != resource.RLIM_INFINITY and fds > soft:
        raise InvalidArgument(
            f"--buffers {config.buffers:,} and --subscribers {config.subscribers:,} "
            f"may need {fds:,} fds, but RLIMIT_NOFILE is {soft:,} (ulimit -n)"
        )


def _size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1024:,.0f} KiB"
