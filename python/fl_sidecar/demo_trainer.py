"""The demo's trainer: a real federated-learning client that talks only to its sidecar.

``python -m fl_sidecar.demo_trainer --target unix:///... --index 0`` subscribes
to the sidecar's events and, for each one:

- ``UPDATE_ROUND_START``: downloads the global model, trains it for a few
  epochs on this client's shard of a synthetic classification task, uploads
  the result with its sample size;
- ``MODEL_TEST_ROUND``: downloads the new global model, evaluates it on the
  shared test set, uploads the metrics;
- ``TRAINING_FINISHED``: exits 0.

It prints one JSON object per line on stdout (``{"event": "ready"}``,
``"train"``, ``"test"``, ``"finished"``, ``"error"``) for the demo to
report: each transfer's raw and wire bytes, its coding (``content_encoding``:
``identity``, ``zstd`` or ``fltc``, the delta coding, with the hash of the global
model it was coded against) and what it would have cost in zstd and in delta coding
(:func:`coded_sizes`). Even-numbered clients move the weights as SAFETENSORS (a state_dict,
no pickle), odd-numbered ones as TORCH modules, so both paths run.

This module is a trainer, not library code: it imports torch directly (the
library confines torch to :mod:`fl_sidecar.models`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from fl_sidecar.client import SidecarClient
from fl_sidecar.errors import FlSidecarError
from fl_sidecar.events import EventKind

__all__ = ["NUM_CLASSES", "NUM_FEATURES", "build_model", "client_data", "evaluate", "test_data"]

NUM_FEATURES = 20
NUM_CLASSES = 4
HIDDEN = 2048
"""Width of the two hidden layers: 4.2 M weights, 17 MB in fp32, so the bytes matter."""
TRAIN_SAMPLES = 400
TEST_SAMPLES = 1000
TASK_SEED = 1234


def build_model(seed: int = 0) -> nn.Module:
    """The demo's model: a small MLP (``nn.Sequential``, so any server can unpickle it)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(NUM_FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, NUM_CLASSES),
    )


def _task() -> Tuple[torch.Tensor, torch.Tensor]:
    # A fixed "teacher": class centres and a mixing matrix make the classes
    # overlap enough that a few rounds visibly help, but are learnable.
    g = torch.Generator().manual_seed(TASK_SEED)
    centres = torch.randn(NUM_CLASSES, NUM_FEATURES, generator=g) * 1.2
    mixing = torch.randn(NUM_FEATURES, NUM_FEATURES, generator=g) / NUM_FEATURES**0.5
    return centres, mixing


def _sample(
    count: int, seed: int, class_weights: Optional[List[float]] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    centres, mixing = _task()
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor(class_weights or [1.0] * NUM_CLASSES)
    labels = torch.multinomial(weights, count, replacement=True, generator=g)
    noise = torch.randn(count, NUM_FEATURES, generator=g) * 2.0
    features = (centres[labels] + noise) @ mixing
    return features, labels


def client_data(index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Client ``index``'s training shard (skewed class balance: the clients differ)."""
    weights = [1.0] * NUM_CLASSES
    weights[index % NUM_CLASSES] = 3.0
    return _sample(TRAIN_SAMPLES, TASK_SEED + 1 + index, weights)


def test_data() -> Tuple[torch.Tensor, torch.Tensor]:
    """The shared, balanced test set."""
    return _sample(TEST_SAMPLES, TASK_SEED - 1)


def evaluate(model: nn.Module, data: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, float]:
    """Mean cross-entropy ``loss`` and ``accuracy`` (0-1) of ``model`` on ``data``."""
    features, labels = data
    model.eval()
    with torch.no_grad():
        logits = model(features)
        loss = nn.functional.cross_entropy(logits, labels).item()
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return {"loss": float(loss), "accuracy": float(accuracy)}


def train(model: nn.Module, data: Tuple[torch.Tensor, torch.Tensor], epochs: int) -> float:
    """Train ``model`` in place with SGD (batches of 32); returns the last epoch's mean loss."""
    features, labels = data
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    g = torch.Generator().manual_seed(int(labels.sum().item()))
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        total = 0.0
        for start in range(0, len(labels), 32):
            batch = order[start : start + 32]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(features[batch]), labels[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            total += loss.item() * len(batch)
        last = total / len(labels)
    return last


def coded_sizes(
    data: bytes, encoding: str, wire: int, reference: Optional[bytes]
) -> Dict[str, int]:
    """What a transfer of ``data`` costs in zstd and in delta coding, in bytes.

    The size the transfer really had where it used that coding (``encoding`` ``"zstd"``
    or ``"fltc"``, ``wire`` bytes); otherwise computed by packing the same bytes:
    :func:`fl_sidecar.codec.pack` for zstd, :func:`fl_sidecar.codec.pack_tensors`
    against ``reference`` (the global model the sidecar would code against) for delta,
    the zstd size when there is no reference.
    """
    from fl_sidecar import codec

    zstd = wire if encoding == "zstd" else len(codec.pack(data))
    if encoding == "fltc":
        delta = wire
    elif reference is None:
        delta = zstd
    else:
        delta = min(zstd, len(codec.pack_tensors(data, reference=reference)))
    return {"zstd": zstd, "delta": delta}


def _emit(record: Dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


class DemoTrainer:
    """One client: its data, its sidecar connection, and what it does per event."""

    def __init__(self, sidecar: SidecarClient, index: int, *, fmt: str, epochs: int) -> None:
        self.sidecar = sidecar
        self.index = index
        self.fmt = fmt
        self.epochs = epochs
        self.train_set = client_data(index)
        self.test_set = test_data()
        self.round_global: Optional[bytes] = None  # the global of the last round start

    def _download(self, model_id: str) -> Tuple[nn.Module, bytes, Dict[str, Any]]:
        import fl_sidecar.models as models

        started = time.monotonic()
        data, info = self.sidecar.download_with_info(model_id, format=self.fmt)
        if self.fmt == "safetensors":
            model = build_model()
            model.load_state_dict(models.from_safetensors(data))
        else:
            model = models.load_trusted(data)
        # A download is coded against the global of the last round start (the sidecar's).
        sizes = coded_sizes(data, info.content_encoding, info.wire_bytes, self.round_global)
        stats = {
            "down_raw": info.size,
            "down_wire": info.wire_bytes,
            "down_zstd": sizes["zstd"],
            "down_delta": sizes["delta"],
            "down_encoding": info.content_encoding,
            "down_reference": getattr(info, "reference_sha256", "") or "",
            "down_seconds": time.monotonic() - started,
        }
        return model, data, stats

    def on_round(self, model_id: str, round_: int) -> None:
        """Train round ``round_`` of the global model ``model_id`` and upload the result."""
        import fl_sidecar.models as models

        model, data, stats = self._download(model_id)
        self.round_global = data  # what the upload, and the next downloads, are coded against
        train_loss = train(model, self.train_set, self.epochs)
        started = time.monotonic()
        metrics = {"loss": train_loss}
        samples = len(self.train_set[1])
        body = (
            models.to_safetensors(model.state_dict())
            if self.fmt == "safetensors"
            else models.dump_module(model)
        )
        result = self.sidecar.upload(
            model_id, body, round=round_, sample_size=samples, metrics=metrics, format=self.fmt
        )
        sizes = coded_sizes(body, result.content_encoding, result.wire_bytes, data)
        stats.update(
            event="train",
            client=self.index,
            round=round_,
            format=self.fmt,
            train_loss=train_loss,
            sample_size=samples,
            up_raw=result.raw_bytes,
            up_wire=result.wire_bytes,
            up_zstd=sizes["zstd"],
            up_delta=sizes["delta"],
            up_encoding=result.content_encoding,
            up_reference=getattr(result, "reference_sha256", "") or "",
            up_seconds=time.monotonic() - started,
            http_status=result.http_status,
        )
        _emit(stats)

    def on_test(self, model_id: str, round_: int) -> None:
        """Evaluate the global model of round ``round_`` and upload its metrics."""
        model, _, stats = self._download(model_id)
        metrics = evaluate(model, self.test_set)
        self.sidecar.upload_metrics(model_id, metrics)
        stats.update(event="test", client=self.index, round=round_, **metrics)
        _emit(stats)

    def run(self, training_id: Optional[str], event_timeout: float) -> int:
        """Handle events until the training finishes; returns the exit status."""
        ids = (training_id,) if training_id else ()
        with self.sidecar.watch_events(training_ids=ids) as events:
            _emit({"event": "ready", "client": self.index})
            while True:
                try:
                    event = events.get(timeout=event_timeout)
                except TimeoutError:
                    _emit({"event": "error", "client": self.index, "error": "stalled"})
                    return 3
                if event.kind is EventKind.UPDATE_ROUND_START:
                    self.on_round(event.model_id or "", event.round or 0)
                elif event.kind is EventKind.MODEL_TEST_ROUND:
                    self.on_test(event.model_id or "", event.round or 0)
                elif event.kind is EventKind.TRAINING_FINISHED:
                    _emit({"event": "finished", "client": self.index, "seq": event.seq})
                    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run one demo trainer; returns 0 when the training finished."""
    parser = argparse.ArgumentParser(prog="python -m fl_sidecar.demo_trainer")
    parser.add_argument("--target", required=True, help="the sidecar's address")
    parser.add_argument("--index", type=int, default=0, help="this client's number (its shard)")
    parser.add_argument("--format", choices=("safetensors", "torch"), default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--training-id", default=None)
    parser.add_argument(
        "--event-timeout", type=float, default=60.0, help="seconds to wait for each event"
    )
    args = parser.parse_args(argv)
    fmt = args.format or ("safetensors" if args.index % 2 == 0 else "torch")
    torch.set_num_threads(1)
    try:
        with SidecarClient(args.target) as sidecar:
            sidecar.wait_ready(timeout=30.0)
            trainer = DemoTrainer(sidecar, args.index, fmt=fmt, epochs=args.epochs)
            return trainer.run(args.training_id, args.event_timeout)
    except (FlSidecarError, OSError) as exc:
        _emit({"event": "error", "client": args.index, "error": str(exc)})
        return 1


if __name__ == "__main__":
    sys.exit(main())
