"""Compatibility mode: real training-script processes started per notification."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from fl_sidecar.errors import ConfigurationError
from fl_sidecar.events import ServerEvent
from fl_sidecar.sidecar.eventbus import EventBus
from fl_sidecar.sidecar.notifications import NotificationServer
from fl_sidecar.sidecar.scripts import ScriptRun, ScriptRunner

TRAINING = "6e3a4c1e-8f5b-4d43-9b43-0d8f3f0b7a11"
OTHER_TRAINING = "a1b2c3d4-0000-4000-8000-000000000002"
MODEL = "0b7c9d2a-1e4f-4a5b-8c6d-7e8f9a0b1c2d"
WAIT = 30.0  # seconds: upper bound for a tiny Python process to start and exit

# Appends one JSON line per run: its argv, its working directory, whether it
# saw a credential-like variable; then waits for a release file if asked
# (so tests can hold a run open without sleeping).
RECORDER = """\
import json, os, sys, time
record = {
    "argv": sys.argv[1:],
    "cwd": os.getcwd(),
    "env_secret": os.environ.get("FL_SECRET"),
    "marker": os.environ.get("MARKER"),
}
with open(os.environ["RECORD_FILE"], "a") as f:
    f.write(json.dumps(record) + "\\n")
gate = os.environ.get("GATE_DIR")
if gate:
    open(os.path.join(gate, "started-" + sys.argv[3]), "w").close()
    release = os.path.join(gate, "release-" + sys.argv[3])
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
print("script output for", sys.argv[1])
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    directory = tmp_path / "work"
    directory.mkdir()
    (directory / "train.py").write_text(RECORDER)
    return directory


def recorder_env(workdir: Path, **extra: str) -> Dict[str, str]:
    # The script gets exactly this environment: nothing of the test's.
    return {"RECORD_FILE": str(workdir / "record.jsonl"), **extra}


def records(workdir: Path) -> List[Dict[str, Any]]:
    path = workdir / "record.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_event(
    bus: EventBus, kind: str, round_: Optional[int], training: str = TRAINING
) -> ServerEvent:
    body: Dict[str, Any] = {"global_model_uuid": MODEL}
    if round_ is not None:
        body["round"] = round_
    raw = json.dumps({"notification_type": kind, "training_uuid": training, "body": body})
    return bus.publish(kind, training, body, raw)


@pytest.fixture
def runner(workdir: Path) -> Iterator[ScriptRunner]:
    runner = ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir),
    )
    yield runner
    runner.stop()


def test_round_and_test_events_start_the_script_with_the_reference_argv(
    runner: ScriptRunner, workdir: Path
) -> None:
    bus = EventBus()
    runner.handle(make_event(bus, "UPDATE_ROUND_START", 0))
    runner.handle(make_event(bus, "MODEL_TEST_ROUND", 1))
    assert runner.wait_idle(WAIT)
    got = records(workdir)
    assert [record["argv"] for record in got] == [
        ["train", "--training-id", TRAINING, "--round", "0", "--model-id", MODEL],
        ["test", "--training-id", TRAINING, "--round", "1", "--model-id", MODEL],
    ]
    assert all(Path(record["cwd"]) == workdir.resolve() for record in got)
    results = runner.results
    assert [(run.action, run.round, run.returncode, run.ok) for run in results] == [
        ("train", 0, 0, True),
        ("test", 1, 0, True),
    ]
    assert results[0].argv[:2] == (sys.executable, "train.py")
    assert results[0].event_seq == 1 and results[1].event_seq == 2


def test_exit_codes_are_captured(workdir: Path) -> None:
    with ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir, EXIT_CODE="3"),
    ) as failing:
        failing.start_training(TRAINING, 4, MODEL)
        assert failing.wait_idle(WAIT)
        (run,) = failing.results
    assert run.returncode == 3
    assert not run.ok
    assert run.error is None
    assert run.duration >= 0


def test_no_credentials_on_the_command_line_or_in_the_scripts_environment(
    workdir: Path,
) -> None:
    # The sidecar passes the script an environment without its credentials.
    env = recorder_env(workdir, MARKER="visible")
    with ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=env,
    ) as runner:
        runner.start_testing(TRAINING, 2, MODEL)
        assert runner.wait_idle(WAIT)
    (record,) = records(workdir)
    assert record["marker"] == "visible"
    assert record["env_secret"] is None
    assert len(record["argv"]) == 7  # action and three flag pairs, nothing else


def test_other_kinds_start_nothing_and_hooks_run_in_order(workdir: Path) -> None:
    calls: List[Tuple[str, str, Optional[str]]] = []
    bus = EventBus()
    with ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir),
        on_training_start=lambda t, m: calls.append(("start", t, m)),
        on_training_finished=lambda t, m: calls.append(("finished", t, m)),
    ) as runner:
        # The real server's order: a round start can precede the training start.
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 0))
        runner.handle(make_event(bus, "TRAINING_START", None))
        runner.handle(make_event(bus, "MODEL_TEST_ROUND", 1))
        runner.handle(bus.publish("BRAND_NEW", TRAINING, {}, "{}"))
        runner.handle(make_event(bus, "CLIENT_REMOVED", None))
        runner.handle(make_event(bus, "TRAINING_FINISHED", None))
        assert runner.wait_idle(WAIT)
        results = runner.results
    assert calls == [("start", TRAINING, MODEL), ("finished", TRAINING, MODEL)]
    assert [record["argv"][0] for record in records(workdir)] == ["train", "test"]
    assert [run.action for run in results] == ["train", "test"]


def test_a_failing_hook_does_not_stop_later_runs(workdir: Path) -> None:
    def broken(training_id: str, model_id: Optional[str]) -> None:
        raise RuntimeError("hook bug")

    bus = EventBus()
    with ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir),
        on_training_start=broken,
    ) as runner:
        runner.handle(make_event(bus, "TRAINING_START", None))
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 0))
        assert runner.wait_idle(WAIT)
    assert [record["argv"][0] for record in records(workdir)] == ["train"]


def gate_paths(gate: Path, training: str) -> Tuple[Path, Path]:
    return gate / f"started-{training}", gate / f"release-{training}"


def wait_for_file(path: Path, timeout: float = WAIT) -> None:
    # Polls the file system: the script is another process, nothing to wait on.
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def test_one_script_at_a_time_per_training_in_order_and_trainings_in_parallel(
    workdir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    bus = EventBus()
    with ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir, GATE_DIR=str(gate)),
    ) as runner:
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 0))
        runner.handle(make_event(bus, "MODEL_TEST_ROUND", 1))
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 0, training=OTHER_TRAINING))
        started, release = gate_paths(gate, TRAINING)
        other_started, other_release = gate_paths(gate, OTHER_TRAINING)
        wait_for_file(started)
        # The other training runs alongside, although the first one is busy.
        wait_for_file(other_started)
        assert sorted(runner.busy_trainings()) == sorted([TRAINING, OTHER_TRAINING])
        # The test run of TRAINING waits for its train run.
        assert [r["argv"][0] for r in records(workdir) if r["argv"][2] == TRAINING] == ["train"]
        assert runner.wait_idle(0.05) is False
        other_release.touch()
        release.touch()
        assert runner.wait_idle(WAIT)
        assert runner.busy_trainings() == []
    ours = [r["argv"][0] for r in records(workdir) if r["argv"][2] == TRAINING]
    assert ours == ["train", "test"]
    assert len(records(workdir)) == 3


def test_handle_returns_at_once_while_a_script_runs(workdir: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    bus = EventBus()
    runner = ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir, GATE_DIR=str(gate)),
    )
    try:
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 0))
        wait_for_file(gate_paths(gate, TRAINING)[0])
        # The script is blocked on its gate: if handle() waited for it, this
        # would hang until the per-test timeout.
        runner.handle(make_event(bus, "MODEL_TEST_ROUND", 1))
        assert runner.busy_trainings() == [TRAINING]
    finally:
        gate_paths(gate, TRAINING)[1].touch()
        assert runner.wait_idle(WAIT)
        runner.stop()
    assert [run.action for run in runner.results] == ["train", "test"]


def test_timeout_stops_a_hanging_script(workdir: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()  # never released
    with ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir, GATE_DIR=str(gate)),
        timeout=0.5,
    ) as runner:
        runner.start_training(TRAINING, 0, MODEL)
        assert runner.wait_idle(WAIT)
        (run,) = runner.results
    assert run.error is not None and "timed out" in run.error
    assert run.returncode is not None and run.returncode != 0
    assert not run.ok


def test_stop_ends_a_running_script_and_drops_queued_ones(workdir: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    bus = EventBus()
    ended: List[ScriptRun] = []
    runner = ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir, GATE_DIR=str(gate)),
        on_result=ended.append,
    )
    runner.handle(make_event(bus, "UPDATE_ROUND_START", 0))
    runner.handle(make_event(bus, "MODEL_TEST_ROUND", 1))
    wait_for_file(gate_paths(gate, TRAINING)[0])
    runner.stop(timeout=WAIT)
    assert runner.busy_trainings() == []
    assert [run.action for run in ended] == ["train"]
    assert ended[0].error == "stopped"
    runner.handle(make_event(bus, "UPDATE_ROUND_START", 1))  # ignored after stop
    assert runner.wait_idle(0)
    assert len(records(workdir)) == 1
    runner.stop()  # idempotent


def test_output_goes_to_a_log_file_per_run(workdir: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    with ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir),
        output_directory=str(logs),
    ) as runner:
        runner.start_training(TRAINING, 2, MODEL)
        assert runner.wait_idle(WAIT)
    log = logs / f"{TRAINING}-train-round2.log"
    assert log.read_text().strip() == "script output for train"


def test_an_executor_that_does_not_exist_is_reported_not_raised(workdir: Path) -> None:
    with ScriptRunner(
        executor=str(workdir / "no-such-python"),
        script_path="train.py",
        working_directory=str(workdir),
    ) as runner:
        runner.start_training(TRAINING, 0, MODEL)
        assert runner.wait_idle(WAIT)
        (run,) = runner.results
    assert run.returncode is None
    assert run.error is not None and run.error.startswith("could not start")


def test_executor_with_arguments_is_split_like_a_shell(workdir: Path) -> None:
    with ScriptRunner(
        executor=f'"{sys.executable}" -u',
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir),
    ) as runner:
        assert runner.command("train", TRAINING, 1, MODEL)[:3] == [sys.executable, "-u", "train.py"]
        runner.start_training(TRAINING, 1, MODEL)
        assert runner.wait_idle(WAIT)
    assert records(workdir)[0]["argv"][0] == "train"


def test_hostile_events_start_nothing(runner: ScriptRunner, workdir: Path) -> None:
    bus = EventBus()
    # Published directly (the endpoint would have refused them): ids that
    # look like options, a missing round.
    runner.handle(
        bus.publish("UPDATE_ROUND_START", "--help", {"round": 0, "global_model_uuid": MODEL}, "{}")
    )
    runner.handle(
        bus.publish("UPDATE_ROUND_START", TRAINING, {"round": 0, "global_model_uuid": "-x"}, "{}")
    )
    runner.handle(bus.publish("MODEL_TEST_ROUND", TRAINING, {"global_model_uuid": MODEL}, "{}"))
    runner.handle(
        bus.publish("MODEL_TEST_ROUND", TRAINING, {"round": -1, "global_model_uuid": MODEL}, "{}")
    )
    assert runner.wait_idle(WAIT)
    assert records(workdir) == []
    assert runner.results == []
    with pytest.raises(ValueError):
        runner.start_training("a b", 0, MODEL)
    with pytest.raises(ValueError):
        runner.start_testing(TRAINING, -2, MODEL)


@pytest.mark.parametrize(
    "changes",
    [
        {"executor": ""},
        {"executor": '"unbalanced'},
        {"script_path": ""},
        {"script_path": "missing.py"},
        {"working_directory": "/nonexistent/dir"},
        {"output_directory": "/nonexistent/logs"},
        {"timeout": 0},
    ],
)
def test_bad_configuration_is_refused_at_construction(
    workdir: Path, changes: Dict[str, Any]
) -> None:
    settings: Dict[str, Any] = {
        "executor": sys.executable,
        "script_path": "train.py",
        "working_directory": str(workdir),
        **changes,
    }
    with pytest.raises(ConfigurationError):
        ScriptRunner(**settings)


def test_end_to_end_notifications_start_the_script(workdir: Path) -> None:
    """The real chain: HTTP POST -> endpoint -> bus -> runner -> process."""
    bus = EventBus()
    two_ended = threading.Semaphore(0)
    with ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir),
        on_result=lambda run: two_ended.release(),
    ) as runner, NotificationServer(bus, port=0, on_event=runner.handle) as endpoint:
        for kind, round_ in [("UPDATE_ROUND_START", 0), ("MODEL_TEST_ROUND", 1)]:
            data = json.dumps(
                {
                    "notification_type": kind,
                    "body": {"round": round_, "global_model_uuid": MODEL},
                    "training_uuid": TRAINING,
                }
            ).encode()
            request = urllib.request.Request(endpoint.url, data=data)
            with urllib.request.urlopen(request, timeout=WAIT) as response:
                assert response.status == 202
        # The endpoint hands the event on after answering: wait for the runs
        # themselves, not for the runner to look idle.
        assert two_ended.acquire(timeout=WAIT)
        assert two_ended.acquire(timeout=WAIT)
    assert [record["argv"] for record in records(workdir)] == [
        ["train", "--training-id", TRAINING, "--round", "0", "--model-id", MODEL],
        ["test", "--training-id", TRAINING, "--round", "1", "--model-id", MODEL],
    ]
    # A trainer watching the bus sees the same events the script was started for.
    assert [event.round for event in bus.snapshot()] == [0, 1]
    bus.close()


# --- caps, refusals and repeats --------------------------------------------------

THIRD_TRAINING = "a1b2c3d4-0000-4000-8000-000000000003"


def test_runs_beyond_the_queue_bound_are_dropped_and_counted(workdir: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    with ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir, GATE_DIR=str(gate)),
        max_concurrent=1,
        max_queued=2,
    ) as runner:
        runner.start_training(TRAINING, 0, MODEL)
        started, release = gate_paths(gate, TRAINING)
        wait_for_file(started)  # running: no longer waiting
        runner.start_training(OTHER_TRAINING, 0, MODEL)
        runner.start_training(THIRD_TRAINING, 0, MODEL)
        runner.start_training(THIRD_TRAINING, 1, MODEL)  # a third waiting run: dropped
        assert runner.dropped == 1
        # One script at a time: the others wait while the first is held.
        assert not gate_paths(gate, OTHER_TRAINING)[0].exists()
        release.touch()
        gate_paths(gate, OTHER_TRAINING)[1].touch()
        gate_paths(gate, THIRD_TRAINING)[1].touch()
        assert runner.wait_idle(WAIT)
    assert sorted((r["argv"][2], r["argv"][4]) for r in records(workdir)) == sorted(
        [(OTHER_TRAINING, "0"), (TRAINING, "0"), (THIRD_TRAINING, "0")]
    )


def test_only_configured_training_ids_get_runs(workdir: Path) -> None:
    bus = EventBus()
    with ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir),
        allowed_training_ids=[OTHER_TRAINING],
        confirm_training=lambda training: pytest.fail("configured ids need no confirmation"),
    ) as runner:
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 0))
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 0, training=OTHER_TRAINING))
        assert runner.wait_idle(WAIT)
    assert [r["argv"][2] for r in records(workdir)] == [OTHER_TRAINING]


def test_unconfirmed_trainings_get_no_runs_and_failed_checks_are_retried(workdir: Path) -> None:
    asked: List[str] = []
    server_up = threading.Event()

    def confirm(training: str) -> bool:
        asked.append(training)
        if training == THIRD_TRAINING and not server_up.is_set():
            raise ConnectionError("FL server unavailable")
        return training != OTHER_TRAINING

    bus = EventBus()
    with ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir),
        confirm_training=confirm,
    ) as runner:
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 0))
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 0, training=OTHER_TRAINING))
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 0, training=THIRD_TRAINING))
        assert runner.wait_idle(WAIT)
        # A refusal is remembered: the next round is refused without asking.
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 1, training=OTHER_TRAINING))
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 1))
        server_up.set()
        # A check that failed is not remembered: asked again.
        runner.handle(make_event(bus, "UPDATE_ROUND_START", 1, training=THIRD_TRAINING))
        assert runner.wait_idle(WAIT)
    assert sorted(asked) == sorted([TRAINING, OTHER_TRAINING, THIRD_TRAINING, THIRD_TRAINING])
    assert sorted((r["argv"][2], r["argv"][4]) for r in records(workdir)) == sorted(
        [(TRAINING, "0"), (TRAINING, "1"), (THIRD_TRAINING, "1")]
    )


def test_repeated_notifications_run_the_script_once(runner: ScriptRunner, workdir: Path) -> None:
    bus = EventBus()
    hooks: List[str] = []
    for kind, round_ in [
        ("UPDATE_ROUND_START", 0),
        ("UPDATE_ROUND_START", 0),
        ("UPDATE_ROUND_START", 0),
        ("MODEL_TEST_ROUND", 1),
        ("MODEL_TEST_ROUND", 1),
    ]:
        runner.handle(make_event(bus, kind, round_))
    finished = ScriptRunner(
        executor=sys.executable,
        script_path="train.py",
        working_directory=str(workdir),
        env=recorder_env(workdir),
        on_training_finished=lambda training, model: hooks.append(training),
    )
    with finished:
        finished.handle(make_event(bus, "TRAINING_FINISHED", None))
        finished.handle(make_event(bus, "TRAINING_FINISHED", None))
        assert finished.wait_idle(WAIT)
    assert runner.wait_idle(WAIT)
    assert [(r["argv"][0], r["argv"][4]) for r in records(workdir)] == [
        ("train", "0"),
        ("test", "1"),
    ]
    assert hooks == [TRAINING]


# --- through a real sidecar and the dev server -------------------------------------

# Records when it ran (CLOCK_MONOTONIC is one clock for every process on the
# machine), holding the slot a moment so that runs allowed in parallel overlap.
INTERVAL_RECORDER = """\
import json, os, sys, time
start = time.monotonic()
time.sleep(float(os.environ["HOLD_SECONDS"]))
record = {"argv": sys.argv[1:], "start": start, "end": time.monotonic()}
with open(os.environ["RECORD_FILE"], "a") as f:
    f.write(json.dumps(record) + "\\n")
"""


def _most_at_once(intervals: List[Tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def test_a_sidecar_caps_scripts_and_refuses_trainings_the_server_does_not_know(
    stack: Any, tmp_path: Path
) -> None:
    from trainer_stack import post_notification

    work = tmp_path / "scripts"
    work.mkdir()
    (work / "record.py").write_text(INTERVAL_RECORDER)
    record_file = work / "record.jsonl"
    side = stack.add_client(
        extra_args=(
            "--script-executor",
            sys.executable,
            "--script-path",
            "record.py",
            "--script-working-directory",
            str(work),
            "--max-concurrent-scripts",
            "2",
        ),
        env={"RECORD_FILE": str(record_file), "HOLD_SECONDS": "0.5"},
    )
    real = [stack.training([side], rounds=1)["training_id"] for _ in range(5)]
    made_up = [f"00000000-0000-4000-8000-{n:012d}" for n in range(30)]
    url = side.notification_url
    for training in [*made_up[:15], *real, *made_up[15:]]:
        body = {"round": 0, "global_model_uuid": MODEL}
        payload = {
            "notification_type": "UPDATE_ROUND_START",
            "body": body,
            "training_uuid": training,
        }
        assert post_notification(url, payload) == 202
    # A repeat of a round start already handled starts nothing.
    repeat = {"round": 0, "global_model_uuid": MODEL}
    payload = {"notification_type": "UPDATE_ROUND_START", "body": repeat, "training_uuid": real[0]}
    assert post_notification(url, payload) == 202

    deadline = time.monotonic() + 120
    refusals = 0
    while time.monotonic() < deadline:
        log = Path(side.sidecar.log_path).read_text(encoding="utf-8", errors="replace")
        refusals = log.count("the FL server does not know this training")
        if len(records_at(record_file)) >= len(real) and refusals >= len(made_up):
            break
        time.sleep(0.1)
    ran = records_at(record_file)
    assert sorted(r["argv"][2] for r in ran) == sorted(real), stack.logs()
    assert refusals >= len(made_up), stack.logs()
    most = _most_at_once([(r["start"], r["end"]) for r in ran])
    assert most <= 2, ran


def records_at(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- switching compatibility mode on and off, the reference's variables ------------


def _wait_for_text(read: Any, text: str, timeout: float = WAIT) -> str:
    deadline = time.monotonic() + timeout
    while True:
        current = str(read())
        if text in current or time.monotonic() > deadline:
            return current
        time.sleep(0.05)


def _post_round_start(url: str, training: str, round_: int = 0) -> int:
    from trainer_stack import post_notification

    body = {"round": round_, "global_model_uuid": MODEL}
    payload = {"notification_type": "UPDATE_ROUND_START", "body": body, "training_uuid": training}
    return post_notification(url, payload)


def _python_on_path() -> str:
    # The reference default executor is "python" from PATH: this interpreter's.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


@pytest.mark.parametrize("switch", ["reference-variables", "run-scripts-flag"])
def test_a_sidecar_runs_the_script_with_the_reference_defaults(switch: str) -> None:
    from sidecar_harness import _short_tempdir, running_sidecar

    workdir = _short_tempdir()
    scripts = workdir / "project"
    (scripts / "src").mkdir(parents=True)
    (scripts / "src" / "main.py").write_text(RECORDER)
    env = {
        "PATH": _python_on_path(),
        "RECORD_FILE": str(workdir / "record.jsonl"),
        "FL_SIDECAR_SCRIPT_TRAINING_IDS": TRAINING,  # no FL server here to confirm it
    }
    args: List[str] = []
    if switch == "reference-variables":
        # Only the working directory, by the reference client's own name.
        env["FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY"] = str(scripts)
    else:
        # Nothing but the flag: the sidecar's current directory is the project.
        args = ["--run-scripts"]
        (workdir / "src").mkdir()
        (workdir / "src" / "main.py").write_text(RECORDER)
        scripts = workdir
    with running_sidecar(workdir=workdir, env=env, args=args) as sidecar:
        url = sidecar.notification_url
        assert url is not None
        assert _post_round_start(url, TRAINING) == 202
        record_file = workdir / "record.jsonl"
        _wait_for_text(lambda: record_file.exists() and record_file.read_text(), "train")
        (got,) = records(workdir)
        assert got["argv"][:3] == ["train", "--training-id", TRAINING]
        assert Path(got["cwd"]).resolve() == scripts.resolve()
        assert "deprecated" not in sidecar.log_text()


def test_without_compatibility_mode_the_log_says_where_round_starts_go() -> None:
    from sidecar_harness import running_sidecar

    from fl_sidecar.client import SidecarClient

    with running_sidecar() as sidecar:
        url = sidecar.notification_url
        assert url is not None
        log = _wait_for_text(sidecar.log_text, "compatibility mode off")
        assert "round starts go to WatchEvents subscribers only" in log
        # Nobody listens and no script runs: a warning, and the event waits on the bus.
        assert _post_round_start(url, TRAINING, 0) == 202
        warning = "no WatchEvents subscriber and no training script"
        assert warning in _wait_for_text(sidecar.log_text, warning)
        with SidecarClient(sidecar.target, timeout=WAIT) as client, client.watch_events(
            training_ids=[TRAINING]
        ) as events:
            first = events.get(timeout=WAIT)
            assert first.round == 0  # it waited for this subscriber
            assert _post_round_start(url, TRAINING, 1) == 202
            assert events.get(timeout=WAIT).round == 1
            # Only the first round start found nobody.
            assert sidecar.log_text().count(warning) == 1
