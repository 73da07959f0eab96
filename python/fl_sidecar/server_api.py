"""The old path of the FL Demonstrator REST client; the code lives in :mod:`fl_sidecar.flserver`.

Re-exports the public names (:class:`FlServerClient`, :class:`Credentials`,
:class:`TransferResult`, ...) and the private helpers that other modules and
tests still import from here. New code imports from :mod:`fl_sidecar.flserver`.
"""

from __future__ import annotations

from fl_sidecar.flserver import bodies, failures
from fl_sidecar.flserver.client import FlServerClient
from fl_sidecar.flserver.coding import COMPRESSION_MODES
from fl_sidecar.flserver.credentials import Credentials
from fl_sidecar.flserver.downloads import DEFAULT_MAX_DOWNLOAD_SIZE
from fl_sidecar.flserver.results import MetricValue, ProgressCallback, TransferResult

__all__ = [
    "COMPRESSION_MODES",
    "DEFAULT_MAX_DOWNLOAD_SIZE",
    "Credentials",
    "FlServerClient",
    "MetricValue",
    "ProgressCallback",
    "TransferResult",
]

# Imported from here by tests and modules that have not moved to the new paths yet.
_StreamBody = bodies.StreamBody
_map_error = failures.map_error
_metric_fields = bodies.metric_fields
_multipart_parts = bodies.multipart_parts
_parse_detail = bodies.parse_detail
_read_detail = bodies.read_detail
_urlencode = bodies.urlencode
