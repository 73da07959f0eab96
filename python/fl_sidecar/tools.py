"""Command-line tools for people: download, upload, pack, unpack, info, events.

``download``/``upload``/``info`` talk to a running sidecar (``--target``;
default: the settings module's). ``pack``/``unpack`` run locally with the
codec (no sidecar), or through one with ``--via-sidecar``. ``info FILE``
describes a local file. Progress bars go to stderr, only on a terminal.

Exit statuses (see :mod:`fl_sidecar.command`): 0 success, 1 the operation
failed (the reason on stderr), 2 bad usage, 130 interrupted. ``demo``
registers its own command (:mod:`fl_sidecar.demo`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from typing import Any, Optional, TextIO, Tuple

from fl_sidecar.command import fail as _fail
from fl_sidecar.command import guarded as _guarded
from fl_sidecar.errors import SizeLimitExceededError
from fl_sidecar.formatting import human_bytes

__all__ = ["ProgressBar", "parse_metric", "register"]

_CHUNK = 1024 * 1024


class ProgressBar:
    """A one-line progress bar on a terminal; silent when the stream is not a TTY.

    Call it as a progress callback ``bar(done_bytes, total_bytes)`` (``total``
    0 = unknown), then :meth:`close`.
    """

    def __init__(self, label: str, stream: Optional[TextIO] = None, *, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        # Redraw at most 10 times a second, and always at the end.
        if now - self._last_draw < 0.1 and not (total and done >= total):
            return
        self._last_draw = now
        elapsed = max(now - self._started, 1e-9)
        rate = done / elapsed
        if total:
            fraction = min(done / total, 1.0)
            filled = int(fraction * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            text = (
                f"\r{self.label} [{bar}] {fraction:6.1%} {human_bytes(done)}/{human_bytes(total)} "
                f"{human_bytes(rate)}/s"
            )
        else:
            text = f"\r{self.label} {human_bytes(done)} {human_bytes(rate)}/s"
        self.stream.write(text)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the bar's line (if anything was drawn)."""
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def parse_metric(text: str) -> Tuple[str, float]:
    """Parse ``name=value`` (value a number).

    Raises:
        argparse.ArgumentTypeError: malformed.
    """
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"metric {name!r}: {value!r} is not a number") from None


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _size(text: str) -> int:
    """Parse a byte count: ``1048576``, ``512k``, ``4MiB``, ``1G`` (binary units).

    Raises:
        argparse.ArgumentTypeError: not a size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4MiB, 1G, 1048576)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _client(args: argparse.Namespace) -> Any:
    from fl_sidecar.client import SidecarClient

    token = None
    if getattr(args, "api_token_file", None):
        with open(args.api_token_file, encoding="utf-8") as f:
            token = f.read().strip() or None
    return SidecarClient(args.target, api_token=token)


# --- commands ------------------------------------------------------------------


def _download(args: argparse.Namespace) -> int:
    bar = ProgressBar(f"download {args.model_id[:8]}")
    try:
        with _client(args) as client:
            result = client.download_to_file(
                args.model_id, args.output, format=args.format, progress=bar
            )
    finally:
        bar.close()
    print(
        f"{args.output}: {result.size} bytes ({result.format}), sha256 {result.sha256}; "
        f"{result.wire_bytes} bytes on the wire ({result.content_encoding or 'identity'})"
    )
    return 0


def _upload(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.file):
        return _fail("upload", f"no such file: {args.file}")
    fmt = args.format
    if fmt is None:
        fmt = "safetensors" if args.file.endswith(".safetensors") else "torch"
    bar = ProgressBar(f"upload {os.path.basename(args.file)}")
    try:
        with _client(args) as client:
            result = client.upload_file(
                args.model_id,
                args.file,
                round=args.round,
                sample_size=args.sample_size,
                metrics=list(args.metric or []),
                format=fmt,
                checksum=True,
                progress=bar,
            )
    finally:
        bar.close()
    print(
        f"uploaded: HTTP {result.http_status} {result.detail}; {result.raw_bytes} bytes, "
        f"{result.wire_bytes} on the wire ({result.content_encoding}), {result.seconds:.2f} s"
    )
    return 0


def _pack(args: argparse.Namespace) -> int:
    total = os.path.getsize(args.input)
    try:
        reference = _reference_arg(args)
    except _UsageError as exc:
        return _fail("pack", str(exc), 2)
    bar = ProgressBar(f"pack {os.path.basename(args.input)}")
    fmt, delta = "zstd", ""
    try:
        if args.via_sidecar:
            with _client(args) as client:
                result = client.pack_file(
                    args.input,
                    args.output,
                    level=args.level or 0,
                    chunk_size=args.chunk_size or 0,
                    format=args.format,
                    reference=reference,
                    progress=bar,
                )
            raw, packed = result.raw_bytes, result.packed_bytes
            fmt, delta = result.format, result.reference_sha256
        elif _packs_tensors(args):
            raw, packed, fmt, delta = _local_tensor_pack(args)
        else:
            raw, packed = _local_stream(args.input, args.output, total, bar, pack=True, args=args)
    finally:
        bar.close()
    ratio = raw / packed if packed else 0.0
    print(f"{args.output}: {raw} -> {packed} bytes (ratio {ratio:.2f}){_coding_note(fmt, delta)}")
    return 0


def _unpack(args: argparse.Namespace) -> int:
    total = os.path.getsize(args.input)
    try:
        reference = _reference_arg(args)
    except _UsageError as exc:
        return _fail("unpack", str(exc), 2)
    bar = ProgressBar(f"unpack {os.path.basename(args.input)}")
    fmt, delta = "zstd", ""
    try:
        if args.via_sidecar:
            with _client(args) as client:
                result = client.unpack_file(
                    args.input,
                    args.output,
                    max_output_size=args.max_size or 0,
                    reference=reference,
                    progress=bar,
                )
            packed, raw = result.packed_bytes, result.raw_bytes
            fmt, delta = result.format, result.reference_sha256
        elif _is_tensor_blob(args.input):
            raw, packed, delta = _local_tensor_unpack(args)
            fmt = "tensor"
        else:
            raw, packed = _local_stream(args.input, args.output, total, bar, pack=False, args=args)
    finally:
        bar.close()
    print(f"{args.output}: {packed} -> {raw} bytes{_coding_note(fmt, delta)}")
    return 0


def _coding_note(fmt: str, reference_sha256: str) -> str:
    """What the summary line says of the format: nothing for zstd (as before)."""
    if fmt != "tensor":
        return ""
    if reference_sha256:
        return f", tensor codec, against the reference {reference_sha256[:16]}"
    return ", tensor codec, no reference needed"


def _reference_arg(args: argparse.Namespace) -> Any:
    """The reference for the client or the codec: a path, a held model, or None.

    Raises:
        _UsageError: ``--held-reference`` without ``--via-sidecar`` or with a round that
            is no number, or ``--format zstd`` with a reference.
    """
    if getattr(args, "format", None) == "zstd" and (args.reference or args.held_reference):
        raise _UsageError("a reference needs the tensor format (--format tensor or auto)")
    if args.held_reference:
        from fl_sidecar.client import HeldModel

        model_id, round_ = args.held_reference
        if not args.via_sidecar:
            raise _UsageError("--held-reference names a model the sidecar holds: add --via-sidecar")
        if not round_.isdigit():
            raise _UsageError(f"--held-reference: ROUND must be a number, not {round_!r}")
        return HeldModel(model_id, int(round_))
    return args.reference


class _UsageError(Exception):
    """Options that do not go together (exit status 2)."""


def _packs_tensors(args: argparse.Namespace) -> bool:
    """Whether a local pack writes a tensor blob (``auto``: when the input is a model)."""
    if args.format == "tensor" or (args.format is None and args.reference is not None):
        return True
    if args.format != "auto":
        return False
    import fl_sidecar.codec as codec
    from fl_sidecar.errors import ModelFormatError

    try:
        codec.layout_of(args.input)
    except ModelFormatError:
        return False
    return True


def _local_tensor_pack(args: argparse.Namespace) -> Tuple[int, int, str, str]:
    """Pack ``args.input`` into a tensor blob; (raw, packed, format, reference sha256)."""
    import fl_sidecar.codec as codec

    stats = codec.pack_file(
        args.input, args.output, level=args.level, reference=args.reference, format="tensor"
    )
    delta = _reference_digest(args.output, args.reference)
    return stats.raw_size, stats.packed_size, "tensor", delta


def _is_tensor_blob(path: str) -> bool:
    import fl_sidecar.codec as codec

    with open(path, "rb") as f:
        return codec.is_tensor_blob(f.read(4))


def _local_tensor_unpack(args: argparse.Namespace) -> Tuple[int, int, str]:
    """Unpack the tensor blob ``args.input``; (raw, packed, reference sha256 or "")."""
    import fl_sidecar.codec as codec

    options = {"max_output_size": args.max_size} if args.max_size else {}
    raw = codec.unpack_file(args.input, args.output, reference=args.reference, **options)
    return raw, os.path.getsize(args.input), _reference_digest(args.input, args.reference)


def _reference_digest(blob_path: str, reference: Optional[str]) -> str:
    """The hex SHA-256 of ``reference`` when the tensor blob at ``blob_path`` uses it, else "".

    Called once the blob was written or decoded, so its header (bit 0 of the flags:
    coded against a reference) has been checked.
    """
    import hashlib
    import struct

    with open(blob_path, "rb") as f:
        header = f.read(8)
    if reference is None or len(header) < 8 or not struct.unpack_from("<H", header, 6)[0] & 1:
        return ""
    digest = hashlib.sha256()
    with open(reference, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_stream(
    src: str,
    dst: str,
    total: int,
    progress: ProgressBar,
    *,
    pack: bool,
    args: argparse.Namespace,
) -> Tuple[int, int]:
    """Stream ``src`` through the codec into ``dst`` (atomically); returns (raw, packed) bytes."""
    import tempfile

    import fl_sidecar.codec as codec

    coder: Any
    if pack:
        options = {}
        if args.level is not None:
            options["level"] = args.level
        if args.chunk_size is not None:
            options["chunk_size"] = args.chunk_size
        chunk = options.get("chunk_size", codec.DEFAULT_CHUNK_SIZE)
        frames = max(1, -(-total // chunk)) if chunk > 0 else 0
        if frames > codec.MAX_FRAMES:
            # Refused before writing: unpacking would refuse such a blob.
            raise SizeLimitExceededError(
                f"{src}: {total} bytes in chunks of {chunk} bytes make {frames} zstd frames, "
                f"more than the {codec.MAX_FRAMES} one blob may have (MAX_FRAMES); "
                "use a larger --chunk-size"
            )
        coder = codec.Packer(**options)
    else:
        coder = codec.Unpacker(**({"max_output_size": args.max_size} if args.max_size else {}))
    directory = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=".fl-sidecar-", suffix=".part", dir=directory)
    read = written = 0
    try:
        with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
            while True:
                block = f.read(_CHUNK * 4)
                if not block:
                    break
                read += len(block)
                # The unpacker hands a bomb's output on in bounded pieces (write_iter).
                for data in [coder.write(block)] if pack else coder.write_iter(block):
                    written += len(data)
                    out.write(data)
                progress(read, total)
            tail = coder.finish()
            if tail:
                written += len(tail)
                out.write(tail)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return (read, written) if pack else (written, read)


def _info(args: argparse.Namespace) -> int:
    if args.file:
        return _info_file(args.file)
    with _client(args) as client:
        info = client.get_info()
    rows = [
        ("target", client.target),
        ("version", info.version),
        ("codec", f"{info.codec} (level {info.codec_level}, chunk {info.codec_chunk_size} B)"),
        ("FL server", info.server_url),
        ("upload coding", info.negotiated_coding or "(not negotiated yet)"),
        ("notifications", info.notification_url or "(none)"),
        ("max message", f"{info.max_message_size} B"),
        ("trusts pickles", "yes" if info.trusts_pickles else "no (TORCH downloads are vetted)"),
    ]
    for name, value in rows:
        print(f"{name:<15} {value}")
    return 0


def _info_file(path: str) -> int:
    import mmap

    import fl_sidecar.codec as codec

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
        if codec.is_tensor_blob(head):
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                tensors = codec.tensor_info(blob)
            needs = (
                f"needs its reference ({tensors.reference_size} B)"
                if tensors.uses_reference
                else "needs no reference"
            )
            print(
                f"{path}: tensor blob (format {tensors.version}), {size} B packed, "
                f"{tensors.total_size} B raw, {tensors.segments} segments, "
                f"{tensors.blocks} blocks; {needs}"
            )
            return 0
        is_zstd = codec.is_zstd(head)
        if is_zstd:
            # inspect walks frame headers and the seek table only: map the file, don't read it.
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                info = codec.inspect(blob)
    if is_zstd:
        raw = "unknown" if info.decompressed_size is None else f"{info.decompressed_size} B"
        print(f"{path}: zstd, {size} B packed, {raw} raw, {info.frames} frames")
        print(
            f"  ratio {info.ratio:.2f}, checksums {'yes' if info.has_checksums else 'no'}, "
            f"seek table {'yes' if info.has_seek_table else 'no'}"
        )
        return 0
    try:
        import fl_sidecar.models as models

        fmt = models.detect_format(path)
    except ImportError:
        return _fail("info", f"{path}: not zstd; install torch to recognise model formats")
    print(f"{path}: {fmt.name.lower()} model, {size} B")
    return 0


def _events(args: argparse.Namespace) -> int:
    after_seq = 0 if args.all else args.after_seq
    shown = 0
    with _client(args) as client, client.watch_events(
        after_seq, args.training or (), observe=not args.take
    ) as stream:
        if args.count == 0:
            return 0
        for event in stream:
            print(_event_line(event, as_json=args.json), flush=True)
            shown += 1
            if args.count is not None and shown >= args.count:
                break
    return 0


def _event_line(event: Any, *, as_json: bool) -> str:
    if as_json:
        return json.dumps(
            {
                "seq": event.seq,
                "kind": event.kind.name,
                "notification_type": event.notification_type,
                "training_id": event.training_id,
                "model_id": event.model_id,
                "round": event.round,
                "received_at": event.received_at,
                "body": json.loads(event.body_json) if event.body_json else None,
            },
            sort_keys=True,
        )
    when = time.strftime("%H:%M:%S", time.localtime(event.received_at))
    fields = [f"training={event.training_id}"]
    if event.round is not None:
        fields.append(f"round={event.round}")
    if event.model_id:
        fields.append(f"model={event.model_id}")
    return f"{event.seq} {when} {event.notification_type} {' '.join(fields)}"


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=None,
        help="the sidecar: unix:///path, a socket path, or host:port "
        "[default: FL_SIDECAR_SOCKET, FL_SIDECAR_LISTEN, else the sidecar's default socket]",
    )
    parser.add_argument(
        "--api-token-file", metavar="PATH", help="read the sidecar's API token from this file"
    )


def _add_reference(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--reference",
        metavar="PATH",
        default=None,
        help=f"the reference model (safetensors or torch archive) {what}; with "
        "--via-sidecar its bytes are streamed to the sidecar",
    )
    group.add_argument(
        "--held-reference",
        nargs=2,
        metavar=("MODEL_ID", "ROUND"),
        default=None,
        help="with --via-sidecar: the global model the sidecar holds for that model and "
        "round as the reference",
    )


def register(subparsers: Any) -> None:
    """Add ``download``, ``upload``, ``pack``, ``unpack``, ``info`` and ``events``."""
    p = subparsers.add_parser("download", help="download a global model through the sidecar")
    p.add_argument("model_id", help="the global model's id")
    p.add_argument("-o", "--output", required=True, help="file to write")
    p.add_argument("--format", choices=("torch", "safetensors"), default="torch")
    _add_target(p)
    p.set_defaults(func=_guarded("download", _download))

    p = subparsers.add_parser("upload", help="upload a locally trained model through the sidecar")
    p.add_argument("model_id", help="the global model's id")
    p.add_argument("file", help="the model file (torch or .safetensors)")
    p.add_argument("--round", type=int, required=True, help="the training round")
    p.add_argument("--sample-size", type=int, required=True, help="training samples (FedAvg)")
    p.add_argument(
        "--metric", type=parse_metric, action="append", metavar="NAME=VALUE", help="repeatable"
    )
    p.add_argument(
        "--format", choices=("torch", "safetensors"), default=None, help="default: by extension"
    )
    _add_target(p)
    p.set_defaults(func=_guarded("upload", _upload))

    p = subparsers.add_parser(
        "pack",
        help="pack a file into the zstd seekable format, or a model with the tensor codec",
        description="Pack a file: the zstd seekable format by default; with --reference "
        "(or --format tensor) a model file is coded tensor by tensor with the tensor codec, "
        "against the reference model when given (docs/tensor-codec.md).",
    )
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--level", type=int, default=None, help="zstd level (default: the codec's)")
    p.add_argument(
        "--chunk-size",
        type=_size,
        default=None,
        help="bytes per frame, e.g. 4MiB (at most 8MiB; the zstd format only)",
    )
    p.add_argument(
        "--format",
        choices=("zstd", "tensor", "auto"),
        default=None,
        help="zstd, tensor, or auto (tensor for a model file) [default: tensor with a "
        "reference, else zstd]",
    )
    _add_reference(p, "code the model against (its tensors of the same name, dtype and shape)")
    p.add_argument("--via-sidecar", action="store_true", help="pack in the sidecar")
    _add_target(p)
    p.set_defaults(func=_guarded("pack", _pack))

    p = subparsers.add_parser(
        "unpack",
        help="unpack any zstd stream or a tensor blob",
        description="Unpack a zstd stream or a tensor blob (told apart by their first bytes); "
        "a tensor blob coded against a reference needs --reference.",
    )
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument(
        "--max-size", type=_size, default=None, help="refuse to produce more (e.g. 20GiB)"
    )
    _add_reference(p, "the tensor blob was coded against")
    p.add_argument("--via-sidecar", action="store_true", help="unpack in the sidecar")
    _add_target(p)
    p.set_defaults(func=_guarded("unpack", _unpack))

    p = subparsers.add_parser("info", help="describe the sidecar, or a local file")
    p.add_argument("file", nargs="?", help="a packed blob or model file to describe")
    _add_target(p)
    p.set_defaults(func=_guarded("info", _info))

    p = subparsers.add_parser(
        "events",
        help="print the FL server's notifications as the sidecar receives them",
        description="Print the sidecar's events, one per line, as they arrive (Ctrl-C stops). "
        "It only watches: a trainer that subscribes later still receives them (--take "
        "changes that).",
    )
    p.add_argument(
        "--training", action="append", metavar="ID", help="only this training (repeatable)"
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--after-seq", type=int, default=None, metavar="N", help="resume after event N"
    )
    start.add_argument(
        "--all", action="store_true", help="start with every event the sidecar still retains"
    )
    p.add_argument("--count", type=int, default=None, metavar="N", help="stop after N events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--take",
        action="store_true",
        help="take delivery like a trainer: events not yet received by anyone are then "
        "marked received",
    )
    _add_target(p)
    p.set_defaults(func=_guarded("events", _events))
