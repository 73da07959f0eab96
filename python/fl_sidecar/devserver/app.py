"""The dev server's WSGI application: the DLR FL Demonstrator REST API on SQLite.

Same paths, fields, status codes and body shapes as the real server (see
docs/protocol.md and docs/devserver.md), safer where the real one is dangerous:
duplicate uploads get 409, uploads are checked without executing their
pickles, malformed input gets 400 (never 500), and notifications cannot block
each other.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import sqlite3
import threading
import time
import urllib.parse
import uuid
from typing import (
    Any,
    BinaryIO,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from fl_sidecar.errors import FlSidecarError

from . import modelcheck
from .multipart import MultipartError, MultipartForm, parse_boundary, parse_multipart
from .notify import Notifier
from .store import Row, Store

__all__ = ["DevServerApp"]

_log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
Headers = List[Tuple[str, str]]
Body = Union[Dict[str, Any], List[Any]]

_JSON_LIMIT = 1024 * 1024
_INT_RE = re.compile(r"^-?[0-9]{1,18}$")
_MAX_COUNT = 10**15  # rounds, sample sizes: far below SQLite's 64-bit integers
_DRAIN_LIMIT = 64 * 1024 * 1024
_DOWNLOAD_CHUNK = 1024 * 1024
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)
_AGGREGATION_METHODS = ("FedAvg", "FedProx")
_KNOWN_METHODS = ("FedAvg", "FedDC", "FedProx")
_AUTH_CHALLENGE = ("WWW-Authenticate", "Token")
_INSERT_METRIC = (
    "INSERT INTO metrics (model_id, training_id, round, reporter_id, kind, key, value, created)"
    " VALUES (?,?,?,?,?,?,?,?)"
)


class _HttpError(Exception):
    """Ends a request with ``status`` and a JSON ``body``; never escapes the app."""

    def __init__(self, status: int, body: Body, headers: Optional[Headers] = None) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = headers or []


def _detail(status: int, message: str) -> _HttpError:
    return _HttpError(status, {"detail": message})


def _listed(message: str) -> _HttpError:
    return _HttpError(400, [message])


class _Response:
    def __init__(
        self, status: int, body: Optional[Body] = None, headers: Optional[Headers] = None
    ) -> None:
        self.status = status
        self.headers: Headers = list(headers or [])
        self.chunks: Iterable[bytes] = []
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            self.headers.append(("Content-Type", "application/json"))
            self.headers.append(("Content-Length", str(len(data))))
            self.chunks = [data]


class _BoundedInput:
    """The request body, never read past its Content-Length (``None``: read to EOF)."""

    def __init__(self, stream: BinaryIO, length: Optional[int]) -> None:
        self._stream = stream
        self.remaining = length

    def read(self, size: int = -1) -> bytes:
        if self.remaining is None:
            return self._stream.read(size)
        if self.remaining <= 0:
            return b""
        want = self.remaining if size < 0 else min(size, self.remaining)
        data = self._stream.read(want)
        self.remaining -= len(data)
        return data


class _Request:
    def __init__(self, environ: Dict[str, Any]) -> None:
        self.environ = environ
        self.method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        self.path = str(environ.get("PATH_INFO", "/"))
        self.content_type = str(environ.get("CONTENT_TYPE", ""))
        raw_length = str(environ.get("CONTENT_LENGTH", "") or "").strip()
        length: Optional[int]
        if raw_length:
            if not raw_length.isdigit():
                raise _detail(400, "Invalid Content-Length.")
            length = int(raw_length)
        elif environ.get("wsgi.input_terminated"):
            length = None
        else:
            length = 0
        self.length = length
        self.body = _BoundedInput(environ["wsgi.input"], length)
        self.user: Optional[Row] = None

    def header(self, name: str) -> Optional[str]:
        value = self.environ.get("HTTP_" + name.upper().replace("-", "_"))
        return None if value is None else str(value)


def _hash_password(password: str, iterations: int, salt: Optional[str] = None) -> str:
    salt = salt or secrets.token_hex(12)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode()}"


def _check_password(password: str, encoded: str) -> bool:
    try:
        _algo, iterations, salt, _digest = encoded.split("$", 3)
        expected = _hash_password(password, int(iterations), salt)
    except ValueError:
        return False
    return hmac.compare_digest(expected, encoded)


def _form_int(name: str, raw: str) -> int:
    """A decimal integer form field (ASCII digits only, at most 18 of them)."""
    text = raw.strip()
    if not _INT_RE.match(text):
        raise _listed(f"{name} must be an integer, got {raw[:40]!r}")
    return int(text)


def _parse_uuid(text: str) -> Optional[str]:
    if not _UUID_RE.match(text):
        return None
    return str(uuid.UUID(text))


class DevServerApp:
    """The WSGI application. :class:`~fl_sidecar.devserver.DevServer` builds and serves it.

    Args:
        store: the database.
        data_dir: directory for model files (``models/``, ``local/``, ``spool/`` under it).
        notifier: delivers notifications.
        max_upload_size: largest request body accepted, in bytes (413 above).
        password_iterations: PBKDF2-SHA256 iterations for new passwords (the
            real server uses 1,000,000; a dev server need not be that slow).
        aggregation_workers: trainings aggregated at the same time.
    """

    def __init__(
        self,
        store: Store,
        data_dir: str,
        notifier: Notifier,
        *,
        max_upload_size: int = 8 * 1024**3,
        password_iterations: int = 20_000,
        aggregation_workers: int = 2,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.max_upload_size = max_upload_size
        self.password_iterations = password_iterations
        self._models_dir = os.path.join(data_dir, "models")
        self._local_dir = os.path.join(data_dir, "local")
        self._spool_dir = os.path.join(data_dir, "spool")
        for directory in (self._models_dir, self._local_dir, self._spool_dir):
            os.makedirs(directory, exist_ok=True)
        self._aggregator = concurrent.futures.ThreadPoolExecutor(
            max_workers=aggregation_workers, thread_name_prefix="devserver-aggregate"
        )
        self._pending_lock = threading.Condition()
        self._pending = 0
        self._routes: List[Tuple[re.Pattern[str], Dict[str, Callable[..., _Response]]]] = [
            (re.compile(r"^/api/users/?$"), {"POST": self._create_user}),
            (re.compile(r"^/api/models/?$"), {"POST": self._upload_global_model}),
            (
                re.compile(r"^/api/models/(?P<model_id>[^/]+)/?$"),
                {"GET": self._download_model, "POST": self._upload_local_model},
            ),
            (
                re.compile(r"^/api/models/(?P<model_id>[^/]+)/metrics/?$"),
                {"POST": self._upload_metrics, "GET": self._list_metrics},
            ),
            (re.compile(r"^/api/trainings/?$"), {"POST": self._create_training}),
            (re.compile(r"^/api/trainings/(?P<training_id>[^/]+)/?$"), {"GET": self._get_training}),
            (
                re.compile(r"^/api/trainings/(?P<training_id>[^/]+)/clients/?$"),
                {"PUT": self._add_participants, "DELETE": self._remove_participants},
            ),
            (
                re.compile(r"^/api/trainings/(?P<training_id>[^/]+)/start/?$"),
                {"POST": self._start_training},
            ),
            (re.compile(r"^/healthz/?$"), {"GET": self._health}),
        ]

    # --- WSGI --------------------------------------------------------------

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request: Optional[_Request] = None
        try:
            request = _Request(environ)
            response = self._dispatch(request)
        except _HttpError as exc:
            response = _Response(exc.status, exc.body, exc.headers)
        except Exception:
            # Input errors are all mapped to 4xx above; reaching here is a server bug.
            _log.exception(
                "dev server bug on %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
            )
            response = _Response(500, {"detail": "Internal server error."})
        if request is not None and response.status >= 400:
            self._drain(request)
        start_response(
            f"{response.status} {_REASONS.get(response.status, 'Unknown')}", response.headers
        )
        return response.chunks

    @staticmethod
    def _drain(request: _Request) -> None:
        # An unread body makes the socket close with a reset, and the client
        # would lose our error answer; read (and drop) a bounded amount.
        remaining = request.body.remaining
        if remaining is None or remaining > _DRAIN_LIMIT:
            return
        while request.body.read(256 * 1024):
            pass

    def _dispatch(self, request: _Request) -> _Response:
        for pattern, handlers in self._routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            handler = handlers.get(request.method)
            if request.method == "OPTIONS":
                allow = ", ".join(sorted([*handlers, "OPTIONS"]))
                return _Response(200, {"allow": allow.split(", ")}, [("Allow", allow)])
            if handler is None:
                allow = ", ".join(sorted(handlers))
                raise _HttpError(
                    405, {"detail": f'Method "{request.method}" not allowed.'}, [("Allow", allow)]
                )
            return handler(request, **match.groupdict())
        raise _detail(404, "Not found.")

    # --- helpers -------------------------------------------------------------

    def _authenticate(self, request: _Request) -> Row:
        header = request.header("Authorization")
        if not header or not header.strip():
            raise _HttpError(
                401, {"detail": "Authentication credentials were not provided."}, [_AUTH_CHALLENGE]
            )
        scheme, _, credentials = header.strip().partition(" ")
        credentials = credentials.strip()
        user: Optional[Row]
        if scheme.lower() == "token":
            if not credentials or " " in credentials:
                raise _HttpError(401, {"detail": "Invalid token header."}, [_AUTH_CHALLENGE])
            user = self.store.one("SELECT * FROM users WHERE token = ?", (credentials,))
            if user is None:
                raise _HttpError(401, {"detail": "Invalid token."}, [_AUTH_CHALLENGE])
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise _HttpError(
                    401,
                    {"detail": "Invalid basic header. Credentials not correctly base64 encoded."},
                    [_AUTH_CHALLENGE],
                ) from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise _HttpError(
                    401,
                    {"detail": "Invalid basic header. No credentials provided."},
                    [_AUTH_CHALLENGE],
                )
            user = None
            if password == "":
                user = self.store.one("SELECT * FROM users WHERE token = ?", (username,))
            else:
                row = self.store.one("SELECT * FROM users WHERE username = ?", (username,))
                if row is not None and _check_password(password, row["password_hash"]):
                    user = row
            if user is None:
                raise _HttpError(401, {"detail": "Invalid username/password."}, [_AUTH_CHALLENGE])
        else:
            raise _HttpError(
                401, {"detail": "Authentication credentials were not provided."}, [_AUTH_CHALLENGE]
            )
        request.user = user
        return user

    def _read_json(self, request: _Request) -> Dict[str, Any]:
        if request.length is not None and request.length > _JSON_LIMIT:
            raise _detail(413, f"JSON body larger than {_JSON_LIMIT} bytes.")
        raw = request.body.read(_JSON_LIMIT + 1)
        if len(raw) > _JSON_LIMIT:
            raise _detail(413, f"JSON body larger than {_JSON_LIMIT} bytes.")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _detail(400, f"JSON parse error - {exc}") from None
        except RecursionError:
            raise _detail(400, "JSON parse error - nested too deeply") from None
        if not isinstance(data, dict):
            raise _detail(400, "Invalid data. Expected a dictionary.")
        return data

    def _read_form(self, request: _Request) -> MultipartForm:
        if request.length is not None and request.length > self.max_upload_size:
            raise _detail(413, f"Request body larger than {self.max_upload_size} bytes.")
        try:
            boundary = parse_boundary(request.content_type)
            return parse_multipart(
                request.body,  # type: ignore[arg-type]
                boundary,
                length=request.length,
                spool_dir=self._spool_dir,
                max_file_size=self.max_upload_size,
            )
        except MultipartError as exc:
            raise _detail(400, f"Multipart form parse error - {exc}") from None

    def _row_or_400(self, table: str, row_id: str, label: str) -> Row:
        """The row of ``table`` (a fixed table name) with id ``row_id``, else a 400."""
        normal = _parse_uuid(row_id)
        row = (
            None
            if normal is None
            else self.store.one(f"SELECT * FROM {table} WHERE id = ?", (normal,))
        )
        if row is None:
            raise _detail(400, f"{label} {row_id} not found.")
        return row

    def _model_or_400(self, model_id: str, label: str = "Model") -> Row:
        return self._row_or_400("models", model_id, label)

    def _training_or_400(self, training_id: str) -> Row:
        return self._row_or_400("trainings", training_id, "Training")

    def _participant_ids(self, training_id: str) -> List[str]:
        rows = self.store.all(
            "SELECT user_id FROM participants WHERE training_id = ? ORDER BY rowid", (training_id,)
        )
        return [r["user_id"] for r in rows]

    def _check_model_file(self, path: str) -> modelcheck.Signature:
        try:
            return modelcheck.check_module_file(path)
        except FlSidecarError as exc:  # ModelError, or e.g. a codec error inside the reader
            raise _listed(f"Invalid model file: {exc}") from None

    def _notify_all(
        self, endpoints: Sequence[str], kind: str, training_id: str, body: Dict[str, Any]
    ) -> None:
        for endpoint in endpoints:
            self.notifier.send(endpoint, kind, training_id, body)

    def _endpoints(self, user_ids: Sequence[str]) -> List[str]:
        result = []
        for user_id in user_ids:
            row = self.store.one("SELECT message_endpoint FROM users WHERE id = ?", (user_id,))
            if row is not None and row["message_endpoint"]:
                result.append(str(row["message_endpoint"]))
        return result

    # --- users ---------------------------------------------------------------

    def _health(self, request: _Request) -> _Response:
        return _Response(200, {"status": "ok"})

    def _create_user(self, request: _Request) -> _Response:
        data = self._read_json(request)
        errors: Dict[str, List[str]] = {}

        def text(name: str, required: bool, limit: int = 254) -> str:
            value = data.get(name, "")
            if value is None:
                value = ""
            if not isinstance(value, str):
                errors[name] = ["Not a valid string."]
                return ""
            if required and not value:
                errors[name] = ["This field is required."]
            elif len(value) > limit:
                errors[name] = [f"Ensure this field has no more than {limit} characters."]
            return str(value)

        def flag(name: str) -> bool:
            value = data.get(name, False)
            if not isinstance(value, bool):
                errors[name] = ["Must be a valid boolean."]
                return False
            return value

        username = text("username", True, 150)
        password = text("password", True, 1024)
        endpoint = text("message_endpoint", True, 2048)
        if endpoint and "message_endpoint" not in errors:
            try:
                parsed = urllib.parse.urlsplit(endpoint)
                valid = parsed.scheme in ("http", "https") and bool(parsed.hostname)
                valid = valid and (parsed.port is None or parsed.port > 0)
            except ValueError:  # e.g. an unclosed IPv6 bracket or a port out of range
                valid = False
            if not valid:
                errors["message_endpoint"] = ["Enter a valid URL."]
        first_name = text("first_name", False, 150)
        last_name = text("last_name", False, 150)
        email = text("email", False)
        actor = flag("actor")
        client = flag("client")
        if errors:
            raise _HttpError(400, errors)
        user_id = str(uuid.uuid4())
        token = secrets.token_hex(20)
        try:
            self.store.execute(
                "INSERT INTO users VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    user_id,
                    username,
                    _hash_password(password, self.password_iterations),
                    token,
                    endpoint,
                    int(actor),
                    int(client),
                    first_name,
                    last_name,
                    email,
                    time.time(),
                ),
            )
        except sqlite3.IntegrityError:
            raise _HttpError(
                400, {"username": ["A user with that username already exists."]}
            ) from None
        body = {
            "id": user_id,
            "username": username,
            "token": token,
            "message_endpoint": endpoint,
            "actor": actor,
            "client": client,
            "first_name": first_name,
            "last_name": last_name,
            "email": email,
        }
        return _Response(201, body)

    # --- models --------------------------------------------------------------

    def _upload_global_model(self, request: _Request) -> _Response:
        user = self._authenticate(request)
        with self._read_form(request) as form:
            name = form.first("name")
            if name is None:
                raise _detail(400, "'name'")
            description = form.first("description") or ""
            part = form.take_file("model_file")
            if part is None:
                raise _detail(400, "No uploaded file 'model_file' found.")
            try:
                signature = self._check_model_file(part.path)
                model_id = str(uuid.uuid4())
                path = os.path.join(self._models_dir, f"{model_id}.pt")
                os.replace(part.path, path)
            except BaseException:
                os.unlink(part.path)
                raise
        now = time.time()
        fmt = "torch"
        self.store.execute(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                model_id,
                name,
                description,
                user["id"],
                0,
                path,
                part.size,
                fmt,
                modelcheck.signature_to_json(signature),
                now,
                now,
            ),
        )
        return _Response(201, {"detail": "Model Upload Accepted", "model_id": model_id})

    def _download_model(self, request: _Request, model_id: str) -> _Response:
        self._authenticate(request)
        row = self._model_or_400(model_id)
        try:
            handle = open(row["path"], "rb")  # noqa: SIM115 - closed by the iterator
        except FileNotFoundError:
            raise _detail(400, f"Model {model_id} not found.") from None
        size = os.fstat(handle.fileno()).st_size
        response = _Response(
            200,
            headers=[
                ("Content-Type", "application/octet-stream"),
                ("Content-Disposition", f'filename="model-{row["id"]}.pt"'),
                ("Content-Length", str(size)),
            ],
        )
        response.chunks = _FileChunks(handle)
        return response

    def _upload_local_model(self, request: _Request, model_id: str) -> _Response:
        user = self._authenticate(request)
        model = self._model_or_400(model_id, "GlobalModel")
        with self._read_form(request) as form:
            raw_round = form.first("round")
            if raw_round is None:
                raise _detail(400, "'round'")
            raw_samples = form.first("sample_size")
            if raw_samples is None:
                raise _detail(400, "'sample_size'")
            upload_round = _form_int("round", raw_round)
            sample_size = _form_int("sample_size", raw_samples)
            if not 1 <= sample_size <= _MAX_COUNT:
                raise _listed(f"sample_size must be an integer from 1 to {_MAX_COUNT}")
            names = form.fields.get("metric_names", [])
            values = self._parse_metric_values(names, form.fields.get("metric_values", []))
            part = form.take_file("model_file")
            if part is None:
                raise _detail(400, "No uploaded file 'model_file' found.")
            try:
                training = self._training_for_upload(model, user, upload_round)
                signature = self._check_model_file(part.path)
                expected = modelcheck.signature_from_json(model["signature"])
                if signature != expected:
                    raise _listed(
                        "Invalid model file: its tensors do not match the global model's "
                        "names, shapes and dtypes"
                    )
                local_id = str(uuid.uuid4())
                path = os.path.join(self._local_dir, f"{local_id}.pt")
                os.replace(part.path, path)
            except BaseException:
                os.unlink(part.path)
                raise
        try:
            complete = self._record_upload(
                training, model, user, upload_round, sample_size, local_id, path, names, values
            )
        except BaseException:
            os.unlink(path)
            raise
        if complete:
            self._submit_aggregation(training["id"], upload_round)
        return _Response(201, {"detail": "Model Update Accepted"})

    @staticmethod
    def _parse_metric_values(
        names: Sequence[str], raw_values: Sequence[str]
    ) -> List[Union[float, str]]:
        if len(names) != len(raw_values):
            raise _detail(400, f"{len(names)} metric_names but {len(raw_values)} metric_values.")
        values: List[Union[float, str]] = []
        for name, raw in zip(names, raw_values):
            try:
                value = float(raw)
            except ValueError:
                # The real server stores a value that is not a number as it came: so do we.
                values.append(raw)
                continue
            if not math.isfinite(value):
                # NaN cannot be stored in SQLite nor written as JSON.
                raise _detail(400, f"Metric {name[:80]!r} is not a finite number.")
            values.append(value)
        return values

    def _training_for_upload(self, model: Row, user: Row, upload_round: int) -> Row:
        training = self.store.one(
            "SELECT * FROM trainings WHERE model_id = ? ORDER BY created DESC", (model["id"],)
        )
        if training is None:
            raise _listed(f"Model {model['id']} is not used by any training")
        self._check_upload_allowed(training, model, user, upload_round)
        return training

    def _check_upload_allowed(
        self, training: Row, model: Row, user: Row, upload_round: int
    ) -> None:
        if user["id"] not in self._participant_ids(training["id"]):
            raise _detail(403, f"You are not a participant of training {training['id']}!")
        if training["state"] != "O":
            raise _listed(f"Training with ID {training['id']} is in state {training['state']}")
        if model["round"] != upload_round:
            raise _listed(
                f"Training with ID {training['id']} is not currently in round {upload_round}"
            )
        if training["phase"] != "update":
            raise _listed(
                f"Training with ID {training['id']} is testing round {upload_round}; "
                "model updates are not accepted until the next round starts"
            )

    def _record_upload(
        self,
        training: Row,
        model: Row,
        user: Row,
        upload_round: int,
        sample_size: int,
        local_id: str,
        path: str,
        names: Sequence[str],
        values: Sequence[Union[float, str]],
    ) -> bool:
        """Store the upload atomically; True when it was the last one of the round."""
        now = time.time()
        with self.store.transaction() as conn:
            # Re-checked under the lock: the state may have moved since the first check.
            fresh_training = conn.execute(
                "SELECT * FROM trainings WHERE id = ?", (training["id"],)
            ).fetchone()
            fresh_model = conn.execute(
                "SELECT * FROM models WHERE id = ?", (model["id"],)
            ).fetchone()
            self._check_upload_allowed(fresh_training, fresh_model, user, upload_round)
            try:
                conn.execute(
                    "INSERT INTO local_models VALUES (?,?,?,?,?,?,?)",
                    (local_id, training["id"], upload_round, user["id"], sample_size, path, now),
                )
            except sqlite3.IntegrityError:
                raise _detail(
                    409,
                    f"You already uploaded a model for round {upload_round} of training "
                    f"{training['id']}; a duplicate is not counted.",
                ) from None
            for name, value in zip(names, values):
                conn.execute(
                    _INSERT_METRIC,
                    (
                        model["id"],
                        training["id"],
                        upload_round,
                        user["id"],
                        "train",
                        name,
                        value,
                        now,
                    ),
                )
            arrived = conn.execute(
                "SELECT COUNT(*) FROM local_models WHERE training_id = ? AND round = ?",
                (training["id"], upload_round),
            ).fetchone()[0]
            expected = conn.execute(
                "SELECT COUNT(*) FROM participants WHERE training_id = ?", (training["id"],)
            ).fetchone()[0]
            if arrived < expected:
                return False
            conn.execute(
                "UPDATE trainings SET phase = 'aggregating', updated = ? WHERE id = ?",
                (now, training["id"]),
            )
            return True

    # --- aggregation ---------------------------------------------------------

    def _submit_aggregation(self, training_id: str, upload_round: int) -> None:
        with self._pending_lock:
            self._pending += 1
        try:
            self._aggregator.submit(self._aggregate, training_id, upload_round)
        except RuntimeError:  # shutting down
            self._done_pending()

    def _done_pending(self) -> None:
        with self._pending_lock:
            self._pending -= 1
            self._pending_lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no aggregation is pending (or ``timeout`` seconds pass); True if idle."""
        with self._pending_lock:
            return self._pending_lock.wait_for(lambda: self._pending == 0, timeout)

    def _aggregate(self, training_id: str, upload_round: int) -> None:
        try:
            self._aggregate_round(training_id, upload_round)
        except Exception as exc:
            _log.exception("aggregation of training %s round %s failed", training_id, upload_round)
            self.store.execute(
                "UPDATE trainings SET state = 'E', error = ?, updated = ? WHERE id = ?",
                (f"aggregation failed: {exc}", time.time(), training_id),
            )
        finally:
            self._done_pending()

    def _aggregate_round(self, training_id: str, upload_round: int) -> None:
        from fl_sidecar import models

        training = self.store.one("SELECT * FROM trainings WHERE id = ?", (training_id,))
        assert training is not None
        model = self.store.one("SELECT * FROM models WHERE id = ?", (training["model_id"],))
        assert model is not None
        uploads = self.store.all(
            "SELECT * FROM local_models WHERE training_id = ? AND round = ? ORDER BY created",
            (training_id, upload_round),
        )
        # average_archives normalises: the sample sizes are the FedAvg weights.
        weights = [float(u["sample_size"]) for u in uploads]
        tmp_path = os.path.join(self._models_dir, f"{model['id']}.{uuid.uuid4().hex}.tmp")
        try:
            # One tensor at a time, with the restricted reader: uploads' pickles never
            # run, and memory does not grow with the number of clients.
            models.average_archives(model["path"], [u["path"] for u in uploads], weights, tmp_path)
            # Readers that already opened the old file keep reading it intact.
            os.replace(tmp_path, model["path"])
        except BaseException:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
            raise
        new_round = upload_round + 1
        now = time.time()
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE models SET round = ?, size = ?, updated = ? WHERE id = ?",
                (new_round, os.path.getsize(model["path"]), now, model["id"]),
            )
            conn.execute(
                "DELETE FROM local_models WHERE training_id = ? AND round = ?",
                (training_id, upload_round),
            )
            conn.execute(
                "UPDATE trainings SET phase = 'test', updated = ? WHERE id = ?", (now, training_id)
            )
        for upload in uploads:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(upload["path"])
        endpoints = self._endpoints(self._participant_ids(training_id))
        self._notify_all(
            endpoints,
            "MODEL_TEST_ROUND",
            training_id,
            {"round": new_round, "global_model_uuid": model["id"]},
        )

    # --- metrics -------------------------------------------------------------

    def _upload_metrics(self, request: _Request, model_id: str) -> _Response:
        user = self._authenticate(request)
        model = self._model_or_400(model_id)
        if request.length is not None and request.length > _JSON_LIMIT:
            raise _detail(413, f"Metrics body larger than {_JSON_LIMIT} bytes.")
        media_type = request.content_type.partition(";")[0].strip().lower()
        if media_type == "multipart/form-data":
            with self._read_form(request) as form:
                fields = form.fields
        elif media_type in ("application/x-www-form-urlencoded", ""):
            raw = request.body.read(_JSON_LIMIT + 1)
            if len(raw) > _JSON_LIMIT:  # a body without Content-Length, not cut off silently
                raise _detail(413, f"Metrics body larger than {_JSON_LIMIT} bytes.")
            try:
                fields = urllib.parse.parse_qs(
                    raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw)
                )
            except (UnicodeDecodeError, ValueError) as exc:
                raise _detail(400, f"Form parse error - {exc}") from None
        elif media_type == "application/json":
            data = self._read_json(request)
            fields = {
                k: [str(x) for x in v] if isinstance(v, list) else [str(v)] for k, v in data.items()
            }
        else:
            raise _detail(415, f'Unsupported media type "{media_type}" in request.')
        names = fields.get("metric_names", [])
        values = self._parse_metric_values(names, fields.get("metric_values", []))
        training = self.store.one(
            "SELECT * FROM trainings WHERE model_id = ? ORDER BY created DESC", (model["id"],)
        )
        if training is not None:
            allowed = set(self._participant_ids(training["id"])) | {training["actor_id"]}
            if user["id"] not in allowed:
                raise _detail(403, f"You are not a participant of training {training['id']}!")
        advance = self._record_metrics(model, training, user, names, values)
        if advance is not None:
            self._advance_after_test(*advance)
        return _Response(201, {"detail": "Model Metrics Upload Accepted", "model_id": model["id"]})

    def _record_metrics(
        self,
        model: Row,
        training: Optional[Row],
        user: Row,
        names: Sequence[str],
        values: Sequence[Union[float, str]],
    ) -> Optional[Tuple[str, int]]:
        """Store metrics; returns (training id, round) when that completes a test round."""
        now = time.time()
        with self.store.transaction() as conn:
            fresh_model = conn.execute(
                "SELECT round FROM models WHERE id = ?", (model["id"],)
            ).fetchone()
            model_round = int(fresh_model["round"])
            training_id = None if training is None else training["id"]
            for name, value in zip(names, values):
                conn.execute(
                    _INSERT_METRIC,
                    (model["id"], training_id, model_round, user["id"], "test", name, value, now),
                )
            if training is None:
                return None
            fresh = conn.execute("SELECT * FROM trainings WHERE id = ?", (training_id,)).fetchone()
            participants = [
                r[0]
                for r in conn.execute(
                    "SELECT user_id FROM participants WHERE training_id = ?", (training_id,)
                )
            ]
            if fresh["state"] != "O" or fresh["phase"] != "test" or user["id"] not in participants:
                return None
            conn.execute(
                "INSERT OR IGNORE INTO test_reports VALUES (?,?,?)",
                (training_id, model_round, user["id"]),
            )
            reported = conn.execute(
                "SELECT COUNT(*) FROM test_reports WHERE training_id = ? AND round = ?",
                (training_id, model_round),
            ).fetchone()[0]
            if reported < len(participants):
                return None
            finished = model_round >= int(fresh["target_num_updates"])
            if finished:
                conn.execute(
                    "UPDATE trainings SET state = 'C', phase = 'done', updated = ? WHERE id = ?",
                    (now, training_id),
                )
            else:
                conn.execute(
                    "UPDATE trainings SET phase = 'update', updated = ? WHERE id = ?",
                    (now, training_id),
                )
            return (str(training_id), model_round)

    def _advance_after_test(self, training_id: str, model_round: int) -> None:
        training = self.store.one("SELECT * FROM trainings WHERE id = ?", (training_id,))
        assert training is not None
        participants = self._participant_ids(training_id)
        if training["state"] == "C":
            recipients = list(participants)
            if training["actor_id"] not in recipients:
                recipients.append(training["actor_id"])
            self._notify_all(
                self._endpoints(recipients),
                "TRAINING_FINISHED",
                training_id,
                {"global_model_uuid": training["model_id"]},
            )
        else:
            self._notify_all(
                self._endpoints(participants),
                "UPDATE_ROUND_START",
                training_id,
                {"round": model_round, "global_model_uuid": training["model_id"]},
            )

    def _list_metrics(self, request: _Request, model_id: str) -> _Response:
        self._authenticate(request)
        model = self._model_or_400(model_id)
        rows = self.store.all(
            "SELECT * FROM metrics WHERE model_id = ? ORDER BY id", (model["id"],)
        )
        body = [
            {
                "model_id": r["model_id"],
                "training_id": r["training_id"],
                "round": r["round"],
                "reporter": r["reporter_id"],
                "kind": r["kind"],
                "key": r["key"],
                "value": r["value"],
            }
            for r in rows
        ]
        return _Response(200, body)

    # --- trainings -----------------------------------------------------------

    def _create_training(self, request: _Request) -> _Response:
        user = self._authenticate(request)
        data = self._read_json(request)
        raw_model = data.get("model_id")
        if not isinstance(raw_model, str):
            raise _HttpError(400, {"model_id": ["This field is required."]})
        model = self._model_or_400(raw_model)
        target = data.get("target_num_updates")
        if not isinstance(target, int) or isinstance(target, bool) or not 1 <= target <= _MAX_COUNT:
            raise _HttpError(
                400, {"target_num_updates": [f"An integer from 1 to {_MAX_COUNT} is required."]}
            )
        metric_names = data.get("metric_names", [])
        if not isinstance(metric_names, list) or not all(isinstance(m, str) for m in metric_names):
            raise _HttpError(400, {"metric_names": ["Expected a list of strings."]})
        method = data.get("aggregation_method", "FedAvg")
        if method not in _KNOWN_METHODS:
            raise _HttpError(400, {"aggregation_method": [f'"{method}" is not a valid choice.']})
        if method not in _AGGREGATION_METHODS:
            raise _HttpError(
                400, {"aggregation_method": [f"{method} is not implemented by the dev server."]}
            )
        clients = self._client_ids(data.get("clients", []))
        training_id = str(uuid.uuid4())
        now = time.time()
        with self.store.transaction() as conn:
            used = conn.execute(
                "SELECT id FROM trainings WHERE model_id = ?", (model["id"],)
            ).fetchone()
            if used is not None:
                raise _listed(f"Model {model['id']} is already used by training {used['id']}")
            conn.execute(
                "INSERT INTO trainings VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    training_id,
                    model["id"],
                    user["id"],
                    "I",
                    "initial",
                    target,
                    json.dumps(metric_names),
                    method,
                    None,
                    now,
                    now,
                ),
            )
            for client in clients:
                conn.execute(
                    "INSERT OR IGNORE INTO participants VALUES (?,?)", (training_id, client)
                )
        return _Response(
            201, {"detail": "Training created successfully!", "training_id": training_id}
        )

    def _client_ids(self, raw: Any) -> List[str]:
        if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
            raise _HttpError(400, {"clients": ["Expected a list of user ids."]})
        result: List[str] = []
        for client in raw:
            normal = _parse_uuid(client)
            row = (
                None
                if normal is None
                else self.store.one("SELECT id FROM users WHERE id = ?", (normal,))
            )
            if row is None:
                raise _HttpError(400, {"clients": [f"User {client} not found."]})
            if row["id"] not in result:
                result.append(row["id"])
        return result

    def _get_training(self, request: _Request, training_id: str) -> _Response:
        self._authenticate(request)
        training = self._training_or_400(training_id)
        return _Response(200, self._training_body(training))

    def _training_body(self, training: Row) -> Dict[str, Any]:
        model = self.store.one("SELECT round FROM models WHERE id = ?", (training["model_id"],))
        model_round = int(model["round"]) if model is not None else 0
        participants = self._participant_ids(training["id"])
        arrived = self.store.one(
            "SELECT COUNT(*) FROM local_models WHERE training_id = ? AND round = ?",
            (training["id"], model_round),
        )
        reported = self.store.one(
            "SELECT COUNT(*) FROM test_reports WHERE training_id = ? AND round = ?",
            (training["id"], model_round),
        )
        return {
            "id": training["id"],
            "state": training["state"],
            "target_num_updates": training["target_num_updates"],
            "metric_names": json.loads(training["metric_names"]),
            "aggregation_method": training["aggregation_method"],
            "model": training["model_id"],
            "actor": training["actor_id"],
            "participants": participants,
            "round": model_round,
            "phase": training["phase"],
            "local_models_arrived": int(arrived[0]) if arrived is not None else 0,
            "local_models_expected": len(participants),
            "test_reports_arrived": int(reported[0]) if reported is not None else 0,
            "error": training["error"],
            "last_update": training["updated"],
        }

    def _add_participants(self, request: _Request, training_id: str) -> _Response:
        self._change_participants(request, training_id, add=True)
        return _Response(202, {"detail": "Users registered as participants!"})

    def _remove_participants(self, request: _Request, training_id: str) -> _Response:
        self._change_participants(request, training_id, add=False)
        return _Response(202, {"detail": "Users removed from participants!"})

    def _change_participants(self, request: _Request, training_id: str, *, add: bool) -> None:
        user = self._authenticate(request)
        training = self._training_or_400(training_id)
        data = self._read_json(request)
        if "clients" not in data:
            raise _HttpError(400, {"clients": ["This field is required."]})
        clients = self._client_ids(data["clients"])
        if training["actor_id"] != user["id"]:
            raise _detail(403, "Only the training's actor may change its participants.")
        with self.store.transaction() as conn:
            state = conn.execute(
                "SELECT state FROM trainings WHERE id = ?", (training["id"],)
            ).fetchone()
            if state["state"] != "I":
                raise _listed(f"Training with ID {training['id']} is in state {state['state']}")
            for client in clients:
                if add:
                    conn.execute(
                        "INSERT OR IGNORE INTO participants VALUES (?,?)", (training["id"], client)
                    )
                else:
                    conn.execute(
                        "DELETE FROM participants WHERE training_id = ? AND user_id = ?",
                        (training["id"], client),
                    )

    def _start_training(self, request: _Request, training_id: str) -> _Response:
        user = self._authenticate(request)
        training = self._training_or_400(training_id)
        if training["actor_id"] != user["id"]:
            raise _detail(403, "Only the training's actor may start it.")
        now = time.time()
        with self.store.transaction() as conn:
            fresh = conn.execute(
                "SELECT state FROM trainings WHERE id = ?", (training["id"],)
            ).fetchone()
            if fresh["state"] != "I":
                raise _listed(
                    f"Training with ID {training['id']} is in state {fresh['state']}, not I"
                )
            count = conn.execute(
                "SELECT COUNT(*) FROM participants WHERE training_id = ?", (training["id"],)
            ).fetchone()[0]
            if count == 0:
                raise _listed(f"Training with ID {training['id']} has no participants")
            conn.execute(
                "UPDATE trainings SET state = 'O', phase = 'update', updated = ? WHERE id = ?",
                (now, training["id"]),
            )
            model_round = conn.execute(
                "SELECT round FROM models WHERE id = ?", (training["model_id"],)
            ).fetchone()[0]
        endpoints = self._endpoints(self._participant_ids(training["id"]))
        self._notify_all(
            endpoints, "TRAINING_START", training["id"], {"global_model_uuid": training["model_id"]}
        )
        self._notify_all(
            endpoints,
            "UPDATE_ROUND_START",
            training["id"],
            {"round": int(model_round), "global_model_uuid": training["model_id"]},
        )
        return _Response(202, {"detail": "Training started!"})

    def close(self) -> None:
        """Wait for running aggregations, then stop the aggregation workers."""
        self._aggregator.shutdown(wait=True)


class _FileChunks:
    """A response body read from an open file in chunks; WSGI servers call close()."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self._handle.read(_DOWNLOAD_CHUNK)
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self._handle.close()


_REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
}
