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

from asyncdmabuf import Busy, DmaBufError, InjectedFault, InvalidArgument, OutOfMemory
from asyncdmabuf.lowlevel import check_int, check_number

__all__ = ["FAULT_OPS", "Fault", "FaultOp", "FaultPlan", "InjectedFault", "Injector"]

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
#: :data:`FaultOp`'s names, in its order: the one list of fault ops.
FAULT_OPS: tuple[FaultOp, ...] = get_args(FaultOp)


_INJECTED: dict[type[DmaBufError], type[InjectedFault]] = {}


def injected(error: type[DmaBufError]) -> type[InjectedFault]:
    """Return the class of an injected fault that is also an ``error``.

    ``except OutOfMemory`` catches an injected ``OutOfMemory`` as it would a
    real one, and ``isinstance(exc, InjectedFault)`` tells it was injected.
    """
    if issubclass(error, InjectedFault):
        return error
    cls = _INJECTED.get(error)
    if cls is None:
        cls = _INJECTED[error] = type(
            f"Injected{error.__name__}", (InjectedFault, error), {}
        )
    return cls


#: What an injected fault raises unless told otherwise; other ops raise
#: :class:`~asyncdmabuf.InjectedFault` itself (``errno`` EIO).
_DEFAULT_ERRORS: Mapping[str, type[InjectedFault]] = types.MappingProxyType(
    {
        "allocate": injected(OutOfMemory),
        "backing": injected(OutOfMemory),
        "attach": injected(Busy),
    }
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
            ``"backing"``, ``Busy`` for ``"attach"``, ``InjectedFault`` (EIO)
            else. A :class:`~asyncdmabuf.DmaBufError` subclass is raised as an
            :class:`~asyncdmabuf.InjectedFault` too; any other class as is.

    Raises:
        InvalidArgument: ``op`` names no operation, or ``nth`` is below 1.
        TypeError: ``nth`` is not an int, or ``error`` not an exception class.
    """

    op: FaultOp
    nth: int = 1
    error: type[Exception] | None = None

    def __post_init__(self) -> None:
        _check_op(self.op)
        check_int(self.nth, "nth", 1)
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
        TypeError: ``probability`` is not a mapping, a probability not a
            number, or a script item not a :class:`Fault`.
    """

    probability: Mapping[FaultOp, float] = field(default_factory=dict)
    script: Sequence[Fault] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.probability, Mapping):
            raise TypeError(
                "probability must be a mapping of operation to probability, "
                f"not {type(self.probability).__name__}"
            )
        probability: dict[FaultOp, float] = {}
        for op, p in self.probability.items():
            _check_op(op)
            probability[op] = check_number(p, f"probability of {op!r}", 0.0, 1.0)
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
        self.calls: dict[str, int] = dict.fromkeys(FAULT_OPS, 0)
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
        cls: type[Exception]
        if error is None:
            cls = _DEFAULT_ERRORS.get(op, InjectedFault)
        elif issubclass(error, DmaBufError):
            cls = injected(error)
        else:
            cls = error
        return cls(f"injected fault in {op} ({what}), call {call}")


def _check_op(op: object) -> None:
    if op not in FAULT_OPS:
        raise InvalidArgument(f"no operation {op!r} to inject a fault into")
