//! fl-sidecar's codec: the zstd seekable format (independent frames plus a seek table),
//! packed and unpacked in parallel, with typed errors for hostile input.
//!
//! Pure Rust with no Python in it; `rust/python` binds it as `fl_sidecar._codec`.

pub mod decode;
pub mod encode;
pub mod error;
mod fileio;
pub mod format;
pub mod pool;
mod rans;
pub mod tensor;

pub use decode::{
    plan, unpack, unpack_file, unpack_stream, DecodePlan, Unpacker, DECODE_STEP,
    DEFAULT_MAX_OUTPUT_SIZE, MIN_BOUNDED_OUTPUT,
};
pub use encode::{
    compress_into, frame_count, frames_bound, pack, pack_file, pack_into, pack_stream,
    packed_bound, PackOptions, PackStats, Packer, DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL,
    MAX_CHUNK_SIZE,
};
pub use encode::{zstd_version, zstd_version_number};
pub use error::{CodecError, Result};
pub use format::{scan, Layout, MAX_FRAMES};
pub use tensor::{
    is_tensor_blob, pack_tensors, plan_tensors, read_tensor_header, unpack_tensors,
    unpack_tensors_file, unpack_tensors_into, unpack_tensors_stream, Segment, SegmentKind,
    TensorHeader, TensorPackOptions, TensorPlan, DEFAULT_TENSOR_BLOCK_SIZE, DEFAULT_TENSOR_LEVEL,
    MAX_TENSOR_BLOCK_SIZE, MIN_TENSOR_BLOCK_SIZE, TENSOR_FORMAT_VERSION,
};

/// What a blob says about itself, read without decompressing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// Number of zstd frames.
    pub frames: u64,
    /// Size of the blob, in bytes.
    pub compressed_size: u64,
    /// Total decompressed size, when every frame's size is recorded.
    pub decompressed_size: Option<u64>,
    /// Whether every frame carries its content checksum.
    pub has_checksums: bool,
    /// Whether the blob ends with a seek table.
    pub has_seek_table: bool,
}

/// Reads a blob's facts from its frame headers and seek table, checking its structure.
pub fn inspect(blob: &[u8]) -> Result<BlobInfo> {
    let layout = scan(blob)?;
    // Without decompressing, a disagreement between a frame's stored checksum and the
    // seek table's can only be reported as such (unpack tells which side is wrong).
    for (i, frame) in layout.frames.iter().enumerate() {
        if let (Some(own), Some(listed)) = (frame.checksum, frame.table_checksum) {
            if own != listed {
                return Err(CodecError::SeekTable(format!(
                    "seek table entry {i}: checksum 0x{listed:08x} disagrees with the frame's \
                     0x{own:08x}"
                )));
            }
        }
    }
    Ok(BlobInfo {
        frames: layout.frames.len() as u64,
        compressed_size: blob.len() as u64,
        decompressed_size: layout.known_total(),
        has_checksums: !layout.frames.is_empty()
            && layout.frames.iter().all(|f| f.header.has_checksum),
        has_seek_table: layout.has_seek_table,
    })
}

/// True when `prefix` starts with a zstd frame or skippable-frame magic number.
pub fn is_zstd(prefix: &[u8]) -> bool {
    if prefix.len() < 4 {
        return false;
    }
    let magic = format::read_u32(prefix, 0);
    magic == format::ZSTD_MAGIC || format::is_skippable_magic(magic)
}

/// The compression levels zstd accepts: (most negative fast level, maximum).
pub fn level_range() -> (i32, i32) {
    (zstd_safe::min_c_level(), zstd_safe::max_c_level())
}

#[cfg(test)]
mod tests;
