"""Who may own the socket and its directories: the sidecar's and the client's path checks.

Plain files and directories stand in for sockets (no socket is opened); as
root, ``chown`` to ``nobody`` (65534) plays the other user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fl_sidecar import errors
from fl_sidecar.client import SidecarClient, unix_socket_path
from fl_sidecar.sidecar import socketdir

OTHER_UID = 65534  # nobody
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def test_own_private_directory_passes(tmp_path: Path) -> None:
    socketdir.check_socket_directory(str(_private_dir(tmp_path / "ok")))


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722, 0o2777], ids=lambda mode: f"{mode:04o}")
def test_directory_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    shared = _private_dir(tmp_path / "shared")
    shared.chmod(mode)
    with pytest.raises(errors.UnsafeSocketError, match="writable by others") as caught:
        socketdir.check_socket_directory(str(shared))
    assert caught.value.path == str(shared)
    assert f"{mode:04o}" in str(caught.value)
    assert "chmod go-w" in str(caught.value)


def test_sticky_directory_passes_like_tmp(tmp_path: Path) -> None:
    shared = _private_dir(tmp_path / "sticky")
    shared.chmod(0o1777)
    socketdir.check_socket_directory(str(shared))


@as_root
def test_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = _private_dir(tmp_path / "theirs")
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(errors.UnsafeSocketError, match="belongs to") as caught:
        socketdir.check_socket_directory(str(theirs))
    assert caught.value.owner == OTHER_UID
    assert f"uid {OTHER_UID}" in str(caught.value)


@as_root
def test_parent_of_another_user_is_refused(tmp_path: Path) -> None:
    parent = _private_dir(tmp_path / "parent")
    mine = _private_dir(parent / "mine")
    os.chown(parent, OTHER_UID, OTHER_UID)
    with pytest.raises(errors.UnsafeSocketError, match="parent") as caught:
        socketdir.check_socket_directory(str(mine))
    assert caught.value.path == str(parent)


def test_world_writable_parent_is_refused_unless_trusted(tmp_path: Path) -> None:
    parent = _private_dir(tmp_path / "emptydir")
    mine = _private_dir(parent / "grpc")
    parent.chmod(0o777)
    with pytest.raises(errors.UnsafeSocketError, match="parent"):
        socketdir.check_socket_directory(str(mine))
    socketdir.check_socket_directory(str(mine), trust_parents=True)
    parent.chmod(0o1777)  # sticky: others cannot rename our directory away
    socketdir.check_socket_directory(str(mine))


def test_symlink_to_a_private_directory_is_checked_where_it_leads(tmp_path: Path) -> None:
    target = _private_dir(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(target)
    socketdir.check_socket_directory(str(link))
    target.chmod(0o777)
    with pytest.raises(errors.UnsafeSocketError) as caught:
        socketdir.check_socket_directory(str(link))
    assert caught.value.path == str(target)


def test_make_creates_each_missing_directory_0700(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask gives 0700
    try:
        socketdir.make_socket_directory(str(tmp_path / "a" / "b"))
    finally:
        os.umask(old_umask)
    for path in (tmp_path / "a", tmp_path / "a" / "b"):
        info = os.lstat(path)
        assert stat.S_ISDIR(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()


@as_root
def test_make_refuses_a_directory_another_user_made_first(tmp_path: Path) -> None:
    # What /tmp/fl-sidecar-<uid> looks like when someone else got there first.
    squatted = _private_dir(tmp_path / "fl-sidecar-0")
    os.chown(squatted, OTHER_UID, OTHER_UID)
    with pytest.raises(errors.UnsafeSocketError, match="belongs to"):
        socketdir.make_socket_directory(str(squatted))
    assert os.lstat(squatted).st_uid == OTHER_UID  # left alone, not taken over


def test_make_refuses_a_symlink_planted_in_its_place(tmp_path: Path) -> None:
    elsewhere = _private_dir(tmp_path / "elsewhere")
    elsewhere.chmod(0o777)
    planted = tmp_path / "fl-sidecar"
    planted.symlink_to(elsewhere)
    with pytest.raises(errors.UnsafeSocketError):
        socketdir.make_socket_directory(str(planted))


def test_socket_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    regular = tmp_path / "s.sock"
    regular.write_bytes(b"")
    with pytest.raises(errors.UnsafeSocketError, match="not a socket"):
        socketdir.check_socket_file(str(regular), owners={os.geteuid()})
    link = tmp_path / "l.sock"
    link.symlink_to(regular)
    with pytest.raises(errors.UnsafeSocketError, match="not a socket"):
        socketdir.check_socket_file(str(link), owners={os.geteuid()})
    assert socketdir.check_socket_file(str(tmp_path / "none"), owners={0}) is None


def test_client_check_needs_a_socket_and_a_trusted_directory(tmp_path: Path) -> None:
    directory = _private_dir(tmp_path / "run")
    with pytest.raises(FileNotFoundError):
        socketdir.check_client_socket(str(directory / "s.sock"))
    (directory / "s.sock").write_bytes(b"")
    with pytest.raises(errors.UnsafeSocketError, match="not a socket"):
        socketdir.check_client_socket(str(directory / "s.sock"))
    with pytest.raises(FileNotFoundError):
        socketdir.check_client_socket(str(tmp_path / "missing" / "s.sock"))


@as_root
def test_client_check_accepts_the_expected_owner_only(tmp_path: Path) -> None:
    directory = _private_dir(tmp_path / "run")
    os.chown(directory, OTHER_UID, OTHER_UID)
    (directory / "s.sock").write_bytes(b"")  # not a socket: the directory is checked first
    with pytest.raises(errors.UnsafeSocketError, match="belongs to") as caught:
        socketdir.check_client_socket(str(directory / "s.sock"))
    assert caught.value.owner == OTHER_UID
    with pytest.raises(errors.UnsafeSocketError, match="not a socket"):
        socketdir.check_client_socket(str(directory / "s.sock"), expected_owner=OTHER_UID)


def test_client_check_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    directory = _private_dir(tmp_path / "run")
    directory.chmod(0o777)
    with pytest.raises(errors.UnsafeSocketError, match="writable by others"):
        socketdir.check_client_socket(str(directory / "s.sock"))


def test_owner_resolution() -> None:
    assert socketdir.resolve_owner(1000) == 1000
    assert socketdir.resolve_owner(" 10001 ") == 10001
    assert socketdir.resolve_owner("root") == 0
    with pytest.raises(errors.UnsafeSocketError, match="neither a uid"):
        socketdir.resolve_owner("no-such-user-fl-sidecar")
    with pytest.raises(errors.UnsafeSocketError):
        socketdir.resolve_owner(-1)


def test_unix_socket_paths_of_targets() -> None:
    assert unix_socket_path("unix:///run/x/s.sock") == "/run/x/s.sock"
    assert unix_socket_path("unix:/run/x/s.sock") == "/run/x/s.sock"
    assert unix_socket_path("unix:rel.sock") == os.path.abspath("rel.sock")
    assert unix_socket_path("unix-abstract:fl") is None
    assert unix_socket_path("127.0.0.1:50051") is None
    assert unix_socket_path("dns:///localhost:1") is None


def test_client_takes_the_expected_owner_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FL_SIDECAR_SOCKET_OWNER", "no-such-user-fl-sidecar")
    with pytest.raises(errors.UnsafeSocketError, match="neither a uid"):
        SidecarClient("unix:///nonexistent/s.sock")
    monkeypatch.setenv("FL_SIDECAR_SOCKET_OWNER", "10001")
    client = SidecarClient("unix:///nonexistent/s.sock")
    try:
        assert client._expected_owner == 10001
    finally:
        client.close()


def test_client_sends_nothing_without_a_socket(tmp_path: Path) -> None:
    client = SidecarClient(str(tmp_path / "s.sock"), timeout=5)
    try:
        with pytest.raises(errors.SidecarError) as caught:
            client.get_info()
    finally:
        client.close()
    assert caught.value.code == "UNAVAILABLE"
    assert "no sidecar is listening" in str(caught.value)


def test_make_creates_nothing_under_a_parent_others_can_write(tmp_path: Path) -> None:
    volume = _private_dir(tmp_path / "volume")
    volume.chmod(0o777)
    with pytest.raises(errors.UnsafeSocketError, match="parent") as caught:
        socketdir.make_socket_directory(str(volume / "grpc" / "deeper"))
    assert caught.value.path == str(volume)
    assert list(volume.iterdir()) == []
    socketdir.make_socket_directory(str(volume / "grpc"), trust_parents=True)
    assert stat.S_IMODE(os.lstat(volume / "grpc").st_mode) == 0o700
