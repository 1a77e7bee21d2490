"""asyncdmabuf bufinfo: the /proc scan, seen from real processes and from odd trees."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from asyncdmabuf import _bufinfo_cli, _sysinfo
from asyncdmabuf._backends import BACKENDS
from asyncdmabuf._label import memfd_label, parse_memfd_label
from asyncdmabuf._sysinfo import (
    FdHolder,
    Mapping,
    SysBuffer,
    SysInfo,
    Uninspected,
    scan,
)

SIZE = 64 * 1024
NOBODY = 65534

#: One child: ``python -c PEER MODE BACKEND SOCKFD...``. It prints one JSON line
#: of facts when its buffers are in place, then waits for a line on stdin.
PEER = textwrap.dedent(
    """
    import ctypes, json, mmap, os, socket, sys
    import anyio, anyio.abc
    import asyncdmabuf as dmabuf
    from asyncdmabuf._backends import BACKENDS
    from asyncdmabuf.exporters import MemfdExporter

    mode, backend, *socks = sys.argv[1:]
    socks = [socket.socket(fileno=int(s)) for s in socks]

    def fds_of(inode):
        out = []
        for entry in os.listdir("/proc/self/fd"):
            try:
                if os.stat(f"/proc/self/fd/{entry}").st_ino == inode:
                    out.append(int(entry))
            except OSError:
                pass
        return sorted(out)

    def ready(inode, **facts):
        print(json.dumps({"pid": os.getpid(), "inode": inode,
                          "fds": fds_of(inode), **facts}), flush=True)
        sys.stdin.readline()

    async def alloc():
        buf = await MemfdExporter().allocate(@SIZE@, name="bi-shared")
        async with buf:
            for i, sock in enumerate(socks):
                stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
                await dmabuf.send_buffer(stream, buf, writable=i == 0)
            ready(buf.inode)

    async def receive():
        stream = await anyio.abc.UNIXSocketStream.from_socket(socks[0])
        buf = await dmabuf.receive_buffer(stream)
        async with buf:
            async with buf.cpu_access("r") as view:
                ready(buf.inode, first=view[0])

    def raw():
        _, fds, _, _ = socket.recv_fds(socks[0], 4096, 1)
        ready(os.fstat(fds[0]).st_ino)

    def maponly():
        # mmap.mmap keeps a dup of the fd: map with libc so that none is left.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _, fds, _, _ = socket.recv_fds(socks[0], 4096, 1)
        inode = os.fstat(fds[0]).st_ino
        addr = libc.mmap(None, @SIZE@, mmap.PROT_READ, mmap.MAP_SHARED, fds[0], 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        os.close(fds[0])
        ready(inode)
        libc.munmap(addr, @SIZE@)

    def run(main):
        name, options = BACKENDS[backend]
        anyio.run(main, backend=name, backend_options=options)

    if mode in ("alloc", "receive"):
        run(alloc if mode == "alloc" else receive)
    else:
        {"raw": raw, "maponly": maponly}[mode]()
    """
).replace("@SIZE@", str(SIZE))


@dataclass
class Peer:
    proc: subprocess.Popen[str]
    facts: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.proc.pid


def _start(mode: str, backend: str, *socks: socket.socket) -> subprocess.Popen[str]:
    fds = [s.fileno() for s in socks]
    return subprocess.Popen(
        [sys.executable, "-c", PEER, mode, backend, *map(str, fds)],
        pass_fds=fds,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _ready(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the peer's signal: everything is in place
    assert line, f"a peer exited early with {proc.wait(timeout=30)}"
    facts: dict[str, Any] = json.loads(line)
    return facts


def _stop(proc: subprocess.Popen[str]) -> None:
    stdin: IO[str] | None = proc.stdin
    try:
        if stdin is not None:
            stdin.write("exit\n")
            stdin.close()
    except BrokenPipeError:
        pass
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(
    scope="module", params=[pytest.param(label, id=label) for label in BACKENDS]
)
def peers(request: pytest.FixtureRequest) -> Iterator[dict[str, Peer]]:
    """An owner sharing one buffer: to an importer (which maps it), to a process
    that only holds the fd (read-only), and to one that maps it and closes the fd."""
    backend: str = request.param
    pairs = [socket.socketpair() for _ in range(3)]
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs["owner"] = _start("alloc", backend, *(a for a, _ in pairs))
        procs["importer"] = _start("receive", backend, pairs[0][1])
        procs["holder"] = _start("raw", backend, pairs[1][1])
        procs["mapper"] = _start("maponly", backend, pairs[2][1])
        for a, b in pairs:
            a.close()
            b.close()
        yield {role: Peer(proc, _ready(proc)) for role, proc in procs.items()}
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        for proc in procs.values():
            _stop(proc)


def _find(info: SysInfo, inode: int) -> SysBuffer:
    (buf,) = [b for b in info.buffers if b.inode == inode]
    return buf


# -- real processes --------------------------------------------------------------------


def test_scan_sees_every_holder_and_mapper(peers: dict[str, Peer]) -> None:
    inode = peers["owner"].facts["inode"]
    assert all(p.facts["inode"] == inode for p in peers.values())
    info = scan(p.pid for p in peers.values())
    buf = _find(info, inode)
    assert buf.kind == "memfd"
    assert buf.size == SIZE
    assert buf.name == "bi-shared"
    assert buf.exporter in (None, "memfd")  # the old label does not say
    held = {(h.pid, h.fd) for h in buf.holders}
    expected = {(p.pid, fd) for p in peers.values() for fd in p.facts["fds"]}
    assert held == expected
    assert peers["mapper"].pid not in buf.holder_pids
    assert set(buf.mapper_pids) == {
        peers["owner"].pid,
        peers["importer"].pid,
        peers["mapper"].pid,
    }
    (holder,) = [h for h in buf.holders if h.pid == peers["holder"].pid]
    assert holder.writable is False  # it was shared writable=False
    usage = {p.pid: p for p in info.processes}
    assert usage[peers["holder"].pid].fds == 1
    assert usage[peers["holder"].pid].held_bytes == SIZE
    assert usage[peers["holder"].pid].mapped_bytes == 0
    mapper = usage[peers["mapper"].pid]
    assert (mapper.fds, mapper.held_bytes) == (0, 0)
    assert mapper.mapped_bytes == mapper.total_bytes == SIZE
    assert usage[peers["owner"].pid].total_bytes == SIZE
    assert info.total_bytes == sum(b.size or 0 for b in info.buffers)
    assert not info.uninspected


def test_the_whole_machine_scan_finds_the_peers(peers: dict[str, Peer]) -> None:
    buf = _find(scan(), peers["owner"].facts["inode"])
    assert set(buf.holder_pids) == {
        peers[r].pid for r in ("owner", "importer", "holder")
    }


def test_pid_filter_looks_at_those_processes_only(peers: dict[str, Peer]) -> None:
    holder = peers["holder"]
    info = scan([holder.pid])
    assert info.scanned == 1
    buf = _find(info, holder.facts["inode"])
    assert buf.holder_pids == (holder.pid,)
    assert buf.mappings == ()
    assert [p.pid for p in info.processes] == [holder.pid]


def _cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncdmabuf", "bufinfo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )


def test_cli_json_end_to_end(peers: dict[str, Peer]) -> None:
    pids = [str(peers[r].pid) for r in ("owner", "mapper")]
    result = _cli("--json", "--pid", *pids)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "asyncdmabuf.bufinfo/1"
    assert doc["pids"] == sorted(map(int, pids))
    (buf,) = [b for b in doc["buffers"] if b["inode"] == peers["owner"].facts["inode"]]
    assert buf["size_bytes"] == SIZE
    assert {h["pid"] for h in buf["holders"]} == {peers["owner"].pid}
    assert {m["pid"] for m in buf["mappings"]} == set(map(int, pids))
    assert all(m["size_bytes"] == SIZE for m in buf["mappings"])
    assert doc["totals"]["buffers"] == len(doc["buffers"])
    assert set(doc["processes"][0]) == {
        "pid",
        "command",
        "fds",
        "buffers",
        "held_bytes",
        "mapped_bytes",
        "total_bytes",
    }


def test_cli_table_end_to_end(peers: dict[str, Peer]) -> None:
    owner = peers["owner"]
    result = _cli("--pid", str(owner.pid))
    assert result.returncode == 0, result.stderr
    assert str(owner.facts["inode"]) in result.stdout
    assert "bi-shared" in result.stdout
    assert "1 object, 65,536 bytes (64 KiB) in total" in result.stdout
    assert all(len(line) <= 80 for line in result.stdout.splitlines())


def _reaped_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


@pytest.mark.parametrize("bad", ["-5", "0", "x", "99999999"])
def test_cli_refuses_a_bad_pid_with_exit_2(bad: str) -> None:
    result = _cli("--pid", bad)
    assert result.returncode == 2
    assert "not a process id" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_refuses_a_pid_that_does_not_exist_in_one_line() -> None:
    pid = _reaped_pid()
    result = _cli("--pid", str(pid), "--json")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no process {pid}"
    assert result.stdout == ""


def test_a_process_gone_before_the_scan_is_counted_as_vanished() -> None:
    pid = _reaped_pid()
    info = scan([pid])
    assert info.uninspected == (
        Uninspected(pid, "vanished", "exited while reading its stat"),
    )
    assert info.buffers == ()


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> SysInfo:
        raise KeyboardInterrupt

    monkeypatch.setattr(_bufinfo_cli, "scan", interrupted)
    args = argparse.Namespace(pids=None, json=False, width=None)
    console = Console(file=io.StringIO())
    assert _bufinfo_cli.bufinfo_command(args, console, console) == 130


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a scan as nobody")
def test_processes_it_may_not_read_are_named_not_fatal() -> None:
    # Imports first (nobody cannot read root's interpreter), then drop to nobody.
    script = (
        "import os, sys, json\n"
        "from asyncdmabuf._sysinfo import scan\n"
        f"os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "info = scan([int(sys.argv[1])])\n"
        "print(json.dumps([[u.pid, u.reason] for u in info.uninspected]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(os.getpid())],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout) == [[os.getpid(), "permission"]]


def test_a_memfd_with_the_new_label_shows_its_exporter() -> None:
    fd = os.memfd_create(memfd_label("simdev", "cam:0"), os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 8192)
        info = scan([os.getpid()])
        (buf,) = [b for b in info.buffers if b.inode == os.fstat(fd).st_ino]
        assert (buf.exporter, buf.name, buf.size) == ("simdev", "cam:0", 8192)
        assert buf.holders == (FdHolder(os.getpid(), fd, True),)
    finally:
        os.close(fd)


# -- a /proc of our own ----------------------------------------------------------------


def _stat(pid: int, state: str, comm: str = "x") -> str:
    return f"{pid} ({comm}) {state} 1 1 1 0 -1 0\n"


def _fake_proc(root: Path) -> None:
    (root / "self").symlink_to("126")
    (root / "notapid").write_text("")
    zombie = root / "123"
    zombie.mkdir()
    (zombie / "stat").write_text(_stat(123, "Z"))
    (root / "124").mkdir()  # vanished: nothing left in it
    nofds = root / "125"
    nofds.mkdir()
    (nofds / "stat").write_text(_stat(125, "S"))
    odd = root / "126"
    (odd / "fd").mkdir(parents=True)
    (odd / "fdinfo").mkdir()
    (odd / "stat").write_text(_stat(126, "S", comm="a) Z (b"))  # ")" in the command
    (odd / "comm").write_text("odd\n")
    (odd / "fd" / "x").write_text("")
    (odd / "fd" / "3").write_text("")  # not a link: readlink says EINVAL
    (odd / "fd" / "4").symlink_to("/memfd:asyncdmabuf:memfd:gone (deleted)")
    (odd / "fd" / "5").symlink_to("socket:[77]")
    (odd / "fd" / "6").symlink_to("/dmabuf:also-gone")
    (odd / "fdinfo" / "4").write_bytes(b"\xff\xfe garbage\nsize:\tlots\n")
    (odd / "maps").write_text(
        "garbage\n"
        "zz-yy rw-s 0 00:01 1 /memfd:asyncdmabuf:memfd:bad (deleted)\n"
        "7f00-7f10 rw-p 00000000 00:00 0 \n"
        "7f0000001000-7f0000003000 rw-s 00000000 00:01 4242"
        "                      /memfd:asyncdmabuf:memfd:ghost (deleted)\n"
        "7f0000005000-7f0000006000 r--s 00000000 00:0e 99 /dmabuf:cam\n"
        "7f0000007000-7f0000008000 r--s 00000000 00:01 5 /memfd:other (deleted)\n"
    )


def test_a_tree_of_odd_entries_is_reported_not_fatal(tmp_path: Path) -> None:
    _fake_proc(tmp_path)
    info = scan(root=str(tmp_path))
    assert info.scanned == 4
    assert [(u.pid, u.reason) for u in info.uninspected] == [
        (123, "zombie"),
        (124, "vanished"),
        (125, "vanished"),
    ]
    ghost, cam = info.buffers  # memfds first
    assert (ghost.kind, ghost.inode, ghost.dev) == ("memfd", 4242, os.makedev(0, 1))
    assert (ghost.name, ghost.exporter, ghost.size) == ("ghost", "memfd", None)
    assert ghost.holders == ()
    assert ghost.mappings == (Mapping(126, 0x7F0000001000, 0x7F0000003000, "rw-s"),)
    assert (cam.kind, cam.name, cam.inode) == ("dma-buf", "cam", 99)
    (usage,) = info.processes
    assert (usage.pid, usage.command, usage.fds) == (126, "odd", 0)
    assert usage.mapped_bytes == 0x2000 + 0x1000
    assert info.total_bytes == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a scan as nobody")
def test_an_unreadable_fd_directory_counts_as_permission() -> None:
    # Not under tmp_path: pytest's base directory is root's alone.
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        _fake_proc(Path(tmp))
        os.chmod(Path(tmp, "126", "fd"), 0)
        result = _scan_as_nobody(tmp)
    assert result.stdout.split() == ["permission", "2"]  # the maps were still read


def _scan_as_nobody(root: str) -> subprocess.CompletedProcess[str]:
    script = (
        "import os, sys\n"
        "from asyncdmabuf._sysinfo import scan\n"
        f"os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "info = scan([126], root=sys.argv[1])\n"
        "print(info.uninspected[0].reason, len(info.buffers))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script, root],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_fdinfo_of_a_kernel_dmabuf() -> None:
    text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t77\nsize:\t4096\n"
    text += "count:\t1\nexp_name:\tsystem\nname:\tframe\nnot a field\n"
    fields = _sysinfo.parse_fdinfo(text)
    assert fields["exp_name"] == "system"
    assert (fields["size"], fields["name"], fields["ino"]) == ("4096", "frame", "77")
    assert _sysinfo.classify_link("anon_inode:dmabuf") == ("dma-buf", None, None)
    assert _sysinfo.classify_link("/dmabuf:x:y") == ("dma-buf", None, "x:y")
    assert _sysinfo.classify_link("/memfd:someone-else (deleted)") is None
    assert _sysinfo.classify_link("/tmp/file") is None


# -- labels ----------------------------------------------------------------------------


@given(exporter=st.text(), name=st.none() | st.text(min_size=1, max_size=32))
def test_a_label_reads_back(exporter: str, name: str | None) -> None:
    label = memfd_label(exporter, name)
    assert len(label.encode("utf-8", "surrogateescape")) <= 240
    parsed = parse_memfd_label(f"/memfd:{label} (deleted)")
    assert parsed is not None
    got_exporter, got_name = parsed
    if len(exporter.encode("utf-8", "surrogateescape")) < 100:
        assert got_exporter == (exporter or None)
    if name is not None and "\0" not in name:
        assert got_name == name


def test_labels_old_and_new() -> None:
    assert memfd_label("memfd", "frame") == "asyncdmabuf:memfd:frame"
    assert memfd_label("memfd", None) == "asyncdmabuf:memfd:"
    assert memfd_label("a:b%", "n") == "asyncdmabuf:a%3Ab%25:n"
    assert parse_memfd_label("asyncdmabuf:memfd:") == ("memfd", None)
    assert parse_memfd_label("asyncdmabuf:frame") == (None, "frame")
    assert parse_memfd_label("/memfd:asyncdmabuf:dmabuf (deleted)") == (None, "dmabuf")
    assert parse_memfd_label("other:frame") is None
    os.close(os.memfd_create(memfd_label("x" * 300, "n" * 32)))  # the kernel takes it
    with pytest.raises(TypeError):
        memfd_label(b"memfd", None)  # type: ignore[arg-type]


# -- rendering -------------------------------------------------------------------------


def _crowded() -> SysInfo:
    holders = tuple(FdHolder(4_000_000 + i, 100 + i, i % 2 == 0) for i in range(6))
    maps = tuple(Mapping(4_000_000 + i, 0, SIZE, "rw-s") for i in range(6))
    bufs = tuple(
        SysBuffer(
            dev=1,
            inode=9_999_999_000 + i,
            kind="memfd" if i else "dma-buf",
            size=(3 << 30) + i,
            name="n" * 32,
            exporter="a-rather-long-exporter-name",
            holders=holders,
            mappings=maps + maps,
        )
        for i in range(3)
    )
    return SysInfo(
        buffers=bufs,
        processes=_sysinfo._usage(bufs, {4_000_000: "c" * 15}),
        uninspected=(Uninspected(1, "permission", "may not read its fds"),),
        scanned=10,
    )


def test_the_tables_fit_80_columns_without_wrapped_headers() -> None:
    out = io.StringIO()
    _bufinfo_cli.render(Console(file=out, width=80), _crowded())
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    header = next(line for line in lines if "inode" in line)
    for title in ("size", "name", "exporter", "held by pid:fd", "mapped by"):
        assert title in header
    proc_header = next(line for line in lines if "command" in line)
    for title in ("pid", "fds", "buffers", "held", "mapped", "total"):
        assert title in proc_header
    assert "3 objects" in out.getvalue()
    assert "1 process could not be inspected: permission 1" in out.getvalue()


def test_json_document_has_units_in_its_keys() -> None:
    doc = _bufinfo_cli.to_json(_crowded(), [5, 3, 5])
    assert doc["pids"] == [3, 5]
    json.dumps(doc)  # every value is JSON
    assert doc["totals"] == {
        "buffers": 3,
        "size_bytes": 3 * (3 << 30) + 3,
        "uninspected_processes": 1,
    }
    assert set(doc["buffers"][0]) == {
        "st_dev",
        "inode",
        "kind",
        "size_bytes",
        "name",
        "exporter",
        "holders",
        "mappings",
    }
    assert doc["uninspected"] == [
        {"pid": 1, "reason": "permission", "detail": "may not read its fds"}
    ]
