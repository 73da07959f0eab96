"""The sidecar's container image, run for real (``make image-test``).

``make image`` (scripts/image-build.sh) builds the image from a local Debian
base and writes ``build/image/image.env``; these tests start it with podman the
way a pod runs it: read-only root filesystem, every capability dropped, no new
privileges, the socket in a world-writable shared directory (as a Kubernetes
emptyDir is), the spool in another such directory, the password in a read-only
secret file. The dev FL server runs on the host; the container reaches it
through slirp4netns's host loopback (10.0.2.2), and the dev server reaches the
container's notification endpoint through a published port. A second
container, with the trainer's uid and the Node.js example trainer, trains two
rounds through the shared socket.

Where this machine cannot run containers, ``make image`` says why in
``build/image/unavailable``, and every test here is skipped with that reason
(``FL_SIDECAR_REQUIRE_IMAGE=1`` turns the skip into a failure, as CI does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pytest
from conftest import DevServerHandle
from trainer_stack import post_notification, tiny_module, tiny_module_bytes

from fl_sidecar.client import SidecarClient
from fl_sidecar.devserver import DevServer
from fl_sidecar.events import EventKind

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "image"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
NODE_EXAMPLE = ROOT / "examples" / "node"
SIDECAR_UID = 10001  # the image's USER, and the trainer's in deploy/k8s
OTHER_UID = 10002
# Inside the containers (deploy/Dockerfile's ENV, deploy/k8s).
SOCKET_VOLUME = "/run/fl-sidecar"
SOCKET_PATH = SOCKET_VOLUME + "/grpc/sidecar.sock"
SECRETS = "/run/secrets/fl"
HOST_LOOPBACK = "10.0.2.2"  # slirp4netns's address of the host's loopback
EVENT_TIMEOUT = 60.0


@dataclass
class Image:
    """What ``make image`` built: the image, the trainer's base, podman's settings."""

    name: str
    trainer_base: str
    archive: Path
    containers_conf: str


def _image_or_skip() -> Image:
    reason: Optional[str] = None
    unavailable = BUILD / "unavailable"
    env_file = BUILD / "image.env"
    if unavailable.exists():
        reason = "this machine cannot run containers: " + unavailable.read_text().strip()
    elif not env_file.exists():
        reason = "no image has been built here: run `make image-test` (or `make image` first)"
    elif shutil.which("podman") is None:
        reason = "podman is not installed (make image installs it from Debian)"
    if reason is not None:
        if os.environ.get("FL_SIDECAR_REQUIRE_IMAGE") == "1":
            pytest.fail(f"FL_SIDECAR_REQUIRE_IMAGE=1 but {reason}")
        pytest.skip(reason)
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    return Image(
        values["IMAGE"],
        values["TRAINER_BASE"],
        Path(values["ARCHIVE"]),
        values["CONTAINERS_CONF"],
    )


class Podman:
    """Runs podman with the settings ``make image`` wrote (CONTAINERS_CONF)."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.env = dict(os.environ, CONTAINERS_CONF=image.containers_conf)

    def __call__(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
            )
        return done

    def inspect(self, what: str, name: str) -> Dict[str, Any]:
        data: List[Dict[str, Any]] = json.loads(self(what, "inspect", name).stdout)
        return data[0]

    def logs(self, name: str) -> str:
        done = self("logs", name, check=False)
        return (done.stdout + done.stderr)[-4000:]


# The hardening a pod's securityContext asks for, as podman flags.
HARDENED = (
    "--read-only",
    "--read-only-tmpfs=false",  # no writable /tmp, /run: only what is mounted
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
)


class SidecarContainer:
    """One sidecar container with its shared socket directory and secret on the host."""

    def __init__(self, podman: Podman, devserver: DevServerHandle) -> None:
        self.podman = podman
        self.name = f"fls-sidecar-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.workdir = Path(tempfile.mkdtemp(prefix="fls-img-", dir="/tmp"))
        self.shared = self.workdir / "shared"
        self.socket_path = self.shared / "grpc" / "sidecar.sock"
        self.username = f"img-client-{uuid.uuid4().hex[:8]}"
        self.password = f"pw-{uuid.uuid4().hex}"
        self.client: Optional[SidecarClient] = None
        try:
            self._start(devserver)
        except BaseException:
            self.close()  # a sidecar that did not come up leaves nothing behind
            raise

    def _start(self, devserver: DevServerHandle) -> None:
        # World-writable without the sticky bit, as a Kubernetes emptyDir: the
        # sidecar makes its own 0700 directory for the socket inside.
        self.shared.mkdir()
        self.shared.chmod(0o777)
        spool = self.workdir / "spool"  # likewise
        spool.mkdir()
        spool.chmod(0o777)
        secrets = self.workdir / "secrets"
        secrets.mkdir(mode=0o750)
        password_file = secrets / "password"
        password_file.write_text(self.password + "\n")
        password_file.chmod(0o400)
        os.chown(password_file, SIDECAR_UID, SIDECAR_UID)
        os.chown(secrets, 0, SIDECAR_UID)
        self.podman(
            "run",
            "--detach",
            "--name",
            self.name,
            *HARDENED,
            "--network=slirp4netns:allow_host_loopback=true",
            "--publish=127.0.0.1::8101",
            "--health-interval=disable",  # run on demand below; no systemd timer here
            f"--volume={self.shared}:{SOCKET_VOLUME}",
            f"--volume={secrets}:{SECRETS}:ro",
            f"--volume={spool}:/var/spool/fl-sidecar",
            f"--env=FL_DEMONSTRATOR_BASE_URL=http://{HOST_LOOPBACK}:{devserver.port}",
            f"--env=FL_SIDECAR_USERNAME={self.username}",
            f"--env=FL_SIDECAR_PASSWORD_FILE={SECRETS}/password",
            self.podman.image.name,
        )
        mapped = self.podman("port", self.name, "8101/tcp").stdout.strip().splitlines()[0]
        self.notification_url = f"http://{mapped}/"
        # The host's client runs as root, the container's sidecar as SIDECAR_UID:
        # the client trusts that uid's socket only because it is told to.
        self.client = SidecarClient(
            "unix:" + str(self.socket_path), timeout=30.0, expected_owner=SIDECAR_UID
        )
        try:
            self.client.wait_ready(timeout=60.0)
        except Exception:
            raise AssertionError(f"the sidecar did not come up:\n{self.logs()}") from None

    @property
    def sidecar(self) -> SidecarClient:
        """The gRPC client to this sidecar, through the shared socket."""
        assert self.client is not None
        return self.client

    def logs(self) -> str:
        return self.podman.logs(self.name)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.podman("rm", "--force", "--time=5", self.name, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def podman() -> Podman:
    return Podman(_image_or_skip())


@pytest.fixture(scope="module")
def devserver(podman: Podman) -> Iterator[DevServerHandle]:
    """The dev FL server on the host's loopback (module-wide: one for all containers)."""
    workdir = Path(tempfile.mkdtemp(prefix="fls-img-dev-", dir="/tmp"))
    server = DevServer(
        data_dir=workdir / "devserver",
        notify_timeout=5.0,
        notify_retry_delays=(0.05, 0.1, 0.2),
        password_iterations=1000,
    )
    server.start()
    try:
        yield DevServerHandle(server)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def sidecar(podman: Podman, devserver: DevServerHandle) -> Iterator[SidecarContainer]:
    container = SidecarContainer(podman, devserver)
    try:
        yield container
    finally:
        container.close()


def _run_in(
    podman: Podman,
    image: str,
    uid: int,
    command: Sequence[str],
    mounts: Sequence[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """A one-off hardened container with ``uid``, no network, the given mounts."""
    return podman(
        "run",
        "--rm",
        *HARDENED,
        "--network=none",
        f"--user={uid}:{uid}",
        *(f"--volume={m}" for m in mounts),
        "--entrypoint",
        command[0],
        image,
        *command[1:],
        timeout=timeout,
        check=False,
    )


def test_image_is_small_non_root_and_has_no_build_tools(podman: Podman) -> None:
    image = podman.image
    info = podman.inspect("image", image.name)
    config = info["Config"]
    assert config["User"] == f"{SIDECAR_UID}:{SIDECAR_UID}"
    assert {"8101/tcp", "9464/tcp"} <= set(config["ExposedPorts"])
    assert f"FL_SIDECAR_SOCKET={SOCKET_PATH}" in config["Env"]
    # What the image is: Debian's python, the sidecar's venv, no pip, no torch.
    # (141.8 MB when this was written; the bound catches an accidental toolchain.)
    assert info["Size"] < 200_000_000, f"the image grew to {info['Size']} bytes"
    assert image.archive.stat().st_size > 0
    probe = _run_in(
        podman,
        image.name,
        SIDECAR_UID,
        [
            "sh",
            "-c",
            "for tool in gcc cc c++ ld cargo rustc make pip pip3 apt-get npm node; do"
            '  command -v "$tool" && exit 1; done;'
            " test ! -e /tmp/wheels || exit 2;"
            ' python -c "import importlib.util as u, sys;'
            " sys.exit(3 if u.find_spec('torch') or u.find_spec('pip') else 0)\" || exit $?;"
            " id -u",
        ],
    )
    assert probe.returncode == 0, f"found a build tool, the wheels, pip or torch:\n{probe.stdout}"
    assert probe.stdout.strip().splitlines()[-1] == str(SIDECAR_UID)
    # No certificate of the build machine's own (its local CAs) is in the image.
    bundle = _run_in(
        podman, image.name, SIDECAR_UID, ["cat", "/etc/ssl/certs/ca-certificates.crt"]
    ).stdout
    assert "BEGIN CERTIFICATE" in bundle
    for local_ca in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
        body = [line for line in local_ca.read_text().splitlines() if "-----" not in line]
        assert body and body[0] not in bundle, f"{local_ca} was put into the image"


def test_sidecar_runs_read_only_without_capabilities(
    podman: Podman, sidecar: SidecarContainer
) -> None:
    host_config = podman.inspect("container", sidecar.name)["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    inside = podman(
        "exec",
        sidecar.name,
        "sh",
        "-c",
        "grep -E '^(CapEff|NoNewPrivs)' /proc/1/status; touch /opt/fl-sidecar/x 2>&1; true",
    ).stdout
    assert "CapEff:\t0000000000000000" in inside
    assert "NoNewPrivs:\t1" in inside
    assert "Read-only file system" in inside
    # The socket lies in the sidecar's own directory inside the shared volume.
    socket_dir = sidecar.socket_path.parent.stat()
    assert (socket_dir.st_uid, socket_dir.st_mode & 0o777) == (SIDECAR_UID, 0o700)
    assert sidecar.socket_path.stat().st_mode & 0o777 == 0o600


def test_health_check_says_serving_through_the_shared_socket(
    podman: Podman, sidecar: SidecarContainer
) -> None:
    # From the host, through the bind-mounted socket, with the image's entry point.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["FL_SIDECAR_SOCKET"] = str(sidecar.socket_path)
    host = subprocess.run(
        ["sh", str(ENTRYPOINT), "healthcheck"], env=env, capture_output=True, timeout=60
    )
    assert host.returncode == 0, host.stderr
    # The image's HEALTHCHECK, as podman and Docker run it.
    assert podman("healthcheck", "run", sidecar.name, check=False).returncode == 0
    # The exec probe of deploy/k8s, inside the container.
    probe = podman("exec", sidecar.name, "fl-sidecar-entrypoint", "healthcheck", check=False)
    assert probe.returncode == 0, probe.stderr


def test_another_uid_is_refused_the_socket(podman: Podman, sidecar: SidecarContainer) -> None:
    connect = [
        "python3",
        "-c",
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
        SOCKET_PATH,
    ]
    mount = [f"{sidecar.shared}:{SOCKET_VOLUME}"]
    trainer = _run_in(podman, podman.image.name, SIDECAR_UID, connect, mount)
    assert trainer.returncode == 0, trainer.stderr
    other = _run_in(podman, podman.image.name, OTHER_UID, connect, mount)
    assert other.returncode != 0
    assert "PermissionError" in other.stderr, other.stderr
    refused = _run_in(
        podman, podman.image.name, OTHER_UID, ["fl-sidecar-entrypoint", "healthcheck"], mount
    )
    assert refused.returncode == 1


def _records(output: str) -> List[Dict[str, Any]]:
    records = []
    for line in output.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def test_node_trainer_in_a_second_container_trains_two_rounds(
    podman: Podman, sidecar: SidecarContainer, devserver: DevServerHandle
) -> None:
    torch = pytest.importorskip("torch")
    node_modules = (NODE_EXAMPLE / "node_modules").resolve()
    assert (node_modules / "@grpc" / "grpc-js").is_dir(), (
        "examples/node has no node_modules: run `make install` (npm ci in examples/node)"
    )
    actor = devserver.create_user(actor=True, client=False)
    client = devserver.create_user(
        sidecar.username, sidecar.password, message_endpoint=sidecar.notification_url
    )
    model_id = devserver.upload_model(actor, tiny_module_bytes())
    training_id = devserver.create_training(actor, model_id, [client], target_num_updates=2)
    devserver.start_training(actor, training_id)

    done = _run_in(
        podman,
        podman.image.trainer_base,
        SIDECAR_UID,
        [
            "node",
            "/app/examples/node/trainer.js",
            "--target",
            "unix://" + SOCKET_PATH,
            "--training-id",
            training_id,
            "--scale",
            "0.5",
            "--shift",
            "0.125",
            "--sample-size",
            "7",
            "--event-timeout",
            str(int(EVENT_TIMEOUT)),
        ],
        [
            f"{sidecar.shared}:{SOCKET_VOLUME}",
            f"{NODE_EXAMPLE / 'trainer.js'}:/app/examples/node/trainer.js:ro",
            f"{node_modules}:/app/examples/node/node_modules:ro",
            f"{ROOT / 'proto'}:/app/proto:ro",
        ],
        timeout=300,
    )
    records = _records(done.stdout)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n--- sidecar ---\n{sidecar.logs()}"
    events = [r["event"] for r in records]
    assert events == ["ready", "train", "test", "train", "test", "finished"], records
    assert [r["round"] for r in records if r["event"] == "train"] == [0, 1]
    assert all(r["http_status"] == 201 for r in records if r["event"] == "train")

    state = devserver.training(actor, training_id)
    assert state["state"] == "C"
    # One client: each round's global model is its upload, (w * 0.5 + 0.125) twice.
    final = sidecar.sidecar.download_state_dict(model_id)
    for name, tensor in tiny_module().state_dict().items():
        expected = (tensor * 0.5 + 0.125) * 0.5 + 0.125
        assert torch.allclose(final[name], expected, atol=1e-6), name


def test_sigterm_drains_exits_zero_and_removes_the_socket(
    podman: Podman, devserver: DevServerHandle
) -> None:
    container = SidecarContainer(podman, devserver)
    try:
        training_id = str(uuid.uuid4())
        round_start = {
            "notification_type": "UPDATE_ROUND_START",
            "training_uuid": training_id,
            "body": {"round": 0, "global_model_uuid": str(uuid.uuid4())},
        }
        # A notification through the published port, a live event stream from the host.
        assert 200 <= post_notification(container.notification_url, round_start) < 300
        with container.sidecar.watch_events(training_ids=[training_id]) as events:
            assert events.get(timeout=EVENT_TIMEOUT).kind is EventKind.UPDATE_ROUND_START
            podman("kill", "--signal=TERM", container.name)
            with pytest.raises(EOFError):
                events.get(timeout=EVENT_TIMEOUT)
        status = podman("wait", container.name, timeout=60).stdout.strip()
        logs = container.logs()
        assert status == "0", logs
        assert "draining" in logs and "msg=stopped" in logs, logs
        assert not container.socket_path.exists()
    finally:
        container.close()
