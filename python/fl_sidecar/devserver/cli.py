"""``fl-sidecar devserver``: run the embedded dev FL server in the foreground.

Stops gracefully on SIGTERM or SIGINT. ``--ready-file`` receives the base URL
once the socket listens, so scripts and tests wait on it instead of sleeping.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Optional

__all__ = ["register", "run"]

_log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``devserver`` subcommand to the top-level CLI's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "devserver",
        help="run the embedded dev FL server (DLR FL Demonstrator API on SQLite)",
        description=(
            "Serve the DLR FL Demonstrator REST API for local runs and demos: users, "
            "models, trainings, FedAvg, notifications. Loopback only unless --host says otherwise."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port, 0 for any free (8000)")
    parser.add_argument("--db", default=":memory:", help="SQLite file, or :memory: (the default)")
    parser.add_argument(
        "--data-dir", default=None, help="directory for model files (a temporary one by default)"
    )
    parser.add_argument(
        "--ready-file", default=None, help="write the base URL to this file once listening"
    )
    parser.add_argument(
        "--notify-timeout", type=float, default=5.0, help="seconds per notification POST (5)"
    )
    parser.add_argument(
        "--max-upload-size",
        type=int,
        default=8 * 1024**3,
        help="largest request body in bytes (8 GiB)",
    )
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="serve without the zstd content-coding middleware (like the real server)",
    )
    parser.add_argument(
        "--notification-quirks",
        action="store_true",
        help="repeat and reorder notifications as the real server does: round starts "
        "three times, tests and finishes twice, the training start after the first round "
        "start, and a late repeat of the previous round start",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (INFO)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit status (0 after a clean stop).

    Raises:
        OSError: the address cannot be bound or the ready file cannot be written.
    """
    from fl_sidecar.devserver import DevServer

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = DevServer(
        host=args.host,
        port=args.port,
        db=args.db,
        data_dir=args.data_dir,
        notify_timeout=args.notify_timeout,
        max_upload_size=args.max_upload_size,
        compression=not args.no_compression,
        notification_quirks=args.notification_quirks,
    )
    try:
        url = server.start()
        if args.ready_file:
            # Written then renamed, so a watcher never reads half a URL.
            tmp = f"{args.ready_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(url + "\n")
            os.replace(tmp, args.ready_file)
        print(f"dev FL server listening on {url}", flush=True)
        while not stop.wait(0.5):
            pass
        _log.info("stopping the dev FL server")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
