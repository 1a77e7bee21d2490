"""The stress engine, its watchdog, and the ``asyncdmabuf`` command line.

Tiny configurations only: the whole file runs in seconds. Time-based behaviour
(latencies, back-off, the watchdog) runs on trio's MockClock.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from asyncdmabuf import (
    Attachment,
    CpuMode,
    Direction,
    DmaBuf,
    FrameLayout,
    InjectedFault,
    InvalidArgument,
    SgTable,
)
from asyncdmabuf import _cli as cli
from asyncdmabuf.__main__ import main
from asyncdmabuf._bench import find_benchmarks
from asyncdmabuf._stress import (
    Invariant,
    LatencySummary,
    StressConfig,
    StressReport,
    percentile,
    run_stress,
)
from asyncdmabuf._stress.stream import (
    StreamConfig,
    StreamProgress,
    StreamReport,
    fd_table,
    fds_left,
    fill_pattern,
    first_difference,
    frame_bytes,
    frame_tile,
)
from asyncdmabuf._stress.stream_run import run_stream
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


def _fields(config: StressConfig | StreamConfig) -> dict[str, Any]:
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


# -- stress --stream: real subscriber processes ---------------------------------------

SMALL_FRAMES = FrameLayout.for_format("XR24", 64, 48)  # 12 KiB
STREAM = StreamConfig(subscribers=2, buffers=3, layout=SMALL_FRAMES, frames=60)


def stream_failed(report: StreamReport) -> list[str]:
    return [f"{inv.name}: {inv.detail}" for inv in report.invariants if not inv.ok]


def held(report: StreamReport, name: str) -> Invariant:
    (found,) = [inv for inv in report.invariants if inv.name == name]
    return found


async def test_stream_every_frame_checked_by_every_subscriber() -> None:
    report = await run_stream(STREAM)
    assert report.ok, stream_failed(report)
    assert report.frames_sent == 60
    block, dropping = report.subscribers
    assert (block.overflow, dropping.overflow) == ("block", "drop-oldest")
    assert block.received == 60
    assert block.gaps == 0
    assert dropping.received + dropping.gaps == 60
    assert dropping.gaps == dropping.dropped == report.frames_dropped
    for sub in report.subscribers:
        assert sub.verified == sub.late_checks == sub.received
        assert sub.bytes_verified == sub.received * SMALL_FRAMES.size
        assert sub.mismatches == sub.late_mismatches == sub.out_of_order == 0
        assert sub.latency.count == sub.received
        assert sub.latency.p50 <= sub.latency.p99 <= sub.latency.max
        assert sub.exit_status == 0
        assert not sub.killed
        assert sub.fds_left == ()
        assert sub.buffers_left == 0
        assert sub.pid != os.getpid()
    assert report.loan_wait.count == report.send_time.count == 60
    for name in ("no fd left", "no buffer left", "no child process left"):
        assert held(report, name).ok


async def test_stream_of_plain_bytes_with_an_odd_size_and_one_overflow() -> None:
    config = StreamConfig(
        subscribers=1, buffers=2, layout=None, frame_size=4099, frames=30,
        overflow="drop-oldest", queue=1,
    )  # fmt: skip
    report = await run_stream(config)
    assert report.ok, stream_failed(report)
    (sub,) = report.subscribers
    assert sub.overflow == "drop-oldest"
    assert sub.bytes_verified == sub.received * 4099


async def test_stream_a_subscriber_killed_holding_frames_gives_them_back() -> None:
    config = StreamConfig(
        subscribers=2, buffers=3, layout=SMALL_FRAMES, frames=80, kill_after=10,
        overflow="block",
    )  # fmt: skip
    report = await run_stream(config)
    assert report.ok, stream_failed(report)
    victim, other = report.subscribers
    assert victim.killed
    assert victim.exit_status == -signal.SIGKILL
    assert victim.received >= 10 + 2  # it held buffers - 1 frames when killed
    assert len(victim.held_at_kill) >= 2
    assert set(victim.held_at_kill) <= set(report.reused_after_kill)
    assert report.sent_after_kill > 0  # the publisher went on
    assert other.received == 80
    assert other.exit_status == 0
    kill = held(report, "a killed subscriber's frames come back")
    assert kill.ok
    assert "every one loaned again" in kill.detail


class CorruptingWrites(MemfdExporter):
    """A broken exporter: every CPU write's end flips the buffer's last byte."""

    def end_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        if "w" in mode:
            with self.vmap(buf) as view:
                view[-1] ^= 0xFF


async def test_stream_corrupted_bytes_fail_the_run() -> None:
    report = await run_stream(
        StreamConfig(subscribers=1, buffers=2, layout=SMALL_FRAMES, frames=10),
        exporter=CorruptingWrites(),
    )
    assert not report.ok
    check = held(report, "every frame's bytes intact")
    assert not check.ok
    assert f"byte {SMALL_FRAMES.size - 1} is" in check.detail
    assert report.subscribers[0].mismatches == 10


async def test_stream_stopped_early_is_judged_and_leaves_nothing() -> None:
    stop = anyio.Event()
    seen: list[int] = []

    def monitor(progress: StreamProgress) -> None:
        seen.append(progress.frames_sent)
        if progress.frames_sent >= 5:
            stop.set()

    config = StreamConfig(**{**_fields(STREAM), "frames": None, "duration": 600.0})
    report = await run_stream(
        config, monitor=monitor, monitor_interval=0.001, stop=stop
    )
    assert report.interrupted
    assert report.ok, stream_failed(report)
    assert 5 <= report.frames_sent < 100_000
    assert seen[0] == 0
    for sub in report.subscribers:
        assert sub.exit_status == 0


def test_the_pattern_is_seq_derived_and_filled_in_place() -> None:
    for size in (1, 15, 16, 17, 4096 + 3):
        for seq in (0, 1, 250, 2**40):
            target = bytearray(size)
            fill_pattern(target, seq)
            assert bytes(target) == frame_bytes(seq, size)
    assert frame_bytes(0, 64) != frame_bytes(1, 64)
    assert frame_tile(7) != frame_tile(8)
    good = frame_bytes(3, 1 << 17)
    bad = bytearray(good)
    bad[100_000] ^= 1
    assert first_difference(bytes(bad), good) == 100_000


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"subscribers": 0}, InvalidArgument),
        ({"buffers": 257}, InvalidArgument),
        ({"queue": 0}, InvalidArgument),
        ({"layout": None, "frame_size": 0}, InvalidArgument),
        ({"layout": "XR24"}, TypeError),
        ({"frames": None, "duration": None}, InvalidArgument),
        ({"frames": None, "duration": float("inf")}, InvalidArgument),
        ({"overflow": "sometimes"}, InvalidArgument),
        ({"kill_after": 60}, InvalidArgument),
        ({"kill_after": -1}, InvalidArgument),
        ({"watchdog": float("inf")}, InvalidArgument),
        ({"subscribers": True}, TypeError),
    ],
)
def test_stream_config_rejects_bad_values(
    bad: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        StreamConfig(**{**_fields(STREAM), **bad})


def test_stream_report_json_keys_carry_units() -> None:
    report = anyio.run(run_stream, STREAM)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["mode"] == "stream"
    assert data["ok"] is True
    assert data["config"]["layout"] == "XR24 64x48"
    assert data["config"]["buffer_size_bytes"] == SMALL_FRAMES.size
    assert "elapsed_s" in data
    assert "loan_wait_us" in data
    sub = data["subscribers"][0]
    assert {"p50_us", "p99_us", "max_us"} <= set(sub["latency_us"])


class StallingWrites(MemfdExporter):
    """An exporter whose fifth CPU write never starts (the first time asked)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> Awaitable[None] | None:
        if "w" not in mode:
            return None
        self.writes += 1
        return anyio.sleep_forever() if self.writes == 5 else None


async def test_stream_watchdog_says_what_the_publisher_waits_for() -> None:
    # Real processes cannot run on a mock clock: the watchdog's period is real
    # time, but the stall is forever, so the outcome does not depend on speed.
    config = StreamConfig(**{**_fields(STREAM), "watchdog": 0.2})
    report = await run_stream(config, exporter=StallingWrites())
    assert report.hung
    assert report.frames_sent == 5  # the stalled frame was still filled, after
    text = "\n".join(report.hang_report)
    assert "nothing moved for" in text
    assert "filling frame 4 (the exporter's cpu_access)" in text
    assert "subscriber pid" in text
    broken = {inv.name for inv in report.invariants if not inv.ok}
    assert broken == {"no hang"}


def test_stream_refuses_an_exporter_without_shareable_memory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # simdev keeps its bytes in device memory: its buffers have no file a
    # subscriber could map. Publisher.bind refuses them before any subscriber
    # process starts; the command says why in one line and exits 1.
    assert main(["stress", "--stream", "--exporter", "simdev"]) == 1
    out, err = capsys.readouterr()
    text = " ".join((out + err).split())  # the console folds long lines
    assert "no shareable memory" in text
    assert "a stream needs an exporter that keeps its bytes in a file" in text
    assert "Traceback" not in text


def test_fds_left_names_new_and_reused_fds() -> None:
    before = fd_table()
    r, w = os.pipe()
    try:
        left = fds_left(before, fd_table())
    finally:
        os.close(r)
        os.close(w)
    assert len(left) == 2
    assert all("pipe:" in entry for entry in left)
    assert fds_left(before, before) == []
    moved = {**before, "0": "/somewhere/else"}
    assert fds_left(before, moved) == ["0 -> /somewhere/else"]
