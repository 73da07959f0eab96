//! Packing: segments checked and cut into blocks, blocks coded in parallel, then the
//! header, the index and the block data written in the order the format fixes.

use std::cell::RefCell;

use rayon::prelude::*;
use xxhash_rust::xxh64::xxh64;
use zstd_safe::{CCtx, CParameter};

use super::planes::{split_planes, xor_into};
use super::{
    Segment, SegmentKind, TensorPackOptions, BLOCK_RECORD_SIZE, FLAG_REFERENCE, HEADER_SIZE,
    KIND_FLOAT, KIND_OPAQUE, MAX_BLOCKS, MAX_PLANES, MAX_SEGMENTS, METHOD_RANS, METHOD_RAW,
    METHOD_ZSTD, SEGMENT_DELTA, SEGMENT_RECORD_SIZE, TENSOR_FORMAT_VERSION, TENSOR_MAGIC,
};
use crate::error::{zstd_error_name, CodecError, Result};
use crate::pool::run_in_pool;

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
    // Per worker: a compression context, the XOR buffer and the planes buffer.
    static ENCODE_SCRATCH: RefCell<(Option<CCtx<'static>>, Vec<u8>, Vec<u8>)> =
        const { RefCell::new((None, Vec::new(), Vec::new())) };
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
            // The top plane holds the exponent, where order-0 coding beats zstd; the other
            // planes of a full model are mantissa bytes, where it never does (not worth
            // the time to try). In a delta every plane is sparse and may go either way.
            let try_rans = planes > 1 && (p == planes - 1 || reference_part.is_some());
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
