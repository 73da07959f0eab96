//! The tensor codec: a model file cut into segments (tensors and the bytes between them),
//! each cut into blocks; float blocks split into byte planes, each plane zstd-compressed or
//! stored raw, optionally after XOR with the same tensor of a reference model. The format
//! is specified in docs/tensor-codec.md; this file follows it field by field.

use std::cell::RefCell;

use rayon::prelude::*;
use xxhash_rust::xxh64::xxh64;
use zstd_safe::{CCtx, CParameter, DCtx};

use crate::error::{zstd_error_name, CodecError, Result};
use crate::pool::run_in_pool;

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

const KIND_OPAQUE: u8 = 0;
const KIND_FLOAT: u8 = 1;
const SEGMENT_DELTA: u8 = 1;
/// Plane methods (4 bits each in a block record): one zstd frame, the bytes as they are,
/// or order-0 rANS (`rans.rs`).
const METHOD_ZSTD: u8 = 0;
const METHOD_RAW: u8 = 1;
const METHOD_RANS: u8 = 2;

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
    fn planes(self) -> usize {
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

fn check_block_size(block_size: u64) -> std::result::Result<(), String> {
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

/// Sorts and checks the caller's segments and fills the gaps between them with opaque
/// ones, so the result covers `0..data_len` exactly; adjacent opaque segments without a
/// reference are merged (fewer, larger zstd frames).
fn normalise(
    segments: &[Segment],
    data_len: u64,
    reference_len: Option<u64>,
) -> Result<Vec<Segment>> {
    let bad = |m: String| Err(CodecError::InvalidArgument(m));
    let mut given: Vec<Segment> = segments.iter().copied().filter(|s| s.length > 0).collect();
    given.sort_by_key(|s| s.offset);
    let mut out: Vec<Segment> = Vec::with_capacity(given.len() * 2 + 1);
    let push = |s: Segment, out: &mut Vec<Segment>| {
        if let Some(last) = out.last_mut() {
            if last.kind == SegmentKind::Opaque
                && s.kind == SegmentKind::Opaque
                && last.reference_offset.is_none()
                && s.reference_offset.is_none()
            {
                last.length += s.length;
                return;
            }
        }
        out.push(s);
    };
    let mut cursor = 0u64;
    for s in given {
        let end = match s.offset.checked_add(s.length) {
            Some(end) if end <= data_len => end,
            _ => {
                return bad(format!(
                    "segment at offset {} of {} bytes reaches past the input's {data_len} bytes",
                    s.offset, s.length
                ))
            }
        };
        if s.offset < cursor {
            return bad(format!(
                "segment at offset {} overlaps the one before",
                s.offset
            ));
        }
        if let SegmentKind::Float { width } = s.kind {
            if !matches!(width, 2 | 4 | 8) {
                return bad(format!("float width must be 2, 4 or 8 bytes, got {width}"));
            }
            if s.length % width as u64 != 0 {
                return bad(format!(
                    "segment at offset {}: {} bytes is not a whole number of {width}-byte floats",
                    s.offset, s.length
                ));
            }
        }
        if let Some(at) = s.reference_offset {
            let Some(rlen) = reference_len else {
                return bad("a segment names a reference offset, but no reference is given".into());
            };
            if at.checked_add(s.length).map_or(true, |e| e > rlen) {
                return bad(format!(
                    "segment at offset {}: its reference range {at}+{} lies outside the \
                     reference's {rlen} bytes",
                    s.offset, s.length
                ));
            }
        }
        if s.offset > cursor {
            push(
                Segment {
                    offset: cursor,
                    length: s.offset - cursor,
                    kind: SegmentKind::Opaque,
                    reference_offset: None,
                },
                &mut out,
            );
        }
        push(s, &mut out);
        cursor = end;
    }
    if cursor < data_len {
        push(
            Segment {
                offset: cursor,
                length: data_len - cursor,
                kind: SegmentKind::Opaque,
                reference_offset: None,
            },
            &mut out,
        );
    }
    if out.len() > MAX_SEGMENTS {
        return bad(format!(
            "{} segments, more than the {MAX_SEGMENTS} a blob may have",
            out.len()
        ));
    }
    Ok(out)
}

/// One block's place: which segment, and which bytes of the input.
#[derive(Debug, Clone, Copy)]
struct BlockSpan {
    segment: u32,
    offset: u64,
    length: u32,
}

fn cut_blocks(segments: &[Segment], block_size: usize) -> Result<Vec<BlockSpan>> {
    let mut blocks = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        let mut at = 0u64;
        while at < s.length {
            let length = (s.length - at).min(block_size as u64);
            blocks.push(BlockSpan {
                segment: i as u32,
                offset: s.offset + at,
                length: length as u32,
            });
            at += length;
        }
        if blocks.len() > MAX_BLOCKS {
            return Err(CodecError::InvalidArgument(format!(
                "the input needs more than the {MAX_BLOCKS} blocks a blob may have; use a \
                 larger block size"
            )));
        }
    }
    Ok(blocks)
}

/// Splits `W`-byte little-endian elements into `W` byte planes of `n` bytes each, after
/// rotating each element left by one bit (the sign moves to bit 0, so the exponent fills
/// the top byte on its own): `dst[p * n + i]` = byte `p` of `rotl1(element i)`.
fn split_planes(src: &[u8], width: usize, dst: &mut [u8]) {
    match width {
        2 => split_rotated::<2>(src, dst),
        4 => split_rotated::<4>(src, dst),
        8 => split_rotated::<8>(src, dst),
        _ => unreachable!("float widths are checked"),
    }
}

fn split_rotated<const W: usize>(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / W;
    let bits = 8 * W as u32;
    let mask = if W == 8 { u64::MAX } else { (1u64 << bits) - 1 };
    let mut planes: Vec<&mut [u8]> = dst.chunks_exact_mut(n.max(1)).take(W).collect();
    for (i, element) in src.chunks_exact(W).enumerate() {
        let mut raw = [0u8; 8];
        raw[..W].copy_from_slice(element);
        let v = u64::from_le_bytes(raw);
        let r = ((v << 1) | (v >> (bits - 1))) & mask;
        let bytes = r.to_le_bytes();
        for (plane, byte) in planes.iter_mut().zip(bytes) {
            plane[i] = byte;
        }
    }
}

/// The inverse of [`split_planes`]: gathers byte `i` of each plane, rotates right by one.
fn merge_planes(planes: &[&[u8]], width: usize, dst: &mut [u8]) {
    match width {
        2 => merge_rotated::<2>(planes, dst),
        4 => merge_rotated::<4>(planes, dst),
        8 => merge_rotated::<8>(planes, dst),
        _ => unreachable!("float widths are checked"),
    }
}

fn merge_rotated<const W: usize>(planes: &[&[u8]], dst: &mut [u8]) {
    let bits = 8 * W as u32;
    let mask = if W == 8 { u64::MAX } else { (1u64 << bits) - 1 };
    let planes: [&[u8]; W] = std::array::from_fn(|p| planes[p]);
    for (i, element) in dst.chunks_exact_mut(W).enumerate() {
        let mut r = 0u64;
        for (p, plane) in planes.iter().enumerate() {
            r |= (plane[i] as u64) << (8 * p);
        }
        let v = ((r >> 1) | (r << (bits - 1))) & mask;
        element.copy_from_slice(&v.to_le_bytes()[..W]);
    }
}

fn xor_into(dst: &mut [u8], other: &[u8]) {
    for (d, o) in dst.iter_mut().zip(other) {
        *d ^= *o;
    }
}

struct EncodedBlock {
    planes: u8,
    methods: [u8; MAX_PLANES],
    raw_length: u32,
    checksum: u64,
    reference_checksum: u64,
    plane_sizes: [u32; MAX_PLANES],
    bytes: Vec<u8>,
}

thread_local! {
    static ENCODE_SCRATCH: RefCell<(Option<CCtx<'static>>, Vec<u8>, Vec<u8>)> =
        const { RefCell::new((None, Vec::new(), Vec::new())) };
    static DECODE_SCRATCH: RefCell<(Option<DCtx<'static>>, Vec<u8>)> =
        const { RefCell::new((None, Vec::new())) };
}

/// Codes one plane the cheapest way: zstd, or (exponent planes) order-0 rANS, whichever
/// is smaller; raw unless that saves at least 1/64 of it (decoding a raw plane is a copy,
/// and a plane that barely compresses is not worth the time). Returns (size, method).
///
/// On an exponent plane rANS is tried first; zstd only when rANS got below a quarter of
/// the plane, where long runs (a delta's zeros) may favour zstd's matches. A full
/// model's exponent plane (about a third after rANS) never does.
fn compress_plane(
    cctx: &mut CCtx<'static>,
    plane: &[u8],
    try_rans: bool,
    out: &mut Vec<u8>,
) -> Result<(u32, u8)> {
    let start = out.len();
    let mut best: Option<(Vec<u8>, u8)> = None;
    if try_rans && !plane.is_empty() {
        let mut coded = Vec::with_capacity(plane.len());
        crate::rans::encode(plane, &mut coded);
        best = Some((coded, METHOD_RANS));
    }
    if best
        .as_ref()
        .map_or(true, |(b, _)| b.len() < plane.len() / 4)
    {
        let mut zstd = Vec::with_capacity(zstd_safe::compress_bound(plane.len()));
        cctx.compress2(&mut zstd, plane)
            .map_err(|code| CodecError::Corrupt(format!("zstd: {}", zstd_error_name(code))))?;
        if best.as_ref().map_or(true, |(b, _)| zstd.len() < b.len()) {
            best = Some((zstd, METHOD_ZSTD));
        }
    }
    let (coded, method) = best.expect("zstd or rANS ran");
    if coded.len() + plane.len() / 64 < plane.len() {
        out.extend_from_slice(&coded);
        Ok(((out.len() - start) as u32, method))
    } else {
        out.extend_from_slice(plane);
        Ok((plane.len() as u32, METHOD_RAW))
    }
}

fn encode_block(
    data: &[u8],
    reference: Option<&[u8]>,
    segment: &Segment,
    span: &BlockSpan,
    level: i32,
) -> Result<EncodedBlock> {
    let src = &data[span.offset as usize..span.offset as usize + span.length as usize];
    let checksum = xxh64(src, 0);
    let reference_part = match (segment.reference_offset, reference) {
        (Some(at), Some(r)) => {
            let from = (at + (span.offset - segment.offset)) as usize;
            Some(&r[from..from + src.len()])
        }
        _ => None,
    };
    ENCODE_SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let (cctx_slot, xored, planes_buf) = &mut *scratch;
        if cctx_slot.is_none() {
            *cctx_slot = Some(CCtx::create());
        }
        let cctx = cctx_slot.as_mut().expect("just created");
        cctx.set_parameter(CParameter::CompressionLevel(level))
            .map_err(|code| {
                CodecError::InvalidArgument(format!(
                    "zstd level {level}: {}",
                    zstd_error_name(code)
                ))
            })?;
        cctx.set_parameter(CParameter::ContentSizeFlag(true))
            .map_err(|code| CodecError::InvalidArgument(zstd_error_name(code).into()))?;
        cctx.set_parameter(CParameter::ChecksumFlag(false))
            .map_err(|code| CodecError::InvalidArgument(zstd_error_name(code).into()))?;
        let input: &[u8] = match reference_part {
            Some(r) => {
                xored.clear();
                xored.extend_from_slice(src);
                xor_into(xored, r);
                xored
            }
            None => src,
        };
        let planes = segment.kind.planes();
        let mut block = EncodedBlock {
            planes: planes as u8,
            methods: [METHOD_ZSTD; MAX_PLANES],
            raw_length: span.length,
            checksum,
            reference_checksum: reference_part.map_or(0, |r| xxh64(r, 0)),
            plane_sizes: [0; MAX_PLANES],
            bytes: Vec::new(),
        };
        let split: &[u8] = if planes == 1 {
            input
        } else {
            planes_buf.resize(input.len(), 0);
            split_planes(input, planes, planes_buf);
            planes_buf
        };
        let n = input.len() / planes;
        for p in 0..planes {
            let plane = &split[p * n..(p + 1) * n];
            // The top plane holds the exponent, where order-0 coding beats zstd; the others
            // are mantissa bytes, where it never does (not worth the time to try).
            let try_rans = planes > 1 && p == planes - 1;
            let (size, method) = compress_plane(cctx, plane, try_rans, &mut block.bytes)?;
            block.plane_sizes[p] = size;
            block.methods[p] = method;
        }
        Ok(block)
    })
}

/// The block record's method field: 4 bits per plane, plane `p` at bits `4p..4p+4`.
fn plane_methods(methods: &[u8; MAX_PLANES]) -> u32 {
    methods
        .iter()
        .enumerate()
        .map(|(p, &m)| (m as u32) << (4 * p))
        .sum()
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Packs `data` as tensors: `segments` name the float tensors (and any opaque ranges, or
/// ranges to code against `reference`); the bytes between them are opaque. Returns the
/// blob. Errors: `InvalidArgument` for bad options or segments.
pub fn pack_tensors(
    data: &[u8],
    segments: &[Segment],
    reference: Option<&[u8]>,
    opts: &TensorPackOptions,
) -> Result<Vec<u8>> {
    opts.validate()?;
    let segments = normalise(
        segments,
        data.len() as u64,
        reference.map(|r| r.len() as u64),
    )?;
    let blocks = cut_blocks(&segments, opts.block_size)?;
    let uses_reference = segments.iter().any(|s| s.reference_offset.is_some());
    let (total_checksum, encoded) = run_in_pool(opts.threads, || {
        rayon::join(
            || xxh64(data, 0),
            || {
                blocks
                    .par_iter()
                    .map(|span| {
                        encode_block(
                            data,
                            reference,
                            &segments[span.segment as usize],
                            span,
                            opts.level,
                        )
                    })
                    .collect::<Result<Vec<EncodedBlock>>>()
            },
        )
    })?;
    let encoded = encoded?;
    let index_size =
        HEADER_SIZE + SEGMENT_RECORD_SIZE * segments.len() + BLOCK_RECORD_SIZE * blocks.len() + 8;
    let body: usize = encoded.iter().map(|b| b.bytes.len()).sum();
    let mut out = Vec::with_capacity(index_size + body);
    out.extend_from_slice(&TENSOR_MAGIC);
    put_u16(&mut out, TENSOR_FORMAT_VERSION);
    put_u16(&mut out, if uses_reference { FLAG_REFERENCE } else { 0 });
    put_u64(&mut out, data.len() as u64);
    put_u32(&mut out, opts.block_size as u32);
    put_u32(&mut out, segments.len() as u32);
    put_u32(&mut out, blocks.len() as u32);
    put_u32(&mut out, 0);
    put_u64(
        &mut out,
        if uses_reference {
            reference.map_or(0, |r| r.len() as u64)
        } else {
            0
        },
    );
    put_u64(&mut out, total_checksum);
    for s in &segments {
        put_u64(&mut out, s.offset);
        put_u64(&mut out, s.length);
        put_u64(&mut out, s.reference_offset.unwrap_or(0));
        out.push(match s.kind {
            SegmentKind::Opaque => KIND_OPAQUE,
            SegmentKind::Float { .. } => KIND_FLOAT,
        });
        out.push(s.kind.planes() as u8);
        out.push(if s.reference_offset.is_some() {
            SEGMENT_DELTA
        } else {
            0
        });
        out.extend_from_slice(&[0u8; 5]);
    }
    for (span, b) in blocks.iter().zip(&encoded) {
        put_u32(&mut out, span.segment);
        out.push(b.planes);
        out.push(0);
        put_u16(&mut out, 0);
        put_u32(&mut out, b.raw_length);
        put_u32(&mut out, plane_methods(&b.methods));
        put_u64(&mut out, b.checksum);
        put_u64(&mut out, b.reference_checksum);
        for size in b.plane_sizes {
            put_u32(&mut out, size);
        }
    }
    let index_checksum = xxh64(&out, 0);
    put_u64(&mut out, index_checksum);
    debug_assert_eq!(out.len(), index_size);
    for b in &encoded {
        out.extend_from_slice(&b.bytes);
    }
    Ok(out)
}

/// True when `prefix` starts with the tensor codec's magic.
pub fn is_tensor_blob(prefix: &[u8]) -> bool {
    prefix.len() >= 4 && prefix[..4] == TENSOR_MAGIC
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
    header: TensorHeader,
    segments: Vec<Segment>,
    blocks: Vec<BlockRecord>,
}

/// Checks `blob`'s header and index against `max_output_size` and itself.
/// Errors: `Corrupt`, `Truncated`, `ChecksumMismatch` (the index), `SizeLimitExceeded`.
pub fn plan_tensors(blob: &[u8], max_output_size: u64) -> Result<TensorPlan<'_>> {
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
    if blob_offset > blob.len() as u64 {
        return Err(CodecError::Truncated(format!(
            "tensor blob of {} bytes ends before its last block ({blob_offset} bytes)",
            blob.len()
        )));
    }
    if blob_offset < blob.len() as u64 {
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
        self.decode_block_unchecked(index, block, reference, out)
    }

    fn decode_block_unchecked(
        &self,
        index: usize,
        block: &BlockRecord,
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
        let mut at = block.blob_offset as usize;
        DECODE_SCRATCH.with(|cell| -> Result<()> {
            let mut scratch = cell.borrow_mut();
            let (dctx_slot, plane_buf) = &mut *scratch;
            if planes == 1 {
                let stored = &self.blob[at..at + block.plane_sizes[0] as usize];
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
                stored_planes[p] = &self.blob[at..at + block.plane_sizes[p] as usize];
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
                self.decode_block_unchecked(i, block, reference, dst)
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
