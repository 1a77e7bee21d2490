"""The built-in exporters, installed as ``asyncdmabuf.exporters``.

Third-party exporters register under the entry-point group
``asyncdmabuf.exporters``; :func:`load` finds any of them by name.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from asyncdmabuf import Exporter, InjectedFault, InvalidArgument

from ._dmaheap import DmaHeapExporter
from ._faults import FAULT_OPS, Fault, FaultOp, FaultPlan
from ._memfd import MemfdExporter, import_fd
from ._simdev import SimDevice, SimStatistics

__all__ = [
    "FAULT_OPS",
    "DmaHeapExporter",
    "Fault",
    "FaultOp",
    "FaultPlan",
    "InjectedFault",
    "MemfdExporter",
    "SimDevice",
    "SimStatistics",
    "available",
    "import_fd",
    "load",
]

GROUP = "asyncdmabuf.exporters"


def available() -> list[str]:
    """Return the names of every registered exporter, sorted."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def load(name: str) -> type[Exporter]:
    """Return the exporter class registered as ``name``.

    Raises:
        InvalidArgument: No exporter is registered under that name.
    """
    for ep in entry_points(group=GROUP, name=name):
        cls = ep.load()
        if isinstance(cls, type) and issubclass(cls, Exporter):
            return cls
        raise InvalidArgument(f"entry point {name!r} is not an Exporter subclass")
    known = ", ".join(available()) or "none"
    raise InvalidArgument(f"no exporter named {name!r} (registered: {known})")
