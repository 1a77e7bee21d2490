"""The stress engine: many tasks attaching, mapping and unmapping, then a verdict.

:func:`run_stress` takes a :class:`StressConfig`, runs it on the current event
loop and returns a :class:`StressReport`; it prints nothing (the command line
in :mod:`.._cli` draws progress and tables around it). It uses only the
contract: exporters found through their entry points, a device's six
statistics fields (:class:`~asyncdmabuf.DeviceStatistics`) when it has them,
faults recognised as :class:`~asyncdmabuf.InjectedFault`.

- :mod:`.config`: what to run, and building the exporter it names;
- :mod:`.workload`: the workers and their operations;
- :mod:`.watchdog`: hang detection, and who waits for what;
- :mod:`.verdict`: the invariants checked at the end;
- :mod:`.report`: the records a run returns;
- :mod:`.run`: :func:`run_stress`, tying them together;
- :mod:`.stream`, :mod:`.stream_run`, :mod:`.stream_child`: ``--stream``,
  one publisher and subscriber processes (:func:`run_stream`).
"""

from __future__ import annotations

from .config import (
    CLEAN_OPS,
    MAP_MODES,
    MapMode,
    StressConfig,
    available_exporters,
    load_exporter,
    make_exporter,
)
from .report import Invariant, LatencySummary, StressProgress, StressReport, percentile
from .run import run_stress
from .stream import StreamConfig, StreamProgress, StreamReport, SubscriberReport
from .stream_run import run_stream

__all__ = [
    "CLEAN_OPS",
    "MAP_MODES",
    "Invariant",
    "LatencySummary",
    "MapMode",
    "StreamConfig",
    "StreamProgress",
    "StreamReport",
    "StressConfig",
    "StressProgress",
    "StressReport",
    "SubscriberReport",
    "available_exporters",
    "load_exporter",
    "make_exporter",
    "percentile",
    "run_stream",
    "run_stress",
]
