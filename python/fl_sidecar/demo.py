"""``fl-sidecar demo``: a real federated training through sidecars, on this machine, in seconds.

What runs (every arrow is a real socket):

    demo trainer 0 --gRPC/unix--> fl-sidecar 0 --HTTP--> embedded dev FL server
    demo trainer 1 --gRPC/unix--> fl-sidecar 1 --HTTP-->        (in this process)
                   <-- events --              <-- notifications (HTTP POST)

1. The embedded dev server starts on a free loopback port.
2. One sidecar per client starts (``python -m fl_sidecar serve``, a subprocess
   on a temporary unix socket, notification endpoint on a free port).
3. The operator's setup: an actor user, one user per client whose
   ``message_endpoint`` is its sidecar's notification URL, the global model (an
   MLP of 4.2 M weights, 17 MB, for a synthetic, seeded classification task: no
   downloads), a
   training with every client for ``--rounds`` rounds, started.
4. One trainer per client (:mod:`fl_sidecar.demo_trainer`, a subprocess)
   follows its sidecar's ``WatchEvents``: download, train, upload; test,
   upload metrics.
5. A table per round: bytes raw, in zstd, in delta coding and as sent (with
   the codings used), seconds, and the global model's test loss and accuracy.
   Every process is stopped at the end.

The exit status is 0 when the training completed, 1 when it failed, stalled
(``--timeout``) or a process died.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, Dict, List, Optional, Sequence, TextIO, Type

from fl_sidecar.client import SidecarClient, SidecarInfo
from fl_sidecar.command import guarded
from fl_sidecar.errors import FlSidecarError
from fl_sidecar.formatting import human_bytes

__all__ = ["DemoError", "SidecarProcess", "register", "run_demo"]


class DemoError(FlSidecarError):
    """The demo could not complete: a process failed, or the training stalled or errored."""


def _python() -> str:
    return sys.executable or "python3"


@dataclass
class SidecarProcess:
    """A ``fl-sidecar serve`` subprocess on a unix socket, started and checked for health.

    Args:
        socket_path: the unix socket it serves on.
        server_url: the FL server's base URL.
        username, password: its FL-server credentials (passed by environment, not argv).
        log_path: where its stdout and stderr go.
        extra_args: more ``serve`` flags.
        env: extra environment variables (e.g. compatibility mode's script settings).
        api_token: the API token the sidecar requires of callers (by environment).
        prefix: a command the sidecar runs under (e.g. ``["ip", "netns", "exec", NAME]``,
            which executes it in place, so :attr:`process` is still the sidecar's).
    """

    socket_path: str
    server_url: str
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    log_path: Optional[str] = None
    extra_args: Sequence[str] = ()
    env: Optional[Dict[str, str]] = None
    api_token: Optional[str] = field(default=None, repr=False)
    prefix: Sequence[str] = ()
    process: Optional[subprocess.Popen[bytes]] = None
    info: Optional[SidecarInfo] = None

    @property
    def target(self) -> str:
        """The gRPC target (``unix:<path>``)."""
        return "unix:" + self.socket_path

    def start(self, timeout: float = 30.0) -> SidecarInfo:
        """Start the process and wait until it answers ``GetInfo``; returns what it says.

        Raises:
            DemoError: it exited or did not answer within ``timeout`` seconds
                (the end of its log is in the message).
        """
        argv = [
            *self.prefix,
            _python(),
            "-m",
            "fl_sidecar",
            "serve",
            "--server-url",
            self.server_url,
            "--notification-port",
            "0",
            *self.extra_args,
        ]
        env = dict(os.environ)
        env.update(self.env or {})
        # By environment, not flag: a training script the sidecar starts in
        # compatibility mode inherits it and so finds this sidecar.
        env["FL_SIDECAR_SOCKET"] = self.socket_path
        if self.username is not None:
            env["FL_SIDECAR_USERNAME"] = self.username
        if self.password is not None:
            env["FL_SIDECAR_PASSWORD"] = self.password
        if self.api_token is not None:
            env["FL_SIDECAR_API_TOKEN"] = self.api_token
        log: Any = subprocess.DEVNULL
        if self.log_path is not None:
            log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        deadline = time.monotonic() + timeout
        with SidecarClient(self.target, timeout=5.0, api_token=self.api_token) as client:
            while True:
                if self.process.poll() is not None:
                    raise DemoError(
                        f"the sidecar exited with status {self.process.returncode}:\n"
                        + self.log_tail()
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stop()
                    raise DemoError(
                        f"the sidecar did not start in {timeout} s:\n" + self.log_tail()
                    )
                if os.path.exists(self.socket_path):
                    try:
                        client.wait_ready(timeout=min(1.0, left))
                        self.info = client.get_info()
                        return self.info
                    except FlSidecarError:
                        pass
                # Waiting on the process itself: returns early if it dies.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=0.05)

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of its log ("" without a log)."""
        if self.log_path is None or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            text = f.read()[-16384:].decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def __enter__(self) -> SidecarProcess:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()


class _Trainer:
    """A demo trainer subprocess whose JSON-line output a thread puts into ``records``."""

    def __init__(
        self,
        index: int,
        target: str,
        training_id: str,
        log_path: str,
        epochs: int,
        records: queue.Queue[Dict[str, Any]],
    ) -> None:
        self.index = index
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                _python(),
                "-m",
                "fl_sidecar.demo_trainer",
                "--target",
                target,
                "--index",
                str(index),
                "--training-id",
                training_id,
                "--epochs",
                str(epochs),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._reader = threading.Thread(
            target=self._read, args=(self.process.stdout, records), daemon=True
        )
        self._reader.start()

    def _read(self, stdout: IO[bytes], records: queue.Queue[Dict[str, Any]]) -> None:
        for line in stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.put(record)
        records.put({"event": "exit", "client": self.index})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


def _round_bytes(records: List[Dict[str, Any]], tests: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A round's transfers, all clients: the round-start downloads, the uploads, the tests'
    downloads of the new global. Sums of raw, zstd, delta and wire bytes; the codings used."""
    sums = {"raw": 0, "zstd": 0, "delta": 0, "wire": 0}
    codings = set()
    for record in records:
        for side in ("down", "up"):
            for what in sums:
                sums[what] += int(record.get(f"{side}_{what}", 0))
            codings.add(str(record.get(f"{side}_encoding", "")))
    for record in tests:
        for what in sums:
            sums[what] += int(record.get(f"down_{what}", 0))
        codings.add(str(record.get("down_encoding", "")))
    return {**sums, "codings": "/".join(sorted(codings - {""})) or "-"}


def _print_table(
    rounds: int,
    baseline: Dict[str, float],
    train: Dict[int, List[Dict[str, Any]]],
    test: Dict[int, List[Dict[str, Any]]],
    round_seconds: Dict[int, float],
    out: TextIO,
) -> None:
    header = (
        f"{'round':>5} {'clients':>7} {'raw':>10} {'zstd':>10} {'delta':>10} {'sent':>10} "
        f"{'sent as':>15} {'seconds':>8} {'train loss':>10} {'test loss':>9} {'accuracy':>8}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    print(
        f"{'init':>5} {'':>7} {'':>10} {'':>10} {'':>10} {'':>10} {'':>15} {'':>8} {'':>10} "
        f"{baseline['loss']:>9.4f} {baseline['accuracy']:>8.1%}",
        file=out,
    )
    for r in range(rounds):
        records = train.get(r, [])
        tests = test.get(r + 1, [])
        b = _round_bytes(records, tests)
        train_loss = (
            sum(x["train_loss"] for x in records) / len(records) if records else float("nan")
        )
        loss = sum(x["loss"] for x in tests) / len(tests) if tests else float("nan")
        accuracy = sum(x["accuracy"] for x in tests) / len(tests) if tests else float("nan")
        print(
            f"{r:>5} {len(records):>7} {human_bytes(b['raw']):>10} {human_bytes(b['zstd']):>10} "
            f"{human_bytes(b['delta']):>10} {human_bytes(b['wire']):>10} {b['codings']:>15} "
            f"{round_seconds.get(r, float('nan')):>8.2f} {train_loss:>10.4f} {loss:>9.4f} "
            f"{accuracy:>8.1%}",
            file=out,
        )


def run_demo(
    *,
    clients: int = 2,
    rounds: int = 3,
    epochs: int = 2,
    timeout: float = 120.0,
    keep: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Run the demo; returns the exit status (0: the training completed).

    Args:
        clients: number of clients (one sidecar and one trainer each).
        rounds: training rounds (the training's ``target_num_updates``).
        epochs: local epochs per round.
        timeout: seconds the whole training may take before it counts as stalled.
        keep: keep the temporary directory with every process's log.
        out: where the report goes.
    """
    import fl_sidecar.models as models
    from fl_sidecar.demo_trainer import build_model, evaluate, test_data
    from fl_sidecar.devserver import DevServer
    from fl_sidecar.server_api import Credentials, FlServerClient

    # Unix socket paths must stay short (108 bytes): a short temp dir.
    workdir = tempfile.mkdtemp(prefix="fl-demo-", dir="/tmp" if os.path.isdir("/tmp") else None)
    sidecars: List[SidecarProcess] = []
    trainers: List[_Trainer] = []
    devserver = DevServer(host="127.0.0.1", port=0, db=":memory:")
    started = time.monotonic()
    status = 1

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    try:
        url = devserver.start()
        say(f"dev FL server        {url}")
        api = FlServerClient(url, retries=1)
        actor_password = secrets.token_hex(12)
        api.create_user(
            "demo-actor", actor_password, "http://127.0.0.1:9/", actor=True, client=False
        )
        actor_creds = Credentials.basic("demo-actor", actor_password)
        user_ids: List[str] = []
        for i in range(clients):
            username, password = f"demo-client-{i}", secrets.token_hex(12)
            sidecar = SidecarProcess(
                socket_path=os.path.join(workdir, f"sidecar-{i}.sock"),
                server_url=url,
                username=username,
                password=password,
                log_path=os.path.join(workdir, f"sidecar-{i}.log"),
            )
            sidecars.append(sidecar)
            info = sidecar.start()
            user = api.create_user(username, password, info.notification_url)
            user_ids.append(str(user["id"]))
            say(
                f"sidecar {i}            {sidecar.target} (notifications {info.notification_url},"
                f" codec {info.codec} level {info.codec_level})"
            )

        initial = build_model(seed=0)
        baseline = evaluate(initial, test_data())
        model_path = os.path.join(workdir, "global-model.pt")
        models.save_module(initial, model_path)
        model_id = api.upload_global_model(
            "demo-mlp", "fl-sidecar demo MLP", model_path, credentials=actor_creds
        )
        training_id = api.create_training(
            model_id,
            target_num_updates=rounds,
            metric_names=["loss", "accuracy"],
            aggregation_method="FedAvg",
            clients=user_ids,
            credentials=actor_creds,
        )
        say(f"global model         {model_id} ({os.path.getsize(model_path)} bytes)")
        say(f"training             {training_id}: {clients} clients, {rounds} rounds, FedAvg")

        merged: queue.Queue[Dict[str, Any]] = queue.Queue()
        for i, sidecar in enumerate(sidecars):
            log_path = os.path.join(workdir, f"trainer-{i}.log")
            trainers.append(_Trainer(i, sidecar.target, training_id, log_path, epochs, merged))
        deadline = time.monotonic() + timeout

        ready = 0
        while ready < clients:
            record = _next_record(merged, deadline)
            if record.get("event") == "ready":
                ready += 1
            elif record.get("event") in ("error", "exit"):
                raise DemoError(f"trainer {record.get('client')} failed: {record}")
        api.start_training(training_id, credentials=actor_creds)
        say("training started; the trainers follow their sidecars' events\n")

        train: Dict[int, List[Dict[str, Any]]] = {}
        test: Dict[int, List[Dict[str, Any]]] = {}
        round_seconds: Dict[int, float] = {}
        round_started = time.monotonic()
        finished = 0
        while finished < clients:
            record = _next_record(merged, deadline)
            event = record.get("event")
            if event == "train":
                train.setdefault(int(record["round"]), []).append(record)
            elif event == "test":
                r = int(record["round"])
                test.setdefault(r, []).append(record)
                if len(test[r]) == clients:
                    # A round is complete when every client tested its result.
                    round_seconds[r - 1] = time.monotonic() - round_started
                    round_started = time.monotonic()
                    say(
                        f"round {r - 1} done in {round_seconds[r - 1]:.2f} s: test accuracy "
                        f"{sum(x['accuracy'] for x in test[r]) / clients:.1%}"
                    )
            elif event == "finished":
                finished += 1
            elif event in ("error", "exit"):
                raise DemoError(f"trainer {record.get('client')} failed: {record}")

        state = api.get_training(training_id, credentials=actor_creds)
        if state.get("state") != "C":
            raise DemoError(f"the training ended in state {state.get('state')!r}, not C")
        say("")
        _print_table(rounds, baseline, train, test, round_seconds, out)
        say(
            "(bytes per round, all clients: each client's download of the round's global "
            "model, its upload, and its test-round download of the new global; raw: the "
            "model files; sent: what the sidecars moved over HTTP, in the codings of 'sent "
            "as' (fltc: delta-coded against the previous global); zstd and delta: what "
            "those codings cost, as sent where the transfer used it, else computed by "
            "packing the same bytes (codec.pack; pack_tensors against the global the "
            "sidecar holds); round 0 fetches the first global whole and includes the "
            "sidecars' first-use imports)"
        )
        final = test.get(rounds, [])
        if final:
            final_accuracy = sum(x["accuracy"] for x in final) / len(final)
            say(
                f"\ntraining {training_id} completed in {time.monotonic() - started:.1f} s: "
                f"accuracy {baseline['accuracy']:.1%} -> {final_accuracy:.1%}"
            )
        status = 0
    except (FlSidecarError, OSError, KeyError, ValueError) as exc:
        say(f"\ndemo failed: {exc}")
        for sidecar in sidecars:
            tail = sidecar.log_tail(15)
            if tail:
                say(f"--- sidecar log {sidecar.socket_path} ---\n{tail}")
        for trainer in trainers:
            if os.path.exists(trainer.log_path):
                with open(trainer.log_path, "rb") as f:
                    tail = f.read()[-4000:].decode("utf-8", "replace")
                if tail.strip():
                    say(f"--- trainer {trainer.index} log ---\n{tail}")
        status = 1
    finally:
        for trainer in trainers:
            trainer.stop()
        for sidecar in sidecars:
            sidecar.stop()
        devserver.stop()
        if keep:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


def _next_record(records: queue.Queue[Dict[str, Any]], deadline: float) -> Dict[str, Any]:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DemoError("the training stalled: no progress before the timeout")
    try:
        return records.get(timeout=left)
    except queue.Empty:
        raise DemoError("the training stalled: no progress before the timeout") from None


def _demo(args: argparse.Namespace) -> int:
    return run_demo(
        clients=args.clients,
        rounds=args.rounds,
        epochs=args.epochs,
        timeout=args.timeout,
        keep=args.keep,
    )


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo", help="a federated training on the embedded dev server through sidecars"
    )
    p.add_argument("--clients", type=int, default=2, help="number of clients (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="training rounds (default 3)")
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round (default 2)")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds before the training counts as stalled"
    )
    p.add_argument("--keep", action="store_true", help="keep every process's log")
    p.set_defaults(func=guarded("demo", _demo))
