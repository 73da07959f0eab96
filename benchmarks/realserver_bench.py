"""The reference client's method vs compat and native, on the dev server in real-server mode.

Run: ``python -m benchmarks realserver [--sizes=128,1024] [--runs=3] [--methods=...]``
(options with ``=``: ``benchmarks`` reads a bare word as a benchmark name), or
``python -m benchmarks.realserver_bench [--sizes 128,1024] [--runs 3]``.

Set-up (real processes, loopback): the embedded dev server as the real FL
server behaves (``compression=False``: no zstd middleware, identity only;
``notification_quirks=True``: repeated and reordered notifications), one
sidecar (``fl-sidecar serve`` on a unix socket, no login of its own: every call
carries the trainer's ``Authorization``). Models: ``nn.Sequential`` of
``Linear(4096, 4096, bias=False)`` in float32 (64 MiB each), saved with
``torch.save`` as a whole module, as the FL server stores them.

Methods, side by side in one run, runs interleaved:

- ``reference``: what the reference client does, written out here. Download:
  ``requests.get(url, headers=auth)`` then
  ``torch.load(io.BytesIO(resp.content), weights_only=False)``. Upload:
  ``torch.save(model, buffer)`` then a multipart ``requests.post`` with
  ``data={owner, round, sample_size, metric_names, metric_values}`` and
  ``files={"model_file": buffer.getvalue()}``.
- ``compat``: :class:`fl_sidecar.compat.Communication` (``download_model``,
  ``upload_model``) through the sidecar.
- ``native``: :meth:`SidecarClient.download_state_dict` /
  :meth:`~SidecarClient.upload_state_dict` (SAFETENSORS) through the sidecar.

Each method moves its own global model (its own training, one fresh model per
run), so no sidecar cache is shared across methods or runs; within a run, the
native upload follows the native download of the same model, as in a round.

Each transfer runs in a fresh trainer process that reports its wall time, its
time to first byte (reference: the response headers, when ``requests`` has
them and starts reading the body; compat and native: the first chunk received
on the gRPC stream) and its peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` after imports and, for uploads, after building the
model to send). The parent samples the sidecar's RSS every 20 ms. "trainer +
sidecar" adds the trainer's peak and the sidecar's peak (both absolute, the
sidecar warmed up by one tiny transfer of each kind first); the reference has
no sidecar. "trainer over start" is the trainer's peak above its RSS when the
clock started (after imports; for uploads, with the model to send built).

Targets: compat and native time <= 1.0x the reference both ways; trainer +
sidecar peak RSS below the reference's both ways; time to first byte < 1 s for
a 1 GiB model. Exit status 1 when a target is missed (each miss is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
METHODS = ("reference", "compat", "native")
OPS = ("download", "upload")
LAYER_MIB = 64  # Linear(4096, 4096) in float32


# --- the trainer process: one transfer, measured -------------------------------------


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); returns that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS") * 1024


def _build_module(size_mib: int, seed: int) -> Any:
    """The benchmark's model: ``size_mib / 64`` float32 ``Linear(4096, 4096)`` layers."""
    import torch

    torch.manual_seed(seed)
    if size_mib == 0:  # the warm-up's tiny model
        return torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        layers = []
        for _ in range(max(1, size_mib // LAYER_MIB)):
            linear = torch.nn.Linear(4096, 4096, bias=False, device="meta")
            linear.weight = torch.nn.Parameter(torch.randn(4096, 4096) * 0.01)
            layers.append(linear)
        return torch.nn.Sequential(*layers)


def _mark_first_chunk(client: Any, progress: Any) -> None:
    """Instrumentation only: compat's own download calls, with ``progress`` where none is given.

    Whichever of the client's download methods compat uses (the whole bytes,
    or the streamed module), the first chunk on the gRPC stream is marked.
    """
    for name in ("download", "download_with_info", "download_module", "download_to_file"):
        plain = getattr(client, name, None)
        if plain is None:
            continue

        def marked(*args: Any, _plain: Any = plain, **kwargs: Any) -> Any:
            if kwargs.get("progress") is None:
                kwargs["progress"] = progress
            return _plain(*args, **kwargs)

        setattr(client, name, marked)


def _child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Do the one transfer ``spec`` names; returns seconds, ttfb and peak RSS."""
    import io

    import torch

    method, op = spec["method"], spec["op"]
    auth = spec["authorization"]
    model = _build_module(spec["size_mib"], seed=1) if op == "upload" else None
    marks: Dict[str, float] = {}

    def first_chunk(done: int, total: int) -> None:
        if done > 0 and "first" not in marks:
            marks["first"] = time.perf_counter()

    if method == "reference":
        import requests

        url = f"{spec['url']}/api/models/{spec['model_id']}/"

        def on_response(resp: Any, *args: Any, **kwargs: Any) -> Any:
            marks["first"] = time.perf_counter()  # headers in; the body is read after this
            return resp

        baseline = _reset_peak()
        started = time.perf_counter()
        if op == "download":
            resp = requests.get(
                url, headers={"Authorization": auth}, hooks={"response": on_response}
            )
            resp.raise_for_status()
            loaded = torch.load(io.BytesIO(resp.content), weights_only=False)
            del resp
            assert isinstance(loaded, torch.nn.Module)
        else:
            buffer = io.BytesIO()
            torch.save(model, buffer)
            resp = requests.post(
                url,
                headers={"Authorization": auth},
                data={
                    "owner": spec["owner"],
                    "round": "0",
                    "sample_size": "10",
                    "metric_names": ["accuracy"],
                    "metric_values": ["0.5"],
                },
                files={"model_file": buffer.getvalue()},
            )
            if resp.status_code != 201:
                raise RuntimeError(f"upload answered {resp.status_code}: {resp.text[:200]}")
    elif method == "compat":
        from fl_sidecar.compat import Communication

        Communication.sidecar_target = spec["target"]
        comm = Communication(spec["owner"], spec["training_id"], 0, spec["model_id"], auth)
        _mark_first_chunk(comm._client(), first_chunk)
        client = comm._client()
        client.get_info()  # connected before the clock starts, as after a round's first call
        baseline = _reset_peak()
        started = time.perf_counter()
        if op == "download":
            loaded = comm.download_model()
            assert isinstance(loaded, torch.nn.Module)
        else:
            assert comm.upload_model(model, {"accuracy": 0.5}, 10)
        comm.close()
    elif method == "native":
        from fl_sidecar.client import CallCredentials, SidecarClient

        native = SidecarClient(spec["target"], credentials=CallCredentials.header(auth))
        native.get_info()
        baseline = _reset_peak()
        started = time.perf_counter()
        if op == "download":
            state = native.download_state_dict(spec["model_id"], progress=first_chunk)
            assert len(state) == max(1, spec["size_mib"] // LAYER_MIB)
        else:
            assert model is not None
            reply = native.upload_state_dict(
                spec["model_id"],
                model.state_dict(),
                round=0,
                sample_size=10,
                metrics={"accuracy": 0.5},
                owner=spec["owner"],
            )
            assert reply.http_status == 201, reply
        native.close()
    else:
        raise SystemExit(f"unknown method {method!r}")
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM") * 1024
    ttfb = marks["first"] - started if op == "download" and "first" in marks else None
    return {"seconds": seconds, "ttfb": ttfb, "peak": peak, "baseline": baseline}


# --- the parent: servers, trainings, the table ----------------------------------------


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    extra = [str(REPO / "python"), str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join([*extra, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.start_rss = self.process.memory_info().rss
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except Exception:  # the process is gone: keep what we saw
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _spawn(spec: Dict[str, Any]) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.realserver_bench", "--child", json.dumps(spec)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env=_child_env(), timeout=900, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({spec['method']} {spec['op']}):\n{proc.stderr[-3000:]}")
    result: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _save_model(path: Path, size_mib: int) -> None:
    import torch

    torch.save(_build_module(size_mib, seed=0), path)


class Trainings:
    """One training per (size, run, method): its own global model and its own uploader."""

    def __init__(self, url: str, notification_url: str) -> None:
        from fl_sidecar.server_api import Credentials, FlServerClient

        self.url = url
        suffix = f"{os.getpid()}-{time.monotonic_ns()}"
        self._anon = FlServerClient(url, retries=1, timeout=900)
        actor = self._anon.create_user(
            f"actor-{suffix}", "pw-actor", "http://127.0.0.1:9/", actor=True, client=False
        )
        self._actor_id = str(actor["id"])
        self._op = FlServerClient(url, Credentials.token(actor["token"]), timeout=900)
        self._suffix = suffix
        self._notification_url = notification_url
        self._count = 0

    def new(self, model_path: Path) -> Dict[str, str]:
        """A started training of one uploader (plus the actor, who never uploads)."""
        self._count += 1
        user = self._anon.create_user(
            f"c{self._count}-{self._suffix}", "pw", self._notification_url
        )
        model_id = self._op.upload_global_model(f"m{self._count}", "bench", model_path)
        # The actor as a participant that never uploads: no aggregation mid-benchmark.
        training_id = self._op.create_training(
            model_id,
            target_num_updates=1,
            metric_names=["accuracy"],
            clients=[str(user["id"]), self._actor_id],
        )
        self._op.start_training(training_id)
        return {
            "model_id": str(model_id),
            "training_id": str(training_id),
            "owner": str(user["id"]),
            "authorization": "Token " + str(user["token"]),
        }

    def close(self) -> None:
        self._op.close()
        self._anon.close()


Key = Tuple[int, str, str]  # size MiB, op, method


def _median(rows: List[Dict[str, Any]], field: str) -> Optional[float]:
    values = [r[field] for r in rows if r.get(field) is not None]
    return float(statistics.median(values)) if values else None


def _warm_up(trainings: Trainings, workdir: Path, target: str) -> None:
    """One tiny download and upload of each kind, so the sidecar's lazy imports are done."""
    tiny = workdir / "tiny.pt"
    _save_model(tiny, 0)
    for method in ("compat", "native"):
        t = trainings.new(tiny)
        for op in OPS:
            _spawn(
                {
                    **t,
                    "method": method,
                    "op": op,
                    "url": trainings.url,
                    "target": target,
                    "size_mib": 0,
                }
            )


def run(sizes: Sequence[int], runs: int, methods: Sequence[str]) -> int:
    """Measure, print the table and the verdicts; returns 1 when a target is missed."""
    from fl_sidecar.demo import SidecarProcess
    from fl_sidecar.devserver import DevServer

    workdir = Path(tempfile.mkdtemp(prefix="flrs-", dir="/tmp"))
    server = DevServer(
        data_dir=workdir / "devserver",
        password_iterations=1000,
        compression=False,
        notification_quirks=True,
    )
    sidecar: Optional[SidecarProcess] = None
    trainings: Optional[Trainings] = None
    results: Dict[Key, List[Dict[str, Any]]] = {}
    try:
        url = server.start()
        sidecar = SidecarProcess(
            socket_path=str(workdir / "sidecar.sock"),
            server_url=url,
            log_path=str(workdir / "sidecar.log"),
            env=_child_env(),
        )
        info = sidecar.start(timeout=120)
        assert sidecar.process is not None
        trainings = Trainings(url, info.notification_url or "http://127.0.0.1:9/")
        _warm_up(trainings, workdir, sidecar.target)
        for size in sizes:
            model_path = workdir / f"global-{size}.pt"
            print(f"building a {size} MiB float32 model ...", flush=True)
            _save_model(model_path, size)
            for r in range(runs):
                for method in methods:
                    t = trainings.new(model_path)
                    for op in OPS:
                        spec = {
                            **t,
                            "method": method,
                            "op": op,
                            "url": url,
                            "target": sidecar.target,
                            "size_mib": size,
                        }
                        with RssSampler(sidecar.process.pid) as sampler:
                            got = _spawn(spec)
                        got["trainer_over"] = got["peak"] - got["baseline"]
                        got["sidecar_peak"] = sampler.peak
                        got["sidecar_over"] = sampler.peak - sampler.start_rss
                        got["total_peak"] = got["peak"] + (
                            sampler.peak if method != "reference" else 0
                        )
                        results.setdefault((size, op, method), []).append(got)
                        ttfb = f"{got['ttfb']:.3f}" if got["ttfb"] is not None else "-"
                        print(
                            f"  {size:5} MiB run {r + 1}/{runs} {op:8} {method:9} "
                            f"{got['seconds']:7.3f} s ttfb {ttfb:>6} s trainer peak "
                            f"{got['peak'] / MIB:6.0f} MiB sidecar peak "
                            f"{got['sidecar_peak'] / MIB:5.0f} MiB",
                            flush=True,
                        )
            model_path.unlink()
    finally:
        if trainings is not None:
            trainings.close()
        if sidecar is not None:
            sidecar.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    _print_table(results, runs)
    return _verdicts(results)


def _print_table(results: Dict[Key, List[Dict[str, Any]]], runs: int) -> None:
    print()
    print(
        f"Dev server in real-server mode (no zstd, notification quirks on), loopback, unix-socket "
        f"sidecar; medians of {runs} runs, each transfer in a fresh trainer process; "
        f"{os.cpu_count()} cores"
    )
    print(
        "| model | op | method | time s | vs reference | TTFB s | trainer peak MiB | "
        "trainer over start MiB | sidecar peak MiB | trainer + sidecar MiB | vs reference |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (size, op, method), rows in sorted(
        results.items(), key=lambda kv: (kv[0][0], OPS.index(kv[0][1]), METHODS.index(kv[0][2]))
    ):
        ref = results.get((size, op, "reference"))
        t = _median(rows, "seconds") or 0.0
        t_ref = _median(ref, "seconds") if ref else None
        ttfb = _median(rows, "ttfb")
        total = _median(rows, "total_peak") or 0.0
        total_ref = _median(ref, "total_peak") if ref else None
        side = "-" if method == "reference" else f"{(_median(rows, 'sidecar_peak') or 0) / MIB:.0f}"
        print(
            f"| {size} MiB | {op} | {method} | {t:.2f} | "
            f"{f'{t / t_ref:.2f}x' if t_ref else '-'} | "
            f"{f'{ttfb:.2f}' if ttfb is not None else '-'} | "
            f"{(_median(rows, 'peak') or 0) / MIB:.0f} | "
            f"{(_median(rows, 'trainer_over') or 0) / MIB:.0f} | {side} | {total / MIB:.0f} | "
            f"{f'{total / total_ref:.2f}x' if total_ref else '-'} |"
        )


def _verdicts(results: Dict[Key, List[Dict[str, Any]]]) -> int:
    status = 0
    print()
    for (size, op, method), rows in sorted(results.items()):
        if method == "reference":
            continue
        ref = results.get((size, op, "reference"))
        if ref:
            ratio = (_median(rows, "seconds") or 0) / (_median(ref, "seconds") or 1)
            ok = ratio <= 1.0
            status |= 0 if ok else 1
            miss = "" if ok else f" (misses by {100 * (ratio - 1):.0f}%)"
            print(
                f"target: {size} MiB {op} {method} time {ratio:.2f}x <= 1.00x the reference: "
                f"{'met' if ok else 'MISSED'}{miss}"
            )
            mem = (_median(rows, "total_peak") or 0) / (_median(ref, "total_peak") or 1)
            ok = mem < 1.0
            status |= 0 if ok else 1
            over = (_median(rows, "total_peak") or 0) - (_median(ref, "total_peak") or 0)
            miss = "" if ok else f" (misses by {over / MIB:.0f} MiB, {100 * (mem - 1):.0f}%)"
            print(
                f"target: {size} MiB {op} {method} trainer + sidecar peak RSS {mem:.2f}x < 1.00x "
                f"the reference's: {'met' if ok else 'MISSED'}{miss}"
            )
        if op == "download" and size >= 1024:
            ttfb = _median(rows, "ttfb")
            ok = ttfb is not None and ttfb < 1.0
            status |= 0 if ok else 1
            miss = "" if ok or ttfb is None else f" (misses by {ttfb - 1.0:.2f} s)"
            shown = f"{ttfb:.2f} s" if ttfb is not None else "unmeasured"
            print(
                f"target: {size} MiB download {method} time to first byte {shown} < 1 s: "
                f"{'met' if ok else 'MISSED'}{miss}"
            )
    return status


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark (or, with ``--child``, one measured transfer); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realserver_bench")
    parser.add_argument("--sizes", default="128,1024", help="model sizes in MiB (128,1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (3)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return run(sizes, args.runs, methods)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "python"))
    sys.exit(main())
