"""The global models the sidecar holds, by (model id, round): fetched once per round, shared.

A SAFETENSORS upload is written into a copy of the global model's archive, and a
download serves or converts that archive. :class:`TemplateCache` keeps the most
recent archives by (model id, round) in the spool directory: concurrent uploads
for one round share one fetch, uploads for other rounds do not wait for it, a
download whose round is known adds its archive (:meth:`TemplateCache.adopt`) and
later reads it instead of fetching again (:meth:`TemplateCache.lookup`), an
archive being read is never removed, and a failed fetch leaves nothing behind.

The FL server keeps one id for a training's global model and overwrites its
bytes after each aggregation, so an archive is valid for the round it was
fetched for only: the round is part of the key, and a body whose round is not
known is never added.
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from fl_sidecar.cancel import Cancellation
from fl_sidecar.flserver import Credentials
from fl_sidecar.sidecar.spool import unlink_quietly

__all__ = ["TEMPLATE_CACHE_SIZE", "ModelFacts", "Template", "TemplateCache"]

TEMPLATE_CACHE_SIZE = 2
"""Archives kept when nobody reads them (the most recently used)."""


@dataclass(frozen=True)
class ModelFacts:
    """What the fetch of a held archive learnt about it.

    Attributes:
        size: the archive's bytes. sha256: their hex digest.
        content_encoding: how it crossed the network (``"zstd"`` or ``"identity"``).
        wire_bytes: the bytes that took.
        vetted: whether the restricted reader has passed it (a download's TORCH
            archive); a template fetched for an upload is not vetted.
    """

    size: int
    sha256: str
    content_encoding: str
    wire_bytes: int
    vetted: bool = False


Fetch = Callable[[Tuple[str, int], Path, Optional[Credentials], Optional[Cancellation]], ModelFacts]
"""``fetch((model_id, round), path, credentials, cancel)`` writes the global model to ``path``."""


class Template:
    """A global model's archive held for one round: an upload's template, a download's source."""

    def __init__(self, path: Path, facts: Optional[ModelFacts] = None) -> None:
        self.path = path
        self.facts = facts
        self.fetched = facts is not None
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
                    template.facts = self._fetch(key, template.path, credentials, stop)
                    template.fetched = True
        except BaseException:
            self.release(key, template)
            raise
        return template

    def lookup(self, key: Tuple[str, int]) -> Optional[Template]:
        """The archive held for ``key``, pinned until :meth:`release`; ``None`` if none is.

        Never fetches, and never waits for a fetch in progress.
        """
        with self._lock:
            template = self._entries.get(key)
            if template is None or not template.fetched or not template.path.exists():
                return None
            self._entries.move_to_end(key)
            template.users += 1
            return template

    def adopt(self, key: Tuple[str, int], source: Path, facts: ModelFacts) -> bool:
        """Hold ``source`` (a fetched archive of ``key``'s round) without copying it.

        ``source`` gets a second name in the cache (a hard link), so its owner may
        still delete its own name. Nothing changes when ``key`` is held or being
        fetched already, or when the link cannot be made (e.g. a file system
        without hard links): the next caller then fetches as before.

        Returns:
            Whether the archive is now held.
        """
        with self._lock:
            current = self._entries.get(key)
            if current is not None and (not current.fetched or current.path.exists()):
                if current.fetched and facts.vetted and current.facts is not None:
                    # The same round's bytes, now known to pass the restricted reader.
                    current.facts = facts
                return False
            path = self._new_path()
            try:
                os.link(source, path)
            except OSError:
                return False
            if current is not None:
                self._entries.pop(key)
                if current.users == 0:
                    unlink_quietly(current.path)
            self._entries[key] = Template(path, facts)
            self._evict_locked()
            return True

    def release(self, key: Tuple[str, int], template: Template) -> None:
        """Unpin ``template`` (from :meth:`acquire` or :meth:`lookup`); the LRU idle ones go."""
        with self._lock:
            template.users -= 1
            current = self._entries.get(key)
            if current is template and not template.fetched and template.users == 0:
                del self._entries[key]  # its fetch failed: the next caller starts afresh
            self._evict_locked()
            if template.users == 0 and current is not template:
                unlink_quietly(template.path)  # replaced while in use: nobody can reach it

    def _evict_locked(self) -> None:
        # The least recently used archives that nobody is reading go.
        excess = len(self._entries) - self.size
        idle = [k for k, t in self._entries.items() if t.users == 0][: max(excess, 0)]
        for old_key in idle:
            unlink_quietly(self._entries.pop(old_key).path)
