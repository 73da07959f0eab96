//! Streaming unpacking: a tensor blob read from any reader and written to any writer one
//! block at a time, so memory is the index plus one block whatever the model's size.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use xxhash_rust::xxh64::Xxh64;

use super::unpack::{plan_index, read_tensor_header};
use super::{BLOCK_RECORD_SIZE, HEADER_SIZE, SEGMENT_RECORD_SIZE};
use crate::error::{CodecError, Result};
use crate::fileio::{read_full, write_atomically};

/// Unpacks a tensor blob from `reader` into `writer` one block at a time: memory is the
/// index plus one block's stored and decoded bytes (at most 8 MiB each), whatever the
/// output's size. Every check of [`unpack_tensors`](super::unpack_tensors) is made, the
/// total checksum once the last block is written (the writer may then hold output that a
/// caller must discard on error, as [`unpack_tensors_file`] does). Returns the bytes
/// written.
pub fn unpack_tensors_stream(
    reader: &mut impl Read,
    writer: &mut impl Write,
    reference: Option<&[u8]>,
    max_output_size: u64,
) -> Result<u64> {
    let mut index = vec![0u8; HEADER_SIZE];
    let n = read_full(reader, &mut index)?;
    index.truncate(n);
    let header = read_tensor_header(&index)?;
    let index_size = HEADER_SIZE
        + SEGMENT_RECORD_SIZE * header.segment_count as usize
        + BLOCK_RECORD_SIZE * header.block_count as usize
        + 8;
    // Read through `take`, so a header that lies about its counts costs only the bytes
    // the stream really holds.
    reader
        .take((index_size - HEADER_SIZE) as u64)
        .read_to_end(&mut index)?;
    let plan = plan_index(&index, max_output_size, false)?;
    plan.check_reference(reference)?;
    let mut stored = Vec::new();
    let mut out = Vec::new();
    let mut total = Xxh64::new(0);
    for (i, block) in plan.blocks.iter().enumerate() {
        stored.resize(block.stored_size(), 0);
        if read_full(reader, &mut stored)? < stored.len() {
            return Err(CodecError::Truncated(format!(
                "tensor stream ends inside block {i}"
            )));
        }
        out.resize(block.raw_length as usize, 0);
        plan.decode_block_unchecked(i, block, &stored, reference, &mut out)?;
        total.update(&out);
        writer.write_all(&out)?;
    }
    if read_full(reader, &mut [0u8; 1])? != 0 {
        return Err(CodecError::Corrupt(
            "tensor stream has bytes after its last block".into(),
        ));
    }
    if total.digest() != plan.header.total_checksum {
        return Err(CodecError::ChecksumMismatch(
            "the decoded output does not match the blob's total checksum".into(),
        ));
    }
    writer.flush()?;
    Ok(plan.header.total_size)
}

/// Unpacks the tensor blob in the file `src` into the file `dst` with bounded memory (see
/// [`unpack_tensors_stream`]); on any error `dst` is left as it was. Returns its size.
pub fn unpack_tensors_file(
    src: &Path,
    dst: &Path,
    reference: Option<&[u8]>,
    max_output_size: u64,
) -> Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 20, File::open(src)?);
    write_atomically(dst, |w| {
        unpack_tensors_stream(&mut reader, w, reference, max_output_size)
    })
}
