"""Every ```python block of the docs (and README.md) runs, so they cannot drift.

Each block runs alone, in a fresh namespace, as it would pasted into a new
file: so every block has its own imports. It runs once per backend: examples
call ``anyio.run(main)``, and the test points ``anyio.run`` at the backend
under test (asyncio, asyncio+uvloop, trio). A block is left out only when the
line right before its fence says so:

- ``<!-- no-test -->``: never run (kept to a handful; see ``NO_TEST_LIMIT``);
- ``<!-- requires: module.attribute -->``: run once that exists, skipped (and
  listed by ``test_examples_waiting_for_features``) until then.

A block holding only snippet lines (``--8<-- "docs/examples/x.py:section"``)
shows part of a module under ``docs/examples/``; the whole module runs (in a
fresh namespace) where its first section appears. ``docs/examples/`` is on
``sys.path`` while blocks run, so a block may ``from slab_exporter import ...``
as a reader who saved the module next to it would.
``make docs`` (part of ``make test``) checks that the site builds.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncdmabuf._backends import BACKENDS

from .helpers import run_example

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
#: The most blocks that may be marked ``<!-- no-test -->`` in all the docs.
NO_TEST_LIMIT = 3

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<info>[^\n]*)$")
_MARK = re.compile(r"^\s*<!--\s*(?P<what>no-test|requires:\s*(?P<req>\S+))\s*-->\s*$")
_SNIPPET = re.compile(r'^\s*--8<--\s+"(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"\s*$')


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    code: str
    no_test: bool = False
    requires: str | None = None
    snippets: tuple[str, ...] = ()


def _blocks(path: Path) -> list[Block]:
    """The ```python blocks of a page, with the marks that precede them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = str(path.relative_to(ROOT))
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        language = (match["info"].split() or [""])[0].lstrip("{.").rstrip("}")
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence)
            and lines[i].strip().strip(fence[0]) == ""
        ):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line)
            i += 1
        i += 1
        if language not in ("python", "py"):
            continue
        before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        mark = _MARK.match(before)
        snippets = [_SNIPPET.match(ln) for ln in body if ln.strip()]
        blocks.append(
            Block(
                page=page,
                line=start + 1,
                code="\n".join(body) + "\n",
                no_test=bool(mark and mark["what"] == "no-test"),
                requires=mark["req"] if mark and mark["req"] else None,
                snippets=tuple(m["path"] for m in snippets if m)
                if snippets and all(snippets)
                else (),
            )
        )
    return blocks


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


ALL_BLOCKS = [block for page in _pages() for block in _blocks(page)]


def _available(requirement: str) -> bool:
    """Whether ``module.attribute`` (or a module) can be imported now."""
    module, _, attribute = requirement.rpartition(".")
    for name, attr in ((requirement, None), (module, attribute)):
        if not name:
            continue
        try:
            imported = importlib.import_module(name)
        except ImportError:
            continue
        if attr is None or hasattr(imported, attr):
            return True
    return False


def _runner(backend: tuple[str, dict[str, Any]]) -> Callable[..., Any]:
    real_run = anyio.run
    name, options = backend

    def run(func: Callable[..., Any], *args: object, **_ignored: object) -> Any:
        return real_run(func, *args, backend=name, backend_options=options)

    return run


def _runnable() -> list[Block]:
    """The blocks to run: each snippet module once, where it first appears."""
    seen: set[str] = set()
    runnable: list[Block] = []
    for block in ALL_BLOCKS:
        if block.no_test:
            continue
        if block.snippets:
            fresh = tuple(p for p in dict.fromkeys(block.snippets) if p not in seen)
            seen.update(fresh)
            if not fresh:
                continue
            block = dataclasses.replace(block, snippets=fresh)
        runnable.append(block)
    return runnable


RUNNABLE = _runnable()


def _run_block(block: Block, backend: tuple[str, dict[str, Any]]) -> None:
    """Run one block (or the modules it shows) alone, on ``backend``."""
    if block.snippets:
        sources = [
            (str(ROOT / p), (ROOT / p).read_text("utf-8")) for p in block.snippets
        ]
    else:
        sources = [(f"{block.page}:{block.line}", block.code)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(anyio, "run", _runner(backend))
        patch.syspath_prepend(str(EXAMPLES))
        for filename, source in sources:
            namespace: dict[str, Any] = {"__name__": "docs_example"}
            try:
                exec(compile(source, filename, "exec"), namespace)
            except BaseException as exc:
                exc.add_note(f"in the example at {block.page} line {block.line}")
                raise


@pytest.mark.parametrize(
    "block", RUNNABLE, ids=[f"{b.page}:{b.line}" for b in RUNNABLE]
)
def test_example_runs_alone(
    block: Block, anyio_backend: tuple[str, dict[str, Any]]
) -> None:
    """Run one example alone, in a namespace of its own, on the backend under test."""
    if block.requires and not _available(block.requires):
        pytest.skip(f"needs {block.requires}")
    _run_block(block, anyio_backend)


def test_every_example_is_tested() -> None:
    """Only a handful of blocks may opt out, and every snippet path exists."""
    assert ALL_BLOCKS, "no examples found under docs/"
    skipped = [f"{b.page}:{b.line}" for b in ALL_BLOCKS if b.no_test]
    assert len(skipped) <= NO_TEST_LIMIT, f"too many untested examples: {skipped}"
    for block in ALL_BLOCKS:
        for path in block.snippets:
            assert (ROOT / path).is_file(), f"{block.page}:{block.line}: no {path}"


def test_examples_waiting_for_features() -> None:
    """List the examples skipped because what they show has not landed yet."""
    waiting = [
        f"{b.page}:{b.line} needs {b.requires}"
        for b in ALL_BLOCKS
        if b.requires and not _available(b.requires)
    ]
    if waiting:
        pytest.skip("examples waiting for features: " + "; ".join(waiting))


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_camera_pipeline_example_runs(backend: str) -> None:
    """docs/examples/camera_pipeline.py: a camera and two consumer processes."""
    args = ["--frames=60", "--fps=240", f"--backend={backend}"]
    out = run_example(EXAMPLES / "camera_pipeline.py", *args)
    assert "recorder: 60 frames, 0 dropped" in out, out
    assert "every buffer came back" in out, out
