"""The upload journal, the cancellable upload body and the upload status rules, without sockets."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import List

import grpc
import pytest

from fl_sidecar import errors
from fl_sidecar.cancel import REASON_SHUTDOWN, REASON_TRAINER_GONE, Cancellation
from fl_sidecar.server_api import _multipart_parts, _StreamBody
from fl_sidecar.sidecar import uploads
from fl_sidecar.sidecar.status import status_for, upload_failure
from fl_sidecar.sidecar.transfers import _upload_state_after
from fl_sidecar.sidecar.uploads import UploadJournal


def _journal(tmp_path: Path) -> UploadJournal:
    return UploadJournal(tmp_path / "journal")


def test_a_sidecar_that_never_uploads_leaves_no_journal(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    assert journal.get("u1") is None
    assert not (tmp_path / "journal").exists()
    journal.sending("u1", "m", 3)
    assert stat.S_IMODE(os.stat(tmp_path / "journal").st_mode) == 0o700


def test_an_upload_goes_from_sending_to_its_outcome_durably(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.claim("u1", "m", 3)
    journal.sending("u1", "m", 3)
    record = journal.get("u1")
    assert record is not None and (record.state, record.body_complete) == ("sending", False)
    journal.body_complete("u1")
    journal.finish("u1", "accepted", http_status=201, detail="Model Update Accepted")
    journal.release("u1")
    # A fresh journal on the same directory (a restarted sidecar) reads the same.
    record = _journal(tmp_path).get("u1")
    assert record is not None
    assert (record.state, record.http_status, record.model_id, record.round) == (
        "accepted",
        201,
        "m",
        3,
    )
    assert record.body_complete and record.pid == os.getpid()
    assert [p.suffix for p in (tmp_path / "journal").iterdir()] == [".json"]  # no temp files


def test_a_crash_before_the_last_byte_is_not_sent_after_it_unknown(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.sending("cut-short", "m", 0)
    journal.sending("all-out", "m", 0)
    journal.body_complete("all-out")
    # The writer (this pid) counts as dead for a journal opened by the same pid:
    # a restarted container's sidecar often gets its predecessor's pid.
    restarted = _journal(tmp_path)
    cut, out = restarted.get("cut-short"), restarted.get("all-out")
    assert cut is not None and cut.state == "not_sent" and "cannot have it" in cut.detail
    assert out is not None and out.state == "unknown" and "may have it" in out.detail


def test_an_upload_of_a_live_sidecar_is_left_alone(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.sending("u1", "m", 0)
    path = next((tmp_path / "journal").glob("*.json"))
    data = json.loads(path.read_text())
    data["pid"] = os.getppid()  # another process that is alive: the test runner's parent
    path.write_text(json.dumps(data))
    record = _journal(tmp_path).get("u1")
    assert record is not None and record.state == "sending"


def test_claims_refuse_what_must_not_be_sent_again(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.claim("busy", "m", 0)
    with pytest.raises(errors.SidecarError) as busy:
        journal.claim("busy", "m", 0)
    assert busy.value.code == "ABORTED"
    for upload_id, state, code in (
        ("done", "accepted", "ALREADY_EXISTS"),
        ("maybe", "unknown", "FAILED_PRECONDITION"),
    ):
        journal.sending(upload_id, "m", 0)
        journal.finish(upload_id, state, http_status=201 if state == "accepted" else 0)
        with pytest.raises(errors.SidecarError) as refused:
            journal.claim(upload_id, "m", 0)
        assert refused.value.code == code
    # Nothing arrived, or the server refused it: the id may be used again.
    for upload_id, state in (("cut", "not_sent"), ("no", "rejected")):
        journal.sending(upload_id, "m", 0)
        journal.finish(upload_id, state)
        journal.claim(upload_id, "m", 0)
        journal.release(upload_id)
    with pytest.raises(ValueError):
        journal.finish("cut", "sending")


def test_old_records_are_pruned_at_start(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.sending("old", "m", 0)
    journal.finish("old", "accepted", http_status=201)
    path = next((tmp_path / "journal").glob("*.json"))
    data = json.loads(path.read_text())
    data["updated_at"] = time.time() - uploads.RETENTION_SECONDS - 60
    path.write_text(json.dumps(data))
    assert _journal(tmp_path).get("old") is None
    assert list((tmp_path / "journal").iterdir()) == []


def test_a_journal_others_may_write_to_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(errors.ConfigurationError, match="writable by others"):
        UploadJournal(directory)


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "ü", "tab\there"])
def test_upload_ids_are_checked(bad: str) -> None:
    with pytest.raises(errors.SidecarError) as caught:
        uploads.check_upload_id(bad)
    assert caught.value.code == "INVALID_ARGUMENT"


# --- the upload body: cancellable up to its last byte ---------------------------


def _body(tmp_path: Path, cancel: Cancellation, completed: List[int]) -> _StreamBody:
    model = tmp_path / "model.pt"
    model.write_bytes(b"x" * (3 * 1024 * 1024 + 5))  # four 1 MiB reads
    parts = _multipart_parts([("round", "0")], "model_file", model, "B")
    return _StreamBody(parts, cancel=cancel, on_complete=lambda: completed.append(1))


def test_a_cancelled_body_stops_before_its_last_byte(tmp_path: Path) -> None:
    cancel = Cancellation()
    completed: List[int] = []
    body = _body(tmp_path, cancel, completed)
    blocks = iter(body)
    next(blocks)
    next(blocks)
    cancel.cancel(REASON_SHUTDOWN)
    with pytest.raises(errors.TransferCancelledError) as caught:
        next(blocks)
    assert caught.value.shutting_down
    assert "stored nothing" in str(caught.value)
    assert completed == [] and not body.complete


def test_the_completion_is_recorded_just_before_the_last_block(tmp_path: Path) -> None:
    cancel = Cancellation()
    completed: List[int] = []
    body = _body(tmp_path, cancel, completed)
    sent = 0
    for block in body:
        sent += len(block)
        if sent < len(body):
            assert completed == [], "recorded before the last block"
        else:
            assert completed == [1] and body.complete
    assert sent == len(body)


# --- what the trainer is told ---------------------------------------------------


def test_retry_is_said_only_when_nothing_arrived() -> None:
    unavailable = errors.ServerUnavailableError("upload failed: connection refused")
    assert _upload_state_after(unavailable, body_complete=False) == "not_sent"
    # The same error after the whole request went out (a zstd body answered 415,
    # then a failing identity attempt) is not a certain non-arrival.
    assert _upload_state_after(unavailable, body_complete=True) == "unknown"
    unknown = errors.UploadOutcomeUnknownError("no answer")
    assert _upload_state_after(unknown, body_complete=False) == "unknown"
    conflict = errors.ConflictError("not currently in round 5", status=400)
    assert _upload_state_after(conflict, body_complete=True) == "rejected"
    shrank = errors.ModelError("shrank while being sent")
    assert _upload_state_after(shrank, body_complete=False) == "not_sent"

    def code(exc: Exception, state: str) -> str:
        return str(status_for(upload_failure(exc, "u1", state)).name)

    assert code(unavailable, "not_sent") == "UNAVAILABLE"
    assert code(unavailable, "unknown") == "UNKNOWN"
    assert code(errors.TransferCancelledError("x", shutting_down=True), "not_sent") == (
        "UNAVAILABLE"
    )
    assert code(errors.TransferCancelledError("x"), "not_sent") == "CANCELLED"
    assert code(errors.SidecarError("drain", code="UNAVAILABLE"), "rejected") == "UNKNOWN"
    kept = upload_failure(conflict, "u1", "rejected")
    assert kept is conflict  # its own code (FAILED_PRECONDITION) stands
    assert code(errors.ModelError("shrank?"), "unknown") == grpc.StatusCode.UNKNOWN.name
    assert code(errors.ModelError("not a model"), "not_sent") == "INVALID_ARGUMENT"


def test_a_cancellation_keeps_its_first_reason() -> None:
    cancel = Cancellation()
    assert not cancel.is_set() and cancel.reason is None
    cancel.cancel(REASON_TRAINER_GONE)
    cancel.cancel(REASON_SHUTDOWN)
    assert cancel.is_set() and cancel.reason == REASON_TRAINER_GONE
    assert not cancel.shutting_down
    assert cancel.wait(0)
