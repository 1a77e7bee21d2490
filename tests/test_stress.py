"""The stress engine, its watchdog, and the ``asyncdmabuf`` command line.

Tiny configurations only: the whole file runs in seconds. Time-based behaviour
(latencies, back-off, the watchdog) runs on trio's MockClock.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from trio.testing import MockClock

from asyncdmabuf import Attachment, Direction, InjectedFault, InvalidArgument, SgTable
from asyncdmabuf import _cli as cli
from asyncdmabuf.__main__ import main
from asyncdmabuf._bench import find_benchmarks
from asyncdmabuf._stress import (
    LatencySummary,
    StressConfig,
    StressReport,
    percentile,
    run_stress,
)
from asyncdmabuf.exporters import MemfdExporter

pytestmark = pytest.mark.anyio

TINY = StressConfig(
    tasks=8, buffers=4, devices=2, buffer_size=4096 + 100, ops=200, cancel_rate=0.2
)


def on_mock_clock() -> pytest.MarkDecorator:
    """Run the test on trio only, with virtual time that jumps when all block."""
    clock = MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend",
        [pytest.param(("trio", {"clock": clock}), id="trio-mockclock")],
    )


def failed(report: StressReport) -> list[str]:
    return [f"{inv.name}: {inv.detail}" for inv in report.invariants if not inv.ok]


class CorruptingExporter(MemfdExporter):
    """A broken exporter: every unmap flips the first byte of the buffer."""

    async def unmap(
        self, attachment: Attachment, sgt: SgTable, direction: Direction
    ) -> None:
        with self.vmap(attachment.buffer) as view:
            view[0] ^= 0xFF


# -- the engine ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["block", "try", "mixed"])
async def test_memfd_run_holds_every_invariant(mode: str) -> None:
    config = StressConfig(**{**_fields(TINY), "map_mode": mode, "cancel_rate": 0.5})
    report = await run_stress(config)
    assert report.ok, failed(report)
    assert report.ops == 200
    assert report.exporter == "memfd"
    assert report.mismatches == 0
    assert report.bytes_verified >= 200 * 2 * config.buffer_size
    if mode == "try":
        assert report.maps == report.cancellations == 0  # try_map never blocks
        assert report.try_maps >= 400
    else:
        assert report.maps > 0
        if mode == "block":  # 400 blocking maps, half of them cancelled at random
            assert report.cancellations > 0
        assert report.map_latency.count == report.maps
        assert (
            report.map_latency.p50 <= report.map_latency.p99 <= report.map_latency.max
        )
    assert not report.hung


@on_mock_clock()
async def test_simdev_with_faults_eviction_and_latency() -> None:
    config = StressConfig(
        exporter="simdev",
        tasks=6,
        buffers=8,
        devices=2,
        buffer_size=4096,
        memory=4 * 4096,  # half the buffers: the rest must be evicted to map
        ops=150,
        map_mode="try",
        fault_rate=0.03,
        alloc_latency=0.001,
        seed=7,
    )
    report = await run_stress(config)
    assert report.ok, failed(report)
    assert report.ops == 150
    assert report.busy > 0  # not resident yet, or memory full
    assert report.evictions > 0
    assert report.move_notifies > 0
    assert 0 < report.faults <= report.faults_injected
    assert report.errors == ()


DEADLOCK = StressConfig(
    exporter="simdev",
    tasks=8,
    buffers=16,
    devices=2,
    buffer_size=4096,
    memory=4 * 4096,  # 4 of 16 buffers fit; every op maps 2 at once
    maps_per_op=2,
    ops=100_000,
    map_mode="block",
    cancel_rate=0.0,
    alloc_latency=0.001,
    watchdog=5.0,
)


@on_mock_clock()
async def test_watchdog_shows_the_deadlock_of_blocking_maps() -> None:
    report = await run_stress(DEADLOCK)
    assert report.hung
    assert not report.ok
    assert report.ops < 100_000
    text = "\n".join(report.hang_report)
    assert "no operation completed for 5.0" in text
    assert "of memory on 'simdev0'" in text  # who waits for device memory
    assert "holds stress-" in text  # ...while holding a mapping
    assert "its memory is pinned by" in text  # and who pins that memory
    assert "deadlock" in text
    # The watchdog cancelled the waiters, and the cancellation left nothing.
    broken = {inv.name for inv in report.invariants if not inv.ok}
    assert broken == {"no hang"}


@on_mock_clock()
async def test_try_map_with_back_off_avoids_that_deadlock() -> None:
    config = StressConfig(**{**_fields(DEADLOCK), "map_mode": "try", "ops": 300})
    report = await run_stress(config)
    assert report.ok, failed(report)
    assert report.ops == 300
    assert report.busy > 0
    assert not report.hung


@on_mock_clock()
async def test_watchdog_names_the_lock_holder() -> None:
    # One buffer, blocking maps, no memory to spare: the first task waits for
    # memory holding the buffer's lock; the others wait for that lock.
    config = StressConfig(
        **{
            **_fields(DEADLOCK),
            "buffers": 2,
            "memory": 4096,
            "tasks": 3,
            "maps_per_op": 2,
        }
    )
    report = await run_stress(config)
    assert report.hung
    text = "\n".join(report.hang_report)
    assert "waits for the lock of stress-" in text
    assert "held by worker-" in text


async def test_corruption_is_caught() -> None:
    report = await run_stress(TINY, exporter=CorruptingExporter())
    assert not report.ok
    assert report.mismatches > 0
    (bytes_check,) = [inv for inv in report.invariants if inv.name == "bytes intact"]
    assert not bytes_check.ok
    assert "byte 0 is" in bytes_check.detail


async def test_duration_bound_run_and_monitor() -> None:
    seen: list[int] = []
    config = StressConfig(**{**_fields(TINY), "ops": None, "duration": 0.05})
    report = await run_stress(
        config, monitor=lambda p: seen.append(p.ops_done), monitor_interval=0.01
    )
    assert report.ok, failed(report)
    assert report.ops > 0
    assert seen
    assert seen[0] == 0


def _fields(config: StressConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def test_percentiles_and_summary() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile(samples, 100) == 100.0
    assert percentile([3.0], 90) == 3.0
    summary = LatencySummary.of(list(reversed(samples)))
    assert (summary.count, summary.p50, summary.p90, summary.max) == (100, 50, 90, 100)
    assert summary.quantiles[0] == 1.0
    assert summary.quantiles[-1] == 100.0
    assert LatencySummary.of([]).count == 0
    with pytest.raises(InvalidArgument):
        percentile([], 50)


@pytest.mark.parametrize(
    "bad",
    [
        {"tasks": 0},
        {"ops": None, "duration": None},
        {"maps_per_op": 5, "buffers": 4},
        {"cancel_rate": 1.5},
        {"map_mode": "sometimes"},
        {"watchdog": -1.0},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        StressConfig(**bad)


# -- the command line ------------------------------------------------------------------

SMALL = ["--tasks", "4", "--buffers", "4", "--buffer-size", "4K", "--ops", "100"]


def test_cli_all_backends_json_and_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "stress.json"
    status = main(["stress", *SMALL, "--backend", "all", "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "what happened" in printed
    assert "every invariant held" in printed
    data = json.loads(out.read_text())
    assert data["ok"] is True
    assert [run["backend"] for run in data["runs"]] == ["asyncio", "uvloop", "trio"]
    run = data["runs"][0]
    assert run["ops"] == 100
    assert {"p50_us", "p90_us", "p99_us", "max_us"} <= set(run["map_latency_us"])
    assert "elapsed_s" in run
    assert run["config"]["buffer_size_bytes"] == 4096
    assert {inv["name"] for inv in run["invariants"]} >= {
        "no live mapping",
        "no fd left",
        "bytes intact",
    }


def test_cli_exits_non_zero_when_an_invariant_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        cli, "run_stress", functools.partial(run_stress, exporter=CorruptingExporter())
    )
    assert main(["stress", *SMALL, "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "bytes intact" in printed
    assert "FAILED" in printed


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stress", *SMALL, "--exporter", "no-such-thing"]) == 2
    assert "no exporter named 'no-such-thing'" in capsys.readouterr().err
    assert main(["stress", "--tasks", "2", "--buffers", "1", "--ops", "5"]) == 2
    assert main(["stress", "--buffer-size", "lots"]) == 2
    assert "not a positive size: 'lots'" in capsys.readouterr().err
    assert cli.parse_size("64K") == 65536
    assert cli.parse_size("1MiB") == 1 << 20


def test_cli_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "stress.png"
    assert main(["stress", *SMALL, "--quiet", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["stress", *SMALL, "--plot", str(tmp_path / "x.png")]) == 2
    assert "asyncdmabuf[plot]" in capsys.readouterr().err


def test_python_dash_m_runs_stress() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "asyncdmabuf", "stress", *SMALL, "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every invariant held" in done.stdout


def test_bench_finds_the_checkout_benchmarks() -> None:
    folder = find_benchmarks()
    assert folder is not None
    assert (folder / "bench_map.py").is_file()
    assert (folder / "bench_scale.py").is_file()


# -- the contract, and nothing more ------------------------------------------------


@dataclass(frozen=True)
class SixFields:
    """Exactly the statistics a device promises: no ``buffers``, no more."""

    memory_total: int = 1 << 20
    memory_in_use: int = 0
    memory_pinned: int = 0
    waiters: int = 0
    evictions: int = 0
    faults_injected: int = 0


class SixFieldExporter(MemfdExporter):
    """A third-party exporter whose statistics() has only the six fields."""

    def statistics(self) -> SixFields:
        return SixFields()


async def test_an_exporter_with_only_the_six_fields_is_enough() -> None:
    report = await run_stress(TINY, exporter=SixFieldExporter())
    assert report.ok, failed(report)
    (memory,) = [i for i in report.invariants if i.name == "no device memory left"]
    assert "0 bytes in use" in memory.detail


class FlakyExporter(MemfdExporter):
    """Raises InjectedFault now and then, under a message that never says so."""

    fault_ops = ("map",)

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def try_map(self, attachment: Attachment, direction: Direction) -> SgTable:
        self.calls += 1
        if self.calls % 7 == 0:
            raise InjectedFault("the bus fell over")
        return super().try_map(attachment, direction)


async def test_faults_are_recognised_by_class_not_by_text() -> None:
    config = StressConfig(**{**_fields(TINY), "map_mode": "try"})
    report = await run_stress(config, exporter=FlakyExporter())
    assert report.ok, failed(report)
    assert report.faults > 0
    assert report.errors == ()


@on_mock_clock()
async def test_report_says_why_try_map_is_busy_with_a_map_latency() -> None:
    # 12.20: each op attaches anew, so with a map latency the first map of a
    # backing after it became resident is Busy; the report says so.
    config = StressConfig(
        exporter="simdev",
        tasks=4,
        buffers=8,
        devices=2,
        buffer_size=4096,
        memory=4 * 4096,
        ops=100,
        map_mode="try",
        map_latency=0.001,
        cancel_rate=0.0,
    )
    report = await run_stress(config)
    assert report.ok, failed(report)
    assert report.busy > 0
    assert report.busy_reasons
    reasons = " ".join(reason for reason, _ in report.busy_reasons)
    assert "first map" in reasons or "not resident" in reasons or "full" in reasons
    assert report.try_maps > report.busy  # a resident, mapped backing is served


def test_stress_engine_and_cli_never_import_the_exporters() -> None:
    import ast

    root = Path(cli.__file__).parent
    files = [root / "_cli.py", root / "_bench.py", root / "_stats.py"]
    files += sorted((root / "_stress").glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
            elif isinstance(node, ast.Import):
                name = " ".join(alias.name for alias in node.names)
            else:
                continue
            assert "exporters" not in name, f"{path.name} imports {name}"


def test_stress_runs_where_sniffio_cannot_be_imported(tmp_path: Path) -> None:
    # A missing module, as Python reports one (anyio treats sniffio as optional).
    (tmp_path / "sniffio.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'sniffio'\", name='sniffio')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "asyncdmabuf", "stress", "--ops", "200", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every invariant held" in done.stdout


def test_bench_imports_its_benchmarks_as_a_package_and_calls_rows() -> None:
    from asyncdmabuf._bench import BENCHMARKS, load_benchmark

    folder = find_benchmarks()
    assert folder is not None
    path_before = list(sys.path)
    for _, name in BENCHMARKS:
        if name is None or not (folder / f"{name}.py").is_file():
            continue  # the stress engine; a benchmark not in this checkout
        if name == "bench_cpu":
            pytest.importorskip("numpy")
        module = load_benchmark(folder, name)
        assert module.__name__ == f"benchmarks.{name}"
        assert callable(module.rows)  # public: the only thing bench calls
    assert sys.path == path_before


# -- contention and what a map's latency is made of (issue 15) -------------------------


async def test_the_default_shape_has_contention_and_a_measured_breakdown(
    anyio_backend: Any,
) -> None:
    # Tasks outnumber buffers and every blocking map holds the lock for
    # map_hold: try_map meets Busy, and blocking maps wait for the lock.
    config = StressConfig(tasks=16, buffers=4, buffer_size=4096, ops=300)
    assert config.map_hold > 0  # the default holds
    report = await run_stress(config)
    assert report.ok, failed(report)
    assert report.busy > 0
    assert report.try_maps > report.busy
    for part in (report.lock_wait, report.exporter_time, report.scheduler_delay):
        assert part.count == report.maps
    assert report.lock_wait.max > 0  # someone waited for a holder
    # The exporter part is the hold, measured: asyncio's and trio's sleeps
    # never end early; uvloop's timers count whole milliseconds, so its hold
    # is rounded (and the measure shows it).
    if report.backend != "uvloop":
        assert report.exporter_time.p50 >= config.map_hold * 0.9
    assert report.exporter_time.max > 0
    assert report.map_latency.max >= report.exporter_time.max


async def test_without_a_hold_the_exporter_part_is_the_exporter_alone() -> None:
    config = StressConfig(**{**_fields(TINY), "map_hold": 0.0})
    report = await run_stress(config)
    assert report.ok, failed(report)
    assert report.exporter_time.count == report.maps
    assert report.exporter_time.p50 < 0.0005  # memfd's map never waits


def test_map_times_split_the_latency() -> None:
    from asyncdmabuf._stress.instrument import MapTimes

    # Called at 0, the lock let go at 3 by the holder, taken (running) at 4,
    # the exporter done at 9 having overslept its hold by 1, returned at 9.5.
    t = MapTimes.of(0.0, 3.0, 4.0, 9.0, 1.0, 9.5)
    assert t == MapTimes(total=9.5, lock_wait=3.0, exporter=4.0, scheduler=2.5)
    assert t.lock_wait + t.exporter + t.scheduler == t.total
    # A free lock: no lock wait, the first checkpoint is scheduler delay.
    free = MapTimes.of(0.0, float("-inf"), 1.0, 2.0, 0.0, 2.0)
    assert (free.lock_wait, free.exporter, free.scheduler) == (0.0, 1.0, 1.0)


async def test_instrumenting_an_exporter_is_undone_after_the_run() -> None:
    exporter = CorruptingExporter()
    await run_stress(TINY, exporter=exporter)
    assert type(exporter) is CorruptingExporter


def test_instrumented_swaps_the_class_for_the_block_only() -> None:
    from asyncdmabuf._stress.instrument import Stamps, instrumented

    class Other(MemfdExporter):
        def __init__(self) -> None:
            super().__init__()

    exporter = Other()
    with instrumented(exporter, Stamps(lambda: 0.0), 0.001) as measured:
        assert measured
        assert type(exporter).__name__ == "Other"
        assert type(exporter) is not Other
    assert type(exporter) is Other


def test_report_json_keys_carry_units() -> None:
    summary = LatencySummary.of([1e-6, 2e-6])
    data = summary.to_dict()
    assert data["count"] == 2
    assert data["max_us"] == pytest.approx(2.0)
    assert set(data) == {
        "count",
        "mean_us",
        "p50_us",
        "p90_us",
        "p99_us",
        "max_us",
        "quantiles_us",
    }


def test_the_plot_of_a_failed_run_says_failed_and_has_a_legend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    plt = cli._load_pyplot()
    report = anyio_run(run_stress, TINY, CorruptingExporter())
    assert not report.ok
    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", figures.append)
    cli._plot(plt, [report], tmp_path / "failed.png")
    (fig,) = figures
    assert fig._suptitle.get_text().startswith("FAILED (asyncio)")
    labels = [t.get_text() for ax in fig.axes[:2] for t in ax.get_legend().texts]
    assert "asyncio (FAILED)" in labels
    monkeypatch.undo()
    plt.close("all")


def anyio_run(func: Any, config: StressConfig, exporter: Any) -> StressReport:
    import anyio

    async def go() -> StressReport:
        report: StressReport = await func(config, exporter=exporter)
        return report

    return anyio.run(go)
