# Hand-written stub of the native module fl_sidecar._codec (rust/python/src/lib.rs).
# The public, documented face is fl_sidecar.codec; use that.
# Checked against the built module by: python -m mypy.stubtest fl_sidecar._codec
from typing import List, Optional, Tuple

from typing_extensions import Buffer, final

_Path = str

DEFAULT_LEVEL: int
DEFAULT_CHUNK_SIZE: int
MAX_CHUNK_SIZE: int
DEFAULT_MAX_OUTPUT_SIZE: int
MIN_LEVEL: int
MAX_LEVEL: int
MIN_PIECE_SIZE: int
DEFAULT_PIECE_SIZE: int
MAX_FRAMES: int
TENSOR_FORMAT_VERSION: int
DEFAULT_TENSOR_BLOCK_SIZE: int
DEFAULT_TENSOR_LEVEL: int
MIN_TENSOR_BLOCK_SIZE: int
MAX_TENSOR_BLOCK_SIZE: int

def pack(data: Buffer, level: int, chunk_size: int, threads: int) -> bytes: ...
def unpack(blob: Buffer, max_output_size: int, threads: int) -> bytes: ...
def pack_file(
    src: _Path, dst: _Path, level: int, chunk_size: int, threads: int
) -> Tuple[int, int, int]: ...
def unpack_file(src: _Path, dst: _Path, max_output_size: int, threads: int) -> int: ...
def inspect(blob: Buffer) -> Tuple[int, int, Optional[int], bool, bool]: ...
def zstd_version() -> str: ...
def pack_tensors(
    data: Buffer,
    layout: List[Tuple[int, int, int, Optional[int]]],
    reference: Optional[Buffer],
    level: int,
    block_size: int,
    threads: int,
) -> bytes: ...
def unpack_tensors(
    blob: Buffer, reference: Optional[Buffer], max_output_size: int, threads: int
) -> bytes: ...
def unpack_tensors_into(
    blob: Buffer, out: Buffer, reference: Optional[Buffer], threads: int
) -> int: ...
def unpack_tensors_file(
    src: _Path, dst: _Path, reference: Optional[Buffer], max_output_size: int
) -> int: ...
def tensor_info(blob: Buffer) -> Tuple[int, int, int, int, int, bool, int]: ...

@final
class Packer:
    def __new__(cls, level: int, chunk_size: int, threads: int) -> Packer: ...
    def write(self, data: Buffer) -> bytes: ...
    def finish(self) -> bytes: ...
    def stats(self) -> Tuple[int, int, int]: ...

@final
class Unpacker:
    def __new__(cls, max_output_size: int, max_piece_size: Optional[int] = None) -> Unpacker: ...
    def write(self, data: Buffer) -> bytes: ...
    def drain(self) -> bytes: ...
    def finish(self) -> None: ...
    @property
    def produced(self) -> int: ...
    @property
    def pending_input(self) -> int: ...

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_LEVEL",
    "DEFAULT_MAX_OUTPUT_SIZE",
    "DEFAULT_PIECE_SIZE",
    "DEFAULT_TENSOR_BLOCK_SIZE",
    "DEFAULT_TENSOR_LEVEL",
    "MAX_CHUNK_SIZE",
    "MAX_FRAMES",
    "MAX_LEVEL",
    "MAX_TENSOR_BLOCK_SIZE",
    "MIN_LEVEL",
    "MIN_PIECE_SIZE",
    "MIN_TENSOR_BLOCK_SIZE",
    "TENSOR_FORMAT_VERSION",
    "Packer",
    "Unpacker",
    "inspect",
    "pack",
    "pack_file",
    "pack_tensors",
    "tensor_info",
    "unpack",
    "unpack_file",
    "unpack_tensors",
    "unpack_tensors_file",
    "unpack_tensors_into",
    "zstd_version",
]
