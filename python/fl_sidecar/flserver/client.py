"""The FL Demonstrator REST client: :class:`FlServerClient`, made of the package's parts.

It is the participant's calls (:mod:`~fl_sidecar.flserver.participant`) and the
operator's (:mod:`~fl_sidecar.flserver.admin`) over one transport
(:mod:`~fl_sidecar.flserver.transport`); this module holds its settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union
from urllib.parse import urlsplit

from fl_sidecar.errors import ConfigurationError
from fl_sidecar.flserver.admin import AdminCalls
from fl_sidecar.flserver.coding import CodingNegotiation
from fl_sidecar.flserver.credentials import Credentials
from fl_sidecar.flserver.downloads import DEFAULT_MAX_DOWNLOAD_SIZE
from fl_sidecar.flserver.participant import ParticipantCalls
from fl_sidecar.flserver.results import PathLike
from fl_sidecar.flserver.transport import DEFAULT_MAX_BACKOFF, open_session

__all__ = ["FlServerClient"]


class FlServerClient(ParticipantCalls, AdminCalls):
    """A client of one FL Demonstrator server (or the embedded dev server).

    Thread safety: one instance may be shared by threads for independent calls
    (requests' connection pool is thread safe), but ``negotiated_coding`` is
    learnt per instance.

    Attributes:
        negotiated_coding: the request coding uploads use: ``"zstd"`` (the server
            advertised it), ``"identity"`` (it did not, or it answered 415), or
            ``None`` (no answer seen yet). It is learnt only from the answers to
            requests made anyway (a download, a JSON call, an upload, a 415); no
            request is ever sent just to learn it, and an upload made while it
            is ``None`` is sent in identity.
    """

    def __init__(
        self,
        base_url: str,
        credentials: Optional[Credentials] = None,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        retries: int = 4,
        backoff: float = 0.5,
        compression: str = "auto",
        level: Optional[int] = None,
        chunk_size: Optional[int] = None,
        threads: int = 0,
        max_download_size: int = DEFAULT_MAX_DOWNLOAD_SIZE,
        spool_dir: Optional[PathLike] = None,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        min_upload_saving: float = 0.1,
        verify: Union[bool, str] = True,
        proxies: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Set up the client; no request is made here.

        Args:
            base_url: the server root, e.g. ``"http://127.0.0.1:8000"`` (no credentials in it).
            credentials: default credentials for every call that needs them.
            timeout: seconds to wait for each read of an answer (between bytes).
            connect_timeout: seconds to wait for a TCP connection.
            retries: extra attempts after the first for requests that may be repeated.
            backoff: first backoff delay in seconds; doubled each retry, with jitter.
            compression: ``"auto"`` (zstd when negotiated), ``"never"`` (identity both
                ways) or ``"always"`` (zstd uploads without waiting for the server to
                advertise it; a 415 still falls back to identity).
            level: zstd level for uploads (codec default when ``None``).
            chunk_size: uncompressed bytes per zstd frame (codec default when ``None``).
            threads: codec worker threads (0: one per core).
            max_download_size: largest model accepted, in bytes, after decoding.
            spool_dir: directory for packed upload bodies (system temp dir when ``None``).
            max_backoff: cap on one backoff delay, in seconds.
            min_upload_saving: pack an upload only if samples of the model shrink by at
                least this fraction (0.1: 10%); 0 packs whenever zstd is negotiated.
            verify: TLS certificate check: True, False, or a CA bundle path.
            proxies: scheme -> proxy URL (environment proxies are never used implicitly).

        Raises:
            ConfigurationError: an argument is invalid (e.g. a URL with a password in it).
        """
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError("base_url must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ConfigurationError("base_url must not hold credentials: pass Credentials instead")
        CodingNegotiation.check_mode(compression)
        if timeout <= 0 or connect_timeout <= 0 or retries < 0 or backoff < 0:
            raise ConfigurationError("timeouts must be positive, retries and backoff non-negative")
        if max_download_size <= 0:
            raise ConfigurationError("max_download_size must be positive")
        if not 0.0 <= min_upload_saving < 1.0:
            raise ConfigurationError("min_upload_saving must be in [0, 1)")
        self.base_url = base_url.rstrip("/") + "/"
        self.credentials = credentials
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.min_upload_saving = float(min_upload_saving)
        self.compression = compression
        self.level = level
        self.chunk_size = chunk_size
        self.threads = threads
        self.max_download_size = int(max_download_size)
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self._coding = CodingNegotiation()
        self._session = open_session(verify, proxies)

    # -- lifecycle --

    def close(self) -> None:
        """Close the keep-alive connections."""
        self._session.close()

    def __enter__(self) -> FlServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FlServerClient({self.base_url!r}, negotiated_coding={self.negotiated_coding!r})"

    @property
    def negotiated_coding(self) -> Optional[str]:
        """The request coding uploads use (see the class's attributes)."""
        return self._coding.negotiated
