"""Tests that third-party exporter authors run against their own exporter.

Subclass :class:`ExporterConformance` in a test module, tell it how to make
your exporter, and pytest runs the whole suite on it, on asyncio,
asyncio+uvloop and trio::

    from asyncdmabuf.testing import ExporterConformance

    class TestMyExporter(ExporterConformance):
        def make_exporter(self):
            return MyExporter()

This module needs pytest (and anyio's pytest plugin, which anyio installs);
``import asyncdmabuf`` itself never imports pytest.
"""

from __future__ import annotations

from ._conformance import (
    DEFAULT_DEVICES,
    DEFAULT_SIZES,
    ConformanceError,
    ExporterConformance,
    count_suspensions,
)

__all__ = [
    "DEFAULT_DEVICES",
    "DEFAULT_SIZES",
    "ConformanceError",
    "ExporterConformance",
    "count_suspensions",
]
