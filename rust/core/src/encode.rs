//! Packing: independent zstd frames compressed in parallel, then the seek table; one-shot,
//! streaming (bounded memory) and file to file.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Write};
use std::marker::PhantomData;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;
use std::os::raw::c_int;
use std::ptr::NonNull;

use crate::error::{zstd_error_name, CodecError, Result};
use crate::fileio::{advise_huge_pages, read_full, write_atomically};
use crate::format::{
    read_u32, too_many_frames, write_seek_table, SeekEntry, MAX_FRAMES, SEEK_TABLE_FOOTER_SIZE,
    SKIPPABLE_HEADER_SIZE,
};
use crate::pool::{check_threads, effective_threads, run_in_pool};

/// The default compression level (chosen by measurement, see docs/codec.md).
pub const DEFAULT_LEVEL: i32 = 3;
/// The default chunk size: uncompressed bytes per frame (see docs/codec.md).
pub const DEFAULT_CHUNK_SIZE: usize = 2 << 20;
// The chunk-size ceiling belongs to the format (the unpacker sizes its buffers by it too).
pub use crate::format::{MAX_CHUNK_SIZE, MAX_WINDOW_LOG};

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

/// One zstd compression context, owned through zstd-sys: zstd-safe 6 knows only the
/// parameters of libzstd 1.5.2 and cannot set the block pre-splitter of 1.5.7.
struct Cctx(NonNull<zstd_sys::ZSTD_CCtx>);

// The context is plain heap memory that libzstd touches only through this handle.
unsafe impl Send for Cctx {}

extern "C" {
    // The same symbol zstd-sys binds, declared with a plain int parameter id so that
    // ids newer than the bound header (experimental ones included) can be passed.
    #[link_name = "ZSTD_CCtx_setParameter"]
    fn zstd_cctx_set_parameter(cctx: *mut zstd_sys::ZSTD_CCtx, param: c_int, value: c_int)
        -> usize;
}

/// `ZSTD_c_blockSplitterLevel` (libzstd >= 1.5.7; `ZSTD_c_experimentalParam20`).
const ZSTD_C_BLOCK_SPLITTER_LEVEL: c_int = 1017;
/// Its value "never pre-split": whole 128 KiB blocks, as libzstd did before 1.5.7.
const BLOCK_SPLITTER_OFF: c_int = 1;
/// The first libzstd with the block pre-splitter.
const ZSTD_1_5_7: u32 = 10507;

impl Cctx {
    fn create() -> Result<Self> {
        NonNull::new(unsafe { zstd_sys::ZSTD_createCCtx() })
            .map(Cctx)
            .ok_or_else(|| CodecError::InvalidArgument("zstd: out of memory".into()))
    }

    fn set(&mut self, param: c_int, value: c_int) -> Result<()> {
        let code = unsafe { zstd_cctx_set_parameter(self.0.as_ptr(), param, value) };
        if unsafe { zstd_sys::ZSTD_isError(code) } != 0 {
            return Err(CodecError::InvalidArgument(format!(
                "zstd parameter {param} = {value}: {}",
                zstd_error_name(code)
            )));
        }
        Ok(())
    }

    /// Compresses `src` into one frame in `dst`, returning its size (or zstd's error code).
    fn compress2(&mut self, dst: &mut [u8], src: &[u8]) -> std::result::Result<usize, usize> {
        let code = unsafe {
            zstd_sys::ZSTD_compress2(
                self.0.as_ptr(),
                dst.as_mut_ptr().cast(),
                dst.len(),
                src.as_ptr().cast(),
                src.len(),
            )
        };
        if unsafe { zstd_sys::ZSTD_isError(code) } != 0 {
            Err(code)
        } else {
            Ok(code)
        }
    }

    fn sizeof(&self) -> usize {
        unsafe { zstd_sys::ZSTD_sizeof_CCtx(self.0.as_ptr()) }
    }
}

impl Drop for Cctx {
    fn drop(&mut self) {
        unsafe { zstd_sys::ZSTD_freeCCtx(self.0.as_ptr()) };
    }
}

fn new_cctx(opts: &PackOptions) -> Result<Cctx> {
    use zstd_sys::ZSTD_cParameter::*;
    let mut cctx = Cctx::create()?;
    cctx.set(ZSTD_c_compressionLevel as c_int, opts.level)?;
    cctx.set(ZSTD_c_checksumFlag as c_int, 1)?;
    cctx.set(ZSTD_c_contentSizeFlag as c_int, 1)?;
    cctx.set(ZSTD_c_windowLog as c_int, opts.window_log() as c_int)?;
    if zstd_version_number() >= ZSTD_1_5_7 {
        // 1.5.7's pre-splitter (on by default from level 3 up) cost a third more CPU on
        // MiniLM fp32 and random floats for output 0.06-0.1 % larger, and saved 0.01 % on
        // bf16 (docs/codec.md): float weights gain nothing from it.
        cctx.set(ZSTD_C_BLOCK_SPLITTER_LEVEL, BLOCK_SPLITTER_OFF)?;
    }
    Ok(cctx)
}

/// The libzstd this was linked with, as MAJOR*10000 + MINOR*100 + RELEASE.
pub fn zstd_version_number() -> u32 {
    unsafe { zstd_sys::ZSTD_versionNumber() }
}

/// The libzstd this was linked with, as "MAJOR.MINOR.RELEASE".
pub fn zstd_version() -> String {
    let v = zstd_version_number();
    format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
}

/// Contexts up to this size stay cached in their worker thread between calls (a level-3
/// context is about 2 MiB); larger ones (high levels) are freed after each call.
const CCTX_CACHE_LIMIT: usize = 16 << 20;

thread_local! {
    // Building a context allocates and faults in its tables every time: reusing one per
    // worker thread took about a tenth off packing's CPU time.
    static CCTX_CACHE: RefCell<Option<((i32, u32), Cctx)>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's cached compression context for `opts`.
fn with_cctx<R>(opts: &PackOptions, f: impl FnOnce(&mut Cctx) -> R) -> Result<R> {
    CCTX_CACHE.with(|cell| {
        let key = (opts.level, opts.window_log());
        let cached = cell.borrow_mut().take();
        let mut cctx = match cached {
            Some((k, cctx)) if k == key => cctx,
            _ => new_cctx(opts)?,
        };
        let result = f(&mut cctx);
        if cctx.sizeof() <= CCTX_CACHE_LIMIT {
            *cell.borrow_mut() = Some((key, cctx));
        }
        Ok(result)
    })
}

/// Refuses to make more frames than the decoder accepts ([`MAX_FRAMES`]): a blob that its
/// own unpacking refuses is never written.
fn check_frame_count(frames: u64) -> Result<()> {
    if frames > MAX_FRAMES as u64 {
        let count = format!("packing would make {frames}");
        return Err(too_many_frames(&count, "; use a larger chunk_size"));
    }
    Ok(())
}

/// The frames packing `data_len` bytes makes: at least one, so empty input still has one.
pub fn frame_count(data_len: u64, opts: &PackOptions) -> u64 {
    data_len.div_ceil(opts.chunk_size as u64).max(1)
}

/// The chunks `data` is cut into: at least one, so empty input still gives a frame.
fn chunks_of<'a>(data: &'a [u8], opts: &PackOptions) -> Vec<&'a [u8]> {
    if data.is_empty() {
        vec![data]
    } else {
        data.chunks(opts.chunk_size).collect()
    }
}

/// Bytes that compressing `data` into frames (without the seek table) may need at most.
pub fn frames_bound(data_len: usize, opts: &PackOptions) -> usize {
    let full = data_len / opts.chunk_size;
    let rest = data_len % opts.chunk_size;
    let mut bound = full * zstd_safe::compress_bound(opts.chunk_size);
    if rest > 0 || data_len == 0 {
        bound += zstd_safe::compress_bound(rest);
    }
    bound
}

/// Bytes that packing `data_len` bytes may need at most, seek table included.
pub fn packed_bound(data_len: usize, opts: &PackOptions) -> usize {
    let frames = if data_len == 0 {
        1
    } else {
        data_len.div_ceil(opts.chunk_size)
    };
    frames_bound(data_len, opts) + SKIPPABLE_HEADER_SIZE + 12 * frames + SEEK_TABLE_FOOTER_SIZE
}

/// Compresses `data` into independent frames written one after another at the start of
/// `out` (at least [`frames_bound`] bytes); returns the bytes used and the seek entries.
///
/// Each worker compresses straight into its chunk's worst-case slot of `out`, and the
/// frames slide down to close the gaps: one pass over the compressed bytes, no per-frame
/// buffers, and only `out`'s pages are ever touched. Workers take chunks in order from one
/// counter, and the slide trails right behind them (see [`Slide`]), so it overlaps the
/// compression instead of running alone after it.
pub fn compress_into(
    data: &[u8],
    opts: &PackOptions,
    out: &mut [u8],
) -> Result<(usize, Vec<SeekEntry>)> {
    opts.validate()?;
    let chunks = chunks_of(data, opts);
    check_frame_count(chunks.len() as u64)?;
    let bound = frames_bound(data.len(), opts);
    if out.len() < bound {
        return Err(CodecError::InvalidArgument(format!(
            "output buffer of {} bytes is below the bound of {bound}",
            out.len()
        )));
    }
    advise_huge_pages(&mut out[..bound]);
    let mut offsets = Vec::with_capacity(chunks.len() + 1);
    let mut offset = 0;
    for chunk in &chunks {
        offsets.push(offset);
        offset += zstd_safe::compress_bound(chunk.len());
    }
    offsets.push(offset);
    let slide = Slide::new(&mut out[..bound], offsets);
    let next = AtomicUsize::new(0);
    let work = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= chunks.len() {
                return Ok(());
            }
            // SAFETY: `i` came from the counter, so no other worker holds this slot.
            let slot = unsafe { slide.slot(i) };
            let result = with_cctx(opts, |cctx| cctx.compress2(slot, chunks[i])).and_then(|r| {
                r.map_err(|code| CodecError::Corrupt(format!("zstd: {}", zstd_error_name(code))))
            });
            match result {
                Ok(n) => slide.done(i, n),
                Err(e) => {
                    next.store(chunks.len(), Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    };
    let workers = effective_threads(opts.threads).min(chunks.len());
    run_in_pool(opts.threads, || {
        (0..workers)
            .into_par_iter()
            .map(|_| work())
            .collect::<Result<Vec<()>>>()
    })??;
    let sizes = slide.finish();
    let mut entries = Vec::with_capacity(chunks.len());
    let mut cursor = 0;
    for (n, chunk) in sizes.into_iter().zip(&chunks) {
        cursor += n;
        // The frame ends with its content checksum: the same low 32 bits of XXH64 the
        // seek table records, so there is nothing to hash again.
        let checksum = read_u32(out, cursor - 4);
        entries.push(SeekEntry {
            compressed_size: n as u32,
            decompressed_size: chunk.len() as u32,
            checksum: Some(checksum),
        });
    }
    Ok((cursor, entries))
}

/// The output of [`compress_into`] while workers fill it: frame `i` is compressed into its
/// worst-case slot `offsets[i]..offsets[i + 1]`, then moved down to `cursor`, the end of the
/// frames before it, once they have all moved.
///
/// Why it is sound: a frame's slot is written only by the worker that took `i` from the
/// counter; a frame moves only after its worker reported it done (through the mutex, which
/// orders the writes before the move) and after every earlier frame moved; and its new
/// place `cursor..cursor + n` ends at or before `offsets[i] + n <= offsets[i + 1]`, below
/// every slot still being written. One thread moves frames at a time (`moving`), outside
/// the lock, so the others keep compressing.
struct Slide<'a> {
    base: *mut u8,
    offsets: Vec<usize>,
    state: Mutex<SlideState>,
    _out: PhantomData<&'a mut [u8]>,
}

struct SlideState {
    sizes: Vec<Option<usize>>,
    moved: usize,
    cursor: usize,
    moving: bool,
}

// The raw pointer is shared on purpose: workers touch disjoint slots, as argued above.
unsafe impl Sync for Slide<'_> {}

impl<'a> Slide<'a> {
    fn new(out: &'a mut [u8], offsets: Vec<usize>) -> Self {
        assert!(offsets.last().is_some_and(|&end| end <= out.len()));
        let frames = offsets.len() - 1;
        Slide {
            base: out.as_mut_ptr(),
            offsets,
            state: Mutex::new(SlideState {
                sizes: vec![None; frames],
                moved: 0,
                cursor: 0,
                moving: false,
            }),
            _out: PhantomData,
        }
    }

    /// Frame `i`'s worst-case slot.
    ///
    /// # Safety
    /// Only the one worker that took `i` may call this, once.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, i: usize) -> &mut [u8] {
        let (start, end) = (self.offsets[i], self.offsets[i + 1]);
        std::slice::from_raw_parts_mut(self.base.add(start), end - start)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlideState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that frame `i` holds `n` compressed bytes; moves every frame that can move.
    fn done(&self, i: usize, n: usize) {
        let mut state = self.lock();
        state.sizes[i] = Some(n);
        if state.moving {
            return; // the thread moving frames will find this one
        }
        state.moving = true;
        while let Some(&Some(n)) = state.sizes.get(state.moved) {
            let (from, to) = (self.offsets[state.moved], state.cursor);
            drop(state);
            // SAFETY: see the type's documentation; `copy` allows the overlap.
            unsafe { std::ptr::copy(self.base.add(from), self.base.add(to), n) };
            state = self.lock();
            state.moved += 1;
            state.cursor += n;
        }
        state.moving = false;
    }

    /// The frames' sizes, once every worker has returned and all frames moved.
    fn finish(self) -> Vec<usize> {
        let state = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        assert_eq!(state.moved, state.sizes.len(), "every frame moved");
        state.sizes.into_iter().map(|n| n.unwrap_or(0)).collect()
    }
}

/// Packs `data` into `out` (at least [`packed_bound`] bytes); returns the blob's length.
pub fn pack_into(data: &[u8], opts: &PackOptions, out: &mut [u8]) -> Result<usize> {
    let (used, entries) = compress_into(data, opts, out)?;
    let mut table = Vec::new();
    write_seek_table(&entries, true, &mut table);
    let end = used + table.len();
    if out.len() < end {
        return Err(CodecError::InvalidArgument(format!(
            "output buffer of {} bytes is too small for the seek table",
            out.len()
        )));
    }
    out[used..end].copy_from_slice(&table);
    Ok(end)
}

/// Packs `data` into a seekable zstd blob.
pub fn pack(data: &[u8], opts: &PackOptions) -> Result<Vec<u8>> {
    opts.validate()?;
    let mut out = vec![0u8; packed_bound(data.len(), opts)];
    let n = pack_into(data, opts, &mut out)?;
    out.truncate(n);
    out.shrink_to_fit();
    Ok(out)
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
    scratch: Vec<u8>,
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
            scratch: Vec::new(),
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
        // Checked before compressing: the frames already emitted stay a valid prefix.
        check_frame_count(self.entries.len() as u64 + frame_count(data.len() as u64, &self.opts))?;
        let bound = frames_bound(data.len(), &self.opts);
        if self.scratch.len() < bound {
            self.scratch.resize(bound, 0);
        }
        let (used, entries) = compress_into(data, &self.opts, &mut self.scratch)?;
        out.extend_from_slice(&self.scratch[..used]);
        self.stats.packed_size += used as u64;
        self.stats.frames += entries.len() as u64;
        self.stats.raw_size += data.len() as u64;
        self.entries.extend(entries);
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

    /// Feeds `data`; appends whatever compressed bytes are ready to `out`. Input that
    /// would take the blob past [`MAX_FRAMES`] frames is refused whole, before any of it
    /// is compressed.
    pub fn write(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.check_open()?;
        let buffered = self.pending.len() as u64 + data.len() as u64;
        check_frame_count(self.entries.len() as u64 + frame_count(buffered, &self.opts))?;
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
        self.scratch = Vec::new();
        Ok(self.stats)
    }
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

/// Packs the file `src` into the file `dst` with bounded memory.
pub fn pack_file(src: &Path, dst: &Path, opts: &PackOptions) -> Result<PackStats> {
    opts.validate()?;
    let mut reader = File::open(src)?;
    // Refused before anything is written, when the size is known (a regular file).
    check_frame_count(frame_count(reader.metadata()?.len(), opts))?;
    write_atomically(dst, |w| pack_stream(&mut reader, w, opts))
}
