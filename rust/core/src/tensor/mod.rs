//! The tensor codec: a model file cut into segments (tensors and the bytes between them),
//! each cut into blocks; float blocks split into byte planes, each plane zstd-compressed or
//! stored raw, optionally after XOR with the same tensor of a reference model. The format
//! is specified in docs/tensor-codec.md, which these modules follow field by field:
//! `pack` writes blobs, `unpack` checks and reads them, `stream` reads them a block at a
//! time, `planes` holds the byte-plane transform.

mod pack;
mod planes;
mod stream;
mod unpack;

pub use pack::pack_tensors;
pub use stream::{unpack_tensors_file, unpack_tensors_stream};
pub use unpack::{
    plan_tensors, read_tensor_header, unpack_tensors, unpack_tensors_into, BlockRecord,
    TensorHeader, TensorPlan,
};

use crate::error::{CodecError, Result};

/// The blob's first four bytes.
pub const TENSOR_MAGIC: [u8; 4] = *b"FLTC";
/// The format version this codec writes and reads.
pub const TENSOR_FORMAT_VERSION: u16 = 1;
/// Header flag: some segments were coded against a reference.
pub const FLAG_REFERENCE: u16 = 1;
/// Size of the fixed header, in bytes.
pub const HEADER_SIZE: usize = 48;
/// Size of one segment record, in bytes.
pub const SEGMENT_RECORD_SIZE: usize = 32;
/// Size of one block record, in bytes.
pub const BLOCK_RECORD_SIZE: usize = 64;
/// The most byte planes a block has (fp64).
pub const MAX_PLANES: usize = 8;
/// Smallest block size a blob may declare, in bytes.
pub const MIN_TENSOR_BLOCK_SIZE: usize = 64 << 10;
/// Largest block size a blob may declare, in bytes: one plane never needs a zstd window
/// above 8 MiB, and one block's scratch stays small.
pub const MAX_TENSOR_BLOCK_SIZE: usize = 8 << 20;
/// The default block size, in bytes.
pub const DEFAULT_TENSOR_BLOCK_SIZE: usize = 1 << 20;
/// The default zstd level of [`pack_tensors`]: on byte planes level 1 beats level 3
/// (MiniLM's fp32 exponent plane: 2.75x against 2.45x; docs/tensor-codec.md).
pub const DEFAULT_TENSOR_LEVEL: i32 = 1;
/// The most segments a blob may have.
pub const MAX_SEGMENTS: usize = 1 << 20;
/// The most blocks a blob may have (at 1 MiB blocks, 4 TiB of output).
pub const MAX_BLOCKS: usize = 1 << 22;

pub(crate) const KIND_OPAQUE: u8 = 0;
pub(crate) const KIND_FLOAT: u8 = 1;
pub(crate) const SEGMENT_DELTA: u8 = 1;
/// Plane methods (4 bits each in a block record): one zstd frame, the bytes as they are,
/// or order-0 rANS (`rans.rs`).
pub(crate) const METHOD_ZSTD: u8 = 0;
pub(crate) const METHOD_RAW: u8 = 1;
pub(crate) const METHOD_RANS: u8 = 2;

/// What a segment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// Bytes coded as they are (pickle records, headers, integer tensors).
    Opaque,
    /// Little-endian floats of `width` bytes each (2: fp16/bf16, 4: fp32, 8: fp64).
    Float {
        /// Bytes per element.
        width: u8,
    },
}

impl SegmentKind {
    pub(crate) fn planes(self) -> usize {
        match self {
            SegmentKind::Opaque => 1,
            SegmentKind::Float { width } => width as usize,
        }
    }
}

/// A byte range of the input with its kind and, optionally, where the same tensor lies in
/// the reference buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Start in the input, in bytes.
    pub offset: u64,
    /// Length, in bytes.
    pub length: u64,
    /// Floats or opaque bytes.
    pub kind: SegmentKind,
    /// Start of the same-sized range in the reference to XOR with, if any.
    pub reference_offset: Option<u64>,
}

/// How to pack tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorPackOptions {
    /// zstd level of every compressed plane.
    pub level: i32,
    /// Bytes of a segment per block (a multiple of 8, 64 KiB to 8 MiB).
    pub block_size: usize,
    /// Worker threads, 0 for one per core.
    pub threads: usize,
}

impl Default for TensorPackOptions {
    fn default() -> Self {
        TensorPackOptions {
            level: DEFAULT_TENSOR_LEVEL,
            block_size: DEFAULT_TENSOR_BLOCK_SIZE,
            threads: 0,
        }
    }
}

pub(crate) fn check_block_size(block_size: u64) -> std::result::Result<(), String> {
    if block_size < MIN_TENSOR_BLOCK_SIZE as u64
        || block_size > MAX_TENSOR_BLOCK_SIZE as u64
        || block_size % 8 != 0
    {
        return Err(format!(
            "block size must be a multiple of 8 from {MIN_TENSOR_BLOCK_SIZE} to \
             {MAX_TENSOR_BLOCK_SIZE} bytes, got {block_size}"
        ));
    }
    Ok(())
}

impl TensorPackOptions {
    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = crate::level_range();
        if self.level < lo || self.level > hi {
            return Err(CodecError::InvalidArgument(format!(
                "level must be {lo} to {hi}, got {}",
                self.level
            )));
        }
        check_block_size(self.block_size as u64).map_err(CodecError::InvalidArgument)?;
        crate::pool::check_threads(self.threads)
    }
}

/// True when `prefix` starts with the tensor codec's magic.
pub fn is_tensor_blob(prefix: &[u8]) -> bool {
    prefix.len() >= 4 && prefix[..4] == TENSOR_MAGIC
}

#[cfg(test)]
mod tests;
