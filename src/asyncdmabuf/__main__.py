"""``python -m asyncdmabuf`` and the ``asyncdmabuf`` command."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ._cli import main as _main

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``asyncdmabuf`` with ``argv`` (default: the process's arguments).

    Returns the exit status; as the console script, it exits with it.
    """
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
