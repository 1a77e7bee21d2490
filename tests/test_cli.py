"""``asyncdmabuf`` end to end, in real processes: exit codes, signals, bad input.

Every child runs ``sys.executable -m asyncdmabuf``, bounded in time; the
signal tests read the child's output until it reports progress, then signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

import asyncdmabuf

SMALL = ["--tasks", "4", "--buffers", "4", "--buffer-size", "4K", "--ops", "60"]
TIMEOUT = 60


def run_cli(
    *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, *prefix] if prefix else [sys.executable, "-m"]
    if not prefix:
        command.append("asyncdmabuf")
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, **(env or {})},
    )


def assert_usage_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2, one line on stderr naming ``words``, no traceback, no work."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "asyncdmabuf stress:" not in done.stdout  # no run was started


@pytest.fixture
def exporter_module(tmp_path: Path) -> dict[str, str]:
    """A module of odd exporters, importable as ``odd`` in the children."""
    (tmp_path / "odd.py").write_text(
        textwrap.dedent(
            """
            from asyncdmabuf import OutOfMemory
            from asyncdmabuf.exporters import MemfdExporter


            class Corrupting(MemfdExporter):
                async def unmap(self, attachment, sgt, direction):
                    with self.vmap(attachment.buffer) as view:
                        view[0] ^= 0xFF


            class NoRoom(MemfdExporter):
                async def allocate(self, size, *, name=None):
                    raise OutOfMemory("no room for the test")


            NOT_A_CLASS = 3
            """
        )
    )
    return {"PYTHONPATH": str(tmp_path)}


# -- exit codes ----------------------------------------------------------------------


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"asyncdmabuf {asyncdmabuf.__version__}"


def test_exporter_by_import_path() -> None:
    done = run_cli(
        "stress",
        *SMALL,
        "--backend",
        "asyncio",
        "--exporter",
        "asyncdmabuf.exporters:MemfdExporter",
        "--quiet",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every invariant held" in done.stdout


@pytest.mark.parametrize(
    ("exporter", "words"),
    [
        ("odd:NOT_A_CLASS", ["not a concrete Exporter subclass"]),
        ("builtins:int", ["not a concrete Exporter subclass"]),
        ("no_such_module:X", ["cannot load exporter", "no_such_module"]),
        ("odd:Missing", ["cannot load exporter"]),
        ("no-such-name", ["no exporter named 'no-such-name'"]),
    ],
)
def test_bad_exporters_are_usage_errors(
    exporter: str, words: list[str], exporter_module: dict[str, str]
) -> None:
    done = run_cli("stress", *SMALL, "--exporter", exporter, env=exporter_module)
    assert_usage_error(done, *words)


def test_a_failed_invariant_exits_1_and_marks_the_plot(
    tmp_path: Path, exporter_module: dict[str, str]
) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    done = run_cli(
        "stress",
        *SMALL,
        "--exporter",
        "odd:Corrupting",
        "--json",
        str(out),
        "--plot",
        str(png),
        env=exporter_module,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED: an invariant did not hold" in done.stdout
    assert "Warning" not in done.stderr  # matplotlib's warnings stay quiet
    assert "Traceback" not in done.stderr
    data = json.loads(out.read_text())
    assert data["ok"] is False
    assert data["interrupted"] is False
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_dmabuf_error_during_the_run_is_a_failed_check(
    exporter_module: dict[str, str],
) -> None:
    done = run_cli("stress", *SMALL, "--exporter", "odd:NoRoom", env=exporter_module)
    assert done.returncode == 1, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    assert "FAILED: an error stopped the run" in text
    assert "OutOfMemory: [ENOMEM] no room for the test" in text
    assert "Traceback" not in done.stderr


# -- every argument checked before any work ------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--json", "/nonexistent/x.json"], ["--json", "no directory /nonexistent"]),
        (["--plot", "/proc/x.png"], ["--plot", "cannot write in /proc"]),
        (["--json", "/tmp"], ["--json", "is a directory"]),
        (["--tasks", "100000000"], ["--tasks 100,000,000", "at most"]),
        (["--buffers", "1000", "--buffer-size", "1G"], ["--buffers 1,000", "need"]),
        (["--memory", "64K"], ["--memory", "'memfd' does not"]),
        (["--map-latency", "0.001"], ["--map-latency", "'memfd' does not"]),
        (["--alloc-latency", "0.001"], ["--alloc-latency", "'memfd' does not"]),
        (["--fault-rate", "0.1"], ["--fault-rate", "'memfd' does not"]),
        (["--tasks", "zero"], ["--tasks", "not a whole number"]),
        (["--buffer-size", "lots"], ["not a positive size"]),
        (["--duration", "0"], ["--duration", "must be > 0"]),
        (["--cancel-rate", "nan"], ["not a finite number"]),
        (["--maps-per-op", "9"], ["maps_per_op (9) exceeds buffers"]),
        (["--no-such-flag"], ["unrecognized arguments"]),
    ],
)
def test_bad_arguments_are_refused_before_any_work(
    args: list[str], words: list[str]
) -> None:
    small = [a for a in SMALL if a not in ("--ops", "60")]
    assert_usage_error(run_cli("stress", *small, *args), *words)


def test_buffers_are_bounded_by_rlimit_nofile() -> None:
    limited = (
        "-c",
        "import resource, sys; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, "
        "resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
        "from asyncdmabuf.__main__ import main; sys.exit(main())",
    )
    done = run_cli("stress", "--buffers", "1000", "--buffer-size", "4K", prefix=limited)
    assert_usage_error(done, "RLIMIT_NOFILE", "at most 192")


def test_no_subcommand_is_a_usage_error() -> None:
    assert_usage_error(run_cli(), "required")


# -- interrupts ------------------------------------------------------------------------


def interrupt(
    args: list[str], signum: int, progress_lines: int = 1
) -> tuple[int, str, str]:
    """Start stress, wait for ``progress_lines`` progress reports, signal it."""
    child = subprocess.Popen(
        [sys.executable, "-m", "asyncdmabuf", "stress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        seen: list[str] = []
        for line in child.stdout:
            seen.append(line)
            if " ops in " in line:
                progress_lines -= 1
                if progress_lines <= 0:
                    break
        child.send_signal(signum)
        out, err = child.communicate(timeout=10)
        return child.returncode, "".join(seen) + out, err
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_ends_the_run_with_the_partial_report(
    backend: str, signum: int, tmp_path: Path
) -> None:
    out = tmp_path / "run.json"
    status, stdout, stderr = interrupt(
        ["--backend", backend, "--duration", "60", "--json", str(out)], signum
    )
    assert status == 130, stdout + stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stdout
    data = json.loads(out.read_text())
    assert data["interrupted"] is True
    (run,) = data["runs"]
    assert run["interrupted"] is True
    assert run["backend"] == backend
    assert run["ok"] is True  # stopped early, and it still left nothing behind


def test_an_interrupted_deadlock_says_who_waits_for_what(tmp_path: Path) -> None:
    # Blocking maps on over-subscribed device memory, the watchdog off: the
    # run stays stuck until the interrupt, which reports the waiters.
    args = [
        "--backend",
        "trio",
        "--exporter",
        "simdev",
        "--map-mode",
        "block",
        "--memory",
        "16K",
        "--buffers",
        "16",
        "--buffer-size",
        "4K",
        "--tasks",
        "8",
        "--cancel-rate",
        "0",
        "--alloc-latency",
        "0.001",
        "--watchdog",
        "0",
        "--duration",
        "60",
    ]
    status, stdout, stderr = interrupt(args, signal.SIGINT, progress_lines=3)
    assert status == 130, stdout + stderr
    assert "Traceback" not in stderr
    assert "who waits for what" in stdout
    assert "of memory on 'simdev0'" in stdout


# -- the terminal at 80 columns -------------------------------------------------


def test_the_default_report_fits_80_columns() -> None:
    done = run_cli("stress", "--ops", "300", env={"COLUMNS": "80"})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    too_long = [line for line in lines if len(line.rstrip()) > 80]
    assert not too_long, too_long
    headers = [
        ("asyncio", "uvloop", "trio"),  # what happened
        ("mean", "p50", "p90", "p99", "max"),  # latency
        ("invariant", "asyncio", "uvloop", "trio"),  # invariants held
    ]
    for words in headers:
        assert any(all(w in line.split() for w in words) for line in lines), words
    text = done.stdout
    for figure in ("of them Busy", "served, %", "lock wait", "exporter", "scheduler"):
        assert figure in text


# -- stress --stream ---------------------------------------------------------------

STREAM = ["--stream", "--subscribers", "2", "--buffers", "3", "--layout", "XR24:64x48"]


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_stream_mode_end_to_end(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    done = run_cli(
        "stress", *STREAM, "--frames", "40", "--backend", backend, "--json", str(out)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    assert "every invariant held" in text
    for figure in ("the publisher", "subscribers:", "drop-oldest", "p99", "no fd left"):
        assert figure in text, figure
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    assert run["mode"] == "stream"
    assert run["backend"] == backend
    assert run["ok"]
    assert run["frames_sent"] == 40
    assert [s["exit_status"] for s in run["subscribers"]] == [0, 0]


def test_stream_kill_fault_on_the_command_line() -> None:
    done = run_cli(
        "stress", *STREAM, "--frames", "60", "--kill-subscriber", "10",
        "--backend", "trio", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every invariant held" in done.stdout


def test_stream_corruption_exits_1(exporter_module: dict[str, str]) -> None:
    (Path(exporter_module["PYTHONPATH"]) / "oddstream.py").write_text(
        textwrap.dedent(
            """
            from asyncdmabuf.exporters import MemfdExporter


            class CorruptingWrites(MemfdExporter):
                def end_cpu_access(self, buf, mode):
                    if "w" in mode:
                        with self.vmap(buf) as view:
                            view[0] ^= 0xFF
            """
        )
    )
    done = run_cli(
        "stress", *STREAM, "--frames", "10", "--backend", "asyncio",
        "--exporter", "oddstream:CorruptingWrites", env=exporter_module,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED: an invariant did not hold" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--tasks", "3"], ["--tasks is not an option of --stream"]),
        (["--ops", "3"], ["--ops is not an option of --stream"]),
        (["--map-mode", "try"], ["--map-mode is not an option of --stream"]),
        (["--no-verify"], ["--no-verify is not an option of --stream"]),
        (["--plot", "/tmp/x.png"], ["--plot is not an option of --stream"]),
        (["--layout", "XR24:10"], ["--layout", "FOURCC:WIDTHxHEIGHT"]),
        (["--layout", "ZZZZ:8x8"], ["--layout", "unknown pixel format"]),
        (["--layout", "XR24:8x8", "--buffer-size", "4K"], ["give one"]),
        (["--frames", "5", "--kill-subscriber", "5"], ["--kill-subscriber 5"]),
        (["--kill-subscriber", "-1"], ["--kill-subscriber", "must be >= 0"]),
        (["--subscribers", "0"], ["--subscribers", "must be positive"]),
        (["--buffers", "300"], ["--buffers must be <= 256"]),
        (["--queue", "5000"], ["--queue must be <= 1024"]),
        (["--overflow", "sometimes"], ["--overflow", "invalid choice"]),
        (["--frames", "5", "--duration", "1"], ["not allowed with"]),
        (["--memory", "64K"], ["--memory", "'memfd' does not"]),
        (["--json", "/nonexistent/x.json"], ["--json", "no directory"]),
        (["--buffers", "200", "--buffer-size", "1G"], ["--buffers 200", "need"]),
    ],
)
def test_stream_bad_arguments_are_refused_before_any_work(
    args: list[str], words: list[str]
) -> None:
    assert_usage_error(run_cli("stress", "--stream", *args), *words)


@pytest.mark.parametrize(
    "flag", [["--subscribers", "2"], ["--frames", "9"], ["--kill-subscriber", "1"]]
)
def test_stream_options_need_stream(flag: list[str]) -> None:
    assert_usage_error(run_cli("stress", *flag), f"{flag[0]} is an option of --stream")


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
@pytest.mark.parametrize(
    "how", ["INT", "TERM", "INT-to-the-group"], ids=["INT", "TERM", "ctrl-c"]
)
def test_a_signal_ends_a_stream_run_cleanly(
    backend: str, how: str, tmp_path: Path
) -> None:
    out = tmp_path / "run.json"
    child = subprocess.Popen(
        [
            sys.executable, "-m", "asyncdmabuf", "stress", *STREAM,
            "--duration", "60", "--backend", backend, "--json", str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a shell gives a job
    )  # fmt: skip
    try:
        assert child.stdout is not None
        seen = []
        for line in child.stdout:
            seen.append(line)
            if " frames in " in line and not line.split(":")[1].startswith(" 0 "):
                break
        if how == "INT-to-the-group":  # Ctrl-C: every process of the job
            os.killpg(child.pid, signal.SIGINT)
        else:
            child.send_signal(signal.SIGINT if how == "INT" else signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
    text = "".join(seen) + stdout
    assert child.returncode == 130, text + stderr
    assert "Traceback" not in stderr
    data = json.loads(out.read_text())
    assert data["interrupted"] is True
    (run,) = data["runs"]
    assert run["interrupted"] is True
    assert run["ok"] is True, run["invariants"]
    assert [s["exit_status"] for s in run["subscribers"]] == [0, 0]


def test_the_stream_report_fits_80_columns() -> None:
    done = run_cli(
        "stress", *STREAM, "--frames", "30", "--kill-subscriber", "5",
        env={"COLUMNS": "80"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    too_long = [line for line in done.stdout.splitlines() if len(line.rstrip()) > 80]
    assert not too_long, too_long


# -- asyncdmabuf bench ------------------------------------------------------------


@pytest.fixture
def fake_benchmarks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A benchmarks folder of three modules: a goal met, one missed, one failing.

    ``bench`` runs these instead of the checkout's (which take a minute); the
    checkout's own ``benchmarks`` package is put back afterwards.
    """
    from asyncdmabuf import _bench

    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    row = "from asyncdmabuf._bench import Row\n"
    (folder / "good.py").write_text(
        row + "def rows(quick):\n"
        "    return [Row('g', 'fast enough', '1 µs', '2 µs', 0.5, '<= 1x', True)]\n"
    )
    (folder / "slow.py").write_text(
        row + "def rows(quick):\n"
        "    return [Row('g', 'too slow', '3 µs', '2 µs', 1.5, '<= 1x', False)]\n"
    )
    (folder / "boom.py").write_text("def rows(quick):\n    raise OSError('no disk')\n")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "benchmarks"}
    monkeypatch.setattr(_bench, "find_benchmarks", lambda: folder)
    monkeypatch.setattr(
        _bench,
        "BENCHMARKS",
        (("good", "good"), ("slow", "slow"), ("boom", "boom"), ("gone", "gone")),
    )
    yield folder
    for name in [k for k in sys.modules if k.split(".")[0] == "benchmarks"]:
        del sys.modules[name]
    sys.modules.update(saved)


def _bench_run(**kwargs: object) -> tuple[int, str]:
    import io

    from rich.console import Console

    from asyncdmabuf._bench import run_bench

    out = io.StringIO()
    console = Console(file=out, width=200)
    status = run_bench(console, quick=True, json_path=None, **kwargs)  # type: ignore[arg-type]
    return status, out.getvalue()


def test_bench_strict_fails_on_a_missed_goal(fake_benchmarks: Path) -> None:
    status, text = _bench_run(only=["good", "slow"])
    assert status == 0  # without --strict a missed goal is reported, not failed
    assert "NO" in text
    status, text = _bench_run(only=["good", "slow"], strict=True)
    assert status == 1
    assert "fast enough" in text
    assert "too slow" in text
    assert "1 of 2 goals not met" in text
    assert _bench_run(only=["good"], strict=True)[0] == 0


def test_bench_skips_a_missing_module_and_reports_a_failing_one(
    fake_benchmarks: Path,
) -> None:
    status, text = _bench_run(only=["good", "gone"], strict=True)
    assert status == 0
    assert "skipped: gone: benchmarks/gone.py is not in this checkout" in text
    status, text = _bench_run(only=["good", "boom"])
    assert status == 1  # a benchmark that fails is a failure, strict or not
    assert "FAILED: boom (benchmarks/boom.py): OSError: no disk" in text
    assert "fast enough" in text  # the others still report


def test_bench_alternates_backends_and_sides_every_other_round() -> None:
    import contextlib
    from collections.abc import AsyncIterator

    from asyncdmabuf._backends import current_loop_label
    from asyncdmabuf._bench import Sides, alternate

    calls: list[tuple[str, str]] = []

    @contextlib.asynccontextmanager
    async def sides() -> AsyncIterator[Sides]:
        def side(name: str, figure: float) -> Callable[[], Awaitable[float]]:
            async def measure() -> float:
                calls.append((current_loop_label() or "?", name))
                return figure

            return measure

        yield {"ours": side("ours", 1.0), "bare": side("bare", 2.0)}

    samples = alternate(sides, 3, ["asyncio", "trio"])
    assert samples == {
        "asyncio": {"ours": [1.0] * 3, "bare": [2.0] * 3},
        "trio": {"ours": [1.0] * 3, "bare": [2.0] * 3},
    }
    forward = [
        ("asyncio", "ours"),
        ("asyncio", "bare"),
        ("trio", "ours"),
        ("trio", "bare"),
    ]
    assert calls == forward + forward[::-1] + forward


def test_bench_registers_every_benchmark_and_the_stream_one() -> None:
    from asyncdmabuf._bench import BENCHMARKS, bench_names

    titles = dict(BENCHMARKS)
    assert titles["stream frames to other processes"] == "bench_stream"
    assert set(bench_names()) >= {
        "bench_map",
        "bench_paths",
        "bench_cpu",
        "bench_pool",
        "bench_scale",
        "stress",
    }


def test_bench_runs_one_benchmark_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = run_cli("bench", "--quick", "--only", "bench_fence", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "measured on:" in done.stdout
    document = json.loads(out.read_text())
    assert document["machine"]["python"].startswith("CPython")
    rows = document["rows"]
    assert rows
    assert all(row["goal"] and row["rounds"] >= 3 for row in rows)
    assert {row["what"].split(":")[0] for row in rows} <= {"asyncio", "uvloop", "trio"}


def test_bench_only_takes_known_names() -> None:
    assert_usage_error(run_cli("bench", "--only", "bench_nope"), "--only", "bench_nope")
