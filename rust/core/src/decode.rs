//! Unpacking: frames decoded in parallel straight into one output buffer (sizes from the
//! frame headers and the seek table), and a streaming decoder for anything else.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use rayon::prelude::*;
use xxhash_rust::xxh64::{xxh64, Xxh64};
use zstd_safe::{DCtx, DParameter, InBuffer, OutBuffer};

use crate::error::{classify_zstd_error, zstd_error_name, CodecError, Result, ZstdFailure};
use crate::fileio::{advise_huge_pages, write_atomically};
use crate::format::{
    frame_header_size, is_skippable_magic, parse_block_header, parse_frame_header,
    parse_seek_table_content, read_u32, scan, too_many_frames, FrameHeader, FrameInfo, Layout,
    SeekTable, MAX_BLOCK_SIZE, MAX_CHUNK_SIZE, MAX_FRAMES, MAX_FRAME_HEADER_SIZE, SEEKABLE_MAGIC,
    SEEK_TABLE_FOOTER_SIZE, SEEK_TABLE_SKIPPABLE_MAGIC, SKIPPABLE_HEADER_SIZE, ZSTD_MAGIC,
};
use crate::pool::run_in_pool;

/// The default limit on the decompressed size: 4 GiB.
pub const DEFAULT_MAX_OUTPUT_SIZE: u64 = 4 << 30;

/// The window every decoder must accept (RFC 9659), in bytes.
const BASE_WINDOW_LOG: u32 = 23;
/// zstd's own default ceiling for streaming windows (128 MiB).
const MAX_STREAM_WINDOW_LOG: u32 = 27;

/// The largest window any zstd decoder supports (window log 31).
const MAX_ZSTD_WINDOW: u64 = 1 << 31;

/// Bytes the streaming decoder produces at a time.
const STREAM_STEP: usize = 128 * 1024;

/// The most decompressed bytes a streaming path (`unpack_stream`, `unpack_file`, the
/// one-shot decoder for frames without sizes) produces and hands on at a time: with the
/// frame's window this bounds their memory, whatever a bomb expands to.
pub const DECODE_STEP: usize = 4 << 20;

/// The smallest output bound [`Unpacker::write_bounded`] accepts: one zstd block's content
/// (128 KiB), the most one step of the decoder can produce.
pub const MIN_BOUNDED_OUTPUT: usize = MAX_BLOCK_SIZE;

fn zstd_failure(code: usize, what: String) -> CodecError {
    match classify_zstd_error(code) {
        ZstdFailure::Checksum => {
            CodecError::ChecksumMismatch(format!("{what}: content checksum mismatch"))
        }
        ZstdFailure::OutOfMemory => CodecError::OutOfMemory(format!(
            "{what}: zstd could not allocate the memory the frame needs (its window)"
        )),
        _ => CodecError::Corrupt(format!("{what}: {}", zstd_error_name(code))),
    }
}

fn low32_xxh64(data: &[u8]) -> u32 {
    xxh64(data, 0) as u32
}

/// A blob whose structure has been checked and whose output size is known when possible.
#[derive(Debug)]
pub struct DecodePlan<'a> {
    blob: &'a [u8],
    layout: Layout,
    limit: u64,
}

/// Walks `blob` and checks its sizes against `max_output_size` before anything is
/// allocated or decompressed.
pub fn plan(blob: &[u8], max_output_size: u64) -> Result<DecodePlan<'_>> {
    let layout = scan(blob)?;
    if let Some(total) = layout.known_total() {
        if total > max_output_size || total > isize::MAX as u64 {
            return Err(CodecError::SizeLimitExceeded {
                limit: max_output_size,
                needed: total,
            });
        }
    }
    for frame in &layout.frames {
        // A header that claims more than its blocks can hold would have its claim
        // allocated before zstd finds the lie.
        if let Some(claimed) = frame.header.content_size {
            if claimed > frame.max_decompressed {
                return Err(CodecError::Corrupt(format!(
                    "zstd frame at offset {}: its header claims {claimed} bytes, more than \
                     the {} its blocks can hold",
                    frame.offset, frame.max_decompressed
                )));
            }
        }
    }
    Ok(DecodePlan {
        blob,
        layout,
        limit: max_output_size,
    })
}

impl DecodePlan<'_> {
    /// The decompressed size, when every frame's size is known up front.
    pub fn output_size(&self) -> Option<usize> {
        self.layout.known_total().map(|t| t as usize)
    }

    /// The checked structure.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The decompressed size: from the frame headers and seek table when they give it,
    /// else by decoding the blob once in [`DECODE_STEP`] pieces that are dropped (memory
    /// one step and one window; a bomb is refused at the limit without holding its output).
    pub fn measure(&self) -> Result<usize> {
        match self.output_size() {
            Some(total) => Ok(total),
            None => {
                let total = self.stream(|_| Ok(()))?;
                usize::try_from(total).map_err(|_| CodecError::SizeLimitExceeded {
                    limit: self.limit,
                    needed: total,
                })
            }
        }
    }

    /// Runs the streaming decoder over the blob, handing `sink` at most [`DECODE_STEP`]
    /// bytes at a time; returns the bytes produced.
    fn stream(&self, mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<u64> {
        let mut unpacker = Unpacker::new(self.limit);
        let mut piece = Vec::with_capacity(DECODE_STEP);
        let mut rest = self.blob;
        while !rest.is_empty() {
            let used = unpacker.write_bounded(rest, &mut piece, DECODE_STEP)?;
            rest = &rest[used..];
            sink(&piece)?;
            piece.clear();
        }
        unpacker.finish()?;
        Ok(unpacker.produced())
    }

    /// Decodes the blob into `out`, which must be exactly [`measure`](Self::measure) bytes:
    /// every frame in parallel into its place when the sizes are known up front, else
    /// streaming, a [`DECODE_STEP`] at a time.
    pub fn decode_into(&self, out: &mut [u8], threads: usize) -> Result<()> {
        let Some(total) = self.output_size() else {
            let mut filled = 0usize;
            let len = out.len();
            let produced = self.stream(|piece| {
                let end = filled + piece.len();
                if end > len {
                    return Err(CodecError::InvalidArgument(format!(
                        "output buffer is {len} bytes, the blob decodes to more"
                    )));
                }
                out[filled..end].copy_from_slice(piece);
                filled = end;
                Ok(())
            })?;
            if produced != len as u64 {
                return Err(CodecError::InvalidArgument(format!(
                    "output buffer is {len} bytes, the blob decodes to {produced}"
                )));
            }
            return Ok(());
        };
        if out.len() != total {
            return Err(CodecError::InvalidArgument(format!(
                "output buffer is {} bytes, the blob decodes to {total}",
                out.len()
            )));
        }
        advise_huge_pages(out);
        let mut slots: Vec<(usize, &FrameInfo, &mut [u8])> =
            Vec::with_capacity(self.layout.frames.len());
        let mut rest = out;
        for (i, frame) in self.layout.frames.iter().enumerate() {
            let size = frame.known_size().unwrap_or(0) as usize;
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(size);
            slots.push((i, frame, head));
            rest = tail;
        }
        let blob = self.blob;
        run_in_pool(threads, || {
            slots.into_par_iter().try_for_each(|(i, frame, dst)| {
                DCTX_CACHE.with(|cell| {
                    let mut dctx = cell.borrow_mut().take().unwrap_or_else(DCtx::create);
                    let result = decode_frame(&mut dctx, blob, i, frame, dst);
                    *cell.borrow_mut() = Some(dctx);
                    result
                })
            })
        })?
    }

    /// Decodes into a new vector of exactly the output's size: in parallel when the sizes
    /// are known; else the blob is measured first (see [`measure`](Self::measure)) and
    /// decoded twice, so memory is the output's size, never the limit.
    pub fn decode_to_vec(&self, threads: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.measure()?];
        self.decode_into(&mut out, threads)?;
        Ok(out)
    }
}

thread_local! {
    // A one-shot decoding context holds no window (about 100 KiB): keep one per worker.
    static DCTX_CACHE: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
}

fn decode_frame(
    dctx: &mut DCtx<'static>,
    blob: &[u8],
    index: usize,
    frame: &FrameInfo,
    dst: &mut [u8],
) -> Result<()> {
    let src = &blob[frame.offset..frame.offset + frame.compressed_size];
    let what = || format!("frame {index} at offset {}", frame.offset);
    let size_from_table = frame.header.content_size.is_none();
    let n = match dctx.decompress(dst, src) {
        Ok(n) => n,
        Err(code) => {
            return Err(
                if size_from_table && classify_zstd_error(code) == ZstdFailure::OutputTooSmall {
                    CodecError::SeekTable(format!(
                        "{}: decodes to more than the {} bytes the seek table says",
                        what(),
                        dst.len()
                    ))
                } else {
                    zstd_failure(code, what())
                },
            )
        }
    };
    if n != dst.len() {
        let msg = format!("{}: decodes to {n} bytes, expected {}", what(), dst.len());
        return Err(if size_from_table {
            CodecError::SeekTable(msg)
        } else {
            CodecError::Corrupt(msg)
        });
    }
    if let Some(expected) = frame.table_checksum {
        match frame.checksum {
            // zstd has verified the frame's own checksum: the table must agree with it.
            Some(actual) if actual != expected => {
                return Err(CodecError::SeekTable(format!(
                    "{}: the seek table's checksum 0x{expected:08x} disagrees with the frame's \
                     0x{actual:08x}",
                    what()
                )))
            }
            Some(_) => {}
            None => {
                let actual = low32_xxh64(dst);
                if actual != expected {
                    return Err(CodecError::ChecksumMismatch(format!(
                        "{}: content does not match the seek table's checksum",
                        what()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Unpacks any zstd stream (ours, or plain single- or multi-frame zstd) into a vector.
pub fn unpack(blob: &[u8], max_output_size: u64, threads: usize) -> Result<Vec<u8>> {
    plan(blob, max_output_size)?.decode_to_vec(threads)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Magic,
    FrameHeader { need: usize },
    BlockHeader,
    BlockBody { left: usize, last: bool },
    Checksum,
    SkippableHeader,
    SkippableBody { left: u64, keep: bool },
}

#[derive(Debug, Clone, Copy)]
struct FrameRecord {
    compressed: u64,
    decompressed: u64,
    checksum: u32,
    has_own_checksum: bool,
}

struct CurrentFrame {
    offset: u64,
    header: FrameHeader,
    produced: u64,
    // For frames without their own checksum, in case a seek table lists one.
    hasher: Option<Xxh64>,
    checksum: Option<u32>,
    // zstd reported the frame complete (decompress_stream returned 0).
    zstd_done: bool,
}

/// A streaming decoder: fed compressed bytes in pieces of any size, it hands back the
/// decompressed bytes as they come, verifies every frame checksum and every seek table,
/// and never holds more than one frame's window plus small headers.
pub struct Unpacker {
    limit: u64,
    produced: u64,
    consumed: u64,
    item_start: u64,
    stage: Stage,
    small: Vec<u8>,
    dctx: DCtx<'static>,
    frame: Option<CurrentFrame>,
    run: Vec<FrameRecord>,
    run_overflow: bool,
    table: Vec<u8>,
    skippable_magic: u32,
    skippable_tail: u32,
    skippable_seen: u64,
    unverified_table_at_end: bool,
    failed: bool,
    finished: bool,
    frames: u64,
    scratch: Vec<u8>,
    window_log_max: u32,
}

impl std::fmt::Debug for Unpacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unpacker")
            .field("limit", &self.limit)
            .field("produced", &self.produced)
            .field("consumed", &self.consumed)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

fn window_log_for(limit: u64) -> u32 {
    let needed = u64::BITS - limit.saturating_sub(1).leading_zeros();
    needed.clamp(BASE_WINDOW_LOG, MAX_STREAM_WINDOW_LOG)
}

impl Unpacker {
    /// A decoder that refuses to produce more than `max_output_size` bytes in total.
    pub fn new(max_output_size: u64) -> Self {
        let window_log_max = window_log_for(max_output_size);
        let mut dctx = DCtx::create();
        // Only fails for out-of-range values, and window_log_for stays in range.
        let _ = dctx.set_parameter(DParameter::WindowLogMax(window_log_max));
        Unpacker {
            limit: max_output_size,
            produced: 0,
            consumed: 0,
            item_start: 0,
            stage: Stage::Magic,
            small: Vec::with_capacity(MAX_FRAME_HEADER_SIZE),
            dctx,
            frame: None,
            run: Vec::new(),
            run_overflow: false,
            table: Vec::new(),
            skippable_magic: 0,
            skippable_tail: 0,
            skippable_seen: 0,
            unverified_table_at_end: false,
            failed: false,
            finished: false,
            frames: 0,
            scratch: Vec::new(),
            window_log_max,
        }
    }

    /// Decompressed bytes produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// zstd frames completed so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Feeds `input`; appends ALL the bytes it decodes to `out`, which a few bytes of a bomb
    /// can grow to the limit. Only for callers that keep the whole output anyway; streaming
    /// callers use [`write_bounded`](Self::write_bounded).
    pub fn write(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.write_bounded(input, out, usize::MAX).map(|_| ())
    }

    /// Feeds as much of `input` as it can without appending more than `max_output` bytes to
    /// `out`; returns how many bytes of `input` it took. The caller offers the rest again
    /// (after handling `out`) to continue: a small input that expands hugely comes out in
    /// pieces of at most `max_output` bytes instead of all at once.
    ///
    /// `max_output` must be at least [`MIN_BOUNDED_OUTPUT`] (one zstd block, the most a
    /// single step can produce); every call with input left makes progress.
    pub fn write_bounded(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        max_output: usize,
    ) -> Result<usize> {
        if max_output < MIN_BOUNDED_OUTPUT {
            return Err(CodecError::InvalidArgument(format!(
                "the output bound must be at least {MIN_BOUNDED_OUTPUT} bytes (one zstd block), \
                 got {max_output}"
            )));
        }
        if self.failed {
            return Err(CodecError::InvalidArgument(
                "the unpacker already failed; start a new one".into(),
            ));
        }
        if self.finished {
            return Err(CodecError::InvalidArgument(
                "the unpacker is already finished".into(),
            ));
        }
        let result = self.write_inner(input, out, max_output);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// Takes up to `need - small.len()` bytes from `input` into the header buffer.
    fn collect(&mut self, input: &[u8], need: usize) -> usize {
        if self.stage == Stage::Magic && self.small.is_empty() {
            self.item_start = self.consumed;
        }
        let take = (need - self.small.len()).min(input.len());
        self.small.extend_from_slice(&input[..take]);
        self.consumed += take as u64;
        take
    }

    /// Runs the parser over `input` one step at a time (a header, a block body or part of
    /// one, a checksum, a skippable frame's bytes). A step decodes at most one block, so it
    /// appends at most `MAX_BLOCK_SIZE` bytes (zstd refuses larger blocks, and each `feed`
    /// drains zstd completely): stopping before a step that could cross `max_output` keeps
    /// the output within it. Returns the bytes of `input` taken.
    fn write_inner(&mut self, input: &[u8], out: &mut Vec<u8>, max_output: usize) -> Result<usize> {
        let start = out.len();
        let total = input.len();
        let mut input = input;
        while !input.is_empty() {
            if (out.len() - start).saturating_add(MAX_BLOCK_SIZE) > max_output {
                break;
            }
            let before = out.len();
            let used = match self.stage {
                Stage::Magic => {
                    let used = self.collect(input, 4);
                    if self.small.len() == 4 {
                        self.start_frame()?;
                    }
                    used
                }
                Stage::FrameHeader { need } => {
                    let used = self.collect(input, need);
                    if self.small.len() == need {
                        let full = frame_header_size(self.small[4]);
                        if full > need {
                            self.stage = Stage::FrameHeader { need: full };
                        } else {
                            self.begin_frame(out)?;
                        }
                    }
                    used
                }
                Stage::BlockHeader => {
                    let used = self.collect(input, 3);
                    if self.small.len() == 3 {
                        let at = self.consumed - 3;
                        let block =
                            parse_block_header([self.small[0], self.small[1], self.small[2]], at)?;
                        let header = std::mem::take(&mut self.small);
                        self.feed(&header, out)?;
                        self.small = header;
                        self.small.clear();
                        self.stage = Stage::BlockBody {
                            left: block.stored_size,
                            last: block.last,
                        };
                        if block.stored_size == 0 {
                            self.end_block(block.last, out)?;
                        }
                    }
                    used
                }
                Stage::BlockBody { left, last } => {
                    let take = left.min(input.len());
                    self.consumed += take as u64;
                    self.feed(&input[..take], out)?;
                    if take == left {
                        self.end_block(last, out)?;
                    } else {
                        self.stage = Stage::BlockBody {
                            left: left - take,
                            last,
                        };
                    }
                    take
                }
                Stage::Checksum => {
                    let used = self.collect(input, 4);
                    if self.small.len() == 4 {
                        let checksum = read_u32(&self.small, 0);
                        let bytes = std::mem::take(&mut self.small);
                        self.feed(&bytes, out)?;
                        self.small = bytes;
                        self.small.clear();
                        if let Some(frame) = self.frame.as_mut() {
                            frame.checksum = Some(checksum);
                        }
                        self.end_frame(out)?;
                    }
                    used
                }
                Stage::SkippableHeader => {
                    let used = self.collect(input, SKIPPABLE_HEADER_SIZE);
                    if self.small.len() == SKIPPABLE_HEADER_SIZE {
                        self.begin_skippable()?;
                    }
                    used
                }
                Stage::SkippableBody { left, keep } => {
                    let take = left.min(input.len() as u64) as usize;
                    self.consumed += take as u64;
                    if keep {
                        self.table.extend_from_slice(&input[..take]);
                    }
                    for &b in &input[take.saturating_sub(4)..take] {
                        self.skippable_tail = (self.skippable_tail >> 8) | (u32::from(b) << 24);
                    }
                    self.skippable_seen += take as u64;
                    if take as u64 == left {
                        self.end_skippable()?;
                    } else {
                        self.stage = Stage::SkippableBody {
                            left: left - take as u64,
                            keep,
                        };
                    }
                    take
                }
            };
            debug_assert!(
                out.len() - before <= MAX_BLOCK_SIZE,
                "one step, one block at most"
            );
            input = &input[used..];
        }
        Ok(total - input.len())
    }

    fn start_frame(&mut self) -> Result<()> {
        let magic = read_u32(&self.small, 0);
        // Whatever came before was not the last thing in the stream.
        self.unverified_table_at_end = false;
        if magic == ZSTD_MAGIC {
            self.stage = Stage::FrameHeader { need: 5 };
            Ok(())
        } else if is_skippable_magic(magic) {
            self.stage = Stage::SkippableHeader;
            Ok(())
        } else {
            Err(CodecError::Corrupt(format!(
                "unknown frame magic 0x{magic:08X} at offset {}: not a zstd stream",
                self.item_start
            )))
        }
    }

    fn begin_frame(&mut self, out: &mut Vec<u8>) -> Result<()> {
        let offset = self.item_start;
        let header = parse_frame_header(&self.small, offset)?;
        if header.dictionary_id != 0 {
            return Err(CodecError::Corrupt(format!(
                "zstd frame at offset {offset} needs dictionary {}, which we do not have",
                header.dictionary_id
            )));
        }
        if let Some(size) = header.content_size {
            let needed = self.produced.saturating_add(size);
            if needed > self.limit {
                return Err(CodecError::SizeLimitExceeded {
                    limit: self.limit,
                    needed,
                });
            }
        }
        if header.window_size > MAX_ZSTD_WINDOW {
            return Err(CodecError::Corrupt(format!(
                "zstd frame at offset {offset}: a window of {} bytes is beyond zstd's maximum",
                header.window_size
            )));
        }
        let allowed_window = 1u64 << self.window_log_max;
        if header.window_size > allowed_window {
            return Err(CodecError::WindowTooLarge {
                limit: allowed_window,
                needed: header.window_size,
            });
        }
        self.frame = Some(CurrentFrame {
            offset,
            header,
            produced: 0,
            hasher: (!header.has_checksum).then(|| Xxh64::new(0)),
            checksum: None,
            zstd_done: false,
        });
        let bytes = std::mem::take(&mut self.small);
        self.feed(&bytes, out)?;
        self.small = bytes;
        self.small.clear();
        self.stage = Stage::BlockHeader;
        Ok(())
    }

    fn end_block(&mut self, last: bool, out: &mut Vec<u8>) -> Result<()> {
        let has_checksum = self.frame.as_ref().is_some_and(|f| f.header.has_checksum);
        if !last {
            self.stage = Stage::BlockHeader;
        } else if has_checksum {
            self.stage = Stage::Checksum;
        } else {
            self.end_frame(out)?;
        }
        Ok(())
    }

    /// Passes bytes of the current frame to zstd and appends what it decodes.
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let Some(frame) = self.frame.as_mut() else {
            return Err(CodecError::Corrupt(
                "internal: bytes outside a frame".into(),
            ));
        };
        let mut inb = InBuffer::around(bytes);
        loop {
            // Never decode more than one byte past the limit, so a bomb stops early.
            let room = (self.limit - self.produced)
                .saturating_add(1)
                .min(STREAM_STEP as u64) as usize;
            if self.scratch.len() < room {
                self.scratch.resize(room, 0);
            }
            let mut outb = OutBuffer::around(&mut self.scratch[..room]);
            let hint = self
                .dctx
                .decompress_stream(&mut outb, &mut inb)
                .map_err(|code| {
                    zstd_failure(code, format!("zstd frame at offset {}", frame.offset))
                })?;
            let n = outb.pos();
            if hint == 0 {
                frame.zstd_done = true;
            }
            if n > 0 {
                self.produced += n as u64;
                if self.produced > self.limit {
                    return Err(CodecError::SizeLimitExceeded {
                        limit: self.limit,
                        needed: self.produced,
                    });
                }
                frame.produced += n as u64;
                if let Some(h) = frame.hasher.as_mut() {
                    h.update(&self.scratch[..n]);
                }
                out.extend_from_slice(&self.scratch[..n]);
            }
            if inb.pos == bytes.len() && (n < room || hint == 0) {
                return Ok(());
            }
        }
    }

    fn end_frame(&mut self, out: &mut Vec<u8>) -> Result<()> {
        // Drain anything zstd still holds for this frame.
        self.feed(&[], out)?;
        let frame = self.frame.take().expect("end_frame inside a frame");
        if !frame.zstd_done {
            // Our walk of the block headers and zstd disagree on where the frame ends.
            return Err(CodecError::Corrupt(format!(
                "zstd frame at offset {}: does not end where its blocks say",
                frame.offset
            )));
        }
        if let Some(size) = frame.header.content_size {
            if size != frame.produced {
                return Err(CodecError::Corrupt(format!(
                    "zstd frame at offset {}: decoded {} bytes, its header says {size}",
                    frame.offset, frame.produced
                )));
            }
        }
        let (checksum, has_own_checksum) = match (frame.checksum, frame.hasher) {
            (Some(c), _) => (c, true),
            (None, Some(h)) => (h.digest() as u32, false),
            (None, None) => (0, false),
        };
        if self.run.len() < MAX_FRAMES {
            self.run.push(FrameRecord {
                compressed: self.consumed - frame.offset,
                decompressed: frame.produced,
                checksum,
                has_own_checksum,
            });
        } else {
            // Bounded bookkeeping: a seek table after this many frames cannot be verified.
            self.run_overflow = true;
        }
        self.frames += 1;
        self.stage = Stage::Magic;
        Ok(())
    }

    fn begin_skippable(&mut self) -> Result<()> {
        let magic = read_u32(&self.small, 0);
        let size = u64::from(read_u32(&self.small, 4));
        if magic == SEEK_TABLE_SKIPPABLE_MAGIC && self.run_overflow {
            // Its frames were too many to record: a limit reached, not damage.
            return Err(too_many_frames(
                &format!("the seek table follows {} or more", MAX_FRAMES + 1),
                "",
            ));
        }
        self.small.clear();
        self.skippable_magic = magic;
        self.skippable_tail = 0;
        self.skippable_seen = 0;
        // A seek table can list at most the frames seen since the last skippable frame,
        // which bounds what we buffer.
        let most = (self.run.len() as u64) * 12 + SEEK_TABLE_FOOTER_SIZE as u64;
        let keep = magic == SEEK_TABLE_SKIPPABLE_MAGIC && size <= most;
        self.unverified_table_at_end = magic == SEEK_TABLE_SKIPPABLE_MAGIC && !keep;
        self.table.clear();
        self.stage = Stage::SkippableBody { left: size, keep };
        if size == 0 {
            // An empty seek-table frame has no footer: damaged if it ends the stream.
            self.unverified_table_at_end = magic == SEEK_TABLE_SKIPPABLE_MAGIC;
            self.stage = Stage::Magic;
            self.run.clear();
            self.run_overflow = false;
        }
        Ok(())
    }

    fn end_skippable(&mut self) -> Result<()> {
        // A seekable footer in a frame without the seek-table magic: a damaged seek table,
        // an error if nothing follows (as the one-shot decoder, reading from the end, says).
        if self.skippable_magic != SEEK_TABLE_SKIPPABLE_MAGIC
            && self.skippable_seen >= SEEK_TABLE_FOOTER_SIZE as u64
            && self.skippable_tail == SEEKABLE_MAGIC
        {
            self.unverified_table_at_end = true;
        }
        if self.skippable_magic == SEEK_TABLE_SKIPPABLE_MAGIC && !self.unverified_table_at_end {
            let at = self.item_start as usize;
            match parse_seek_table_content(&self.table, at)? {
                Some(table) => self.check_table(&table)?,
                None => self.unverified_table_at_end = true,
            }
        }
        self.table = Vec::new();
        self.run.clear();
        self.run_overflow = false;
        self.stage = Stage::Magic;
        Ok(())
    }

    fn check_table(&self, table: &SeekTable) -> Result<()> {
        if self.run_overflow {
            let count = format!("the seek table follows {} or more", MAX_FRAMES + 1);
            return Err(too_many_frames(&count, ""));
        }
        let n = table.entries.len();
        if n != self.run.len() {
            return Err(CodecError::SeekTable(format!(
                "the seek table lists {n} frames, but {} precede it",
                self.run.len()
            )));
        }
        let described = &self.run[..];
        for (i, (rec, entry)) in described.iter().zip(&table.entries).enumerate() {
            if u64::from(entry.compressed_size) != rec.compressed
                || u64::from(entry.decompressed_size) != rec.decompressed
            {
                return Err(CodecError::SeekTable(format!(
                    "seek table entry {i} says {}/{} compressed/decompressed bytes, the frame \
                     has {}/{}",
                    entry.compressed_size,
                    entry.decompressed_size,
                    rec.compressed,
                    rec.decompressed
                )));
            }
            if let Some(expected) = entry.checksum {
                if expected != rec.checksum {
                    return Err(if rec.has_own_checksum {
                        CodecError::SeekTable(format!(
                            "seek table entry {i}: its checksum disagrees with the frame's"
                        ))
                    } else {
                        CodecError::ChecksumMismatch(format!(
                            "frame {i} of the seek table: content does not match its checksum"
                        ))
                    });
                }
            }
        }
        Ok(())
    }

    /// Declares the end of the input: an error if the stream stopped inside a frame,
    /// had no frame at all, or ends with a malformed seek table.
    pub fn finish(&mut self) -> Result<()> {
        if self.failed {
            return Err(CodecError::InvalidArgument(
                "the unpacker already failed; start a new one".into(),
            ));
        }
        if self.finished {
            return Err(CodecError::InvalidArgument(
                "the unpacker is already finished".into(),
            ));
        }
        if self.stage != Stage::Magic || !self.small.is_empty() {
            self.failed = true;
            return Err(CodecError::Truncated(format!(
                "the stream ends inside a frame, after {} bytes",
                self.consumed
            )));
        }
        if self.consumed == 0 {
            self.failed = true;
            return Err(CodecError::Truncated(
                "empty input: a zstd stream has at least one frame".into(),
            ));
        }
        if self.unverified_table_at_end {
            self.failed = true;
            return Err(CodecError::SeekTable(
                "the stream ends with a seek-table frame that does not describe the frames \
                 before it"
                    .into(),
            ));
        }
        self.finished = true;
        Ok(())
    }
}

/// Unpacks everything `reader` yields into `writer` with the streaming decoder; memory is
/// one 1 MiB read, one [`DECODE_STEP`] of output and the frame's window.
pub fn unpack_stream(
    reader: &mut impl Read,
    writer: &mut impl Write,
    max_output_size: u64,
) -> Result<u64> {
    let mut unpacker = Unpacker::new(max_output_size);
    let mut input = vec![0u8; 1 << 20];
    let mut out = Vec::with_capacity(DECODE_STEP);
    loop {
        let n = match reader.read(&mut input) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        // A bounded step at a time: a megabyte of bomb never becomes gigabytes in memory.
        let mut rest = &input[..n];
        while !rest.is_empty() {
            let used = unpacker.write_bounded(rest, &mut out, DECODE_STEP)?;
            rest = &rest[used..];
            writer.write_all(&out)?;
            out.clear();
        }
    }
    unpacker.finish()?;
    writer.flush()?;
    Ok(unpacker.produced())
}

/// Unpacks the file `src` into the file `dst`; returns the bytes written.
///
/// A file that ends with a seek table describing all of it, with frames of at most
/// [`MAX_CHUNK_SIZE`] (ours), is decoded `threads` frames at a time in parallel (memory
/// about twice `threads` frames); anything else goes through the streaming decoder (memory
/// one [`DECODE_STEP`], one 1 MiB read and the frame's window). Either way the limit is
/// checked before writing, when sizes are known, and more than [`MAX_FRAMES`] frames in
/// the seek table is a `FrameLimit` error before anything is decoded.
pub fn unpack_file(src: &Path, dst: &Path, max_output_size: u64, threads: usize) -> Result<u64> {
    let mut file = File::open(src)?;
    match seekable_file_layout(&mut file)? {
        Some(table) if table.entries.len() > MAX_FRAMES => {
            let count = format!("its seek table lists {}", table.entries.len());
            Err(too_many_frames(&count, ""))
        }
        Some(table) if frames_fit_in_memory(&table) => write_atomically(dst, |w| {
            unpack_seekable_file(&mut file, &table, w, max_output_size, threads)
        }),
        // Frames larger than ours (a seek table may list up to 4 GiB each): a batch of
        // them would be held whole, so the streaming decoder takes them in bounded steps.
        _ => {
            file.seek(SeekFrom::Start(0))?;
            write_atomically(dst, |w| unpack_stream(&mut file, w, max_output_size))
        }
    }
}

/// Whether every frame the table lists is one the parallel file path may hold whole: at
/// most [`MAX_CHUNK_SIZE`] bytes decompressed (our largest frame) and the most zstd can
/// compress that into.
fn frames_fit_in_memory(table: &SeekTable) -> bool {
    let most_compressed = zstd_safe::compress_bound(MAX_CHUNK_SIZE);
    table.entries.iter().all(|e| {
        e.decompressed_size as usize <= MAX_CHUNK_SIZE
            && e.compressed_size as usize <= most_compressed
    })
}

/// The seek table at the end of `file` when it describes every byte before it.
fn seekable_file_layout(file: &mut File) -> Result<Option<SeekTable>> {
    let len = file.metadata()?.len();
    let footer_len = (SKIPPABLE_HEADER_SIZE + SEEK_TABLE_FOOTER_SIZE) as u64;
    if len < footer_len {
        return Ok(None);
    }
    let mut footer = [0u8; SEEK_TABLE_FOOTER_SIZE];
    file.seek(SeekFrom::Start(len - SEEK_TABLE_FOOTER_SIZE as u64))?;
    file.read_exact(&mut footer)?;
    if read_u32(&footer, 5) != SEEKABLE_MAGIC {
        return Ok(None);
    }
    let frames = u64::from(read_u32(&footer, 0));
    let entry_size: u64 = if footer[4] & 0x80 != 0 { 12 } else { 8 };
    let table_len = frames * entry_size + footer_len;
    if table_len > len {
        // Let the streaming decoder name what is wrong.
        return Ok(None);
    }
    let table_start = len - table_len;
    let mut tail = vec![0u8; table_len as usize];
    file.seek(SeekFrom::Start(table_start))?;
    file.read_exact(&mut tail)?;
    let Some((_, table)) = crate::format::seek_table_at_end(&tail)? else {
        return Ok(None);
    };
    let described: u64 = table
        .entries
        .iter()
        .map(|e| u64::from(e.compressed_size))
        .sum();
    // Frames before the table that it does not list (concatenated blobs): stream it all.
    Ok((described == table_start).then_some(table))
}

fn unpack_seekable_file(
    file: &mut File,
    table: &SeekTable,
    writer: &mut impl Write,
    max_output_size: u64,
    threads: usize,
) -> Result<u64> {
    let total: u64 = table
        .entries
        .iter()
        .map(|e| u64::from(e.decompressed_size))
        .sum();
    if total > max_output_size {
        return Err(CodecError::SizeLimitExceeded {
            limit: max_output_size,
            needed: total,
        });
    }
    file.seek(SeekFrom::Start(0))?;
    let batch = crate::pool::effective_threads(threads);
    let mut input = Vec::new();
    let mut output = Vec::new();
    let mut produced = 0u64;
    for entries in table.entries.chunks(batch) {
        let compressed: usize = entries.iter().map(|e| e.compressed_size as usize).sum();
        input.clear();
        input.resize(compressed, 0);
        file.read_exact(&mut input).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                CodecError::Truncated("the file ends before the frames its seek table lists".into())
            } else {
                e.into()
            }
        })?;
        // These frames plus their own slice of the table form a small seekable blob: the
        // one-shot decoder checks every frame against its entry exactly as for a whole blob.
        crate::format::write_seek_table(entries, table.has_checksums, &mut input);
        let plan = plan(&input, max_output_size - produced)?;
        let size = plan.output_size().ok_or_else(|| {
            CodecError::SeekTable("the seek table leaves a frame size unknown".into())
        })?;
        output.clear();
        output.resize(size, 0);
        plan.decode_into(&mut output, threads)?;
        writer.write_all(&output)?;
        produced += size as u64;
    }
    debug_assert_eq!(produced, total);
    writer.flush()?;
    Ok(produced)
}
