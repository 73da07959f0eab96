"""The templates of SAFETENSORS uploads: global models fetched once per round, shared.

A SAFETENSORS upload is written into a copy of the global model's archive, so
the sidecar fetches that archive at upload time. :class:`TemplateCache` keeps
the most recent ones by (model id, round): concurrent uploads for one round
share one fetch, uploads for other rounds do not wait for it, a template being
read is never removed, and a failed fetch leaves nothing behind.
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import Callable, Optional, Tuple

from fl_sidecar.flserver import Credentials
from fl_sidecar.sidecar.cancel import Cancellation
from fl_sidecar.sidecar.spool import unlink_quietly

__all__ = ["TEMPLATE_CACHE_SIZE", "Template", "TemplateCache"]

TEMPLATE_CACHE_SIZE = 2
"""Templates kept when nobody reads them (the most recently used)."""

Fetch = Callable[[Tuple[str, int], Path, Optional[Credentials], Optional[Cancellation]], None]
"""``fetch((model_id, round), path, credentials, cancel)`` writes the global model to ``path``."""


class Template:
    """A global model fetched as the template for one round's SAFETENSORS uploads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fetched = False
        self.users = 0  # callers fetching or reading it: while > 0 it is never removed
        self.fetch_lock = threading.Lock()


class TemplateCache:
    """The fetched templates by (model id, round), least recently used first. Thread-safe."""

    def __init__(
        self, new_path: Callable[[], Path], fetch: Fetch, *, size: int = TEMPLATE_CACHE_SIZE
    ) -> None:
        """Keep up to ``size`` idle templates; ``new_path()`` names a fresh spool file."""
        self.size = size
        self._new_path = new_path
        self._fetch = fetch
        self._entries: collections.OrderedDict[Tuple[str, int], Template] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def acquire(
        self,
        key: Tuple[str, int],
        credentials: Optional[Credentials],
        stop: Optional[Cancellation] = None,
    ) -> Template:
        """The fetched template for ``key``, pinned (never removed) until released.

        Concurrent callers for one key share one fetch; callers for other keys do not
        wait for it. A failed fetch is retried by the next caller.

        Raises:
            Whatever the fetch raised (the template is then not kept).
        """
        with self._lock:
            template = self._entries.get(key)
            if template is None or (template.fetched and not template.path.exists()):
                template = Template(self._new_path())
                self._entries[key] = template
            self._entries.move_to_end(key)
            template.users += 1
        try:
            with template.fetch_lock:
                if not template.fetched:
                    self._fetch(key, template.path, credentials, stop)
                    template.fetched = True
        except BaseException:
            self.release(key, template)
            raise
        return template

    def release(self, key: Tuple[str, int], template: Template) -> None:
        """Unpin ``template`` (from :meth:`acquire`); the least recently used idle ones go."""
        with self._lock:
            template.users -= 1
            current = self._entries.get(key)
            if current is template and not template.fetched and template.users == 0:
                del self._entries[key]  # its fetch failed: the next caller starts afresh
            # Evict the least recently used templates that nobody is reading.
            excess = len(self._entries) - self.size
            idle = [k for k, t in self._entries.items() if t.users == 0][: max(excess, 0)]
            for old_key in idle:
                unlink_quietly(self._entries.pop(old_key).path)
            if template.users == 0 and current is not template:
                unlink_quietly(template.path)  # replaced while in use: nobody can reach it
