"""Streams: frames from one publisher to many subscribers, across processes.

``_transport`` is the seam (messages with fds, peer credentials), ``_unix`` its
UNIX-socket implementation, ``_wire`` the messages, ``_publisher`` and
``_subscriber`` the two ends, which see only the seam.
"""

from __future__ import annotations

from ._frame import Frame
from ._publisher import Publisher, PublisherStatistics, SubscriberInfo
from ._subscriber import Subscriber, SubscriberStatistics, subscribe
from ._transport import Listener, PeerCredentials, Transport

__all__ = [
    "Frame",
    "Listener",
    "PeerCredentials",
    "Publisher",
    "PublisherStatistics",
    "Subscriber",
    "SubscriberInfo",
    "SubscriberStatistics",
    "Transport",
    "subscribe",
]
