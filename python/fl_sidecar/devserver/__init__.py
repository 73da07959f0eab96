"""The embedded dev FL server: the DLR FL Demonstrator REST API on SQLite.

``DevServer`` serves it on a real socket in background threads (tests, demos);
``fl-sidecar devserver`` runs it from the command line. See docs/devserver.md.
"""

from __future__ import annotations

from .server import DevServer

__all__ = ["DevServer"]
