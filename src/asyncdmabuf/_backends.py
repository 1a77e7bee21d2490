"""The event loops asyncdmabuf runs on, by the names its tools use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["BACKENDS"]

#: Backend label -> (anyio backend name, backend options), as ``anyio.run`` and
#: anyio's pytest plugin take them: asyncio, asyncio on uvloop's event loop, and
#: trio. Read it; don't change it.
BACKENDS: Mapping[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}
