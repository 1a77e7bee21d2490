"""The validators of every kind of argument, one of each.

Each returns the value it checked (normalised where that means something, an
int as a :class:`Direction`, say) and raises ``TypeError`` for a wrong type or
:class:`InvalidArgument` for a value out of range, so that no bad argument
reaches further than the entry point that took it.
"""

from __future__ import annotations

import math
from typing import cast

from ._errors import BadFileDescriptor, InvalidArgument
from ._types import CpuMode, Direction, Usage

__all__ = [
    "CPU_MODES",
    "FD_MAX",
    "check_bool",
    "check_cpu_mode",
    "check_direction",
    "check_fd",
    "check_int",
    "check_name",
    "check_number",
    "check_usage",
    "is_int",
]

#: The largest fd number there can be (fds are C ints).
FD_MAX = 2**31 - 1
#: The longest buffer name, in bytes of UTF-8 (``DMA_BUF_NAME_LEN``).
NAME_MAX = 32

#: The CPU access modes (a tuple: ``in`` is a few identity tests, and an
#: unhashable value is not an error to it).
CPU_MODES: tuple[str, ...] = ("w", "r", "rw")


def is_int(value: object) -> bool:
    """Return whether ``value`` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(
    value: object, what: str, minimum: int = 1, maximum: int | None = None
) -> int:
    """Return ``value`` if it is an int (not a bool) in ``[minimum, maximum]``.

    Raises:
        TypeError: ``value`` is not an int.
        InvalidArgument: It is out of range.
    """
    if not is_int(value):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    number = cast(int, value)
    if number < minimum:
        raise InvalidArgument(f"{what} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise InvalidArgument(f"{what} must be <= {maximum}, got {number}")
    return number


def check_number(
    value: object, what: str, minimum: float = 0.0, maximum: float = math.inf
) -> float:
    """Return ``value`` as a float if it is a finite real number in range.

    Raises:
        TypeError: ``value`` is neither an int nor a float (or is a bool).
        InvalidArgument: It is NaN, infinite where ``maximum`` is finite, or
            out of ``[minimum, maximum]``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    number = float(value)
    if math.isnan(number) or not minimum <= number <= maximum:
        raise InvalidArgument(f"{what} must be in [{minimum}, {maximum}], got {value}")
    return number


def check_bool(value: object, what: str) -> bool:
    """Return ``value`` if it is a bool.

    Raises:
        TypeError: It is not.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool, not {type(value).__name__}")
    return value


def check_fd(fd: object) -> int:
    """Return ``fd`` as an int.

    Raises:
        TypeError: ``fd`` is not an int.
        BadFileDescriptor: ``fd`` is negative or beyond any fd number.
    """
    if not is_int(fd):
        raise TypeError(f"an fd is an int, not {type(fd).__name__}")
    number = cast(int, fd)
    if not 0 <= number <= FD_MAX:  # an fd is a C int: beyond it, none is open
        raise BadFileDescriptor(f"fd {number} is not open")
    return number


def check_name(name: object) -> str | None:
    """Return ``name`` if it is a valid buffer name (``DMA_BUF_SET_NAME``'s rule).

    Raises:
        TypeError: ``name`` is neither a str nor None.
        InvalidArgument: It is longer than 32 bytes of UTF-8, holds a NUL, or
            is not valid UTF-8 (a lone surrogate).
    """
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"a buffer name is a str, not {type(name).__name__}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 for the kernel's name
        raise InvalidArgument(f"buffer name {name!r} is not valid UTF-8") from None
    if len(encoded) > NAME_MAX or "\0" in name:
        raise InvalidArgument(f"buffer name {name!r} is longer than 32 bytes")
    return name


def check_direction(direction: object) -> Direction:
    """Return ``direction`` as a :class:`Direction`.

    Raises:
        TypeError: ``direction`` is not an int.
        InvalidArgument: It is an int that names no direction.
    """
    if type(direction) is Direction:
        return direction
    if not is_int(direction):
        raise TypeError(
            f"direction must be a Direction, not {type(direction).__name__}"
        )
    try:
        return Direction(cast(int, direction))
    except ValueError:
        raise InvalidArgument(f"{direction} is not a DMA direction") from None


def check_usage(usage: object) -> Usage:
    """Return ``usage`` as a :class:`Usage`.

    Raises:
        TypeError: ``usage`` is not an int (or a Usage).
        InvalidArgument: It is an int that is no usage.
    """
    if isinstance(usage, Usage):
        return usage
    if not is_int(usage):
        raise TypeError(f"a fence usage is a Usage, not {type(usage).__name__}")
    try:
        return Usage(cast(int, usage))
    except ValueError:
        raise InvalidArgument(f"{usage} is not a fence usage") from None


def check_cpu_mode(mode: object) -> CpuMode:
    """Return ``mode`` if it is a CPU access mode: ``"r"``, ``"w"`` or ``"rw"``.

    Raises:
        TypeError: ``mode`` is not a str.
        InvalidArgument: It is another str.
    """
    if not isinstance(mode, str):
        raise TypeError(f"a CPU access mode is a str, not {type(mode).__name__}")
    if mode not in CPU_MODES:
        raise InvalidArgument(f"CPU access mode must be 'r', 'w' or 'rw', not {mode!r}")
    return cast(CpuMode, mode)
