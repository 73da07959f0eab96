"""Old import path of the durable upload journal.

The code lives in :mod:`fl_sidecar.sidecar.uploads` now;
this module only re-exports its names,
so that existing imports keep working.
"""

from __future__ import annotations

from fl_sidecar.sidecar.uploads import (
    ACCEPTED,
    NOT_SENT,
    REJECTED,
    RETENTION_SECONDS,
    SENDING,
    STATES,
    UNKNOWN,
    UploadJournal,
    UploadRecord,
    check_upload_id,
)

__all__ = [
    "ACCEPTED",
    "NOT_SENT",
    "REJECTED",
    "RETENTION_SECONDS",
    "SENDING",
    "STATES",
    "UNKNOWN",
    "UploadJournal",
    "UploadRecord",
    "check_upload_id",
]
