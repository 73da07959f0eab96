"""Settings of ``fl-sidecar serve``: flags over environment over defaults, validation, secrets."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional

import grpc
import pytest

from fl_sidecar import errors
from fl_sidecar.sidecar.settings import (
    DEFAULT_MAX_MODEL_SIZE,
    DEFAULT_NOTIFICATION_PORT,
    SETTINGS,
    Settings,
    add_arguments,
    default_socket_path,
    is_loopback_host,
    parse_listen,
    parse_size,
    strip_userinfo,
)
from fl_sidecar.sidecar.status import status_for
from fl_sidecar.sidecar.telemetry import RedactingFilter, configure_logging


def settings(argv: List[str], env: Optional[Dict[str, str]] = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return Settings.from_args(parser.parse_args(argv), env or {})


def test_defaults_are_safe() -> None:
    s = settings([], {"XDG_RUNTIME_DIR": "/run/user/1000"})
    assert s.socket_path == "/run/user/1000/fl-sidecar/sidecar.sock"
    assert s.listen is None
    assert s.notification_host == "127.0.0.1"
    assert s.notification_port == DEFAULT_NOTIFICATION_PORT
    assert s.metrics_port is None
    assert s.trust_pickles is False
    assert s.api_token is None
    assert s.max_model_size == DEFAULT_MAX_MODEL_SIZE
    assert s.compression == "auto"
    assert s.compatibility_mode is False


def test_flags_override_environment() -> None:
    env = {
        "FL_SIDECAR_SERVER_URL": "http://env:1",
        "FL_DEMONSTRATOR_BASE_URL": "http://reference:2",
        "FL_SIDECAR_MAX_MODEL_SIZE": "2G",
        "FL_SIDECAR_TRUST_PICKLES": "yes",
        "FL_CLIENT_SERVER_PORT": "9000",
        "FL_SIDECAR_LOG_FORMAT": "json",
    }
    s = settings([], env)
    assert s.server_url == "http://env:1"
    assert s.max_model_size == 2 * 1024**3
    assert s.trust_pickles is True
    assert s.notification_port == 9000
    assert s.log_format == "json"
    s = settings(
        [
            "--server-url",
            "http://flag:3",
            "--max-model-size",
            "500MB",
            "--notification-port",
            "0",
            "--log-format",
            "text",
        ],
        env,
    )
    assert s.server_url == "http://flag:3"
    assert s.max_model_size == 500 * 1000**2
    assert s.notification_port == 0
    assert s.log_format == "text"


def test_reference_base_url_is_the_fallback() -> None:
    assert settings([], {"FL_DEMONSTRATOR_BASE_URL": "http://ref:8000"}).server_url == (
        "http://ref:8000"
    )


def test_compatibility_mode_from_the_reference_variables() -> None:
    s = settings(
        [],
        {
            "FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR": "python3",
            "FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH": "train.py",
            "FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY": "/work",
        },
    )
    assert s.warnings == ()
    assert s.compatibility_mode
    assert (s.script_executor, s.script_path, s.script_working_directory) == (
        "python3",
        "train.py",
        "/work",
    )


def test_secrets_from_files_and_never_in_repr(tmp_path: Path) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text("s3cret-password\n")
    token_file = tmp_path / "token"
    token_file.write_text("api-token-value")
    s = settings(
        ["--username", "alice", "--password-file", str(password_file)],
        {"FL_SIDECAR_API_TOKEN_FILE": str(token_file)},
    )
    assert s.password == "s3cret-password"
    assert s.api_token == "api-token-value"
    assert "s3cret-password" not in repr(s)
    assert "api-token-value" not in repr(s)
    assert set(s.secrets()) >= {"s3cret-password", "api-token-value"}


def test_missing_secret_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigurationError, match="secret file"):
        settings(["--username", "a", "--password-file", str(tmp_path / "absent")])


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--listen", "0.0.0.0:50051"], {}, "--allow-remote"),
        (["--listen", "nonsense"], {}, "listen"),
        (["--notification-host", "0.0.0.0"], {}, "--allow-remote"),
        ([], {"FL_SIDECAR_TRUST_PICKLES": "maybe"}, "boolean"),
        ([], {"FL_SIDECAR_MAX_MODEL_SIZE": "12 parsecs"}, "size"),
        ([], {"FL_SIDECAR_MAX_MODEL_SIZE": "0"}, "size"),
        ([], {"FL_CLIENT_SERVER_PORT": "70000"}, "port"),
        ([], {"FL_SIDECAR_COMPRESSION": "gzip"}, "compression"),
        ([], {"FL_SIDECAR_LOG_LEVEL": "LOUD"}, "log level"),
        (["--server-url", "ftp://x"], {}, "URL"),
        (["--username", "alice"], {}, "password"),
        (["--socket", "/tmp/" + "x" * 200], {}, "longer"),
    ],
)
def test_invalid_settings_are_refused(argv: List[str], env: Dict[str, str], message: str) -> None:
    with pytest.raises(errors.ConfigurationError, match=message):
        settings(argv, env)


def test_remote_addresses_with_allow_remote() -> None:
    s = settings(["--listen", "0.0.0.0:50051", "--allow-remote"])
    assert s.listen == ("0.0.0.0", 50051)
    assert s.socket_path is None  # TCP only when --listen is given without --socket


def test_invalid_url_message_does_not_echo_the_password() -> None:
    with pytest.raises(errors.ConfigurationError) as caught:
        settings(["--server-url", "ftp://bob:hunter2-pw@host/"])
    assert "hunter2-pw" not in str(caught.value)


def test_helpers() -> None:
    assert parse_size("4G") == 4 * 1024**3
    assert parse_size("1048576") == 1024 * 1024
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert is_loopback_host("localhost") and is_loopback_host("127.0.0.5")
    assert is_loopback_host("::1")
    assert not is_loopback_host("10.0.0.1") and not is_loopback_host("example.com")
    assert strip_userinfo("https://u:p@host:8000/api?x=1") == "https://host:8000/api?x=1"
    assert strip_userinfo("http://host/") == "http://host/"


def test_status_codes_follow_the_proto() -> None:
    def code(exc: BaseException) -> grpc.StatusCode:
        return status_for(exc)

    assert code(errors.NotFoundError("x")) == grpc.StatusCode.NOT_FOUND
    assert code(errors.AuthenticationError("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert code(errors.PermissionDeniedError("x")) == grpc.StatusCode.PERMISSION_DENIED
    assert code(errors.ConflictError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code(errors.UploadOutcomeUnknownError("x")) == grpc.StatusCode.UNKNOWN
    assert code(errors.ServerUnavailableError("x")) == grpc.StatusCode.UNAVAILABLE
    assert code(errors.ChecksumMismatchError("x")) == grpc.StatusCode.DATA_LOSS
    assert code(errors.TruncatedDataError("x")) == grpc.StatusCode.DATA_LOSS
    assert code(errors.SizeLimitExceededError("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # zstd failing to allocate a window is a resource limit, not damage in the data.
    assert code(MemoryError()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code(errors.ModelLimitExceededError("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code(errors.ModelReadCancelledError("x")) == grpc.StatusCode.CANCELLED
    assert code(errors.SpoolFullError("x", spool_dir="/s")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code(errors.UnsafePickleError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code(errors.ModelFormatError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(errors.TensorMismatchError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(errors.SidecarError("x", code="CANCELLED")) == grpc.StatusCode.CANCELLED
    assert code(KeyError("bug")) == grpc.StatusCode.INTERNAL


def test_logs_redact_secrets_in_text_and_json() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    for fmt in ("text", "json"):
        stream = io.StringIO()
        configure_logging(level="INFO", fmt=fmt, secrets=["tok-secret-123"], stream=stream)
        try:
            log = logging.getLogger("fl_sidecar.test")
            log.info("header %s", "Token tok-secret-123", extra={"auth": "x tok-secret-123"})
            try:
                raise ValueError("tok-secret-123 in an exception")
            except ValueError:
                log.exception("failed")
        finally:
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)
        text = stream.getvalue()
        assert "tok-secret-123" not in text
        assert "***" in text
        if fmt == "json":
            first = json.loads(text.splitlines()[0])
            # "Token" stays unless another test registered a secret that overlaps it
            # (the registry is process-wide): the secret itself never shows.
            assert first["msg"] in ("header Token ***", "header ***")
            assert first["auth"] == "x ***"


def test_logs_redact_secrets_inside_structured_fields_and_stacks() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    for fmt in ("text", "json"):
        stream = io.StringIO()
        configure_logging(level="INFO", fmt=fmt, secrets=["tok-secret-123"], stream=stream)
        try:
            logging.getLogger("fl_sidecar.test").info(
                "call",
                extra={
                    "headers": {"Authorization": "Token tok-secret-123"},
                    "argv": ["--password", "tok-secret-123"],
                    "raw": b"tok-secret-123",
                    "error": ValueError("bad tok-secret-123"),
                    "rounds": [1, 2],
                },
                stack_info=True,
            )
        finally:
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)
        text = stream.getvalue()
        assert "tok-secret-123" not in text, fmt
        # Fields without a secret keep their type.
        if fmt == "json":
            record = json.loads(text.splitlines()[0])
            assert record["rounds"] == [1, 2]
            assert "***" in record["headers"] and "***" in record["argv"]


def test_redacting_filter_ignores_tiny_strings() -> None:
    assert RedactingFilter(["ab"]).redact("abc") == "abc"


def test_training_script_environment_has_no_server_credentials() -> None:
    s = settings(
        ["--socket", "/tmp/x.sock"],
        {
            "FL_SIDECAR_USERNAME": "u",
            "FL_SIDECAR_PASSWORD": "pw-1234",
            "FL_SIDECAR_TOKEN": "tok-1234",
            "PATH": "/bin",
        },
    )
    assert s.script_env is not None
    assert "FL_SIDECAR_PASSWORD" not in s.script_env
    assert "FL_SIDECAR_TOKEN" not in s.script_env
    assert s.script_env["PATH"] == "/bin"
    assert s.script_env["FL_SIDECAR_SOCKET"] == "/tmp/x.sock"


def test_training_script_environment_has_no_userinfo_in_the_server_url() -> None:
    s = settings(
        ["--socket", "/tmp/x.sock"],
        {"FL_DEMONSTRATOR_BASE_URL": "http://u:pw-1234@fl.example:8000/api"},
    )
    assert s.script_env is not None
    assert s.script_env["FL_DEMONSTRATOR_BASE_URL"] == "http://fl.example:8000/api"
    assert "pw-1234" in s.secrets()


def test_socket_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    from fl_sidecar.sidecar.process import check_socket_directory

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    check_socket_directory(str(private))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(errors.ConfigurationError, match="writable by others"):
        check_socket_directory(str(shared))
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot remove our socket
    check_socket_directory(str(shared))


def test_trusting_the_socket_parent_is_off_unless_asked(tmp_path: Path) -> None:
    assert settings(["--socket", "/tmp/x.sock"]).trust_socket_parent is False
    assert settings(["--socket", "/tmp/x.sock", "--trust-socket-parent"]).trust_socket_parent
    env = {"FL_SIDECAR_TRUST_SOCKET_PARENT": "1"}
    assert settings(["--socket", "/tmp/x.sock"], env).trust_socket_parent is True
    with pytest.raises(errors.ConfigurationError, match="FL_SIDECAR_TRUST_SOCKET_PARENT"):
        settings(["--socket", "/tmp/x.sock"], {"FL_SIDECAR_TRUST_SOCKET_PARENT": "maybe"})


def test_socket_refusals_are_configuration_errors_that_name_the_path(tmp_path: Path) -> None:
    from fl_sidecar.sidecar.process import check_socket_directory

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(errors.UnsafeSocketError) as caught:
        check_socket_directory(str(shared))
    assert isinstance(caught.value, errors.ConfigurationError)  # exit status 2 in serve
    assert caught.value.path == str(shared)
    # The parents' check alone can be waived, never the directory's own.
    with pytest.raises(errors.UnsafeSocketError):
        check_socket_directory(str(shared), trust_parents=True)


# --- compatibility mode: switch, reference defaults, caps ---------------------------


def test_the_old_working_directory_name_still_works_with_a_warning() -> None:
    s = settings([], {"FL_DEMONSTRATOR_TRAINING_SCRIPT_WORKING_DIRETORY": "/old"})
    assert s.compatibility_mode
    assert s.script_working_directory == "/old"
    (warning,) = s.warnings
    assert "FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY" in warning
    # The reference client's name wins when both are set.
    both = settings(
        [],
        {
            "FL_DEMONSTRATOR_TRAINING_SCRIPT_WORKING_DIRETORY": "/old",
            "FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY": "/new",
        },
    )
    assert both.script_working_directory == "/new"
    assert both.warnings == ()


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--run-scripts"], {}),
        ([], {"FL_SIDECAR_RUN_SCRIPTS": "1"}),
        ([], {"FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR": "python"}),
        ([], {"FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH": "src/main.py"}),
        ([], {"FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY": "."}),
        (["--script-working-directory", "."], {}),
    ],
)
def test_compatibility_mode_is_on_with_the_reference_defaults(
    argv: List[str], env: Dict[str, str]
) -> None:
    s = settings(argv, env)
    assert s.compatibility_mode
    assert (s.script_executor, s.script_path, s.script_working_directory) == (
        "python",
        "src/main.py",
        ".",
    )
    assert (s.max_concurrent_scripts, s.max_queued_scripts) == (2, 64)
    assert s.script_training_ids is None


def test_compatibility_mode_off_unless_asked_and_off_when_told() -> None:
    off = settings([], {})
    assert not off.compatibility_mode
    assert (off.script_executor, off.script_path, off.script_working_directory) == (None,) * 3
    told = settings(
        [], {"FL_SIDECAR_RUN_SCRIPTS": "0", "FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH": "x"}
    )
    assert not told.compatibility_mode
    assert told.script_path is None


def test_script_caps_and_training_ids() -> None:
    s = settings(
        ["--run-scripts", "--max-concurrent-scripts", "3"],
        {"FL_SIDECAR_MAX_QUEUED_SCRIPTS": "5", "FL_SIDECAR_SCRIPT_TRAINING_IDS": " a , b,,"},
    )
    assert (s.max_concurrent_scripts, s.max_queued_scripts) == (3, 5)
    assert s.script_training_ids == ("a", "b")
    with pytest.raises(errors.ConfigurationError, match="names no training id"):
        settings([], {"FL_SIDECAR_SCRIPT_TRAINING_IDS": " , "})
    with pytest.raises(errors.ConfigurationError):
        settings([], {"FL_SIDECAR_MAX_CONCURRENT_SCRIPTS": "0"})
    with pytest.raises(SystemExit):
        settings(["--max-queued-scripts", "0"])


# --- the settings table: one declaration per setting ---------------------------------


def _serve_help() -> str:
    parser = argparse.ArgumentParser(prog="serve")
    add_arguments(parser)
    # argparse wraps lines (also after hyphens): compare without whitespace.
    return "".join(parser.format_help().split())


def test_every_setting_is_in_the_help_with_its_variables_and_default() -> None:
    text = _serve_help()
    for setting in SETTINGS:
        folded = "".join(setting.help_text().split())
        assert folded in text, setting.flag
        for name in setting.env + setting.deprecated_env:
            assert name in folded, (setting.flag, name)
        shown = setting.shown_default()
        if shown is not None:
            assert "".join(f"; default {shown}]".split()) in folded, setting.flag
        flag = setting.flag if setting.switch else f"{setting.flag}{setting.metavar}"
        assert flag in text, setting.flag
        if setting.secret_file:
            assert f"{setting.file_flag}PATH" in text
            assert all(f"{name}_FILE" in text for name in setting.env)


def test_every_settings_field_is_one_table_entry_with_its_default() -> None:
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    derived = {"script_env", "warnings"}
    entries = [s.field for s in SETTINGS if s.field is not None]
    assert len(entries) == len(set(entries))
    assert set(entries) == set(fields) - derived
    for setting in SETTINGS:
        if setting.field is not None and setting.applies_default:
            assert fields[setting.field].default == setting.default, setting.field
    assert len({s.flag for s in SETTINGS}) == len(SETTINGS)


def test_docs_settings_table_lists_every_setting() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "sidecar.md").read_text()
    table = docs.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    for setting in SETTINGS:
        (row,) = [
            r
            for r in rows
            if any(
                flag.strip("`").split(" ")[0] == setting.flag
                for flag in r.split("|")[1].strip().split(", ")
            )
        ]
        for name in setting.env + setting.deprecated_env:
            assert f"`{name}`" in row, (setting.flag, name)
        if setting.secret_file:
            assert f"`{setting.file_flag}`" in row
            assert all(f"`{name}_FILE`" in row for name in setting.env)
        if setting.default_text is None and setting.default is not None and not setting.switch:
            assert str(setting.shown_default()) in row, setting.flag


def test_a_value_that_does_not_parse_names_its_flag_and_variable() -> None:
    for setting in SETTINGS:
        if setting.parse is str:
            continue
        bad = " , " if setting.field == "script_training_ids" else "\x00not a value\x00"
        env = {setting.env[0]: bad}
        with pytest.raises(errors.ConfigurationError) as caught:
            settings(["--socket", "/tmp/x.sock"], env)
        assert f"{setting.flag} / {setting.env[0]}" in str(caught.value), setting.flag
        assert setting.what in str(caught.value)


def test_the_default_socket_is_one_function_of_the_environment() -> None:
    assert settings([], {"XDG_RUNTIME_DIR": "/run/user/7"}).socket_path == default_socket_path(
        {"XDG_RUNTIME_DIR": "/run/user/7"}
    )
    assert default_socket_path({}) == f"/tmp/fl-sidecar-{os.getuid()}/sidecar.sock"
    assert settings(["--listen", "127.0.0.1:0"], {}).socket_path is None
