# Hand-written stub of the native module fl_sidecar._codec (rust/python/src/lib.rs).
# The public, documented face is fl_sidecar.codec; use that.
from typing import Optional, Tuple

from typing_extensions import Buffer

_Path = str

DEFAULT_LEVEL: int
DEFAULT_CHUNK_SIZE: int
MAX_CHUNK_SIZE: int
DEFAULT_MAX_OUTPUT_SIZE: int
MIN_LEVEL: int
MAX_LEVEL: int

def pack(data: Buffer, level: int, chunk_size: int, threads: int) -> bytes: ...
def unpack(blob: Buffer, max_output_size: int, threads: int) -> bytes: ...
def pack_file(
    src: _Path, dst: _Path, level: int, chunk_size: int, threads: int
) -> Tuple[int, int, int]: ...
def unpack_file(src: _Path, dst: _Path, max_output_size: int, threads: int) -> int: ...
def inspect(blob: Buffer) -> Tuple[int, int, Optional[int], bool, bool]: ...

class Packer:
    def __init__(self, level: int, chunk_size: int, threads: int) -> None: ...
    def write(self, data: Buffer) -> bytes: ...
    def finish(self) -> bytes: ...
    def stats(self) -> Tuple[int, int, int]: ...

class Unpacker:
    def __init__(self, max_output_size: int) -> None: ...
    def write(self, data: Buffer) -> bytes: ...
    def finish(self) -> None: ...
    @property
    def produced(self) -> int: ...

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_LEVEL",
    "DEFAULT_MAX_OUTPUT_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_LEVEL",
    "MIN_LEVEL",
    "Packer",
    "Unpacker",
    "inspect",
    "pack",
    "pack_file",
    "unpack",
    "unpack_file",
]
