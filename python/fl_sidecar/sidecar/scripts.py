"""Compatibility mode: start the training script per notification, like the reference client.

The reference client runs ``<executor> <script_path> train --training-id <id>
--round <n> --model-id <id>`` for each ``UPDATE_ROUND_START`` and the same with
``test`` for each ``MODEL_TEST_ROUND``, in its configured working directory
(``FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR``, ``..._SCRIPT_PATH``,
``..._WORKING_DIRETORY``). It also calls ``init_training`` on
``TRAINING_START`` and ``end_training`` on ``TRAINING_FINISHED``, which start
no process; here they are hooks (override them, or pass callables).

:meth:`ScriptRunner.handle` returns at once. Each training has its own queue,
so one training's scripts run one at a time in the order their notifications
arrived; different trainings run side by side, at most ``max_concurrent`` at
once (2 by default) on that many worker threads. At most ``max_queued`` runs
wait (64 by default); a run beyond that is dropped and logged as an error
(:attr:`ScriptRunner.dropped` counts them), so a flood of notifications costs
neither processes nor memory. Exit codes are logged and kept
(:attr:`ScriptRunner.results`).

Which trainings get scripts: with ``allowed_training_ids``, only those; else,
with ``confirm_training``, only trainings it confirms (the sidecar asks the FL
server for the training, once per id, and remembers the answer for the most
recent 1,024 ids), so notifications with made-up ids start nothing. A refused
event is logged as a warning.

Each (training, action, round) runs once from :meth:`ScriptRunner.handle`
(repeats are logged and skipped), and ``TRAINING_START`` /
``TRAINING_FINISHED`` call their hooks once per training: the FL server repeats
notifications. :meth:`ScriptRunner.start_training` and
:meth:`ScriptRunner.start_testing` run what they are asked.

No credential is put on the command line: the script talks to the sidecar
over gRPC, and the sidecar keeps the credentials. The script's environment is
the ``env`` the caller passes (``None`` inherits the sidecar's own; pass one
without credentials when the sidecar's environment holds any).
"""

from __future__ import annotations

import collections
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import (
    IO,
    Callable,
    Deque,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
)

from fl_sidecar.errors import ConfigurationError
from fl_sidecar.events import EventKind, ServerEvent, is_valid_id

__all__ = ["DEFAULT_MAX_CONCURRENT", "DEFAULT_MAX_QUEUED", "ScriptRun", "ScriptRunner"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENT = 2
"""Training scripts running at once."""

DEFAULT_MAX_QUEUED = 64
"""Runs (and hooks) waiting at most."""

# Seconds a script gets to exit after SIGTERM (on stop or timeout) before SIGKILL.
_TERMINATE_GRACE = 5.0
# Training ids whose confirmation is remembered, and (training, action, round)
# keys remembered to skip repeats: bounded, least recent forgotten first.
_CONFIRMED_MEMORY = 1024
_SEEN_MEMORY = 10_000

TrainingHook = Callable[[str, Optional[str]], None]
"""``hook(training_id, model_id)``, for training start and training finished."""


@dataclass(frozen=True)
class ScriptRun:
    """The outcome of one run of the training script.

    Attributes:
        training_id: the training it ran for.
        action: ``"train"`` or ``"test"``.
        round: the round from the notification.
        model_id: the global model's id from the notification.
        argv: the full command line.
        returncode: the exit status; negative for a signal (POSIX); ``None``
            when it could not be started.
        error: why it failed to start or was stopped (``None`` when it ran to
            its own end).
        started_at: unix time, seconds.
        duration: seconds from start to exit.
        event_seq: the sequence number of the event that caused it (0 when
            started directly).
    """

    training_id: str
    action: str
    round: int
    model_id: str
    argv: Tuple[str, ...]
    returncode: Optional[int]
    error: Optional[str]
    started_at: float
    duration: float
    event_seq: int = 0

    @property
    def ok(self) -> bool:
        """Whether the script ran and exited with status 0."""
        return self.returncode == 0 and self.error is None


class ScriptRunner:
    """Starts the training script for round and test notifications (compatibility mode)."""

    def __init__(
        self,
        *,
        executor: str,
        script_path: str,
        working_directory: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        output_directory: Optional[str] = None,
        on_training_start: Optional[TrainingHook] = None,
        on_training_finished: Optional[TrainingHook] = None,
        on_result: Optional[Callable[[ScriptRun], None]] = None,
        history: int = 1000,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_queued: int = DEFAULT_MAX_QUEUED,
        allowed_training_ids: Optional[Iterable[str]] = None,
        confirm_training: Optional[Callable[[str], bool]] = None,
    ) -> None:
        """Configure the runner (nothing starts before the first event).

        Args:
            executor: the program that runs the script, e.g. ``python`` or
                ``/opt/venv/bin/python -u``; split like a shell would (quotes
                allowed), never run through a shell.
            script_path: the training script; relative paths are relative to
                ``working_directory``.
            working_directory: where the script runs; ``None``: the sidecar's
                current directory.
            env: the script's complete environment; ``None`` inherits the
                sidecar's (see the module docs about credentials).
            timeout: seconds a run may take before it is stopped (SIGTERM,
                then SIGKILL after 5 s); ``None``: no limit.
            output_directory: if set, each run's stdout and stderr go to
                ``<training>-<action>-round<n>.log`` there; otherwise they are
                the sidecar's own.
            on_training_start, on_training_finished: hooks called with
                ``(training_id, model_id)`` in the training's queue, for
                ``TRAINING_START`` and ``TRAINING_FINISHED``.
            on_result: called with each :class:`ScriptRun` when it ends.
            history: how many :class:`ScriptRun` results to keep.
            max_concurrent: scripts (and hooks) running at once, across trainings.
            max_queued: runs waiting at most; further ones are dropped and logged.
            allowed_training_ids: if given, only these trainings get runs and
                hooks; others are refused (logged).
            confirm_training: without ``allowed_training_ids``, called (on a
                worker thread) with a training id before its first run; ``False``
                refuses the training (remembered), an exception refuses this run
                only (logged). ``None``: every training is accepted.

        Raises:
            ConfigurationError: the executor is empty or cannot be split (one
                that is not found is reported by each run, see
                :meth:`executor_found`), the script or a directory does not exist,
                ``timeout`` is not positive, or ``max_concurrent`` or
                ``max_queued`` is less than 1.
        """
        try:
            self._executor: List[str] = shlex.split(executor)
        except ValueError as exc:
            raise ConfigurationError(f"training script executor cannot be split: {exc}") from None
        if not self._executor:
            raise ConfigurationError("training script executor is empty")
        if not script_path:
            raise ConfigurationError("training script path is empty")
        if working_directory is not None and not os.path.isdir(working_directory):
            raise ConfigurationError(
                f"training script working directory does not exist: {working_directory!r}"
            )
        resolved = os.path.join(working_directory or os.curdir, script_path)
        if not os.path.isfile(resolved):
            raise ConfigurationError(f"training script not found: {resolved!r}")
        if output_directory is not None and not os.path.isdir(output_directory):
            raise ConfigurationError(
                f"training script output directory does not exist: {output_directory!r}"
            )
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"training script timeout must be positive, got {timeout}")
        if max_concurrent < 1:
            raise ConfigurationError(
                f"concurrent training scripts must be at least 1, got {max_concurrent}"
            )
        if max_queued < 1:
            raise ConfigurationError(
                f"queued training scripts must be at least 1, got {max_queued}"
            )
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self._allowed: Optional[FrozenSet[str]] = (
            frozenset(allowed_training_ids) if allowed_training_ids is not None else None
        )
        self._confirm_training = confirm_training
        self.script_path = script_path
        self.working_directory = working_directory
        self.timeout = timeout
        self.output_directory = output_directory
        self._env = dict(env) if env is not None else None
        self._on_training_start = on_training_start
        self._on_training_finished = on_training_finished
        self._on_result = on_result
        self._cond = threading.Condition()
        # Waiting jobs per training; trainings with waiting jobs and none
        # running, in the order they became ready; trainings with a job running.
        self._queues: Dict[str, Deque[Callable[[], None]]] = {}
        self._ready: Deque[str] = collections.deque()
        self._running: Set[str] = set()
        self._queued = 0
        self._threads: List[threading.Thread] = []
        self._processes: Dict[str, subprocess.Popen[bytes]] = {}
        self._results: Deque[ScriptRun] = collections.deque(maxlen=history)
        self._confirmed: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self._seen: collections.OrderedDict[Tuple[str, str, Optional[int]], None] = (
            collections.OrderedDict()
        )
        self._stopping = False
        self.dropped = 0
        """Runs and hooks dropped because ``max_queued`` were already waiting."""

    # --- the reference client's entry points ------------------------------------

    def handle(self, event: ServerEvent) -> None:
        """Queue what ``event`` asks for and return at once.

        ``UPDATE_ROUND_START`` queues a ``train`` run, ``MODEL_TEST_ROUND`` a
        ``test`` run, ``TRAINING_START`` and ``TRAINING_FINISHED`` the hooks;
        other kinds are logged and ignored. An event whose ids or round are
        unusable, of a training that is refused, or that repeats one already
        handled (same training, kind and round) is logged and ignored. Never
        raises for a bad event.
        """
        kind = event.kind
        handled_kinds = (
            EventKind.TRAINING_START,
            EventKind.TRAINING_FINISHED,
            EventKind.UPDATE_ROUND_START,
            EventKind.MODEL_TEST_ROUND,
        )
        if kind in handled_kinds:
            refusal = self._refusal(event.training_id)
            if refusal is not None:
                logger.warning(
                    "training script not started: %s",
                    refusal,
                    extra={"seq": event.seq, "training_id": event.training_id[:80]},
                )
                return
            if not self._first_time(event):
                logger.info(
                    "training script not started again: a repeat of a handled notification",
                    extra={
                        "seq": event.seq,
                        "training_id": event.training_id,
                        "round": event.round,
                    },
                )
                return
        if kind is EventKind.TRAINING_START:
            self._enqueue(
                event.training_id,
                lambda: self.init_training(event.training_id, event.model_id),
                "training-start hook",
            )
        elif kind is EventKind.TRAINING_FINISHED:
            self._enqueue(
                event.training_id,
                lambda: self.end_training(event.training_id, event.model_id),
                "training-finished hook",
            )
        elif kind in (EventKind.UPDATE_ROUND_START, EventKind.MODEL_TEST_ROUND):
            action = "train" if kind is EventKind.UPDATE_ROUND_START else "test"
            if event.round is None or event.model_id is None:
                logger.warning(
                    "training script not started: event lacks round or model id",
                    extra={"seq": event.seq, "training_id": event.training_id},
                )
                return
            self._queue_run(action, event.training_id, event.round, event.model_id, event.seq)
        else:
            logger.info(
                "no training script action for this notification",
                extra={"seq": event.seq, "notification_type": event.notification_type[:80]},
            )

    def start_training(self, training_id: str, round: int, model_id: str) -> None:
        """Queue a ``train`` run of the script for ``round``; returns at once.

        Raises:
            ValueError: an id is not a valid id or the round is negative.
        """
        self._queue_run("train", training_id, round, model_id, 0, strict=True)

    def start_testing(self, training_id: str, round: int, model_id: str) -> None:
        """Queue a ``test`` run of the script for ``round``; returns at once.

        Raises:
            ValueError: an id is not a valid id or the round is negative.
        """
        self._queue_run("test", training_id, round, model_id, 0, strict=True)

    def init_training(self, training_id: str, model_id: Optional[str]) -> None:
        """The reference client's training-start hook: calls ``on_training_start``.

        Runs in the training's queue (after the runs queued before it);
        override or pass ``on_training_start`` to prepare for a training.
        """
        logger.info("training started", extra={"training_id": training_id, "model_id": model_id})
        if self._on_training_start is not None:
            self._on_training_start(training_id, model_id)

    def end_training(self, training_id: str, model_id: Optional[str]) -> None:
        """The reference client's training-finished hook: calls ``on_training_finished``.

        Runs in the training's queue, after every run queued before it ended.
        """
        logger.info("training finished", extra={"training_id": training_id, "model_id": model_id})
        if self._on_training_finished is not None:
            self._on_training_finished(training_id, model_id)

    def command(self, action: str, training_id: str, round: int, model_id: str) -> List[str]:
        """The command line for one run: ``<executor...> <script> <action> --training-id ...``."""
        return [
            *self._executor,
            self.script_path,
            action,
            "--training-id",
            training_id,
            "--round",
            str(round),
            "--model-id",
            model_id,
        ]

    def executor_found(self) -> bool:
        """Whether the executor is an executable file or a program on the scripts' ``PATH``."""
        search_path = (self._env if self._env is not None else os.environ).get("PATH", os.defpath)
        return shutil.which(self._executor[0], path=search_path) is not None

    # --- state -------------------------------------------------------------------

    @property
    def results(self) -> List[ScriptRun]:
        """The most recent runs' outcomes, oldest first."""
        with self._cond:
            return list(self._results)

    def busy_trainings(self) -> List[str]:
        """Trainings with a run in progress or queued."""
        with self._cond:
            return sorted(self._running | {t for t, q in self._queues.items() if q})

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until nothing is queued or running.

        Args:
            timeout: the longest wait in seconds; ``None``: no limit.

        Returns:
            ``True`` when idle, ``False`` on timeout.
        """
        with self._cond:
            return self._cond.wait_for(lambda: not self._queued and not self._running, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Drop queued work, stop running scripts and wait for the workers. Idempotent.

        Running scripts get SIGTERM (their whole process group on POSIX),
        then SIGKILL after 5 s. Later events are ignored.

        Args:
            timeout: the longest wait for the workers to finish, in seconds.
        """
        with self._cond:
            self._stopping = True
            self._queues.clear()
            self._ready.clear()
            self._queued = 0
            processes = list(self._processes.values())
            workers = list(self._threads)
            self._cond.notify_all()
        for process in processes:
            _terminate(process)
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> ScriptRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals -----------------------------------------------------------------

    def _queue_run(
        self,
        action: str,
        training_id: str,
        round: int,
        model_id: str,
        event_seq: int,
        *,
        strict: bool = False,
    ) -> None:
        problem = None
        if not is_valid_id(training_id):
            problem = "training id is not a valid id"
        elif not is_valid_id(model_id):
            problem = "model id is not a valid id"
        elif isinstance(round, bool) or not isinstance(round, int) or round < 0:
            problem = "round is not a non-negative integer"
        if problem is not None:
            if strict:
                raise ValueError(f"training script not started: {problem}")
            logger.warning("training script not started: %s", problem, extra={"seq": event_seq})
            return
        self._enqueue(
            training_id,
            lambda: self._run(action, training_id, round, model_id, event_seq),
            f"{action} round {round}",
        )

    def _refusal(self, training_id: str) -> Optional[str]:
        """Why ``training_id`` gets no runs, as far as known without asking; ``None``: go on."""
        if self._allowed is not None:
            if training_id in self._allowed:
                return None
            return "training id not in the configured training ids"
        with self._cond:
            if self._confirmed.get(training_id) is False:
                return "the FL server does not know this training"
        return None

    def _first_time(self, event: ServerEvent) -> bool:
        """Remember ``event``'s (training, kind, round); ``False`` if it was seen before."""
        key = (event.training_id, event.kind.value, event.round)
        with self._cond:
            if key in self._seen:
                return False
            self._seen[key] = None
            while len(self._seen) > _SEEN_MEMORY:
                self._seen.popitem(last=False)
        return True

    def _may_run(self, training_id: str) -> bool:
        """Whether ``training_id`` is allowed or confirmed (asks ``confirm_training`` once)."""
        if self._allowed is not None:
            return training_id in self._allowed
        if self._confirm_training is None:
            return True
        with self._cond:
            known = self._confirmed.get(training_id)
        if known is None:
            try:
                known = bool(self._confirm_training(training_id))
            except Exception as exc:
                # Not remembered: the FL server may be back for the next round.
                logger.warning(
                    "training script not started: could not confirm the training with the "
                    "FL server (%s)",
                    exc,
                    extra={"training_id": training_id},
                )
                return False
            with self._cond:
                self._confirmed[training_id] = known
                while len(self._confirmed) > _CONFIRMED_MEMORY:
                    self._confirmed.popitem(last=False)
        if not known:
            logger.warning(
                "training script not started: the FL server does not know this training",
                extra={"training_id": training_id},
            )
        return known

    def _enqueue(self, training_id: str, job: Callable[[], None], what: str) -> None:
        with self._cond:
            if self._stopping:
                logger.warning(
                    "script runner stopped; event ignored", extra={"training_id": training_id}
                )
                return
            if self._queued >= self.max_queued:
                self.dropped += 1
                logger.error(
                    "training script queue full (%d waiting): %s dropped",
                    self._queued,
                    what,
                    extra={"training_id": training_id, "dropped": self.dropped},
                )
                return
            queue = self._queues.setdefault(training_id, collections.deque())
            queue.append(job)
            self._queued += 1
            if len(queue) == 1 and training_id not in self._running:
                self._ready.append(training_id)
            self._threads = [t for t in self._threads if t.is_alive()]
            if len(self._threads) < self.max_concurrent:
                worker = threading.Thread(
                    target=self._work, name="fl-sidecar-script-worker", daemon=True
                )
                self._threads.append(worker)
                worker.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._stopping or not self._ready:
                    if threading.current_thread() in self._threads:
                        self._threads.remove(threading.current_thread())
                    self._cond.notify_all()
                    return
                training_id = self._ready.popleft()
                job = self._queues[training_id].popleft()
                self._queued -= 1
                self._running.add(training_id)
            try:
                if self._may_run(training_id):
                    job()
            except Exception:
                # A hook's bug must not stop the training's later runs.
                logger.exception("training job failed", extra={"training_id": training_id})
            finally:
                with self._cond:
                    self._running.discard(training_id)
                    if self._queues.get(training_id):
                        self._ready.append(training_id)
                    else:
                        self._queues.pop(training_id, None)
                    self._cond.notify_all()

    def _run(self, action: str, training_id: str, round: int, model_id: str, seq: int) -> None:
        argv = self.command(action, training_id, round, model_id)
        started_at = time.time()
        started = time.monotonic()
        returncode: Optional[int] = None
        error: Optional[str] = None
        output: Optional[IO[bytes]] = None
        try:
            if self.output_directory is not None:
                name = f"{training_id}-{action}-round{round}.log"
                output = open(os.path.join(self.output_directory, name), "ab")  # noqa: SIM115
            process = self._start(training_id, argv, output)
        except OSError as exc:
            error = f"could not start: {exc.strerror or exc}"
            process = None
        else:
            if process is None:
                error = "stopped before it started"
        if process is not None:
            logger.info(
                "training script started",
                extra={
                    "training_id": training_id,
                    "action": action,
                    "round": round,
                    "pid": process.pid,
                },
            )
            try:
                returncode = process.wait(self.timeout)
            except subprocess.TimeoutExpired:
                error = f"timed out after {self.timeout} s"
                returncode = _terminate(process)
            with self._cond:
                self._processes.pop(training_id, None)
                if self._stopping and error is None and returncode != 0:
                    error = "stopped"
        if output is not None:
            output.close()
        run = ScriptRun(
            training_id=training_id,
            action=action,
            round=round,
            model_id=model_id,
            argv=tuple(argv),
            returncode=returncode,
            error=error,
            started_at=started_at,
            duration=time.monotonic() - started,
            event_seq=seq,
        )
        with self._cond:
            self._results.append(run)
        log = logger.info if run.ok else logger.warning
        log(
            "training script ended: %s round %d, exit status %s%s",
            action,
            round,
            returncode,
            f" ({error})" if error else "",
            extra={
                "training_id": training_id,
                "action": action,
                "round": round,
                "returncode": returncode,
                "duration_s": _round_seconds(run.duration),
            },
        )
        if self._on_result is not None:
            try:
                self._on_result(run)
            except Exception:
                logger.exception("on_result callback failed")

    def _start(
        self, training_id: str, argv: Sequence[str], output: Optional[IO[bytes]]
    ) -> Optional[subprocess.Popen[bytes]]:
        with self._cond:
            if self._stopping:
                return None
            process = subprocess.Popen(
                list(argv),
                cwd=self.working_directory,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                # Its own process group, so a stop or timeout also reaches the
                # workers it forks (data loaders).
                start_new_session=os.name == "posix",
                close_fds=True,
            )
            self._processes[training_id] = process
            return process


def _round_seconds(value: float) -> float:
    """``value`` rounded to milliseconds, for logs."""
    return float(f"{value:.3f}")


def _terminate(process: subprocess.Popen[bytes]) -> Optional[int]:
    """SIGTERM the process (group), SIGKILL after a grace period; returns its exit status."""
    if process.poll() is not None:
        return process.returncode
    _signal(process, signal.SIGTERM)
    try:
        return process.wait(_TERMINATE_GRACE)
    except subprocess.TimeoutExpired:
        _signal(process, getattr(signal, "SIGKILL", signal.SIGTERM))
        return process.wait()


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    killpg = getattr(os, "killpg", None)
    try:
        if killpg is not None:
            killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
