"""SimDevice: a simulated device with finite memory, late allocation and a DMA engine.

One concept per module:

- :mod:`.device`: :class:`SimDevice`, the exporter ops and the importing
  :class:`~asyncdmabuf.Device` it holds;
- :mod:`.constraints`: where pages may lie so that attached devices reach them;
- :mod:`.pages`: the page allocator (free extents, highest first);
- :mod:`.eviction`: resident buffers, eviction, and the tasks waiting for room;
- :mod:`.dma`: the DMA engine and its fence timeline;
- :mod:`.state`: what is kept per buffer and per attachment;
- :mod:`.stats`: :class:`SimStatistics`.
"""

from __future__ import annotations

from asyncdmabuf.exporters._faults import Fault, FaultOp, FaultPlan

from .device import SimDevice
from .stats import SimStatistics

__all__ = ["Fault", "FaultOp", "FaultPlan", "SimDevice", "SimStatistics"]
