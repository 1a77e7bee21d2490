"""Fault injection for simulated devices: by probability and by script.

A :class:`FaultPlan` says which operations fail and how often; an
:class:`Injector` (one per device) counts the calls of each operation and
decides, deterministically under its seed, which of them raise.
"""

from __future__ import annotations

import random
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, final, get_args

from asyncdmabuf import Busy, DmaBufError, InvalidArgument, OutOfMemory

__all__ = ["FAULT_OPS", "Fault", "FaultOp", "FaultPlan", "Injector"]

#: The operations a fault can be injected into. ``"backing"`` is the late
#: allocation of a buffer's pages (first map, restore after eviction, or CPU
#: access); ``"allocate"`` is :meth:`SimDevice.allocate` itself.
FaultOp = Literal[
    "allocate",
    "backing",
    "attach",
    "detach",
    "map",
    "unmap",
    "release",
    "begin_cpu_access",
    "end_cpu_access",
    "copy",
]
FAULT_OPS: frozenset[str] = frozenset(get_args(FaultOp))

#: What an injected fault raises unless told otherwise; other ops raise
#: ``DmaBufError`` with ``errno`` EIO.
_DEFAULT_ERRORS: Mapping[str, type[Exception]] = types.MappingProxyType(
    {"allocate": OutOfMemory, "backing": OutOfMemory, "attach": Busy}
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted fault: the ``nth`` call of ``op`` raises.

    Attributes:
        op: The operation that fails (see :data:`FaultOp`).
        nth: Which call fails, counted from when the fault is armed (at the
            device's creation for a :class:`FaultPlan`, at
            :meth:`SimDevice.inject_fault` otherwise); 1 is the next call.
        error: The exception class to raise, called with a message; None for
            the op's default: ``OutOfMemory`` for ``"allocate"`` and
            ``"backing"``, ``Busy`` for ``"attach"``, ``DmaBufError`` (EIO) else.

    Raises:
        InvalidArgument: ``op`` names no operation, or ``nth`` is below 1.
        TypeError: ``nth`` is not an int, or ``error`` not an exception class.
    """

    op: FaultOp
    nth: int = 1
    error: type[Exception] | None = None

    def __post_init__(self) -> None:
        if self.op not in FAULT_OPS:
            raise InvalidArgument(f"no operation {self.op!r} to inject a fault into")
        if not isinstance(self.nth, int) or isinstance(self.nth, bool):
            raise TypeError(f"nth must be an int, not {type(self.nth).__name__}")
        if self.nth < 1:
            raise InvalidArgument(f"nth must be >= 1, got {self.nth}")
        if self.error is not None and not (
            isinstance(self.error, type) and issubclass(self.error, Exception)
        ):
            raise TypeError("error must be an Exception subclass")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """The faults a :class:`SimDevice` injects: random ones, and a script.

    Attributes:
        probability: For each operation, the chance that any one call fails,
            drawn from the device's seeded generator.
        script: Faults that fire on given calls, whatever the draw.

    Raises:
        InvalidArgument: An unknown operation, or a probability outside [0, 1].
        TypeError: A script item is not a :class:`Fault`.
    """

    probability: Mapping[FaultOp, float] = field(default_factory=dict)
    script: Sequence[Fault] = ()

    def __post_init__(self) -> None:
        probability: dict[FaultOp, float] = {}
        for op, p in dict(self.probability).items():
            if op not in FAULT_OPS:
                raise InvalidArgument(f"no operation {op!r} to inject a fault into")
            if isinstance(p, bool) or not isinstance(p, int | float):
                raise TypeError(f"probability of {op!r} must be a number")
            if not 0.0 <= p <= 1.0:
                raise InvalidArgument(f"probability of {op!r} must be in [0, 1]")
            probability[op] = float(p)
        script = tuple(self.script)
        for fault in script:
            if not isinstance(fault, Fault):
                raise TypeError(f"a fault script holds Fault, not {type(fault)}")
        object.__setattr__(self, "probability", types.MappingProxyType(probability))
        object.__setattr__(self, "script", script)


@final
class Injector:
    """Decides, call by call, whether an operation fails (a device's private part)."""

    __slots__ = ("armed", "calls", "injected", "probability", "rng")

    def __init__(self, plan: FaultPlan, seed: int | None) -> None:
        self.rng = random.Random(seed)
        self.probability: dict[str, float] = {
            op: p for op, p in plan.probability.items()
        }
        self.calls = dict.fromkeys(FAULT_OPS, 0)
        self.armed: list[tuple[str, int, type[Exception] | None]] = []
        self.injected = 0
        for fault in plan.script:
            self.arm(fault)

    def arm(self, fault: Fault) -> None:
        self.armed.append((fault.op, self.calls[fault.op] + fault.nth, fault.error))

    def check(self, op: str, what: str) -> Exception | None:
        """Count a call of ``op``; return the exception to raise, if any."""
        self.calls[op] = call = self.calls[op] + 1
        p = self.probability.get(op, 0.0)
        hit = p > 0.0 and self.rng.random() < p
        error: type[Exception] | None = None
        for index, (armed_op, armed_call, armed_error) in enumerate(self.armed):
            if armed_op == op and armed_call == call:
                del self.armed[index]
                hit, error = True, armed_error
                break
        if not hit:
            return None
        self.injected += 1
        cls = error or _DEFAULT_ERRORS.get(op, DmaBufError)
        return cls(f"injected fault in {op} ({what}), call {call}")
