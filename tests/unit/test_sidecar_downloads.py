"""The download hand-off: progress while fetching, the model handed over or deleted, never lost."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

import pytest

from fl_sidecar.cancel import REASON_TRAINER_GONE, Cancellation
from fl_sidecar.errors import NotFoundError
from fl_sidecar.sidecar.downloads import (
    PHASE_CONVERTING,
    PHASE_FETCHING,
    DownloadCancelledError,
    DownloadHandoff,
    DownloadProgress,
    EarlyStream,
    ModelChangedError,
    PartFile,
)
from fl_sidecar.sidecar.spool import SpooledModel

Progress = Callable[[int, Optional[int]], None]


def _model(tmp_path: Path, name: str = "model.pt") -> SpooledModel:
    path = tmp_path / name
    path.write_bytes(b"weights")
    return SpooledModel(path, 7, "0" * 64, "torch", "identity", 7)


def _drain(
    handoff: DownloadHandoff,
) -> Tuple[List[Union[DownloadProgress, PartFile]], SpooledModel]:
    updates: List[Union[DownloadProgress, PartFile]] = []
    fetching = handoff.progress(lambda: True)
    while True:
        try:
            updates.append(next(fetching))
        except StopIteration as done:
            return updates, done.value


def test_progress_then_the_model(tmp_path: Path) -> None:
    release = threading.Event()

    def fetch(
        progress: Progress, on_converting: Callable[[], None], cancel: Cancellation, _part: Any
    ) -> Any:
        progress(10, 100)
        progress(50, None)  # a newer count wins; an unknown total is 0
        on_converting()
        release.wait(10)
        return _model(tmp_path)

    handoff = DownloadHandoff(fetch)
    fetching = handoff.progress(lambda: True)
    first = next(fetching)
    assert isinstance(first, DownloadProgress)
    assert first.phase == PHASE_FETCHING and first.done in (10, 50)
    release.set()
    updates: List[Union[DownloadProgress, PartFile]] = [first]
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
    def fetch(
        progress: Progress, on_converting: Callable[[], None], cancel: Cancellation, _part: Any
    ) -> Any:
        raise NotFoundError("download of model m failed: HTTP 400: Model m not found.")

    handoff = DownloadHandoff(fetch)
    with pytest.raises(NotFoundError):
        _drain(handoff)
    handoff.close()


def test_a_trainer_that_leaves_stops_the_download_and_its_late_model_is_deleted(
    tmp_path: Path,
) -> None:
    model = _model(tmp_path)

    def fetch(
        progress: Progress, on_converting: Callable[[], None], cancel: Cancellation, _part: Any
    ) -> Any:
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


def test_each_attempts_part_file_is_handed_over_open_and_closed_with_the_handoff(
    tmp_path: Path,
) -> None:
    part = tmp_path / "model.pt.part"

    def fetch(
        progress: Progress, on_converting: Callable[[], None], cancel: Cancellation, on_part: Any
    ) -> Any:
        part.write_bytes(b"")
        on_part(part, "identity", 7)
        part.write_bytes(b"weights")
        part.rename(tmp_path / "model.pt")  # the reader's file stays readable
        return _model(tmp_path)

    handoff = DownloadHandoff(fetch)
    updates, model = _drain(handoff)
    parts = [u for u in updates if isinstance(u, PartFile)]
    assert len(parts) == 1 and parts[0].total == 7 and parts[0].coding == "identity"
    assert parts[0].file.read() == b"weights"
    handoff.close()
    assert parts[0].file.closed and not model.path.exists()


def _part(path: Path, data: bytes, total: int) -> PartFile:
    path.write_bytes(data)
    return PartFile(open(path, "rb"), "identity", total)  # the stream closes it


def test_an_early_stream_sends_whole_chunks_and_holds_the_last_one_back(tmp_path: Path) -> None:
    body = bytes(range(256)) * 4  # 1024 bytes, in chunks of 300
    part_path = tmp_path / "a.part"
    stream = EarlyStream(_part(part_path, body[:700], len(body)), 300)
    assert list(stream.ready()) == [body[:300], body[300:600]]  # 100 bytes wait for more
    with open(part_path, "ab") as grow:
        grow.write(body[700:])
    # All bytes have arrived, but the last chunk waits for the end of vetting.
    assert list(stream.ready()) == [body[600:900]]
    assert stream.sent == 900
    final = tmp_path / "model.pt"
    final.write_bytes(body)
    rest = list(stream.finish(SpooledModel(final, len(body), "", "torch", "identity", 0)))
    assert b"".join(rest) == body[900:]


def test_an_early_stream_refuses_a_model_other_than_the_one_it_began(tmp_path: Path) -> None:
    body = b"x" * 1000
    final = tmp_path / "model.pt"
    # A retried fetch that got other bytes than those already sent.
    stream = EarlyStream(_part(tmp_path / "a.part", body, len(body)), 100)
    assert len(list(stream.ready())) == 9
    stream.restart(_part(tmp_path / "b.part", b"", len(body)))
    assert list(stream.ready()) == []  # nothing more goes out before the end
    final.write_bytes(b"y" * 1000)
    with pytest.raises(ModelChangedError):
        list(stream.finish(SpooledModel(final, 1000, "", "torch", "identity", 0)))
    # The same bytes after the retry: the rest follows.
    stream = EarlyStream(_part(tmp_path / "c.part", body, len(body)), 100)
    assert len(list(stream.ready())) == 9
    stream.restart(_part(tmp_path / "d.part", b"", len(body)))
    final.write_bytes(body)
    assert list(stream.finish(SpooledModel(final, 1000, "", "torch", "identity", 0))) == [
        body[900:]
    ]
    # Fewer bytes than announced.
    stream = EarlyStream(_part(tmp_path / "e.part", body, len(body)), 100)
    final.write_bytes(body[:999])
    with pytest.raises(ModelChangedError):
        list(stream.finish(SpooledModel(final, 999, "", "torch", "identity", 0)))
