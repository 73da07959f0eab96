"""Old import path of the notification endpoint.

The code lives in :mod:`fl_sidecar.sidecar.notifications` now;
this module only re-exports its names,
so that existing imports keep working.
"""

from __future__ import annotations

from fl_sidecar.sidecar.notifications import (
    DEFAULT_EVICT_AFTER,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER,
    DEFAULT_PORT,
    DEFAULT_REQUEST_DEADLINE,
    STATUS_BY_KIND,
    NotificationServer,
)

__all__ = [
    "DEFAULT_EVICT_AFTER",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_PEER",
    "DEFAULT_PORT",
    "DEFAULT_REQUEST_DEADLINE",
    "STATUS_BY_KIND",
    "NotificationServer",
]
