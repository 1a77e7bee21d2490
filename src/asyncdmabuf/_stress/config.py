"""What a stress run does, and the exporter it runs on.

Exporters are found through their entry points (group
``asyncdmabuf.exporters``), never imported by name: the framework does not
depend on ``asyncdmabuf.exporters``.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, get_args

from .._errors import InvalidArgument
from .._exporter import Exporter
from .._validate import check_int, check_number

if TYPE_CHECKING:
    from .._pool import Allocator

__all__ = [
    "CLEAN_OPS",
    "GROUP",
    "MAP_MODES",
    "ExporterSpec",
    "MapMode",
    "StressConfig",
    "available_exporters",
    "load_exporter",
    "make_exporter",
]

#: The entry-point group exporters register under.
GROUP = "asyncdmabuf.exporters"
#: Fault ops ``fault_rate`` leaves clean, so that every run can set up and
#: tear down.
CLEAN_OPS = frozenset({"allocate", "release"})
#: The granule ``memory`` is rounded to when the exporter does not say.
DEFAULT_PAGE = 4096

MapMode = Literal["block", "try", "mixed"]

MAP_MODES: tuple[str, ...] = get_args(MapMode)


@dataclass(frozen=True, slots=True)
class StressConfig:
    """What to run; every field has a default that ``make run`` uses.

    Attributes:
        exporter: The exporter's entry-point name (``memfd``, ``simdev``...).
        tasks: Concurrent worker tasks.
        buffers: Buffers they share.
        devices: Importing devices they attach with.
        buffer_size: Bytes per buffer.
        ops: Operations to run in total; None to run for ``duration``.
        duration: Seconds to run when ``ops`` is None.
        map_mode: ``block``, ``try`` (with back-off) or ``mixed`` (per op).
        maps_per_op: Buffers each operation maps at once.
        cancel_rate: Chance that a blocking map is cancelled at a random point.
        fault_rate: Chance that an exporter op fails, for exporters that
            inject faults (their ``fault_ops`` but :data:`CLEAN_OPS`).
        seed: Seeds every random choice (and the SimDevice's faults).
        watchdog: Seconds without a completed operation that count as a hang;
            0 turns the watchdog off.
        verify: Check and rewrite the bytes through CPU access in every op.
        backoff: The first back-off of a ``try`` operation, in seconds.
        memory: Device memory in bytes, for exporters that take ``memory``;
            None for room for every buffer.
        alloc_latency: Seconds to allocate a buffer's backing (``alloc_latency``).
        map_latency: Seconds of a backing's first map (``map_latency``).
        map_hold: Seconds every blocking map spends in the exporter with the
            buffer's lock held, added by the run (see :mod:`.instrument`) to
            whatever the exporter's own map takes, as a device's map does;
            0 for the exporter as it is.
    """

    exporter: str = "memfd"
    tasks: int = 64
    buffers: int = 32
    devices: int = 4
    buffer_size: int = 64 << 10
    ops: int | None = 10_000
    duration: float | None = None
    map_mode: MapMode = "mixed"
    maps_per_op: int = 2
    cancel_rate: float = 0.02
    fault_rate: float = 0.0
    seed: int = 0
    watchdog: float = 10.0
    verify: bool = True
    backoff: float = 0.0005
    memory: int | None = None
    alloc_latency: float = 0.0
    map_latency: float = 0.0
    map_hold: float = 0.0005

    def __post_init__(self) -> None:
        for name in ("tasks", "buffers", "devices", "buffer_size", "maps_per_op"):
            check_int(getattr(self, name), name)
        if self.ops is not None:
            check_int(self.ops, "ops")
        elif (
            self.duration is None
            or check_number(self.duration, "duration") <= 0
            or self.duration == float("inf")
        ):
            raise InvalidArgument("give a positive ops count or duration")
        if self.maps_per_op > self.buffers:
            raise InvalidArgument(
                f"maps_per_op ({self.maps_per_op}) exceeds buffers ({self.buffers})"
            )
        if self.map_mode not in MAP_MODES:
            raise InvalidArgument(f"map_mode must be one of {', '.join(MAP_MODES)}")
        for name in ("cancel_rate", "fault_rate"):
            check_number(getattr(self, name), name, 0.0, 1.0)
        for name in (
            "watchdog",
            "backoff",
            "alloc_latency",
            "map_latency",
            "map_hold",
        ):
            value = check_number(getattr(self, name), name)
            if value == float("inf"):
                raise InvalidArgument(f"{name} must be finite, got {value}")
        if self.memory is not None:
            check_int(self.memory, "memory")


class ExporterSpec(Protocol):
    """What :func:`make_exporter` reads of a run's configuration."""

    @property
    def exporter(self) -> str: ...
    @property
    def buffers(self) -> int: ...
    @property
    def buffer_size(self) -> int: ...
    @property
    def memory(self) -> int | None: ...
    @property
    def alloc_latency(self) -> float: ...
    @property
    def map_latency(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def fault_rate(self) -> float: ...


def available_exporters() -> list[str]:
    """Return the names of every registered exporter, sorted."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def load_exporter(name: str) -> type[Exporter]:
    """Return the exporter class registered as ``name``, or at ``module:Class``.

    Raises:
        InvalidArgument: No exporter is registered under that name, the
            module or class cannot be found, or it is not an
            :class:`~asyncdmabuf.Exporter` subclass.
    """
    if ":" in name:
        module_name, _, qualname = name.partition(":")
        try:
            found: object = importlib.import_module(module_name)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError, ValueError) as exc:
            raise InvalidArgument(f"cannot load exporter {name!r}: {exc}") from None
        if (
            isinstance(found, type)
            and issubclass(found, Exporter)
            and not inspect.isabstract(found)
        ):
            return found
        raise InvalidArgument(f"{name!r} is not a concrete Exporter subclass")
    for ep in entry_points(group=GROUP, name=name):
        cls = ep.load()
        if isinstance(cls, type) and issubclass(cls, Exporter):
            return cls
        raise InvalidArgument(f"entry point {name!r} is not an Exporter subclass")
    known = ", ".join(available_exporters()) or "none"
    raise InvalidArgument(f"no exporter named {name!r} (registered: {known})")


def exporter_options(cls: type[Exporter]) -> frozenset[str]:
    """The options :func:`make_exporter` can pass ``cls``'s constructor."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read: no options
        return frozenset()
    return frozenset(
        key
        for key, p in params.items()
        if p.kind
        not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        )
    )


def run_exporter(
    config: ExporterSpec, exporter: Exporter | None
) -> tuple[Exporter, Allocator]:
    """The run's exporter, ``exporter`` or else :func:`make_exporter`'s; it allocates.

    Returns:
        The exporter, and the same object typed as an :class:`Allocator`.

    Raises:
        InvalidArgument: It cannot be built, or has no ``allocate(size)``.
        NoDevice: Its backing is missing on this machine.
    """
    if exporter is None:
        exporter = make_exporter(config)
    if getattr(exporter, "allocate", None) is None:
        raise InvalidArgument(f"exporter {exporter.name!r} has no allocate(size)")
    return exporter, cast("Allocator", exporter)


def make_exporter(config: ExporterSpec) -> Exporter:
    """Build the exporter ``config.exporter`` names, configured for the run.

    The options its constructor takes by keyword are passed, the others left
    out: ``name`` (the entry-point name and ``0``), ``memory`` (default: room
    for every buffer, rounded to its ``page_size``), ``alloc_latency``,
    ``map_latency``, ``seed``, and, with a ``fault_rate``, ``faults``: that
    rate for each op of the class's ``fault_ops`` but :data:`CLEAN_OPS`.

    Raises:
        InvalidArgument: No exporter of that name, or it cannot be built.
        NoDevice: Its backing is missing on this machine.
    """
    cls = load_exporter(config.exporter)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read: no options
        params = {}  # type: ignore[assignment]
    page = DEFAULT_PAGE
    if "page_size" in params and isinstance(params["page_size"].default, int):
        page = params["page_size"].default
    memory = config.memory
    if memory is None:
        memory = config.buffers * -(-config.buffer_size // page) * page
    fault_ops = getattr(cls, "fault_ops", ())
    offered: dict[str, Any] = {
        "name": f"{config.exporter}0",
        "memory": -(-memory // page) * page,
        "alloc_latency": config.alloc_latency,
        "map_latency": config.map_latency,
        "seed": config.seed,
    }
    if config.fault_rate:
        offered["faults"] = {
            op: config.fault_rate for op in fault_ops if op not in CLEAN_OPS
        }
    options = {
        key: value
        for key, value in offered.items()
        if key in params and params[key].kind is not inspect.Parameter.POSITIONAL_ONLY
    }
    try:
        return cls(**options)
    except TypeError as exc:
        raise InvalidArgument(
            f"exporter {config.exporter!r} cannot be built with {sorted(options)}: "
            f"{exc}"
        ) from None


def injects_faults(exporter: Exporter) -> bool:
    """Return whether ``exporter`` says it can inject faults (``fault_ops``)."""
    return bool(getattr(type(exporter), "fault_ops", ()))
