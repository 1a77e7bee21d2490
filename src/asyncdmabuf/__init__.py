"""asyncdmabuf: the Linux dma-buf buffer-sharing model, async-native, on anyio.

An exporter creates buffers; importers (devices) attach to them and map them to
get scatter tables; buffers travel as file descriptors and are refcounted with
:func:`get` and :meth:`DmaBuf.put`. Every operation that can wait is a coroutine
and a checkpoint; every ``try_*`` operation is a plain function that never waits.
"""

from __future__ import annotations

from . import _reduction  # noqa: F401  (DmaBuf pickles through multiprocessing)
from ._attachment import Attachment
from ._buffer import DmaBuf, export, get
from ._bufinfo import (
    AttachmentInfo,
    BufInfo,
    FenceInfo,
    HolderInfo,
    StreamInfo,
    bufinfo,
    format_bufinfo,
)
from ._device import Device
from ._errors import (
    BadFileDescriptor,
    Busy,
    DmaBufError,
    InjectedFault,
    InvalidArgument,
    NoDevice,
    OutOfMemory,
)
from ._exporter import CpuMode, Exporter
from ._fence import Fence, FenceContext
from ._layout import FrameLayout, Plane
from ._lock import LockStatistics
from ._pool import BufferPool, PoolStatistics
from ._resv import Reservation, Usage
from ._sgtable import Direction, SgEntry, SgTable
from ._share import (
    ShareInfo,
    receive_buffer,
    receive_buffer_with_info,
    send_buffer,
)
from ._stats import DeviceStatistics
from ._stream import (
    Frame,
    Publisher,
    PublisherStatistics,
    Subscriber,
    SubscriberInfo,
    SubscriberStatistics,
    subscribe,
)

__all__ = [
    "Attachment",
    "AttachmentInfo",
    "BadFileDescriptor",
    "BufInfo",
    "BufferPool",
    "Busy",
    "CpuMode",
    "Device",
    "DeviceStatistics",
    "Direction",
    "DmaBuf",
    "DmaBufError",
    "Exporter",
    "Fence",
    "FenceContext",
    "FenceInfo",
    "Frame",
    "FrameLayout",
    "HolderInfo",
    "InjectedFault",
    "InvalidArgument",
    "LockStatistics",
    "NoDevice",
    "OutOfMemory",
    "Plane",
    "PoolStatistics",
    "Publisher",
    "PublisherStatistics",
    "Reservation",
    "SgEntry",
    "SgTable",
    "ShareInfo",
    "StreamInfo",
    "Subscriber",
    "SubscriberInfo",
    "SubscriberStatistics",
    "Usage",
    "bufinfo",
    "export",
    "format_bufinfo",
    "get",
    "receive_buffer",
    "receive_buffer_with_info",
    "send_buffer",
    "subscribe",
]

__version__ = "0.1.0"

# Public objects say they come from the package, as trio's and anyio's do.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("asyncdmabuf._"):
        _obj.__module__ = __name__
del _name, _obj
