"""A real FL stack for trainer-side tests: the dev server, sidecar subprocesses, their clients.

:class:`TrainerStack` starts the embedded dev server (in this process, on a
free loopback port) and an actor user; :meth:`TrainerStack.add_client` starts
one ``fl-sidecar serve`` subprocess on a temporary unix socket (notification
endpoint on a free port), registers a client user whose message endpoint is
that sidecar's notification URL, and returns a :class:`SidecarClient` to it.
Module-scoped fixtures share one stack across a test module's tests.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from conftest import DevServerHandle, User

from fl_sidecar.client import SidecarClient
from fl_sidecar.demo import SidecarProcess
from fl_sidecar.devserver import DevServer

__all__ = ["ClientSide", "TrainerStack", "post_notification", "tiny_module", "tiny_module_bytes"]


def tiny_module(seed: int = 0) -> Any:
    """A small ``nn.Sequential`` (4 -> 3 -> 2), as the shared ``tiny_model`` fixture builds."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def tiny_module_bytes(seed: int = 0) -> bytes:
    """``torch.save`` of :func:`tiny_module`."""
    import torch

    buffer = io.BytesIO()
    torch.save(tiny_module(seed), buffer)
    return buffer.getvalue()


def post_notification(url: str, payload: Mapping[str, Any], timeout: float = 10.0) -> int:
    """POST a notification as the FL server does; returns the HTTP status."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        status: int = response.status
        return status


@dataclass
class ClientSide:
    """One client: its FL user, its sidecar process and a gRPC client to that sidecar."""

    user: User
    sidecar: SidecarProcess
    client: SidecarClient

    @property
    def notification_url(self) -> str:
        """Where the FL server POSTs this client's notifications."""
        assert self.sidecar.info is not None
        return self.sidecar.info.notification_url


class TrainerStack:
    """The dev server plus any number of sidecar-backed clients; :meth:`close` stops them all."""

    def __init__(self, *, notification_quirks: bool = False) -> None:
        """Start the dev server; ``notification_quirks`` repeats and reorders its notifications."""
        # Unix socket paths must stay under 108 bytes: a short directory.
        self.workdir = Path(tempfile.mkdtemp(prefix="fls-", dir="/tmp"))
        self.server = DevServer(
            data_dir=self.workdir / "devserver",
            notify_timeout=5.0,
            notify_retry_delays=(0.05, 0.1, 0.2),
            password_iterations=1000,
            notification_quirks=notification_quirks,
        )
        self.server.start()
        self.devserver = DevServerHandle(self.server)
        self.actor = self.devserver.create_user(actor=True, client=False)
        self.clients: List[ClientSide] = []

    def add_client(
        self,
        *,
        extra_args: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
        register: bool = True,
        api_token: Optional[str] = None,
        username: Optional[str] = None,
        password: Optional[str] = None,
    ) -> ClientSide:
        """Start a sidecar for a new client user (registered with its notification URL)."""
        index = len(self.clients)
        username = username or f"client{index}-{os.getpid()}"
        password = password or f"pw-{index}-secret"
        sidecar = SidecarProcess(
            socket_path=str(self.workdir / f"s{index}.sock"),
            server_url=self.devserver.url,
            username=username,
            password=password,
            log_path=str(self.workdir / f"sidecar-{index}.log"),
            extra_args=tuple(extra_args),
            env=env,
            api_token=api_token,
        )
        try:
            info = sidecar.start(timeout=60.0)
        except BaseException:
            sidecar.stop()
            raise
        if register:
            user = self.devserver.create_user(
                username, password, message_endpoint=info.notification_url
            )
        else:
            user = User("", username, password, "", info.notification_url)
        side = ClientSide(user, sidecar, SidecarClient(sidecar.target, timeout=30.0))
        self.clients.append(side)
        return side

    def training(
        self,
        clients: Sequence[ClientSide],
        *,
        rounds: int,
        model: Optional[bytes] = None,
        start: bool = False,
    ) -> Dict[str, str]:
        """Upload a global model and create a training of ``clients``; ids as a dict."""
        model_id = self.devserver.upload_model(self.actor, model or tiny_module_bytes())
        training_id = self.devserver.create_training(
            self.actor,
            model_id,
            [c.user for c in clients],
            target_num_updates=rounds,
            metric_names=("accuracy",),
        )
        if start:
            self.devserver.start_training(self.actor, training_id)
        return {"model_id": model_id, "training_id": training_id}

    def logs(self) -> str:
        """Every sidecar's log tail, for assertion messages."""
        return "\n".join(
            f"--- sidecar {i} ---\n{c.sidecar.log_tail(20)}" for i, c in enumerate(self.clients)
        )

    def close(self) -> None:
        """Stop every sidecar and the dev server; remove the temporary directory."""
        for side in self.clients:
            side.client.close()
            side.sidecar.stop()
        self.server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
