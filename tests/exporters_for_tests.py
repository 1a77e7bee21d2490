"""Small exporters that let tests hold the buffer lock, refuse, fail or misbehave."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import anyio

from asyncdmabuf import (
    Attachment,
    Busy,
    DmaBuf,
    Exporter,
    SgEntry,
    SgTable,
    export,
)
from asyncdmabuf._sgtable import Direction

BASE = 0x1000


class RecordingExporter(Exporter):
    """Serves one-entry tables at a fake bus address and records every op.

    ``gate``: when set to an Event, ``map`` waits for it (so the buffer lock
    stays held) after recording that it started; ``map_started`` is set then.
    """

    name: ClassVar[str] = "recording"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate: anyio.Event | None = None
        self.map_started = anyio.Event()
        self.refuse_attach = False
        self.released: list[DmaBuf] = []
        self.table_factory: Callable[[Attachment, Direction], object] | None = None

    def make(self, size: int = 4096, name: str | None = None) -> DmaBuf:
        return export(self, size, priv={"allocated": False}, name=name)

    async def attach(self, buf: DmaBuf, attachment: Attachment) -> None:
        self.calls.append(f"attach {attachment.device.name}")
        if self.refuse_attach:
            raise Busy("refused by the test")

    async def detach(self, buf: DmaBuf, attachment: Attachment) -> None:
        self.calls.append(f"detach {attachment.device.name}")

    def _table(self, attachment: Attachment, direction: Direction) -> SgTable:
        if self.table_factory is not None:
            return self.table_factory(attachment, direction)  # type: ignore[return-value]
        size = attachment.buffer.size
        return SgTable(
            [SgEntry(BASE, size, 0)], direction=direction, attachment=attachment
        )

    async def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        self.calls.append(f"map {attachment.device.name}")
        if self.gate is not None:
            self.map_started.set()
            try:
                await self.gate.wait()
            except anyio.get_cancelled_exc_class():
                self.calls.append(f"map cancelled {attachment.device.name}")
                raise
        return self._table(attachment, direction)

    def try_map(self, attachment: Attachment, direction: Direction) -> SgTable:
        self.calls.append(f"try_map {attachment.device.name}")
        return self._table(attachment, direction)

    async def unmap(
        self, attachment: Attachment, sgt: SgTable, direction: Direction
    ) -> None:
        self.calls.append(f"unmap {attachment.device.name}")

    async def release(self, buf: DmaBuf) -> None:
        self.calls.append("release")
        self.released.append(buf)


class WaitingExporter(RecordingExporter):
    """An exporter that can only map by waiting: the base ``try_map`` (Busy)."""

    name: ClassVar[str] = "waiting"

    try_map = Exporter.try_map
