"""The names asyncdmabuf gives its memfds, and reading them back.

A memfd's label shows in ``/proc/PID/fd`` and ``/proc/PID/maps``: made here by
:func:`sealed_memfd <asyncdmabuf.lowlevel.sealed_memfd>`, read by the
machine-wide ``asyncdmabuf bufinfo``. For reporting only: any process can give a
file any name, so no decision about what an fd is rests on it.
"""

from __future__ import annotations

__all__ = ["LABEL_PREFIX", "memfd_label", "parse_memfd_label"]

#: What every asyncdmabuf memfd's label starts with.
LABEL_PREFIX = "asyncdmabuf:"
#: ``memfd_create`` takes at most 249 bytes (NAME_MAX less ``memfd:``); stay below.
_LABEL_MAX = 240
_DELETED = " (deleted)"


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace(":", "%3A").replace("\0", "%00")


def _unescape(text: str) -> str:
    return text.replace("%00", "\0").replace("%3A", ":").replace("%25", "%")


def memfd_label(exporter: str, name: str | None) -> str:
    """Return the ``memfd_create`` label of a buffer: ``asyncdmabuf:EXPORTER:NAME``.

    The exporter's ``%``, ``:`` and NUL are escaped (``%25``, ``%3A``, ``%00``) so
    that the first ``:`` after the prefix ends it; the name (at most 32 bytes,
    empty for None) follows unchanged. A long exporter name is cut so the label
    fits ``memfd_create``'s limit; :func:`parse_memfd_label` reads it back.

    Raises:
        TypeError: ``exporter`` is not a str, or ``name`` neither a str nor None.
    """
    if not isinstance(exporter, str):
        raise TypeError(f"exporter must be a str, not {type(exporter).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, not {type(name).__name__}")
    tail = (":" + (name or "")).encode("utf-8", "surrogateescape")
    room = max(_LABEL_MAX - len(LABEL_PREFIX) - len(tail), 0)
    head = _escape(exporter).encode("utf-8", "surrogateescape")
    if len(head) > room:
        head = head[:room]
        cut = head.rfind(b"%", max(len(head) - 2, 0))
        if cut >= 0:  # do not leave half an escape behind
            head = head[:cut]
    label = (LABEL_PREFIX.encode() + head + tail)[:_LABEL_MAX]
    return label.decode("utf-8", errors="ignore")


def parse_memfd_label(label: str) -> tuple[str | None, str | None] | None:
    """Return ``(exporter, name)`` from an asyncdmabuf memfd label, or None.

    Reads both forms: ``asyncdmabuf:EXPORTER:NAME`` (:func:`memfd_label`) and the
    older ``asyncdmabuf:NAME``, whose exporter is unknown (None). An empty name
    is None. ``label`` may carry the ``memfd:`` prefix and ``" (deleted)"``
    suffix of a ``/proc`` link, with or without its leading ``/``.
    """
    text = label.removeprefix("/").removeprefix("memfd:").removesuffix(_DELETED)
    if not text.startswith(LABEL_PREFIX):
        return None
    rest = text[len(LABEL_PREFIX) :]
    exporter: str | None
    exporter, sep, name = rest.partition(":")
    if not sep:  # the old form: the rest is the name
        exporter, name = None, rest
    else:
        exporter = _unescape(exporter) or None
    return exporter, name or None
