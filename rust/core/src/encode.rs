//! Packing: independent zstd frames compressed in parallel, then the seek table; one-shot,
//! streaming (bounded memory) and file to file.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use rayon::prelude::*;
use zstd_safe::{CCtx, CParameter};

use crate::error::{zstd_error_name, CodecError, Result};
use crate::format::{write_seek_table, SeekEntry, SEEKABLE_MAX_FRAMES};
use crate::pool::{check_threads, effective_threads, run_in_pool};

/// The default compression level (chosen by measurement, see docs/codec.md).
pub const DEFAULT_LEVEL: i32 = 3;
/// The default chunk size: uncompressed bytes per frame (see docs/codec.md).
pub const DEFAULT_CHUNK_SIZE: usize = 2 << 20;
/// The largest chunk size: frames must not need a window above 8 MiB (RFC 9659).
pub const MAX_CHUNK_SIZE: usize = 8 << 20;
/// The window log of the largest allowed window (8 MiB).
pub const MAX_WINDOW_LOG: u32 = 23;

/// How to pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackOptions {
    /// zstd compression level (negative levels are fast modes; 0 means zstd's default, 3).
    pub level: i32,
    /// Uncompressed bytes per frame, 1 to 8 MiB.
    pub chunk_size: usize,
    /// Worker threads, 0 for one per core.
    pub threads: usize,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            level: DEFAULT_LEVEL,
            chunk_size: DEFAULT_CHUNK_SIZE,
            threads: 0,
        }
    }
}

impl PackOptions {
    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = (zstd_safe::min_c_level(), zstd_safe::max_c_level());
        if self.level < lo || self.level > hi {
            return Err(CodecError::InvalidArgument(format!(
                "level must be {lo} to {hi}, got {}",
                self.level
            )));
        }
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(CodecError::InvalidArgument(format!(
                "chunk_size must be 1 to {MAX_CHUNK_SIZE} bytes, got {}",
                self.chunk_size
            )));
        }
        check_threads(self.threads)
    }

    /// The window log that covers one chunk, never above 8 MiB.
    pub fn window_log(&self) -> u32 {
        let needed = usize::BITS - self.chunk_size.saturating_sub(1).leading_zeros();
        needed.clamp(10, MAX_WINDOW_LOG)
    }
}

/// One compressed frame.
#[derive(Debug, Clone)]
pub struct CompressedFrame {
    /// The whole zstd frame.
    pub data: Vec<u8>,
    /// Its decompressed size, in bytes.
    pub raw_size: u32,
}

impl CompressedFrame {
    fn seek_entry(&self) -> SeekEntry {
        let n = self.data.len();
        // The frame ends with its content checksum: the same low 32 bits of XXH64 the
        // seek table records, so there is nothing to hash again.
        let checksum = u32::from_le_bytes([
            self.data[n - 4],
            self.data[n - 3],
            self.data[n - 2],
            self.data[n - 1],
        ]);
        SeekEntry {
            compressed_size: n as u32,
            decompressed_size: self.raw_size,
            checksum: Some(checksum),
        }
    }
}

fn new_cctx(opts: &PackOptions) -> std::result::Result<CCtx<'static>, String> {
    let mut cctx = CCtx::create();
    for p in [
        CParameter::CompressionLevel(opts.level),
        CParameter::ChecksumFlag(true),
        CParameter::ContentSizeFlag(true),
        CParameter::WindowLog(opts.window_log()),
    ] {
        cctx.set_parameter(p)
            .map_err(|code| format!("zstd parameter: {}", zstd_error_name(code)))?;
    }
    Ok(cctx)
}

fn compress_chunk(
    cctx: &mut std::result::Result<CCtx<'static>, String>,
    chunk: &[u8],
) -> Result<CompressedFrame> {
    let cctx = cctx
        .as_mut()
        .map_err(|e| CodecError::InvalidArgument(e.clone()))?;
    let mut data = Vec::with_capacity(zstd_safe::compress_bound(chunk.len()));
    cctx.compress2(&mut data, chunk)
        .map_err(|code| CodecError::Corrupt(format!("zstd: {}", zstd_error_name(code))))?;
    Ok(CompressedFrame {
        data,
        raw_size: chunk.len() as u32,
    })
}

/// Compresses `data` into frames of `opts.chunk_size` bytes, in parallel.
///
/// Empty input gives one empty frame, so every packed blob starts with a zstd frame.
pub fn compress_frames(data: &[u8], opts: &PackOptions) -> Result<Vec<CompressedFrame>> {
    opts.validate()?;
    if data.is_empty() {
        return Ok(vec![compress_chunk(&mut new_cctx(opts), data)?]);
    }
    run_in_pool(opts.threads, || {
        data.par_chunks(opts.chunk_size)
            .map_init(|| new_cctx(opts), compress_chunk)
            .collect::<Result<Vec<_>>>()
    })?
}

/// A packed blob held as its parts, so a caller can allocate the output once.
#[derive(Debug, Clone)]
pub struct Packed {
    frames: Vec<CompressedFrame>,
    table: Vec<u8>,
    raw_size: u64,
}

impl Packed {
    /// Total size of the blob, in bytes.
    pub fn len(&self) -> usize {
        self.frames.iter().map(|f| f.data.len()).sum::<usize>() + self.table.len()
    }

    /// Always false: a blob has at least one frame and the seek table.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of zstd frames.
    pub fn frames(&self) -> usize {
        self.frames.len()
    }

    /// Uncompressed size, in bytes.
    pub fn raw_size(&self) -> u64 {
        self.raw_size
    }

    /// Writes the blob into `out`, which must be exactly `len()` bytes.
    pub fn write_into(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.len(), "output buffer has the wrong size");
        crate::decode::advise_huge_pages(out);
        let mut rest = out;
        for f in &self.frames {
            let (head, tail) = rest.split_at_mut(f.data.len());
            head.copy_from_slice(&f.data);
            rest = tail;
        }
        rest.copy_from_slice(&self.table);
    }

    /// The blob as one vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len()];
        self.write_into(&mut out);
        out
    }
}

fn check_frame_count(frames: u64) -> Result<()> {
    if frames > SEEKABLE_MAX_FRAMES {
        return Err(CodecError::InvalidArgument(format!(
            "{frames} frames exceed the seekable format's limit of {SEEKABLE_MAX_FRAMES}; \
             use a larger chunk_size"
        )));
    }
    Ok(())
}

/// Packs `data` into a seekable zstd blob, keeping the parts apart (see [`Packed`]).
pub fn pack_parts(data: &[u8], opts: &PackOptions) -> Result<Packed> {
    opts.validate()?;
    check_frame_count((data.len() / opts.chunk_size) as u64 + 1)?;
    let frames = compress_frames(data, opts)?;
    let entries: Vec<SeekEntry> = frames.iter().map(CompressedFrame::seek_entry).collect();
    let mut table = Vec::new();
    write_seek_table(&entries, true, &mut table);
    Ok(Packed {
        frames,
        table,
        raw_size: data.len() as u64,
    })
}

/// Packs `data` into a seekable zstd blob.
pub fn pack(data: &[u8], opts: &PackOptions) -> Result<Vec<u8>> {
    Ok(pack_parts(data, opts)?.to_vec())
}

/// Sizes of a finished packing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackStats {
    /// Uncompressed bytes read.
    pub raw_size: u64,
    /// Bytes of the packed blob, seek table included.
    pub packed_size: u64,
    /// Number of zstd frames.
    pub frames: u64,
}

/// A streaming packer: memory stays at about `threads x chunk_size` plus the compressed
/// output of one batch, whatever the input size.
#[derive(Debug)]
pub struct Packer {
    opts: PackOptions,
    batch: usize,
    pending: Vec<u8>,
    entries: Vec<SeekEntry>,
    stats: PackStats,
    finished: bool,
}

impl Packer {
    /// A packer with the given options.
    pub fn new(opts: PackOptions) -> Result<Self> {
        opts.validate()?;
        let batch = opts.chunk_size * effective_threads(opts.threads);
        Ok(Packer {
            opts,
            batch,
            pending: Vec::new(),
            entries: Vec::new(),
            stats: PackStats::default(),
            finished: false,
        })
    }

    /// Bytes of input the packer compresses at a time (`threads x chunk_size`).
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Sizes so far.
    pub fn stats(&self) -> PackStats {
        self.stats
    }

    fn emit(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let frames = compress_frames(data, &self.opts)?;
        check_frame_count(self.entries.len() as u64 + frames.len() as u64)?;
        for f in &frames {
            self.entries.push(f.seek_entry());
            out.extend_from_slice(&f.data);
            self.stats.packed_size += f.data.len() as u64;
        }
        self.stats.frames += frames.len() as u64;
        self.stats.raw_size += data.len() as u64;
        Ok(())
    }

    fn check_open(&self) -> Result<()> {
        if self.finished {
            return Err(CodecError::InvalidArgument(
                "the packer is already finished".into(),
            ));
        }
        Ok(())
    }

    /// Feeds `data`; appends whatever compressed bytes are ready to `out`.
    pub fn write(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.check_open()?;
        if !self.pending.is_empty() {
            let take = (self.batch - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == self.batch {
                let pending = std::mem::take(&mut self.pending);
                let result = self.emit(&pending, out);
                self.pending = pending;
                self.pending.clear();
                result?;
            }
        }
        if self.pending.is_empty() {
            // Whole batches straight from the caller's buffer: no copy.
            let whole = data.len() - data.len() % self.batch;
            if whole > 0 {
                for batch in data[..whole].chunks(self.batch) {
                    self.emit(batch, out)?;
                }
            }
            if self.pending.capacity() < self.batch && whole < data.len() {
                self.pending.reserve_exact(self.batch);
            }
            self.pending.extend_from_slice(&data[whole..]);
        }
        Ok(())
    }

    /// Compresses the rest and appends it and the seek table to `out`; returns the sizes.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<PackStats> {
        self.check_open()?;
        if !self.pending.is_empty() || self.entries.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            self.emit(&pending, out)?;
        }
        let before = out.len();
        write_seek_table(&self.entries, true, out);
        self.stats.packed_size += (out.len() - before) as u64;
        self.finished = true;
        self.pending = Vec::new();
        Ok(self.stats)
    }
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Packs everything `reader` yields into `writer`, a batch at a time.
pub fn pack_stream(
    reader: &mut impl Read,
    writer: &mut impl Write,
    opts: &PackOptions,
) -> Result<PackStats> {
    let mut packer = Packer::new(*opts)?;
    let mut input = vec![0u8; packer.batch_size()];
    let mut out = Vec::new();
    loop {
        let n = read_full(reader, &mut input)?;
        if n == 0 {
            break;
        }
        packer.write(&input[..n], &mut out)?;
        writer.write_all(&out)?;
        out.clear();
        if n < input.len() {
            break;
        }
    }
    let stats = packer.finish(&mut out)?;
    writer.write_all(&out)?;
    writer.flush()?;
    Ok(stats)
}

/// Writes through a temporary file next to `dst` and renames it into place, so a failure
/// leaves no half-written `dst` behind (and an existing `dst` untouched).
pub(crate) fn write_atomically<T>(
    dst: &Path,
    body: impl FnOnce(&mut std::io::BufWriter<File>) -> Result<T>,
) -> Result<T> {
    let name = dst.file_name().ok_or_else(|| {
        CodecError::InvalidArgument(format!("{} is not a file path", dst.display()))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.partial", std::process::id()));
    let tmp = dst.with_file_name(tmp_name);
    let result = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let value = body(&mut w)?;
        w.into_inner().map_err(|e| CodecError::Io(e.into_error()))?;
        std::fs::rename(&tmp, dst)?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Packs the file `src` into the file `dst` with bounded memory.
pub fn pack_file(src: &Path, dst: &Path, opts: &PackOptions) -> Result<PackStats> {
    opts.validate()?;
    let mut reader = File::open(src)?;
    write_atomically(dst, |w| pack_stream(&mut reader, w, opts))
}
