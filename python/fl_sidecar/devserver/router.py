"""The dev server's router: path patterns to handlers by method, with OPTIONS, 405 and 404."""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Mapping, Tuple

from .wsgi import HttpError, Request, Response, detail

__all__ = ["Handler", "Router"]

Handler = Callable[..., Response]
"""Called as ``handler(request, **named_groups_of_the_path)``."""


class Router:
    """Routes in the order added; the first pattern that matches the path wins."""

    def __init__(self) -> None:
        self._routes: List[Tuple[re.Pattern[str], Dict[str, Handler]]] = []

    def add(self, pattern: str, handlers: Mapping[str, Handler]) -> None:
        """Route paths matching ``pattern`` (a regex; named groups become arguments)."""
        self._routes.append((re.compile(pattern), dict(handlers)))

    def dispatch(self, request: Request) -> Response:
        """Call the handler of the request's path and method.

        Raises:
            HttpError: 404 for an unknown path; 405 (with ``Allow``) for a
                method the path does not take. ``OPTIONS`` answers 200 with
                the allowed methods.
        """
        for pattern, handlers in self._routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            handler = handlers.get(request.method)
            if request.method == "OPTIONS":
                allow = ", ".join(sorted([*handlers, "OPTIONS"]))
                return Response(200, {"allow": allow.split(", ")}, [("Allow", allow)])
            if handler is None:
                allow = ", ".join(sorted(handlers))
                raise HttpError(
                    405, {"detail": f'Method "{request.method}" not allowed.'}, [("Allow", allow)]
                )
            return handler(request, **match.groupdict())
        raise detail(404, "Not found.")
