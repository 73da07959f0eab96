"""The status-code contract: the servicer's table, docs/sidecar.md's table and the proto agree."""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import grpc
import pytest

from fl_sidecar import errors, wire
from fl_sidecar.sidecar.codecstreams import MAX_PACK_CHUNK_SIZE
from fl_sidecar.sidecar.status import STATUS_BY_ERROR, status_for

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "sidecar.md"
PROTO = ROOT / "proto" / "fl_sidecar" / "v1" / "sidecar.proto"
MIB = 1024 * 1024


def _doc_rows() -> List[Tuple[str, str]]:
    """(error class, status) cells of each row of the "Status codes" table, in order.

    The status cell of ``SidecarError`` says "its own code": the codes it names
    are in its "When" cell, which stands in for it.
    """
    text = DOCS.read_text()
    section = text.split("## Status codes", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| Error class") or "---" in line:
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((cells[0], cells[2] if cells[0] == "`SidecarError`" else cells[1]))
    assert rows, "docs/sidecar.md has no status table"
    return rows


def _codes_in(cell: str) -> List[str]:
    return re.findall(r"`([A-Z_]{4,})`", cell)


def _instance(error_class: type) -> BaseException:
    if error_class is errors.SpoolFullError:
        return errors.SpoolFullError("full", spool_dir="/spool")
    instance: BaseException = error_class("x")
    return instance


def test_the_docs_table_is_the_servicers_table_in_its_order() -> None:
    documented = [(name.strip("`"), cell) for name, cell in _doc_rows()]
    by_name = {error_class.__name__: code for error_class, code in STATUS_BY_ERROR}
    table_rows = [(name, cell) for name, cell in documented if name in by_name]
    # Every class of the table is documented, once, in the order that decides.
    assert [name for name, _ in table_rows] == [c.__name__ for c, _ in STATUS_BY_ERROR]
    for name, cell in table_rows:
        assert _codes_in(cell) == [by_name[name].name], name


@pytest.mark.parametrize(("error_class", "code"), STATUS_BY_ERROR)
def test_each_documented_class_gets_its_code(error_class: type, code: grpc.StatusCode) -> None:
    assert status_for(_instance(error_class)) == code


def test_the_rows_outside_the_table_are_true() -> None:
    rows = {name: cell for name, cell in _doc_rows()}
    assert _codes_in(rows["`SidecarError`"])  # it names the codes the sidecar uses itself
    for code in _codes_in(rows["`SidecarError`"]):
        assert status_for(errors.SidecarError("x", code=code)).name == code
    assert _codes_in(rows["`TransferCancelledError`"]) == ["CANCELLED", "UNAVAILABLE"]
    assert status_for(errors.TransferCancelledError("x")) == grpc.StatusCode.CANCELLED
    shutdown = errors.TransferCancelledError("x", shutting_down=True)
    assert status_for(shutdown) == grpc.StatusCode.UNAVAILABLE
    (disk_row,) = [cell for name, cell in rows.items() if name.startswith("`OSError`")]
    for number in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        assert status_for(OSError(number, "full")).name == _codes_in(disk_row)[0]
    assert status_for(OSError(errno.EACCES, "denied")) == grpc.StatusCode.INTERNAL
    assert _codes_in(rows["any other exception"]) == ["INTERNAL"]
    assert status_for(KeyError("bug")) == grpc.StatusCode.INTERNAL


def _proto_header_codes() -> Set[str]:
    header = PROTO.read_text().split("syntax =", 1)[0]
    block = header.split("// Errors are gRPC status codes", 1)[1].split("\n//\n", 1)[0]
    return set(re.findall(r"^//   ([A-Z_]{4,}) ", block, flags=re.MULTILINE))


def test_the_proto_lists_every_code_the_sidecar_gives() -> None:
    documented: Set[str] = set()
    for _name, cell in _doc_rows():
        documented |= set(_codes_in(cell))
    # RESOURCE_EXHAUSTED also comes from gRPC itself (too many calls); the docs say so.
    assert _proto_header_codes() == documented


def test_the_proto_states_the_limits_of_the_code() -> None:
    text = PROTO.read_text()
    low, high = re.search(r"chunks of (\d+)-(\d+) MiB", text).groups()  # type: ignore[union-attr]
    assert (int(low) * MIB, int(high) * MIB) == (wire.DEFAULT_CHUNK_SIZE, wire.MAX_CHUNK_SIZE)
    message = re.search(r"messages up\s*//\s*to (\d+) MiB", text)
    assert message is not None and int(message.group(1)) * MIB == wire.MAX_MESSAGE_SIZE
    download = text.split("message DownloadModelRequest", 1)[1].split("}", 1)[0]
    default, most = re.search(  # type: ignore[union-attr]
        r"default \((\d+) MiB\); at most (\d+) MiB", download
    ).groups()
    assert (int(default) * MIB, int(most) * MIB) == (wire.DEFAULT_CHUNK_SIZE, wire.MAX_CHUNK_SIZE)
    pack = text.split("message PackOptions", 1)[1].split("}", 1)[0]
    pack_most = re.search(r"at most (\d+) MiB", pack)
    assert pack_most is not None and int(pack_most.group(1)) * MIB == MAX_PACK_CHUNK_SIZE


def test_every_status_the_table_names_is_a_grpc_code() -> None:
    names: Dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}
    for _name, cell in _doc_rows():
        for code in _codes_in(cell):
            assert code in names, code
