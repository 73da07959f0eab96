"""The download hand-off: progress while fetching, the model handed over or deleted, never lost."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import pytest

from fl_sidecar.errors import NotFoundError
from fl_sidecar.sidecar.cancel import REASON_TRAINER_GONE, Cancellation
from fl_sidecar.sidecar.downloads import (
    PHASE_CONVERTING,
    PHASE_FETCHING,
    DownloadCancelledError,
    DownloadHandoff,
    DownloadProgress,
)
from fl_sidecar.sidecar.spool import SpooledModel

Progress = Callable[[int, Optional[int]], None]


def _model(tmp_path: Path, name: str = "model.pt") -> SpooledModel:
    path = tmp_path / name
    path.write_bytes(b"weights")
    return SpooledModel(path, 7, "0" * 64, "torch", "identity", 7)


def _drain(handoff: DownloadHandoff) -> Tuple[List[DownloadProgress], SpooledModel]:
    updates: List[DownloadProgress] = []
    fetching = handoff.progress(lambda: True)
    while True:
        try:
            updates.append(next(fetching))
        except StopIteration as done:
            return updates, done.value


def test_progress_then_the_model(tmp_path: Path) -> None:
    release = threading.Event()

    def fetch(progress: Progress, on_converting: Callable[[], None], cancel: Cancellation) -> Any:
        progress(10, 100)
        progress(50, None)  # a newer count wins; an unknown total is 0
        on_converting()
        release.wait(10)
        return _model(tmp_path)

    handoff = DownloadHandoff(fetch)
    fetching = handoff.progress(lambda: True)
    first = next(fetching)
    assert first.phase == PHASE_FETCHING and first.done in (10, 50)
    release.set()
    updates = [first]
    model: Optional[SpooledModel] = None
    while model is None:
        try:
            updates.append(next(fetching))
        except StopIteration as done:
            model = done.value
    assert updates[-1] == DownloadProgress(PHASE_CONVERTING)
    assert DownloadProgress(PHASE_FETCHING, 50, 0) in updates
    assert model is not None and model.path.exists()
    handoff.close()
    assert not model.path.exists()  # closing deletes the model it handed over
    assert handoff.cancel.reason == REASON_TRAINER_GONE


def test_an_error_of_the_download_reaches_the_call(tmp_path: Path) -> None:
    def fetch(progress: Progress, on_converting: Callable[[], None], cancel: Cancellation) -> Any:
        raise NotFoundError("download of model m failed: HTTP 400: Model m not found.")

    handoff = DownloadHandoff(fetch)
    with pytest.raises(NotFoundError):
        _drain(handoff)
    handoff.close()


def test_a_trainer_that_leaves_stops_the_download_and_its_late_model_is_deleted(
    tmp_path: Path,
) -> None:
    model = _model(tmp_path)

    def fetch(progress: Progress, on_converting: Callable[[], None], cancel: Cancellation) -> Any:
        # The HTTP layer would stop at the cancellation; this fetch finishes anyway.
        cancel.wait(10)
        return model

    handoff = DownloadHandoff(fetch)
    with pytest.raises(DownloadCancelledError):
        next(handoff.progress(lambda: False))
    handoff.trainer_gone()
    handoff._thread.join(10)
    assert not handoff._thread.is_alive()
    # The worker finished after the call stopped waiting: the model is deleted, not lost.
    handoff.close()
    assert not model.path.exists()
    assert handoff.cancel.reason == REASON_TRAINER_GONE
