"""The exporter conformance suite, run on the project's own exporters."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType
from typing import ClassVar

from asyncdmabuf import Device, DmaBuf, Exporter
from asyncdmabuf.exporters import DmaHeapExporter, MemfdExporter, SimDevice
from asyncdmabuf.testing import ExporterConformance

from .exporters_for_tests import RecordingExporter


class TestMemfdExporter(ExporterConformance):
    def make_exporter(self) -> Exporter:
        return MemfdExporter()


class TestDmaHeapExporter(ExporterConformance):
    """Skipped (NoDevice) where ``/dev/dma_heap/system`` does not exist."""

    def make_exporter(self) -> Exporter:
        return DmaHeapExporter()


class TestSimDevice(ExporterConformance):
    def make_exporter(self) -> Exporter:
        return SimDevice("conformance-sim", memory=1 << 20)

    def assert_idle(self, exporter: Exporter) -> None:
        assert isinstance(exporter, SimDevice)
        stats = exporter.statistics()
        assert (stats.memory_in_use, stats.waiters, stats.buffers) == (0, 0, 0)


class TestSimDeviceWithLatency(TestSimDevice):
    """Allocation and map latencies: map() waits, so try_map() must say Busy."""

    def make_exporter(self) -> Exporter:
        return SimDevice(
            "conformance-slow", memory=1 << 20, alloc_latency=1e-4, map_latency=1e-4
        )


class TestRecordingExporter(ExporterConformance):
    """A memoryless exporter: no CPU access, a one-entry table at a fake address.

    It always answers with one entry and never refuses, so it cannot serve a
    device with a segment limit (the framework would reject its table): only
    the devices without one apply.
    """

    cpu_access: ClassVar[bool] = False
    devices: ClassVar[tuple[Device, ...]] = tuple(
        device
        for device in ExporterConformance.devices
        if device.max_segment_size >= 1 << 32
    )

    def make_exporter(self) -> Exporter:
        return RecordingExporter()

    async def allocate(self, exporter: Exporter, size: int) -> DmaBuf:
        assert isinstance(exporter, RecordingExporter)
        return exporter.make(size)


def _load_example(name: str) -> ModuleType:
    """Import ``docs/examples/<name>.py``, the code the documentation shows."""
    path = pathlib.Path(__file__).parent.parent / "docs" / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_examples_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


slab_exporter = _load_example("slab_exporter")


class TestSlabExporter(ExporterConformance):
    """The exporter that docs/writing-an-exporter.md builds."""

    def make_exporter(self) -> Exporter:
        exporter: Exporter = slab_exporter.SlabExporter()
        return exporter

    def assert_idle(self, exporter: Exporter) -> None:
        assert isinstance(exporter, slab_exporter.SlabExporter)
        assert sorted(exporter.free) == list(range(exporter.slabs))
