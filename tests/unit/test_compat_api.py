"""``fl_sidecar.compat`` offers the reference client's whole public API (names and signatures).

The reference's surface is data, in ``tests/fixtures/reference_api.json``:
module names, methods with their parameters in order (and defaults, where the
reference has any), class methods, instance attributes, the exception classes
and ``Settings`` with its variables and defaults. A drop-in replacement must
accept every call the reference accepts, so each compat signature must take
the same parameters in the same order, by the same names; it may add only
parameters with defaults after them.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from fl_sidecar import compat, config
from fl_sidecar.compat import Communication, Settings

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "reference_api.json"
REFERENCE: Dict[str, Any] = json.loads(FIXTURE.read_text())

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _check_signature(where: str, function: Any, spec: Dict[str, Any], *, drop_first: bool) -> None:
    """``function`` accepts every call the reference's ``spec`` accepts."""
    parameters = list(inspect.signature(function).parameters.values())
    if drop_first:
        assert parameters and parameters[0].name in ("self", "cls"), where
        parameters = parameters[1:]
    expected: List[str] = spec["parameters"]
    defaults: Dict[str, Any] = spec.get("defaults", {})
    names = [p.name for p in parameters[: len(expected)]]
    assert names == expected, f"{where}: parameters {names}, the reference has {expected}"
    for parameter in parameters[: len(expected)]:
        assert parameter.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD, (where, parameter)
        if parameter.name in defaults:
            assert parameter.default == defaults[parameter.name], (where, parameter)
    for extra in parameters[len(expected) :]:
        # Anything more must be optional, or the reference's calls would break.
        assert extra.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) or (
            extra.default is not inspect.Parameter.empty
        ), f"{where}: extra parameter {extra.name} has no default"


def test_every_reference_name_is_exported() -> None:
    for name in REFERENCE["module_names"]:
        assert name in compat.__all__, name
        assert getattr(compat, name) is not None, name


def test_module_functions_have_the_reference_signatures() -> None:
    for name, spec in REFERENCE["functions"].items():
        _check_signature(name, getattr(compat, name), spec, drop_first=False)


@pytest.mark.parametrize("name", sorted(REFERENCE["communication"]["methods"]))
def test_methods_have_the_reference_signatures(name: str) -> None:
    spec = REFERENCE["communication"]["methods"][name]
    attribute = inspect.getattr_static(Communication, name)
    assert not isinstance(attribute, (classmethod, staticmethod)), name
    _check_signature(name, attribute, spec, drop_first=True)


@pytest.mark.parametrize("name", sorted(REFERENCE["communication"]["classmethods"]))
def test_classmethods_are_classmethods_with_the_reference_signatures(name: str) -> None:
    spec = REFERENCE["communication"]["classmethods"][name]
    assert isinstance(inspect.getattr_static(Communication, name), classmethod), name
    # Through the class: bound, so cls is gone, exactly as callers see it.
    _check_signature(name, getattr(Communication, name), spec, drop_first=False)


def test_instance_attributes_are_set_by_the_constructor() -> None:
    arguments: List[Any] = [uuid.uuid4(), uuid.uuid4(), 3, uuid.uuid4(), "Token abc"]
    com = Communication(*arguments)
    names = REFERENCE["communication"]["instance_attributes"]
    assert [getattr(com, name) for name in names] == arguments


@pytest.mark.parametrize("name", sorted(REFERENCE["exceptions"]))
def test_exceptions_take_a_response_and_carry_it(name: str) -> None:
    spec = REFERENCE["exceptions"][name]
    cls = getattr(compat, name)
    assert issubclass(cls, getattr(compat, spec["base"], Exception))
    first = list(inspect.signature(cls.__init__).parameters)[1]
    assert first == spec["first_parameter"]

    class ReferenceShapedResponse:  # what the reference raises with: a requests.Response
        status_code = 400
        text = '{"detail": "Model 1 not found."}'

    response = ReferenceShapedResponse()
    exc = cls(response)
    assert exc.response is response
    assert exc.http_status == 400
    assert str(exc) == response.text  # the reference's message: the body (no "message" key)
    assert cls(ServerShaped('{"message": "short"}')).args == ("short",)
    raised_here = cls("the sidecar refused it", code="INVALID_ARGUMENT")
    for attribute in REFERENCE["response_attributes"]:
        assert hasattr(raised_here.response, attribute), attribute
    assert raised_here.response.status_code is None


class ServerShaped:
    status_code = 500

    def __init__(self, text: str) -> None:
        self.text = text


def test_settings_has_the_reference_fields_types_and_defaults() -> None:
    defaults = config.reference_client_environment({})
    for name, spec in REFERENCE["settings"].items():
        value = getattr(Settings, name)
        assert type(value).__name__ == spec["type"], name
        if spec["variable"] is not None:
            assert str(spec["default"]) == defaults[spec["variable"]], name
    assert Settings.COMMUNICATION_MODULE == "fl_sidecar.compat.Communication"
    module, _, attribute = Settings.COMMUNICATION_MODULE.rpartition(".")
    assert getattr(__import__(module, fromlist=[attribute]), attribute) is Communication


def test_settings_variables_are_read_like_the_reference() -> None:
    read = config.reference_client_environment(
        {
            "FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY": "/work",
            "FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH": "",  # set but empty: kept, as there
            "FL_CLIENT_SERVER_PORT": "9000",
        }
    )
    assert read["FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY"] == "/work"
    assert read["FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH"] == ""
    assert read["FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR"] == "python"
    assert read["FL_CLIENT_SERVER_PORT"] == "9000"
    # At import, from this process's environment.
    now = config.reference_client_environment()
    assert now["FL_DEMONSTRATOR_BASE_URL"] == Settings.FL_DEMONSTRATOR_BASE_URL
    assert str(Settings.SERVER_PORT) == now["FL_CLIENT_SERVER_PORT"]


def test_start_training_runs_what_settings_say_at_call_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: List[Tuple[List[str], str]] = []

    class RecordingPopen:
        def __init__(self, args: List[str], cwd: str) -> None:
            started.append((args, cwd))

    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    monkeypatch.setattr(Settings, "FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR", "python3.11")
    monkeypatch.setattr(Settings, "FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH", "train.py")
    monkeypatch.setattr(Settings, "FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY", "/srv/job")
    Communication.start_training("t-1", 2, "m-1")
    Communication.start_testing("t-1", 3, "m-1")
    expected = ["--training-id", "t-1", "--round", "2", "--model-id", "m-1"]
    assert started[0] == (["python3.11", "train.py", "train", *expected], "/srv/job")
    assert started[1][0][2:4] == ["test", "--training-id"]
    # A class-level override still wins over Settings.
    monkeypatch.setattr(Communication, "script_path", "other.py")
    Communication.start_training("t-1", 2, "m-1")
    assert started[2][0][1] == "other.py"
