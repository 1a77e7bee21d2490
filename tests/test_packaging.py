"""The exporters/ folder installs as asyncdmabuf.exporters, from a wheel too."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_the_exporters_as_a_subpackage(tmp_path: Path) -> None:
    src = tmp_path / "src"
    # Build from a copy, as from a clean clone: no build/ or egg-info leftovers.
    shutil.copytree(
        ROOT,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist)],
        cwd=src,
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "asyncdmabuf/exporters/__init__.py" in names
    assert "asyncdmabuf/exporters/_memfd.py" in names
    assert not any(name.startswith("exporters/") for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "memfd = asyncdmabuf.exporters:MemfdExporter" in (
        zipfile.ZipFile(wheel).read(entry_points).decode()
    )

    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install",
         "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    # The fresh venv gets the wheel; its dependencies (anyio) come from ours,
    # appended after its own site-packages so the wheel's copy wins.
    deps = site.getsitepackages()[0]
    probe = (
        f"import sys; sys.path.append({deps!r}); "
        "import asyncdmabuf.exporters as e; "
        "from asyncdmabuf.exporters import MemfdExporter; "
        "print(e.__file__); print(MemfdExporter.name)"
    )
    out = subprocess.run(
        [str(python), "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split()
    assert out[0].startswith(str(venv))
    assert out[1] == "memfd"
