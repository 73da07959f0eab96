"""Streaming zstd decoding with bounded memory per step, over the codec's ``Unpacker``.

``codec.Unpacker.write(data)`` returns everything ``data`` decodes to, and a few
bytes of zstd can decode to a lot: an RLE block is 4 bytes for 128 KiB, so 16 KB
of a "bomb" is 512 MiB in one call, limited only by ``max_output_size``. Both
HTTP paths (the client's downloads, the middleware's request bodies) therefore
feed the unpacker in pieces cut at zstd block boundaries (RFC 8878), each piece
decoding to at most about ``max_step`` bytes. Parsing the block headers costs a
few Python operations per block (at most 128 KiB of output each). The scanner
only decides where to cut; the unpacker still validates everything, so a
malformed stream is fed on unchanged and fails there with the codec's error.
"""

from __future__ import annotations

from typing import Any, Iterator, List

__all__ = ["BoundedUnpacker"]

_ZSTD_MAGIC = 0xFD2FB528
_BLOCK_MAX = 128 * 1024  # RFC 8878 Block_Maximum_Size: the most one block decodes to
_RAW, _RLE, _COMPRESSED = 0, 1, 2

# Scanner states. "Collect" states gather a header of ``_need`` bytes; _PASS hands
# ``_left`` bytes (a block body, a skippable payload, a checksum) straight through.
_MAGIC, _SKIP_SIZE, _DESCRIPTOR, _FRAME_REST, _BLOCK_HEADER, _PASS, _OPAQUE = range(7)
# Where to go after _PASS.
_THEN_MAGIC, _THEN_BLOCK, _THEN_FRAME_END = range(3)


class BoundedUnpacker:
    """Decode a zstd stream in steps of at most about ``max_step`` bytes of output.

    Args:
        max_output_size: total decoded bytes allowed (the codec's bomb limit).
        max_step: bytes of output one step may produce (plus one block, 128 KiB).
    """

    def __init__(self, max_output_size: int, max_step: int = 4 * 1024 * 1024) -> None:
        from fl_sidecar import codec

        self._unpacker = codec.Unpacker(max_output_size=max_output_size)
        self._max_step = max_step
        self._state = _MAGIC
        self._need = 4  # bytes of the current header still to collect
        self._header = b""
        self._left = 0  # bytes still to pass in _PASS
        self._then = _THEN_MAGIC
        self._checksum = False
        self._piece: List[Any] = []
        self._bound = 0  # the most the pending piece can decode to

    def write(self, data: bytes) -> Iterator[bytes]:
        """Feed ``data``; yields decoded pieces (each at most ~``max_step`` bytes).

        Raises:
            the codec's CodecError subclasses (corrupt data, size limit exceeded).
        """
        view = memoryview(data)
        pos = 0
        end = len(view)
        while pos < end:
            if self._state == _OPAQUE:
                # Not something the scanner knows: hand it over as is; the codec decides.
                self._piece.append(view[pos:])
                pos = end
            elif self._state == _PASS:
                take = min(self._left, end - pos)
                self._piece.append(view[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._passed()
            else:
                take = min(self._need, end - pos)
                self._header += bytes(view[pos : pos + take])
                self._piece.append(view[pos : pos + take])
                pos += take
                self._need -= take
                if self._need == 0:
                    header, self._header = self._header, b""
                    self._collected(header)
            if self._bound >= self._max_step:
                yield from self._flush()
        yield from self._flush()

    def finish(self) -> None:
        """Check that the stream ended where a frame ends.

        Raises:
            TruncatedDataError: the stream is incomplete.
        """
        self._unpacker.finish()

    def _flush(self) -> Iterator[bytes]:
        if not self._piece:
            return
        piece = b"".join(self._piece)
        self._piece = []
        self._bound = 0
        out = self._unpacker.write(piece)
        if out:
            yield out

    def _collect(self, state: int, need: int) -> None:
        self._state, self._need = state, need

    def _pass(self, count: int, then: int) -> None:
        self._state, self._left, self._then = _PASS, count, then
        if count == 0:
            self._passed()

    def _collected(self, header: bytes) -> None:
        state = self._state
        if state == _MAGIC:
            magic = int.from_bytes(header, "little")
            if magic == _ZSTD_MAGIC:
                self._collect(_DESCRIPTOR, 1)
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._collect(_SKIP_SIZE, 4)
            else:
                self._state = _OPAQUE
        elif state == _SKIP_SIZE:
            self._pass(int.from_bytes(header, "little"), _THEN_MAGIC)
        elif state == _DESCRIPTOR:
            fhd = header[0]
            single = (fhd >> 5) & 1
            self._checksum = bool((fhd >> 2) & 1)
            rest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
            rest += ((1 if single else 0), 2, 4, 8)[(fhd >> 6) & 3]
            if rest:
                self._collect(_FRAME_REST, rest)
            else:
                self._collect(_BLOCK_HEADER, 3)
        elif state == _FRAME_REST:
            self._collect(_BLOCK_HEADER, 3)
        elif state == _BLOCK_HEADER:
            word = int.from_bytes(header, "little")
            then = _THEN_FRAME_END if word & 1 else _THEN_BLOCK
            kind = (word >> 1) & 3
            size = word >> 3
            if kind == _RAW:
                self._bound += size
                self._pass(size, then)
            elif kind == _RLE:
                self._bound += size
                self._pass(1, then)
            elif kind == _COMPRESSED:
                self._bound += _BLOCK_MAX
                self._pass(size, then)
            else:
                self._state = _OPAQUE  # a reserved block type: the codec will refuse it

    def _passed(self) -> None:
        if self._then == _THEN_BLOCK:
            self._collect(_BLOCK_HEADER, 3)
        elif self._then == _THEN_FRAME_END and self._checksum:
            self._checksum = False
            self._pass(4, _THEN_MAGIC)
        else:
            self._collect(_MAGIC, 4)
