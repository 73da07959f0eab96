//! Unpacking: the header and index checked against the blob and the caller's limit
//! before anything is allocated, then blocks decoded in parallel (or one at a time, by
//! index) and checked against their checksums.

use std::cell::RefCell;

use rayon::prelude::*;
use xxhash_rust::xxh64::xxh64;
use zstd_safe::DCtx;

use super::planes::{merge_planes, xor_into};
use super::{
    check_block_size, is_tensor_blob, Segment, SegmentKind, BLOCK_RECORD_SIZE, FLAG_REFERENCE,
    HEADER_SIZE, KIND_FLOAT, KIND_OPAQUE, MAX_BLOCKS, MAX_PLANES, MAX_SEGMENTS, METHOD_RANS,
    METHOD_RAW, METHOD_ZSTD, SEGMENT_DELTA, SEGMENT_RECORD_SIZE, TENSOR_FORMAT_VERSION,
};
use crate::error::{zstd_error_name, CodecError, Result};
use crate::pool::run_in_pool;

thread_local! {
    // Per worker: a decompression context and one block's planes.
    static DECODE_SCRATCH: RefCell<(Option<DCtx<'static>>, Vec<u8>)> =
        const { RefCell::new((None, Vec::new())) };
}

/// One block as the index records it, with where its bytes lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRecord {
    /// Index of its segment.
    pub segment: u32,
    /// Number of byte planes (1 for opaque segments).
    pub planes: u8,
    /// Each plane's method: 0 zstd frame, 1 raw, 2 order-0 rANS (0 past `planes`).
    pub methods: [u8; MAX_PLANES],
    /// Reconstructed bytes of the block.
    pub raw_length: u32,
    /// xxh64 (seed 0) of the reconstructed bytes.
    pub checksum: u64,
    /// xxh64 (seed 0) of the reference bytes it was XORed with (0 without).
    pub reference_checksum: u64,
    /// Stored bytes of each plane.
    pub plane_sizes: [u32; MAX_PLANES],
    /// Where the block's first plane starts in the blob.
    pub blob_offset: u64,
    /// Where the block's bytes go in the output.
    pub output_offset: u64,
}

impl BlockRecord {
    /// Bytes of its planes in the blob.
    pub fn stored_size(&self) -> usize {
        self.plane_sizes.iter().map(|&s| s as usize).sum()
    }
}

/// What a tensor blob's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorHeader {
    /// Format version.
    pub version: u16,
    /// Header flags ([`FLAG_REFERENCE`]).
    pub flags: u16,
    /// Bytes of the reconstructed output.
    pub total_size: u64,
    /// The encoder's block size.
    pub block_size: u32,
    /// Number of segments.
    pub segment_count: u32,
    /// Number of blocks.
    pub block_count: u32,
    /// Bytes of the reference it was coded against (0 without).
    pub reference_size: u64,
    /// xxh64 (seed 0) of the whole reconstructed output.
    pub total_checksum: u64,
}

impl TensorHeader {
    /// Whether the blob needs a reference to decode.
    pub fn uses_reference(&self) -> bool {
        self.flags & FLAG_REFERENCE != 0
    }
}

fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn rd64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads and checks only the fixed header (the first [`HEADER_SIZE`] bytes).
pub fn read_tensor_header(blob: &[u8]) -> Result<TensorHeader> {
    if blob.len() >= 4 && !is_tensor_blob(blob) {
        return Err(CodecError::Corrupt(
            "not a tensor-codec blob (bad magic)".into(),
        ));
    }
    if blob.len() < HEADER_SIZE {
        return Err(CodecError::Truncated(format!(
            "tensor blob of {} bytes ends inside its {HEADER_SIZE}-byte header",
            blob.len()
        )));
    }
    let header = TensorHeader {
        version: rd16(blob, 4),
        flags: rd16(blob, 6),
        total_size: rd64(blob, 8),
        block_size: rd32(blob, 16),
        segment_count: rd32(blob, 20),
        block_count: rd32(blob, 24),
        reference_size: rd64(blob, 32),
        total_checksum: rd64(blob, 40),
    };
    if header.version != TENSOR_FORMAT_VERSION {
        return Err(CodecError::Corrupt(format!(
            "tensor blob version {} is not supported (this codec reads version \
             {TENSOR_FORMAT_VERSION})",
            header.version
        )));
    }
    if header.flags & !FLAG_REFERENCE != 0 || rd32(blob, 28) != 0 {
        return Err(CodecError::Corrupt(format!(
            "tensor blob header has unknown flags 0x{:04x} or a non-zero reserved field",
            header.flags
        )));
    }
    check_block_size(header.block_size as u64).map_err(CodecError::Corrupt)?;
    if header.segment_count as usize > MAX_SEGMENTS || header.block_count as usize > MAX_BLOCKS {
        return Err(CodecError::Corrupt(format!(
            "tensor blob declares {} segments and {} blocks; at most {MAX_SEGMENTS} and \
             {MAX_BLOCKS} are allowed",
            header.segment_count, header.block_count
        )));
    }
    if !header.uses_reference() && header.reference_size != 0 {
        return Err(CodecError::Corrupt(
            "tensor blob names a reference size without the reference flag".into(),
        ));
    }
    Ok(header)
}

/// A tensor blob whose header and index have been checked: sizes, coverage and the index
/// checksum, before anything is allocated for the output.
#[derive(Debug)]
pub struct TensorPlan<'a> {
    blob: &'a [u8],
    pub(super) header: TensorHeader,
    segments: Vec<Segment>,
    pub(super) blocks: Vec<BlockRecord>,
}

/// Checks `blob`'s header and index against `max_output_size` and itself.
/// Errors: `Corrupt`, `Truncated`, `ChecksumMismatch` (the index), `SizeLimitExceeded`.
pub fn plan_tensors(blob: &[u8], max_output_size: u64) -> Result<TensorPlan<'_>> {
    plan_index(blob, max_output_size, true)
}

/// As [`plan_tensors`]; with `whole` false `blob` may end after the index (streaming),
/// and the block data is not looked for.
pub(super) fn plan_index(blob: &[u8], max_output_size: u64, whole: bool) -> Result<TensorPlan<'_>> {
    let header = read_tensor_header(blob)?;
    if header.total_size > max_output_size || header.total_size > isize::MAX as u64 {
        return Err(CodecError::SizeLimitExceeded {
            limit: max_output_size,
            needed: header.total_size,
        });
    }
    let segments_at = HEADER_SIZE;
    let blocks_at = segments_at + SEGMENT_RECORD_SIZE * header.segment_count as usize;
    let index_end = blocks_at + BLOCK_RECORD_SIZE * header.block_count as usize;
    // Both counts are bounded above, so this cannot overflow; checking it first bounds
    // every allocation below by the blob's own size.
    if blob.len() < index_end + 8 {
        return Err(CodecError::Truncated(format!(
            "tensor blob of {} bytes ends inside its index ({} bytes)",
            blob.len(),
            index_end + 8
        )));
    }
    if xxh64(&blob[..index_end], 0) != rd64(blob, index_end) {
        return Err(CodecError::ChecksumMismatch(
            "tensor blob index does not match its checksum".into(),
        ));
    }
    let corrupt = |m: String| CodecError::Corrupt(format!("tensor blob index: {m}"));
    let mut segments = Vec::with_capacity(header.segment_count as usize);
    let mut cursor = 0u64;
    for i in 0..header.segment_count as usize {
        let at = segments_at + i * SEGMENT_RECORD_SIZE;
        let (offset, length, reference_offset) =
            (rd64(blob, at), rd64(blob, at + 8), rd64(blob, at + 16));
        let (kind, width, flags) = (blob[at + 24], blob[at + 25], blob[at + 26]);
        if blob[at + 27..at + 32].iter().any(|&b| b != 0) {
            return Err(corrupt(format!("segment {i} has non-zero reserved bytes")));
        }
        if offset != cursor || length == 0 {
            return Err(corrupt(format!(
                "segment {i} starts at {offset} with {length} bytes; segments must be \
                 non-empty and follow one another from 0"
            )));
        }
        let kind = match (kind, width) {
            (KIND_OPAQUE, 1) => SegmentKind::Opaque,
            (KIND_FLOAT, 2 | 4 | 8) if length % width as u64 == 0 => SegmentKind::Float { width },
            _ => {
                return Err(corrupt(format!(
                    "segment {i} has kind {kind}, width {width} for {length} bytes"
                )))
            }
        };
        let delta = match flags {
            0 => None,
            SEGMENT_DELTA if header.uses_reference() => {
                if reference_offset
                    .checked_add(length)
                    .map_or(true, |e| e > header.reference_size)
                {
                    return Err(corrupt(format!(
                        "segment {i}'s reference range lies outside the reference"
                    )));
                }
                Some(reference_offset)
            }
            _ => return Err(corrupt(format!("segment {i} has flags 0x{flags:02x}"))),
        };
        if delta.is_none() && reference_offset != 0 {
            return Err(corrupt(format!(
                "segment {i} has a reference offset but no delta flag"
            )));
        }
        cursor = offset
            .checked_add(length)
            .filter(|&e| e <= header.total_size)
            .ok_or_else(|| corrupt(format!("segment {i} reaches past the output's size")))?;
        segments.push(Segment {
            offset,
            length,
            kind,
            reference_offset: delta,
        });
    }
    if cursor != header.total_size {
        return Err(corrupt(format!(
            "segments cover {cursor} bytes, the header says {}",
            header.total_size
        )));
    }
    let mut blocks = Vec::with_capacity(header.block_count as usize);
    let mut blob_offset = (index_end + 8) as u64;
    let mut output_offset = 0u64;
    let mut segment_end = 0u64;
    let mut next_segment = 0usize;
    for i in 0..header.block_count as usize {
        let at = blocks_at + i * BLOCK_RECORD_SIZE;
        let segment = rd32(blob, at);
        let planes = blob[at + 4];
        let raw_length = rd32(blob, at + 8);
        if blob[at + 5] != 0 || rd16(blob, at + 6) != 0 {
            return Err(corrupt(format!("block {i} has non-zero reserved bytes")));
        }
        let methods = rd32(blob, at + 12);
        let mut plane_method = [METHOD_ZSTD; MAX_PLANES];
        for (p, slot) in plane_method.iter_mut().enumerate() {
            match ((methods >> (4 * p)) & 0xF) as u8 {
                METHOD_ZSTD => {}
                m @ (METHOD_RAW | METHOD_RANS) if p < planes as usize => *slot = m,
                other => {
                    return Err(corrupt(format!(
                        "block {i} plane {p} has method {other}, not one this codec knows"
                    )))
                }
            }
        }
        // Blocks walk the segments in order: a block starts the next segment exactly
        // when the current one is used up.
        if output_offset == segment_end {
            if segment as usize != next_segment || next_segment >= segments.len() {
                return Err(corrupt(format!(
                    "block {i} names segment {segment}, expected {next_segment}"
                )));
            }
            segment_end = segments[next_segment].offset + segments[next_segment].length;
            next_segment += 1;
        } else if segment as usize + 1 != next_segment {
            return Err(corrupt(format!(
                "block {i} names segment {segment}, expected {}",
                next_segment - 1
            )));
        }
        let s = &segments[segment as usize];
        if planes as usize != s.kind.planes() {
            return Err(corrupt(format!(
                "block {i} has {planes} planes for its segment"
            )));
        }
        if raw_length == 0
            || raw_length > header.block_size
            || output_offset + raw_length as u64 > segment_end
            || raw_length as usize % planes as usize != 0
        {
            return Err(corrupt(format!("block {i} claims {raw_length} bytes")));
        }
        let plane_len = raw_length / planes as u32;
        let mut plane_sizes = [0u32; MAX_PLANES];
        for (p, size) in plane_sizes.iter_mut().enumerate() {
            *size = rd32(blob, at + 32 + 4 * p);
            let raw = plane_method[p] == METHOD_RAW;
            let ok = if p >= planes as usize {
                *size == 0
            } else if raw {
                *size == plane_len
            } else {
                *size > 0 && *size as usize <= zstd_safe::compress_bound(plane_len as usize)
            };
            if !ok {
                return Err(corrupt(format!(
                    "block {i} plane {p} has a stored size of {size}"
                )));
            }
        }
        let checksum = rd64(blob, at + 16);
        let reference_checksum = rd64(blob, at + 24);
        if s.reference_offset.is_none() && reference_checksum != 0 {
            return Err(corrupt(format!(
                "block {i} has a reference checksum outside a delta segment"
            )));
        }
        blocks.push(BlockRecord {
            segment,
            planes,
            methods: plane_method,
            raw_length,
            checksum,
            reference_checksum,
            plane_sizes,
            blob_offset,
            output_offset,
        });
        blob_offset += plane_sizes.iter().map(|&s| s as u64).sum::<u64>();
        output_offset += raw_length as u64;
    }
    if output_offset != header.total_size || next_segment != segments.len() {
        return Err(corrupt(format!(
            "blocks cover {output_offset} bytes, the header says {}",
            header.total_size
        )));
    }
    if whole && blob_offset > blob.len() as u64 {
        return Err(CodecError::Truncated(format!(
            "tensor blob of {} bytes ends before its last block ({blob_offset} bytes)",
            blob.len()
        )));
    }
    if whole && blob_offset < blob.len() as u64 {
        return Err(CodecError::Corrupt(format!(
            "tensor blob has {} bytes after its last block",
            blob.len() as u64 - blob_offset
        )));
    }
    Ok(TensorPlan {
        blob,
        header,
        segments,
        blocks,
    })
}

impl<'a> TensorPlan<'a> {
    /// The checked header.
    pub fn header(&self) -> &TensorHeader {
        &self.header
    }

    /// The segments, covering the output in order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The block index: each block's place in the blob and in the output (seeking).
    pub fn blocks(&self) -> &[BlockRecord] {
        &self.blocks
    }

    /// Bytes of the reconstructed output.
    pub fn output_size(&self) -> usize {
        self.header.total_size as usize
    }

    /// Checks that `reference` is what the blob needs (present and of its size).
    /// Errors: `ReferenceMismatch`.
    pub fn check_reference(&self, reference: Option<&[u8]>) -> Result<()> {
        if !self.header.uses_reference() {
            return Ok(());
        }
        match reference {
            None => Err(CodecError::ReferenceMismatch(format!(
                "the blob was coded against a reference of {} bytes; none was given",
                self.header.reference_size
            ))),
            Some(r) if r.len() as u64 != self.header.reference_size => {
                Err(CodecError::ReferenceMismatch(format!(
                    "the blob was coded against a reference of {} bytes; the one given has {}",
                    self.header.reference_size,
                    r.len()
                )))
            }
            Some(_) => Ok(()),
        }
    }

    /// Decodes block `index` into `out` (exactly its `raw_length` bytes), checking the
    /// reference range's checksum first and the block's checksum after.
    /// Errors: `ReferenceMismatch`, `Corrupt`, `ChecksumMismatch`, `InvalidArgument`.
    pub fn decode_block(
        &self,
        index: usize,
        reference: Option<&[u8]>,
        out: &mut [u8],
    ) -> Result<()> {
        self.check_reference(reference)?;
        let block = self.blocks.get(index).ok_or_else(|| {
            CodecError::InvalidArgument(format!("block {index} of {}", self.blocks.len()))
        })?;
        if out.len() != block.raw_length as usize {
            return Err(CodecError::InvalidArgument(format!(
                "block {index} decodes to {} bytes, the buffer has {}",
                block.raw_length,
                out.len()
            )));
        }
        self.decode_block_unchecked(index, block, self.stored(block), reference, out)
    }

    /// The block's planes in the blob.
    fn stored(&self, block: &BlockRecord) -> &'a [u8] {
        let start = block.blob_offset as usize;
        &self.blob[start..start + block.stored_size()]
    }

    pub(super) fn decode_block_unchecked(
        &self,
        index: usize,
        block: &BlockRecord,
        stored_block: &[u8],
        reference: Option<&[u8]>,
        out: &mut [u8],
    ) -> Result<()> {
        let segment = &self.segments[block.segment as usize];
        let reference_part = match (segment.reference_offset, reference) {
            (Some(at), Some(r)) => {
                let from = (at + block.output_offset - segment.offset) as usize;
                let part = &r[from..from + out.len()];
                if xxh64(part, 0) != block.reference_checksum {
                    return Err(CodecError::ReferenceMismatch(format!(
                        "block {index} (output bytes {}..{}) was coded against other reference \
                         bytes than the ones given",
                        block.output_offset,
                        block.output_offset + out.len() as u64
                    )));
                }
                Some(part)
            }
            _ => None,
        };
        let planes = block.planes as usize;
        let plane_len = out.len() / planes;
        let mut at = 0usize;
        DECODE_SCRATCH.with(|cell| -> Result<()> {
            let mut scratch = cell.borrow_mut();
            let (dctx_slot, plane_buf) = &mut *scratch;
            if planes == 1 {
                let stored = &stored_block[..block.plane_sizes[0] as usize];
                match block.methods[0] {
                    METHOD_RAW => out.copy_from_slice(stored),
                    METHOD_RANS => crate::rans::decode(stored, out)?,
                    _ => decompress_plane(dctx_slot, stored, out, index, 0)?,
                }
                return Ok(());
            }
            // Compressed planes decode into their slot of the scratch; raw ones are read
            // straight from the blob; then one pass interleaves them all.
            plane_buf.resize(out.len(), 0);
            let mut stored_planes: [&[u8]; MAX_PLANES] = [&[]; MAX_PLANES];
            let mut raw_planes = [false; MAX_PLANES];
            for p in 0..planes {
                stored_planes[p] = &stored_block[at..at + block.plane_sizes[p] as usize];
                at += block.plane_sizes[p] as usize;
                raw_planes[p] = block.methods[p] == METHOD_RAW;
            }
            for (p, slot) in plane_buf
                .chunks_exact_mut(plane_len)
                .take(planes)
                .enumerate()
            {
                match block.methods[p] {
                    METHOD_RAW => {}
                    METHOD_RANS => crate::rans::decode(stored_planes[p], slot)?,
                    _ => decompress_plane(dctx_slot, stored_planes[p], slot, index, p)?,
                }
            }
            let decoded: Vec<&[u8]> = plane_buf
                .chunks_exact(plane_len)
                .take(planes)
                .enumerate()
                .map(|(p, slot)| {
                    if raw_planes[p] {
                        stored_planes[p]
                    } else {
                        slot
                    }
                })
                .collect();
            merge_planes(&decoded, planes, out);
            Ok(())
        })?;
        if let Some(r) = reference_part {
            xor_into(out, r);
        }
        if xxh64(out, 0) != block.checksum {
            return Err(CodecError::ChecksumMismatch(format!(
                "block {index} (output bytes {}..{}) does not match its checksum",
                block.output_offset,
                block.output_offset + out.len() as u64
            )));
        }
        Ok(())
    }

    /// Decodes every block in parallel into `out` (exactly [`output_size`](Self::output_size)
    /// bytes), then checks the total checksum. Scratch memory is one block per worker.
    /// Errors: as [`decode_block`](Self::decode_block), and `InvalidArgument` for a
    /// buffer of the wrong size.
    pub fn decode_into(
        &self,
        reference: Option<&[u8]>,
        out: &mut [u8],
        threads: usize,
    ) -> Result<()> {
        self.check_reference(reference)?;
        if out.len() != self.output_size() {
            return Err(CodecError::InvalidArgument(format!(
                "output buffer is {} bytes, the blob decodes to {}",
                out.len(),
                self.output_size()
            )));
        }
        crate::fileio::advise_huge_pages(out);
        let mut slots: Vec<(usize, &BlockRecord, &mut [u8])> =
            Vec::with_capacity(self.blocks.len());
        let mut rest = &mut *out;
        for (i, block) in self.blocks.iter().enumerate() {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(block.raw_length as usize);
            slots.push((i, block, head));
            rest = tail;
        }
        run_in_pool(threads, || {
            slots.into_par_iter().try_for_each(|(i, block, dst)| {
                self.decode_block_unchecked(i, block, self.stored(block), reference, dst)
            })
        })??;
        self.check_total(out)
    }

    /// Decodes into a new vector, then checks the total checksum.
    pub fn decode_to_vec(&self, reference: Option<&[u8]>, threads: usize) -> Result<Vec<u8>> {
        self.check_reference(reference)?;
        let mut out = vec![0u8; self.output_size()];
        self.decode_into(reference, &mut out, threads)?;
        Ok(out)
    }

    /// Checks the whole output against the header's total checksum.
    pub fn check_total(&self, out: &[u8]) -> Result<()> {
        if xxh64(out, 0) != self.header.total_checksum {
            return Err(CodecError::ChecksumMismatch(
                "the decoded output does not match the blob's total checksum".into(),
            ));
        }
        Ok(())
    }
}

fn decompress_plane(
    dctx_slot: &mut Option<DCtx<'static>>,
    stored: &[u8],
    out: &mut [u8],
    block: usize,
    plane: usize,
) -> Result<()> {
    let dctx = dctx_slot.get_or_insert_with(DCtx::create);
    match dctx.decompress(out, stored) {
        Ok(n) if n == out.len() => Ok(()),
        Ok(n) => Err(CodecError::Corrupt(format!(
            "block {block} plane {plane} decodes to {n} bytes, expected {}",
            out.len()
        ))),
        Err(code) => Err(CodecError::Corrupt(format!(
            "block {block} plane {plane}: {}",
            zstd_error_name(code)
        ))),
    }
}

/// Unpacks a tensor blob into a new vector, checking it whole.
pub fn unpack_tensors(
    blob: &[u8],
    reference: Option<&[u8]>,
    max_output_size: u64,
    threads: usize,
) -> Result<Vec<u8>> {
    plan_tensors(blob, max_output_size)?.decode_to_vec(reference, threads)
}

/// Unpacks a tensor blob into `out`, which must be exactly its output size; returns it.
pub fn unpack_tensors_into(
    blob: &[u8],
    reference: Option<&[u8]>,
    out: &mut [u8],
    threads: usize,
) -> Result<usize> {
    let plan = plan_tensors(blob, out.len() as u64)?;
    plan.decode_into(reference, out, threads)?;
    Ok(out.len())
}
