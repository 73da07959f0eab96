"""The container image's recipe, the Kubernetes manifest and the code they deploy agree.

The manifest is validated against the Kubernetes API's schema in strict mode
(unknown fields are errors), offline: kubernetes-validate ships the schemas.
Then the manifest, deploy/Dockerfile (ENV, EXPOSE, USER, VOLUME, HEALTHCHECK)
and the settings module must agree on the socket path, the ports, the uid and
the variable names. The image itself is built and run by
tests/integration/test_image.py.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

from fl_sidecar import config
from fl_sidecar.errors import ConfigurationError
from fl_sidecar.sidecar import settings as settings_module

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MANIFEST = ROOT / "deploy" / "k8s" / "trainer-with-sidecar.yaml"
# A current Kubernetes release whose schema kubernetes-validate ships.
KUBERNETES_VERSION = "1.37.0"
HEALTHCHECK = ["fl-sidecar-entrypoint", "healthcheck"]


def _known_variables() -> set[str]:
    # The settings module is the one place that reads the environment: every
    # variable it understands is named in its source.
    source = Path(settings_module.__file__ or "").read_text()
    return set(re.findall(r"\b(FL_[A-Z_]+[A-Z])\b", source))


def _manifest() -> List[Dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def _document(kind: str) -> Dict[str, Any]:
    return next(d for d in _manifest() if d["kind"] == kind)


def _pod_spec() -> Dict[str, Any]:
    spec: Dict[str, Any] = _document("Deployment")["spec"]["template"]["spec"]
    return spec


def _sidecar() -> Dict[str, Any]:
    (sidecar,) = _pod_spec()["initContainers"]
    assert sidecar["name"] == "fl-sidecar"
    return dict(sidecar)


def _trainer() -> Dict[str, Any]:
    (trainer,) = _pod_spec()["containers"]
    return dict(trainer)


def _env(container: Dict[str, Any]) -> Dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _dockerfile_lines() -> List[str]:
    return DOCKERFILE.read_text().replace("\\\n", " ").splitlines()


def _final_stage() -> List[str]:
    """The runtime stage's instructions (after the last FROM)."""
    lines = _dockerfile_lines()
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last_from:]


def _instruction(name: str) -> List[str]:
    return [line[len(name) + 1 :].strip() for line in _final_stage() if line.startswith(name + " ")]


def _dockerfile_env() -> Dict[str, str]:
    env: Dict[str, str] = {}
    for arguments in _instruction("ENV"):
        for name, value in re.findall(r"(\w+)=(\S+)", arguments):
            env[name] = value
    return env


def _mount_path(container: Dict[str, Any], volume: str) -> PurePosixPath:
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume]
    return PurePosixPath(mount["mountPath"])


# --- the schema -----------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(_manifest())))
def test_manifest_is_valid_for_a_current_kubernetes_in_strict_mode(index: int) -> None:
    document = _manifest()[index]
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_a_misspelled_field_and_a_wrongly_typed_port() -> None:
    # The check above can fail: the same validator refuses these two mistakes.
    deployment = _document("Deployment")
    misspelled = copy.deepcopy(deployment)
    misspelled["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelled, KUBERNETES_VERSION, strict=True)
    string_port = copy.deepcopy(deployment)
    string_port["spec"]["template"]["spec"]["initContainers"][0]["ports"][0]["containerPort"] = (
        "8101"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(string_port, KUBERNETES_VERSION, strict=True)


# --- the pod --------------------------------------------------------------------


def test_manifest_holds_the_expected_objects() -> None:
    kinds = sorted(doc["kind"] for doc in _manifest())
    assert kinds == ["Deployment", "NetworkPolicy", "Secret", "Service"]


def test_sidecar_is_a_native_sidecar_with_probes_and_limits() -> None:
    sidecar = _sidecar()
    # An init container that keeps running: started before the trainer, stopped after it.
    assert sidecar["restartPolicy"] == "Always"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["exec"]["command"] == HEALTHCHECK, probe
    limits = sidecar["resources"]["limits"]
    assert {"cpu", "memory"} <= set(limits)
    assert set(sidecar["resources"]["requests"]) >= {"cpu", "memory"}


def test_sidecar_runs_non_root_read_only_without_capabilities() -> None:
    pod = _pod_spec()
    security = _sidecar()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Service links would inject FL_<SERVICE>_PORT=tcp://... variables, and FL_*
    # names are the sidecar's settings (a Service named fl-sidecar-metrics would
    # set FL_SIDECAR_METRICS_PORT).
    assert pod["enableServiceLinks"] is False


def test_the_socket_is_shared_and_the_credentials_are_not() -> None:
    pod = _pod_spec()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["sidecar-socket"]
    sidecar, trainer = _sidecar(), _trainer()
    assert _mount_path(sidecar, "sidecar-socket") == _mount_path(trainer, "sidecar-socket")
    assert "credentials" in {m["name"] for m in sidecar["volumeMounts"]}
    assert "credentials" not in {m["name"] for m in trainer["volumeMounts"]}
    # The socket is 0600: the trainer must run with the sidecar's uid.
    assert trainer["securityContext"]["runAsUser"] == sidecar["securityContext"]["runAsUser"]


def test_the_fl_server_reaches_the_notification_port_and_nothing_else() -> None:
    port = config.DEFAULT_NOTIFICATION_PORT
    sidecar_ports = {p["name"]: p["containerPort"] for p in _sidecar()["ports"]}
    assert sidecar_ports["notifications"] == port
    service = _document("Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port
    labels = _document("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    policy = _document("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    admitted = sorted(p["port"] for rule in policy["ingress"] for p in rule["ports"])
    assert admitted == sorted([port, sidecar_ports["metrics"]])


def test_the_grace_period_outlasts_the_drain() -> None:
    drain = float(_env(_sidecar()).get("FL_SIDECAR_DRAIN_SECONDS", config.DEFAULT_DRAIN_SECONDS))
    assert _pod_spec()["terminationGracePeriodSeconds"] > drain + 1


# --- manifest, image and code agree ---------------------------------------------------


def test_every_variable_the_deployment_sets_is_a_known_setting() -> None:
    known = _known_variables()
    used = set(_dockerfile_env()) | set(_env(_sidecar())) | set(_env(_trainer()))
    fl_variables = {name for name in used if name.startswith("FL_")}
    assert fl_variables, "the deployment sets no FL_* variable at all"
    # FL_SIDECAR_TARGET is the Node.js example's own variable (examples/node/trainer.js).
    client_only = {"FL_SIDECAR_TARGET"}
    node_trainer = (ROOT / "examples" / "node" / "trainer.js").read_text()
    assert "process.env.FL_SIDECAR_TARGET" in node_trainer
    assert fl_variables - client_only <= known, f"unknown: {sorted(fl_variables - known)}"


def test_manifest_states_the_image_defaults_unchanged() -> None:
    image = _dockerfile_env()
    sidecar = _env(_sidecar())
    shared = set(image) & set(sidecar)
    assert {"FL_SIDECAR_SOCKET", "FL_CLIENT_SERVER_PORT", "FL_SIDECAR_METRICS_PORT"} <= shared
    assert {name: sidecar[name] for name in shared} == {name: image[name] for name in shared}


def test_socket_path_agrees_and_lies_in_a_private_directory_of_the_volume() -> None:
    socket = PurePosixPath(_dockerfile_env()["FL_SIDECAR_SOCKET"])
    trainer_env = _env(_trainer())
    assert PurePosixPath(trainer_env["FL_SIDECAR_SOCKET"]) == socket
    assert trainer_env["FL_SIDECAR_TARGET"] == "unix://" + str(socket)
    volume = _mount_path(_sidecar(), "sidecar-socket")
    assert _instruction("VOLUME") == [f'["{volume}"]']
    # An emptyDir is world-writable, which the sidecar refuses as the socket's
    # own directory; it makes a deeper one with mode 0700 itself.
    assert socket.parent.parent == volume
    assert len(str(socket).encode()) <= 107
    spool = _mount_path(_sidecar(), "spool")
    assert PurePosixPath(_dockerfile_env()["FL_SIDECAR_SPOOL_DIR"]) == spool


def test_image_ports_agree_with_the_code_and_the_manifest() -> None:
    env = _dockerfile_env()
    exposed = {int(p) for line in _instruction("EXPOSE") for p in line.split()}
    assert int(env["FL_CLIENT_SERVER_PORT"]) == config.DEFAULT_NOTIFICATION_PORT == 8101
    assert exposed == {int(env["FL_CLIENT_SERVER_PORT"]), int(env["FL_SIDECAR_METRICS_PORT"])}
    assert exposed == {p["containerPort"] for p in _sidecar()["ports"]}


def test_image_user_is_the_manifest_uid_and_not_root() -> None:
    (user,) = _instruction("USER")
    uid, gid = (int(part) for part in user.split(":"))
    assert uid != 0 and gid != 0
    security = _sidecar()["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid)
    assert _pod_spec()["securityContext"]["fsGroup"] == gid
    (create_user,) = [line for line in _instruction("RUN") if "useradd" in line]
    assert f"--uid {uid}" in create_user and f"--gid {gid}" in create_user


def test_image_health_check_and_entry_point_are_the_probe_command() -> None:
    (healthcheck,) = _instruction("HEALTHCHECK")
    assert healthcheck.endswith('CMD ["fl-sidecar-entrypoint", "healthcheck"]')
    assert _instruction("ENTRYPOINT") == ['["fl-sidecar-entrypoint"]']
    copies = [shlex.split(line) for line in _instruction("COPY")]
    assert ["deploy/entrypoint.sh", "/usr/local/bin/fl-sidecar-entrypoint"] in copies
    assert (ROOT / "deploy" / "entrypoint.sh").stat().st_mode & 0o111


def test_sidecar_flags_and_environment_resolve(tmp_path: Path) -> None:
    container = _sidecar()
    args: List[str] = list(container["args"])
    assert args[0] == "serve"
    token_file = tmp_path / "token"
    token_file.write_text("0123456789abcdef0123456789abcdef01234567\n")
    flags = [str(token_file) if a.startswith("/var/run/secrets/") else a for a in args[1:]]
    env = _dockerfile_env()
    env.update(_env(container))
    env["FL_SIDECAR_SOCKET"] = str(tmp_path / "grpc" / "sidecar.sock")
    env["FL_SIDECAR_SPOOL_DIR"] = str(tmp_path)

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    settings = config.Settings.from_args(parser.parse_args(flags), env)

    assert settings.server_token == "0123456789abcdef0123456789abcdef01234567"
    assert settings.notification_port == 8101
    assert settings.notification_host == "0.0.0.0"
    assert settings.metrics_port == 9464
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


# --- the build context ------------------------------------------------------------


def test_image_installs_wheels_only_and_its_base_is_an_argument() -> None:
    lines = _dockerfile_lines()
    arguments = [line for line in lines if line.startswith("ARG BASE_IMAGE=")]
    assert arguments == ["ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm"]
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    installs = [line for line in lines if "pip install" in line]
    assert installs and all("--no-index" in line for line in installs)
    # No package manager, compiler or torch is installed in either stage.
    text = DOCKERFILE.read_text()
    for word in ("apt-get", "cargo", "maturin", "gcc", "torch=="):
        assert word not in text, word


def test_everything_the_dockerfile_copies_is_in_the_build_context() -> None:
    sources: List[str] = []
    for line in _dockerfile_lines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += shlex.split(line)[1:-1]
    assert sources == ["build/image/wheels/", "deploy/entrypoint.sh"]
    # The context sends only these: never the venv, target/ or a secret.
    ignore = [line for line in DOCKERIGNORE.read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "*"
    assert ignore[1:] == ["!build/image/wheels/*.whl", "!deploy/entrypoint.sh"]
    assert (ROOT / "scripts" / "image-wheels.sh").exists()
