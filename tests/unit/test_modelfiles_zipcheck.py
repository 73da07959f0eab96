"""Archives that two readers would read differently are refused, by the vetting reader
and by ``load_trusted``, so a vetted archive can never load as another one.

Each hostile archive is built here with zipfile or raw bytes around a pickle that would
run ``touch <marker>`` (an ``os.system`` call) if anything unpickled it.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sidecar import modelfiles
from fl_sidecar.errors import AmbiguousArchiveError, ModelFormatError, UnsafePickleError
from fl_sidecar.modelfiles import torch_io


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Tuple[Any, Tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _good() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, buf)
    return buf.getvalue()


def _records(data: bytes) -> List[Tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def _zip(records: List[Tuple[str, bytes]], **kwargs: Any) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(out, "w", **kwargs) as zf:
            for name, data in records:
                zf.writestr(name, data)
    return out.getvalue()


def _central(data: bytes) -> List[int]:
    """Offsets of the central directory records."""
    found, pos = [], data.find(b"PK\x01\x02")
    while pos >= 0:
        found.append(pos)
        pos = data.find(b"PK\x01\x02", pos + 4)
    return found


def _duplicate_pickle_first(evil: bytes) -> bytes:
    return _zip([("archive/data.pkl", evil), *_records(_good())])


def _duplicate_pickle_last(evil: bytes) -> bytes:
    return _zip([*_records(_good()), ("archive/data.pkl", evil)])


def _renamed(new: str) -> Callable[[bytes], bytes]:
    """A good archive with one more record named ``new`` holding the evil pickle."""
    return lambda evil: _zip([*_records(_good()), (new, evil)])


def _pickle_then_zip(evil: bytes) -> bytes:
    # torch.load reads a file that does not start with PK as a legacy pickle (and runs
    # it); zipfile finds the zip at the end and reads the harmless one.
    return evil + _good()


def _legacy_then_zip(evil: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue() + _good()


def _zip_then_data(evil: bytes) -> bytes:
    return _good() + evil


def _zip_with_comment(evil: bytes) -> bytes:
    data = bytearray(_good())
    struct.pack_into("<H", data, len(data) - 2, len(evil))
    return bytes(data) + evil


def _local_name_differs(evil: bytes) -> bytes:
    # The directory says data.pkl; the local header says another name.
    data = bytearray(_zip([("archive/data.pkl", evil), *_records(_good())[1:]]))
    data[30 : 30 + len("archive/data.pkl")] = b"archive/data.pkX"
    return bytes(data)


def _sizes_disagree(evil: bytes) -> bytes:
    # A stored record whose local header gives another size than the directory.
    data = bytearray(_zip(_records(_good())))
    struct.pack_into("<I", data, 22, struct.unpack_from("<I", data, 22)[0] + 1)
    return bytes(data)


def _stored_sizes_differ(evil: bytes) -> bytes:
    data = bytearray(_zip(_records(_good())))
    for at in (18, _central(bytes(data))[0] + 20):  # compressed size, local and central
        struct.pack_into("<I", data, at, struct.unpack_from("<I", data, at)[0] + 1)
    return bytes(data)


def _overlapping(evil: bytes) -> bytes:
    # A second directory record for the pickle's local header under another name.
    data = _zip(_records(_good()))
    first = _central(data)[0]
    name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, first + 28)
    record = bytearray(data[first : first + 46 + name_len + extra_len + comment_len])
    record[46 + name_len - 1 : 46 + name_len] = b"X"
    end = data.rfind(b"PK\x05\x06")
    count, size, offset = struct.unpack_from("<HII", data, end + 10)
    head = data[:end] + bytes(record)
    tail = bytearray(data[end:])
    struct.pack_into("<HHII", tail, 8, count + 1, count + 1, size + len(record), offset)
    return head + bytes(tail)


def _record_inside_another(evil: bytes) -> bytes:
    # The pickle's whole local record sits inside another record's data, and only the
    # directory points at it: readers that walk the local headers never see it.
    inner = _zip([("archive/data.pkl", evil)])
    inner_directory = _central(inner)[0]
    blob = inner[:inner_directory]
    data = _zip([("archive/data/9", blob), *_records(_good())[1:]])
    name_len, extra_len = struct.unpack_from("<HH", data, 26)
    hidden_at = 30 + name_len + extra_len
    record = bytearray(inner[inner_directory : inner.rfind(b"PK\x05\x06")])
    struct.pack_into("<I", record, 42, hidden_at)
    end = data.rfind(b"PK\x05\x06")
    count, size, offset = struct.unpack_from("<HII", data, end + 10)
    tail = bytearray(data[end:])
    struct.pack_into("<HHII", tail, 8, count + 1, count + 1, size + len(record), offset)
    return data[:end] + bytes(record) + bytes(tail)


def _gap_between_records(evil: bytes) -> bytes:
    # Hidden bytes after the first record, the directory's offsets moved past them.
    data = _zip(_records(_good()))
    entries = _central(data)
    second = struct.unpack_from("<I", data, entries[1] + 42)[0]
    out = bytearray(data[:second] + evil + data[second:])
    for pos in _central(bytes(out)):
        offset = struct.unpack_from("<I", out, pos + 42)[0]
        if offset >= second:
            struct.pack_into("<I", out, pos + 42, offset + len(evil))
    end = out.rfind(b"PK\x05\x06")
    struct.pack_into("<I", out, end + 16, struct.unpack_from("<I", out, end + 16)[0] + len(evil))
    return bytes(out)


def _zip64_count_disagrees(evil: bytes) -> bytes:
    data = bytearray(_good())  # torch writes a zip64 end record
    end64 = data.rfind(b"PK\x06\x06")
    struct.pack_into("<QQ", data, end64 + 24, 99, 99)
    return bytes(data)


def _zip64_mark_without_zip64(evil: bytes) -> bytes:
    data = bytearray(_zip(_records(_good())))
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", data, end + 12, 0xFFFFFFFF)
    return bytes(data)


def _non_ascii_name(evil: bytes) -> bytes:
    data = bytearray(_zip([*_records(_good()), ("archive/extra\xe9", b"")]))
    for pos in _central(bytes(data)):
        struct.pack_into("<H", data, pos + 8, struct.unpack_from("<H", data, pos + 8)[0] & ~0x800)
    pos = data.find(b"archive/extra\xc3\xa9")
    while pos >= 0:  # one byte shorter would shift offsets; keep the length, drop UTF-8
        data[pos + 13 : pos + 15] = b"\xe9_"
        pos = data.find(b"archive/extra\xc3\xa9", pos + 1)
    return bytes(data)


def _marked_as_directory(evil: bytes) -> bytes:
    # torch's reader (miniz) takes the DOS directory attribute for a directory and reads
    # nothing (it returned uninitialised memory here); zipfile reads the record.
    data = bytearray(_good())
    struct.pack_into("<I", data, _central(bytes(data))[0] + 38, 0x10)
    return bytes(data)


def _outside_the_folder(evil: bytes) -> bytes:
    return _zip([*_records(_good()), ("other/data.pkl", evil)])


HOSTILE: Dict[str, Callable[[bytes], bytes]] = {
    "duplicate data.pkl, evil first": _duplicate_pickle_first,
    "duplicate data.pkl, evil last": _duplicate_pickle_last,
    "names differing in case": _renamed("archive/DATA.PKL"),
    "names differing in Unicode normalisation": lambda evil: _zip(
        [*_records(_good()), ("archive/caf\u00e9", b""), ("archive/cafe\u0301", evil)]
    ),
    "a ./ component": _renamed("archive/./data.pkl"),
    "a .. component": _renamed("archive/x/../data.pkl"),
    "a backslash": _renamed("archive\\data.pkl"),
    "a leading slash": _renamed("/archive/data.pkl"),
    "an empty component": _renamed("archive//data.pkl"),
    "a pickle with a zip appended": _pickle_then_zip,
    "a legacy torch file with a zip appended": _legacy_then_zip,
    "data after the end record": _zip_then_data,
    "a comment that hides data": _zip_with_comment,
    "a local header naming another record": _local_name_differs,
    "local and central sizes disagree": _sizes_disagree,
    "a stored record whose sizes differ": _stored_sizes_differ,
    "two directory records for one local header": _overlapping,
    "bytes hidden between records": _gap_between_records,
    "a record inside another's data": _record_inside_another,
    "zip64 and end record disagree": _zip64_count_disagrees,
    "a zip64 mark without zip64": _zip64_mark_without_zip64,
    "a non-ASCII name not flagged UTF-8": _non_ascii_name,
    "a record outside the archive folder": _outside_the_folder,
    "a file marked as a DOS directory": _marked_as_directory,
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_archive_is_refused_by_every_reader(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = HOSTILE[kind](pickle.dumps(_Evil(marker), protocol=2))
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(AmbiguousArchiveError, match="differently"):
            modelfiles.describe(source)
        with pytest.raises(AmbiguousArchiveError):
            torch_io.load_trusted(source)
    with pytest.raises(ModelFormatError):
        modelfiles.detect_format(data)
    assert not marker.exists()


def test_duplicate_pickle_would_otherwise_run_in_torch(tmp_path: Path) -> None:
    # Why it matters: zipfile's directory keeps the last data.pkl (the one the old
    # vetting read); torch's reader can pick the other one.
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(marker), protocol=2)
    for data in (_duplicate_pickle_first(evil), _duplicate_pickle_last(evil)):
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        assert reader.get_all_records().count("data.pkl") == 2
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = [i.filename for i in zf.infolist()]
        assert names.count("archive/data.pkl") == 2


def test_pickle_with_a_zip_appended_reads_as_the_zip_in_zipfile(tmp_path: Path) -> None:
    # zipfile tolerates data before the archive, torch.load takes the file for a pickle.
    data = _pickle_then_zip(pickle.dumps(_Evil(tmp_path / "pwned"), protocol=2))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert "archive/data.pkl" in zf.namelist()
    assert not data.startswith(b"PK\x03\x04")


def _our_writer(state: Dict[str, torch.Tensor]) -> bytes:
    template = _good()
    return torch_io.write_tensors(template, state) or b""


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_good, id="torch.save"),
        pytest.param(
            lambda: _zip(_records(_good()), compression=zipfile.ZIP_DEFLATED), id="deflated"
        ),
        pytest.param(lambda: _zip(_records(_good())), id="zipfile"),
        pytest.param(lambda: _our_writer({"w": torch.ones(4)}), id="fl_sidecar writer"),
        pytest.param(lambda: _jit(torch.jit.script(torch.nn.Linear(2, 3))), id="torch.jit.save"),
    ],
)
def test_honest_archives_still_load(make: Callable[[], bytes], tmp_path: Path) -> None:
    data = make()
    info = modelfiles.describe(data)
    assert info.tensors
    path = tmp_path / "m.pt"
    path.write_bytes(data)
    for source in (data, path):
        loaded = torch_io.load_trusted(source)
        assert loaded is not None


def _jit(module: Any) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


def test_load_trusted_loads_the_file_it_checked(tmp_path: Path, monkeypatch: Any) -> None:
    # The path is swapped for an evil file between the check and torch's read: torch
    # must still read the open file that was checked, not the path again.
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    path.write_bytes(_good())
    swapped = tmp_path / "swap.pt"
    swapped.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    real_load = torch.load

    def swapping_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        os.replace(swapped, path)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", swapping_load)
    loaded = torch_io.load_trusted(path)
    assert torch.equal(loaded["w"], torch.arange(4, dtype=torch.float32))
    assert not marker.exists()


def test_load_trusted_can_vet_the_bytes_it_loads(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "hook": _Evil(marker)}, buf)
    path = tmp_path / "evil.pt"
    path.write_bytes(buf.getvalue())
    for source in (buf.getvalue(), path):
        with pytest.raises(UnsafePickleError):
            torch_io.load_trusted(source, vet=True)
    assert not marker.exists()
    assert torch.equal(torch_io.load_trusted(_good(), vet=True)["w"], torch.arange(4.0))


def _structure_offsets(data: bytes) -> List[int]:
    """Byte offsets of every zip header field (local headers, directory, end records)."""
    spots: List[int] = []
    for magic, size in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46), (b"PK\x06\x06", 56)):
        pos = data.find(magic)
        while pos >= 0:
            spots.extend(range(pos, min(pos + size, len(data))))
            pos = data.find(magic, pos + 4)
    spots.extend(range(len(data) - 42, len(data)))  # locator and end record
    return sorted(set(spots))


def _deflated_with_descriptors() -> bytes:
    class Unseekable(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            self.data += b
            return len(b)

    out = Unseekable()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in _records(_good()):
            with zf.open(name, "w") as w:
                w.write(data)
    return bytes(out.data)


_BASES = {"torch.save": _good(), "deflated, descriptors": _deflated_with_descriptors()}


@pytest.mark.parametrize("base", list(_BASES))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_property_what_we_accept_torch_reads_alike(base: str, data: st.DataObject) -> None:
    # Header bytes mutated at random: whatever the vetting reader accepts, torch's own
    # reader must list the same records and give the same pickle.
    archive_bytes = bytearray(_BASES[base])
    spots = _structure_offsets(bytes(archive_bytes))
    flips = data.draw(
        st.lists(st.tuples(st.sampled_from(spots), st.integers(0, 255)), min_size=1, max_size=3)
    )
    for pos, value in flips:
        archive_bytes[pos] = value
    mutated = bytes(archive_bytes)
    try:
        with modelfiles.open_archive(mutated, parse=False) as opened:
            ours = sorted(n.split("/", 1)[1] for n in opened.record_names)
            pkl = opened.read_record(opened.records["data.pkl"])
    except ModelFormatError as exc:
        assert str(exc)
        return
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(mutated))
        theirs, their_pkl = sorted(reader.get_all_records()), bytes(reader.get_record("data.pkl"))
    except RuntimeError:
        return  # torch refuses it (a corrupt record we have not read yet): no disagreement
    assert theirs == ours
    assert their_pkl == pkl
