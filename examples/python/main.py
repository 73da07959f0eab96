#!/usr/bin/env python3
"""A trainer written like the DLR reference client's MNIST example, migrated by one import.

The reference example's ``src/main.py`` does ``from dlr.fl.client import
Communication``; this one does ``from fl_sidecar.compat import Communication``
and is otherwise the same program: the client's process (here, the sidecar in
compatibility mode) starts it per notification as

    python main.py train|test --training-id ID --round N --model-id ID

and it downloads the global model, trains or tests it, and uploads the model
with its metrics and sample size, or the test metrics.

Instead of MNIST (a download) it uses a synthetic classification task sized
from the model itself (the first ``nn.Linear``'s inputs, the last one's
outputs), generated with a fixed seed per client.

Environment (as in the reference example): ``FL_DEMONSTRATOR_USERNAME`` and
``CLIENT_ID`` (a UUID) must be set; ``FL_DEMONSTRATOR_PASSWORD`` is the
password (the reference example hard-codes it).
"""

from __future__ import annotations

import zlib
from argparse import ArgumentParser, Namespace
from logging import Logger, basicConfig, getLogger
from os import environ
from typing import Any, Dict, Tuple
from uuid import UUID

import torch.nn

from fl_sidecar.compat import Communication  # was: from dlr.fl.client import Communication

BATCH_SIZE = 16
EPOCHS = 1
LEARNING_RATE = 0.05


def get_datasets(model: torch.nn.Module, client_id: UUID) -> Tuple[Any, Any]:
    """A seeded synthetic classification task shaped for ``model``; (train, test) tensors."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    features, classes = linears[0].in_features, linears[-1].out_features
    task = torch.Generator().manual_seed(7)
    centres = torch.randn(classes, features, generator=task) * 2
    own = torch.Generator().manual_seed(zlib.crc32(client_id.bytes))

    def sample(count: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, classes, (count,), generator=generator)
        data = centres[labels] + torch.randn(count, features, generator=generator)
        return data, labels

    return sample(64, own), sample(64, torch.Generator().manual_seed(8))


def train(model: torch.nn.Module, client_id: UUID) -> Tuple[torch.nn.Module, Dict[str, Any], int]:
    """Train a model; returns the trained model, its metrics and the sample size."""
    (data, target), test_set = get_datasets(model, client_id)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for _ in range(EPOCHS):
        for start in range(0, len(target), BATCH_SIZE):
            optimizer.zero_grad()
            loss = loss_fn(
                model(data[start : start + BATCH_SIZE]), target[start : start + BATCH_SIZE]
            )
            loss.backward()
            optimizer.step()
    metrics = evaluate(model, test_set)
    return model, metrics, len(target)


def evaluate(model: torch.nn.Module, test_set: Tuple[Any, Any]) -> Dict[str, float]:
    """Loss and accuracy of ``model`` on ``test_set``."""
    data, target = test_set
    model.eval()
    with torch.no_grad():
        output = model(data)
        loss = torch.nn.functional.cross_entropy(output, target).item()
        accuracy = (output.argmax(dim=1) == target).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}


def test(model: torch.nn.Module, client_id: UUID) -> Dict[str, Any]:
    """Test a model; returns its metrics."""
    _, test_set = get_datasets(model, client_id)
    return evaluate(model, test_set)


def main(logger: Logger) -> None:
    """Main entry point of the training script."""
    username = environ["FL_DEMONSTRATOR_USERNAME"]  # KeyError if not set, as in the reference
    password = environ.get("FL_DEMONSTRATOR_PASSWORD", "mnist-secret")
    args = parse_args()
    logger.debug("args: %s", args)
    com = Communication.from_user_password(
        args.client_id, args.training_id, args.round, args.model_id, username, password
    )
    model: torch.nn.Module = com.download_model()
    if args.action == "train":
        trained_model, metrics, sample_size = train(model, args.client_id)
        com.upload_model(trained_model, metrics, sample_size)
    elif args.action == "test":
        metrics = test(model, args.client_id)
        com.upload_metrics(metrics)
    else:
        raise ValueError(f"Unknown action: {args.action}")
    logger.info("training script end")


def parse_args() -> Namespace:
    """Parse the command line the client process passes."""
    parser = ArgumentParser(prog="main.py", description="MNIST-style example main.py")
    parser.add_argument("action", choices=["train", "test"], type=str, help="Action to perform")
    parser.add_argument(
        "--client-id", default=UUID(environ["CLIENT_ID"]), type=UUID, help="Client UUID"
    )
    parser.add_argument("--training-id", required=True, type=UUID, help="Training UUID")
    parser.add_argument("--round", required=True, type=int, help="Training round")
    parser.add_argument("--model-id", required=True, type=UUID, help="Global model UUID")
    return parser.parse_args()


if __name__ == "__main__":
    basicConfig(level="INFO")
    main(getLogger("fl.client"))
