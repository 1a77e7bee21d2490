"""The toolkit for exporter authors: what the built-in exporters are made of.

Everything here is public and stable, as :mod:`trio.lowlevel` is: the built-in
exporters under ``asyncdmabuf.exporters`` use only :mod:`asyncdmabuf` and this
module, exactly as a third-party exporter must.
"""

from __future__ import annotations

from ._backends import current_time, native_checkpoint, task_name
from ._device import DMA_MASK_32, DMA_MASK_64, UNLIMITED_SEGMENT
from ._errors import from_oserror
from ._fd import MEMFD_SEALS, dup_cloexec, seal_against_resizing, sealed_memfd
from ._fdkind import RESIZE_SEALS, WRITE_SEALS, FdInfo, FdKind, classify
from ._mapped import (
    MAX_TABLE_ENTRIES,
    MappedExporter,
    MappedFile,
    address_of,
    export_mapped,
    layout,
    map_fd,
)
from ._validate import (
    check_bool,
    check_cpu_mode,
    check_direction,
    check_fd,
    check_int,
    check_name,
    check_number,
    is_int,
)
from ._waitqueue import Deferred, WaitQueue, WaitQueueStatistics

__all__ = [
    "DMA_MASK_32",
    "DMA_MASK_64",
    "MAX_TABLE_ENTRIES",
    "MEMFD_SEALS",
    "RESIZE_SEALS",
    "UNLIMITED_SEGMENT",
    "WRITE_SEALS",
    "Deferred",
    "FdInfo",
    "FdKind",
    "MappedExporter",
    "MappedFile",
    "WaitQueue",
    "WaitQueueStatistics",
    "address_of",
    "check_bool",
    "check_cpu_mode",
    "check_direction",
    "check_fd",
    "check_int",
    "check_name",
    "check_number",
    "classify",
    "current_time",
    "dup_cloexec",
    "export_mapped",
    "from_oserror",
    "is_int",
    "layout",
    "map_fd",
    "native_checkpoint",
    "seal_against_resizing",
    "sealed_memfd",
    "task_name",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("asyncdmabuf._"):
        _obj.__module__ = __name__
del _name, _obj
