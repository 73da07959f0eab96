"""Who may own the unix socket and the directories above it.

Whoever can write to the socket's directory (or to a directory above it) can
put their own server in the sidecar's place and read every trainer's token
and FL server credentials. So, as ssh-agent and systemd do:

- the sidecar serves only from a directory it owns that no one else can
  write to, whose parents are owned by root or by the sidecar's user and
  writable by others only with the sticky bit (like ``/tmp``); it creates
  missing directories itself with mode 0700 and never follows a symlink it
  did not check;
- a trainer's client connects only to a socket owned by its own user, root,
  or an owner it was told to expect, in a directory of one of those owners
  that no one else can write to.

Pure path checks, no sockets: the server and the client both use them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import AbstractSet, Optional, Union

from fl_sidecar.errors import UnsafeSocketError

__all__ = [
    "check_client_socket",
    "check_socket_directory",
    "check_socket_file",
    "make_socket_directory",
    "owner_name",
    "resolve_owner",
]

_ROOT_UID = 0
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def owner_name(uid: int) -> str:
    """``"name (uid N)"`` for messages, or ``"uid N"`` when the uid has no name."""
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def resolve_owner(owner: Union[int, str]) -> int:
    """A uid from a number (``1000``, ``"1000"``) or a user name (``"flsidecar"``).

    Raises:
        UnsafeSocketError: a name that no user has, or a negative number.
    """
    if isinstance(owner, int) or owner.strip().isdigit():
        uid = int(owner)
        if uid < 0:
            raise UnsafeSocketError(f"the expected socket owner {owner!r} is not a uid")
        return uid
    try:
        import pwd

        return pwd.getpwnam(owner.strip()).pw_uid
    except (ImportError, KeyError):
        raise UnsafeSocketError(
            f"the expected socket owner {owner!r} is neither a uid nor a user name here"
        ) from None


def _writable_by_others(info: os.stat_result) -> bool:
    return bool(info.st_mode & _WRITABLE_BY_OTHERS) and not info.st_mode & stat.S_ISVTX


def _mode(info: os.stat_result) -> str:
    return f"{stat.S_IMODE(info.st_mode):04o}"


def _check_one_directory(
    path: str, info: os.stat_result, owners: AbstractSet[int], role: str
) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeSocketError(f"the {role} {path} is not a directory", path=path)
    if info.st_uid not in owners:
        allowed = " or ".join(owner_name(uid) for uid in sorted(owners))
        raise UnsafeSocketError(
            f"the {role} {path} belongs to {owner_name(info.st_uid)}, not to {allowed}; "
            "another user could replace the socket there. Use a directory of your own "
            "(or remove this one if it is not yours)",
            path=path,
            owner=info.st_uid,
        )
    if _writable_by_others(info):
        raise UnsafeSocketError(
            f"the {role} {path} is writable by others (mode {_mode(info)}, owner "
            f"{owner_name(info.st_uid)}), so they could replace the socket; make it "
            f"private (chmod go-w {path}) or use another directory",
            path=path,
            owner=info.st_uid,
        )


def check_socket_directory(
    directory: str,
    *,
    uid: Optional[int] = None,
    trust_parents: bool = False,
) -> None:
    """Refuse a socket directory that someone other than ``uid`` could change.

    The directory must be owned by ``uid`` (default: this process's effective
    uid) and writable by group or others only with the sticky bit. Each parent,
    after resolving symlinks, must be owned by root or ``uid`` and be writable
    by others only with the sticky bit (``/tmp`` passes); ``trust_parents``
    skips the parents' check (a volume that only trusted containers mount).

    Raises:
        UnsafeSocketError: a directory fails the checks; the message names it,
            its owner and the fix. FileNotFoundError: the directory is missing.
    """
    me = os.geteuid() if uid is None else uid
    resolved = os.path.realpath(directory)
    _check_one_directory(resolved, os.lstat(resolved), {me}, "socket directory")
    if not trust_parents:
        _check_parents(os.path.dirname(resolved), me)


def _check_parents(parent: str, uid: int) -> None:
    """``parent`` and every directory above it: root's or ``uid``'s, others write only if sticky."""
    while True:
        _check_one_directory(
            parent, os.lstat(parent), {_ROOT_UID, uid}, "socket directory's parent"
        )
        above = os.path.dirname(parent)
        if above == parent:
            return
        parent = above


def make_socket_directory(directory: str, *, trust_parents: bool = False) -> None:
    """Create ``directory`` (and missing parents) with mode 0700, then check it.

    Each missing component is made with ``mkdir(mode=0o700)`` and looked at
    with ``lstat`` (never through a symlink): one that someone else created
    first, or that is a symlink, is refused.

    Raises:
        UnsafeSocketError: as :func:`check_socket_directory`, or a component that
            appeared under someone else's name. OSError: a directory cannot be made.
    """
    me = os.geteuid()
    absolute = os.path.abspath(directory)
    missing = []
    probe = absolute
    while not os.path.lexists(probe):
        missing.append(probe)
        above = os.path.dirname(probe)
        if above == probe:
            break
        probe = above
    if missing and not trust_parents:
        # Before creating anything: a directory made under an unsafe parent is no use.
        _check_parents(os.path.realpath(probe), me)
    for component in reversed(missing):
        # Raced with another process: the lstat below decides.
        with contextlib.suppress(FileExistsError):
            os.mkdir(component, 0o700)
        info = os.lstat(component)
        if stat.S_ISLNK(info.st_mode):
            raise UnsafeSocketError(
                f"{component} appeared as a symlink while the sidecar created it; refusing it",
                path=component,
                owner=info.st_uid,
            )
        _check_one_directory(component, info, {me}, "socket directory")
    check_socket_directory(absolute, uid=me, trust_parents=trust_parents)


def check_socket_file(path: str, *, owners: AbstractSet[int]) -> Optional[os.stat_result]:
    """``lstat`` of an existing socket path, refused unless a socket of one of ``owners``.

    Returns:
        The status, or ``None`` when nothing is at ``path``.

    Raises:
        UnsafeSocketError: ``path`` is not a socket (a file, a symlink, ...) or has
            another owner.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(info.st_mode):
        raise UnsafeSocketError(
            f"{path} exists and is not a socket; refusing to use or replace it",
            path=path,
            owner=info.st_uid,
        )
    if info.st_uid not in owners:
        allowed = " or ".join(owner_name(uid) for uid in sorted(owners))
        raise UnsafeSocketError(
            f"the socket {path} belongs to {owner_name(info.st_uid)}, not to {allowed}; "
            "it may be another user's server posing as the sidecar",
            path=path,
            owner=info.st_uid,
        )
    return info


def check_client_socket(path: str, *, expected_owner: Optional[int] = None) -> None:
    """Refuse to talk to a socket that might not be the sidecar's, before any call.

    The socket and its directory must be owned by this process's effective uid,
    root, or ``expected_owner`` (the sidecar's uid when it runs as another
    user, e.g. in its own container); the directory must not be writable by
    others without the sticky bit.

    Raises:
        UnsafeSocketError: the socket or its directory fails the checks.
        FileNotFoundError: nothing is at ``path`` (no sidecar is listening there).
    """
    owners = {os.geteuid(), _ROOT_UID}
    if expected_owner is not None:
        owners.add(expected_owner)
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    try:
        directory_info = os.lstat(directory)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no sidecar socket directory", directory) from None
    _check_one_directory(directory, directory_info, owners, "sidecar's socket directory")
    socket_path = os.path.join(directory, os.path.basename(path))
    if check_socket_file(socket_path, owners=owners) is None:
        raise FileNotFoundError(errno.ENOENT, "no sidecar socket", socket_path)
