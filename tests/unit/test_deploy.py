"""The container image and the Kubernetes manifest agree with the code they deploy.

No container engine runs here, so this checks what can be checked without one:
the manifest parses, every ``FL_*`` variable the image and the manifest set is
a setting the sidecar knows, the sidecar container's flags and environment
resolve into valid settings, and everything the Dockerfile copies exists.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from fl_sidecar import config
from fl_sidecar.errors import ConfigurationError
from fl_sidecar.sidecar import settings as settings_module

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
MANIFEST = ROOT / "deploy" / "k8s" / "trainer-with-sidecar.yaml"


def _known_variables() -> set[str]:
    # The settings module is the one place that reads the environment: every
    # variable it understands is named in its source.
    source = Path(settings_module.__file__ or "").read_text()
    return set(re.findall(r"\b(FL_[A-Z_]+[A-Z])\b", source))


def _manifest() -> List[Dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def _containers() -> Dict[str, Dict[str, Any]]:
    deployment = next(d for d in _manifest() if d["kind"] == "Deployment")
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def _dockerfile_env() -> Dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: Dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for name, value in re.findall(r"(\w+)=(\S+)", line[4:]):
                env[name] = value
    return env


def test_manifest_parses_into_the_expected_objects() -> None:
    kinds = sorted(doc["kind"] for doc in _manifest())
    assert kinds == ["Deployment", "Secret", "Service"]
    containers = _containers()
    assert set(containers) == {"fl-sidecar", "trainer"}
    # The socket volume is shared; the credentials are mounted in the sidecar only.
    mounts = {n: {m["name"] for m in c["volumeMounts"]} for n, c in containers.items()}
    assert "sidecar-socket" in mounts["fl-sidecar"] & mounts["trainer"]
    assert "credentials" in mounts["fl-sidecar"]
    assert "credentials" not in mounts["trainer"]


def test_every_variable_the_deployment_sets_is_a_known_setting() -> None:
    known = _known_variables()
    used = set(_dockerfile_env())
    for container in _containers().values():
        used |= {e["name"] for e in container.get("env", [])}
    fl_variables = {name for name in used if name.startswith("FL_")}
    assert fl_variables, "the deployment sets no FL_* variable at all"
    assert fl_variables <= known, f"unknown settings: {sorted(fl_variables - known)}"


def test_sidecar_container_flags_and_environment_resolve(tmp_path: Path) -> None:
    container = _containers()["fl-sidecar"]
    args: List[str] = list(container["args"])
    assert args[0] == "serve"
    token_file = tmp_path / "token"
    token_file.write_text("0123456789abcdef0123456789abcdef01234567\n")
    flags = [str(token_file) if a.startswith("/var/run/secrets/") else a for a in args[1:]]
    env = _dockerfile_env()
    env.update({e["name"]: e["value"] for e in container["env"]})
    env["FL_SIDECAR_SOCKET"] = str(tmp_path / "sidecar.sock")
    env["FL_SIDECAR_SPOOL_DIR"] = str(tmp_path)

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    settings = config.Settings.from_args(parser.parse_args(flags), env)

    assert settings.server_token == "0123456789abcdef0123456789abcdef01234567"
    assert settings.notification_port == 8101
    assert settings.server_url == "http://fl-demonstrator.fl.svc:8000"
    # The secret never shows in the settings' repr (which may end up in logs).
    assert "0123456789abcdef" not in repr(settings)


def test_sidecar_refuses_a_public_notification_address_without_allow_remote(
    tmp_path: Path,
) -> None:
    env = {
        "FL_CLIENT_SERVER_HOST": "0.0.0.0",
        "FL_SIDECAR_SOCKET": str(tmp_path / "s.sock"),
    }
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    with pytest.raises(ConfigurationError, match="allow-remote"):
        config.Settings.from_args(parser.parse_args([]), env)


def test_everything_the_dockerfile_copies_exists() -> None:
    sources: List[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY source {source} is missing"
    assert (ROOT / "deploy" / "entrypoint.sh").stat().st_mode & 0o111
