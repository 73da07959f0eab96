//! The pyo3 binding `fl_sidecar._codec`: registers the codec's functions and classes,
//! reads inputs through the buffer protocol without copying, releases the GIL for the
//! work, and maps each core error to its class in `fl_sidecar.errors`.

mod buffer;

use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use fl_sidecar_core as core;
use fl_sidecar_core::{CodecError, PackOptions};
use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyType};

use buffer::InputBuffer;

/// A core error, or a panic caught at the boundary.
enum Failure {
    Codec(CodecError),
    Panic(String),
}

impl From<CodecError> for Failure {
    fn from(e: CodecError) -> Self {
        Failure::Codec(e)
    }
}

/// Runs `f`, turning a panic into a `Failure` so none crosses into Python.
fn guarded<T>(f: impl FnOnce() -> Result<T, Failure>) -> Result<T, Failure> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(Failure::Panic(msg))
        }
    }
}

fn error_class<'py>(py: Python<'py>, name: &str) -> PyResult<&'py PyType> {
    Ok(py
        .import("fl_sidecar.errors")?
        .getattr(name)?
        .downcast::<PyType>()?)
}

fn raise(py: Python<'_>, name: &str, msg: String) -> PyErr {
    match error_class(py, name) {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(e) => e,
    }
}

fn to_py_err(py: Python<'_>, failure: Failure) -> PyErr {
    match failure {
        Failure::Panic(msg) => raise(py, "CodecError", format!("internal codec error: {msg}")),
        Failure::Codec(e) => {
            let msg = e.to_string();
            match e {
                CodecError::InvalidArgument(_) => PyValueError::new_err(msg),
                CodecError::Corrupt(_) => raise(py, "CorruptDataError", msg),
                CodecError::Truncated(_) => raise(py, "TruncatedDataError", msg),
                CodecError::ChecksumMismatch(_) => raise(py, "ChecksumMismatchError", msg),
                CodecError::SeekTable(_) => raise(py, "SeekTableError", msg),
                CodecError::SizeLimitExceeded { .. }
                | CodecError::WindowTooLarge { .. }
                | CodecError::FrameLimit(_) => raise(py, "SizeLimitExceededError", msg),
                CodecError::OutOfMemory(_) => PyMemoryError::new_err(msg),
                CodecError::ReferenceMismatch(_) => raise(py, "ReferenceMismatchError", msg),
                CodecError::Io(io) => PyErr::from(io),
            }
        }
    }
}

/// Runs `f` without the GIL and behind the panic guard.
fn run_released<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<T, Failure> + Send,
) -> PyResult<T> {
    py.allow_threads(|| guarded(f))
        .map_err(|e| to_py_err(py, e))
}

/// A new `bytes` of exactly `len` bytes, filled in place by `fill` (no zeroing, no copy).
fn new_bytes(
    py: Python<'_>,
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> PyResult<()>,
) -> PyResult<PyObject> {
    let size = ffi::Py_ssize_t::try_from(len)
        .map_err(|_| PyValueError::new_err("output too large for a bytes object"))?;
    // SAFETY: a NULL source asks CPython for an uninitialised bytes object of `size` bytes,
    // which nothing else can see until we return it.
    unsafe {
        let ptr = ffi::PyBytes_FromStringAndSize(std::ptr::null(), size);
        let obj: PyObject = PyObject::from_owned_ptr_or_err(py, ptr)?;
        // Called even for an empty result: decoding zero bytes still verifies the frames.
        let data = if len == 0 {
            &mut [][..]
        } else {
            std::slice::from_raw_parts_mut(ffi::PyBytes_AsString(ptr) as *mut u8, len)
        };
        fill(data)?;
        Ok(obj)
    }
}

/// Packs a C-contiguous buffer into a seekable zstd blob (bytes).
#[pyfunction]
#[pyo3(text_signature = "(data, level, chunk_size, threads)")]
fn pack(
    py: Python<'_>,
    data: &PyAny,
    level: i32,
    chunk_size: usize,
    threads: usize,
) -> PyResult<PyObject> {
    let input = InputBuffer::get(py, data)?;
    let slice = input.as_slice();
    let opts = PackOptions {
        level,
        chunk_size,
        threads,
    };
    opts.validate().map_err(|e| to_py_err(py, e.into()))?;
    let bound = core::packed_bound(slice.len(), &opts);
    let size = ffi::Py_ssize_t::try_from(bound)
        .map_err(|_| PyValueError::new_err("input too large for a bytes object"))?;
    // SAFETY: a NULL source asks CPython for an uninitialised bytes object that nothing
    // else can see until we return it; we fill its first `used` bytes, then shrink it to
    // that (realloc of a large block remaps pages, it does not copy them).
    unsafe {
        let mut ptr = ffi::PyBytes_FromStringAndSize(std::ptr::null(), size);
        if ptr.is_null() {
            return Err(PyErr::fetch(py));
        }
        let out = std::slice::from_raw_parts_mut(ffi::PyBytes_AsString(ptr) as *mut u8, bound);
        let used = match run_released(py, || Ok(core::pack_into(slice, &opts, out)?)) {
            Ok(used) => used,
            Err(e) => {
                ffi::Py_DECREF(ptr);
                return Err(e);
            }
        };
        if _PyBytes_Resize(&mut ptr, used as ffi::Py_ssize_t) != 0 {
            // On failure CPython has released the object and set the error.
            return Err(PyErr::fetch(py));
        }
        Ok(PyObject::from_owned_ptr(py, ptr))
    }
}

extern "C" {
    // Not in the limited API, but exported by every CPython 3: shrinks a bytes object that
    // has a single reference, in place when the allocator can.
    fn _PyBytes_Resize(bytes: *mut *mut ffi::PyObject, newsize: ffi::Py_ssize_t) -> c_int;
}

/// Unpacks any zstd blob (bytes) straight into a result of its final size: in parallel when
/// the sizes are known, else measured by a first streaming pass (bounded memory) and decoded
/// by a second, so a bomb never costs more than one step of memory.
#[pyfunction]
#[pyo3(text_signature = "(blob, max_output_size, threads)")]
fn unpack(
    py: Python<'_>,
    blob: &PyAny,
    max_output_size: u64,
    threads: usize,
) -> PyResult<PyObject> {
    let input = InputBuffer::get(py, blob)?;
    let slice = input.as_slice();
    let plan = run_released(py, || Ok(core::plan(slice, max_output_size)?))?;
    let total = match plan.output_size() {
        Some(total) => total,
        None => run_released(py, || Ok(plan.measure()?))?,
    };
    new_bytes(py, total, |out| {
        run_released(py, || Ok(plan.decode_into(out, threads)?))
    })
}

/// Packs the file `src` into the file `dst`; returns (raw_size, packed_size, frames).
#[pyfunction]
#[pyo3(text_signature = "(src, dst, level, chunk_size, threads)")]
fn pack_file(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    level: i32,
    chunk_size: usize,
    threads: usize,
) -> PyResult<(u64, u64, u64)> {
    let opts = PackOptions {
        level,
        chunk_size,
        threads,
    };
    let stats = run_released(py, || Ok(core::pack_file(&src, &dst, &opts)?))?;
    Ok((stats.raw_size, stats.packed_size, stats.frames))
}

/// Unpacks the file `src` into the file `dst`; returns the bytes written.
#[pyfunction]
#[pyo3(text_signature = "(src, dst, max_output_size, threads)")]
fn unpack_file(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    max_output_size: u64,
    threads: usize,
) -> PyResult<u64> {
    run_released(py, || {
        Ok(core::unpack_file(&src, &dst, max_output_size, threads)?)
    })
}

/// (frames, compressed_size, decompressed_size or None, has_checksums, has_seek_table).
#[pyfunction]
#[pyo3(text_signature = "(blob)")]
#[allow(clippy::type_complexity)]
fn inspect(py: Python<'_>, blob: &PyAny) -> PyResult<(u64, u64, Option<u64>, bool, bool)> {
    let input = InputBuffer::get(py, blob)?;
    let slice = input.as_slice();
    let info = run_released(py, || Ok(core::inspect(slice)?))?;
    Ok((
        info.frames,
        info.compressed_size,
        info.decompressed_size,
        info.has_checksums,
        info.has_seek_table,
    ))
}

/// Streaming encoder: `write` returns the compressed bytes ready now, `finish` the rest.
#[pyclass(module = "fl_sidecar._codec")]
struct Packer {
    inner: core::Packer,
}

#[pymethods]
impl Packer {
    #[new]
    fn new(level: i32, chunk_size: usize, threads: usize) -> PyResult<Self> {
        let opts = PackOptions {
            level,
            chunk_size,
            threads,
        };
        Python::with_gil(|py| {
            core::Packer::new(opts)
                .map(|inner| Packer { inner })
                .map_err(|e| to_py_err(py, e.into()))
        })
    }

    fn write(&mut self, py: Python<'_>, data: &PyAny) -> PyResult<PyObject> {
        let input = InputBuffer::get(py, data)?;
        let slice = input.as_slice();
        let inner = &mut self.inner;
        let out = run_released(py, || {
            let mut out = Vec::new();
            inner.write(slice, &mut out)?;
            Ok(out)
        })?;
        Ok(PyBytes::new(py, &out).into())
    }

    fn finish(&mut self, py: Python<'_>) -> PyResult<PyObject> {
        let inner = &mut self.inner;
        let out = run_released(py, || {
            let mut out = Vec::new();
            inner.finish(&mut out)?;
            Ok(out)
        })?;
        Ok(PyBytes::new(py, &out).into())
    }

    /// (raw_size, packed_size, frames) so far.
    fn stats(&self) -> (u64, u64, u64) {
        let s = self.inner.stats();
        (s.raw_size, s.packed_size, s.frames)
    }
}

/// Streaming decoder for any zstd stream.
///
/// Each call returns at most `max_piece_size` bytes (`DEFAULT_PIECE_SIZE` when None); input
/// a call could not decode yet is copied and held (the caller's buffer may be reused once
/// `write` returns), and `drain` decodes it piece by piece.
#[pyclass(module = "fl_sidecar._codec")]
struct Unpacker {
    inner: core::Unpacker,
    max_piece_size: usize,
    held: Vec<u8>,
    held_from: usize,
}

impl Unpacker {
    fn pending(&self) -> usize {
        self.held.len() - self.held_from
    }
}

#[pymethods]
impl Unpacker {
    #[new]
    fn new(max_output_size: u64, max_piece_size: Option<usize>) -> PyResult<Self> {
        let max_piece_size = max_piece_size.unwrap_or(core::DECODE_STEP);
        if max_piece_size < core::MIN_BOUNDED_OUTPUT {
            return Err(PyValueError::new_err(format!(
                "max_piece_size must be at least {} bytes (one zstd block), got {max_piece_size}",
                core::MIN_BOUNDED_OUTPUT
            )));
        }
        Ok(Unpacker {
            inner: core::Unpacker::new(max_output_size),
            max_piece_size,
            held: Vec::new(),
            held_from: 0,
        })
    }

    fn write(&mut self, py: Python<'_>, data: &PyAny) -> PyResult<PyObject> {
        if self.pending() > 0 {
            return Err(PyValueError::new_err(format!(
                "{} bytes of earlier input are still held: drain() them before writing more",
                self.pending()
            )));
        }
        let input = InputBuffer::get(py, data)?;
        let slice = input.as_slice();
        let inner = &mut self.inner;
        let bound = self.max_piece_size;
        let (out, held) = run_released(py, || {
            let mut out = Vec::with_capacity(bound.min(64 << 20));
            let used = inner.write_bounded(slice, &mut out, bound)?;
            Ok((out, slice[used..].to_vec()))
        })?;
        self.held = held;
        self.held_from = 0;
        Ok(PyBytes::new(py, &out).into())
    }

    /// The next piece decoded from held input; empty once none is held.
    fn drain(&mut self, py: Python<'_>) -> PyResult<PyObject> {
        let bound = self.max_piece_size;
        if self.pending() == 0 {
            // Nothing held; still refused after finish() or an error, like write().
            self.inner
                .write(&[], &mut Vec::new())
                .map_err(|e| to_py_err(py, e.into()))?;
            return Ok(PyBytes::new(py, b"").into());
        }
        let inner = &mut self.inner;
        let rest = &self.held[self.held_from..];
        let result = run_released(py, || {
            let mut out = Vec::with_capacity(bound.min(64 << 20));
            let used = inner.write_bounded(rest, &mut out, bound)?;
            Ok((out, used))
        });
        match result {
            Ok((out, used)) => {
                self.held_from += used;
                if self.pending() == 0 {
                    self.held = Vec::new();
                    self.held_from = 0;
                }
                Ok(PyBytes::new(py, &out).into())
            }
            Err(e) => {
                self.held = Vec::new();
                self.held_from = 0;
                Err(e)
            }
        }
    }

    fn finish(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.pending() > 0 {
            return Err(PyValueError::new_err(format!(
                "{} bytes of input are still held: drain() them before finish()",
                self.pending()
            )));
        }
        let inner = &mut self.inner;
        run_released(py, || Ok(inner.finish()?))
    }

    /// Decompressed bytes produced so far.
    #[getter]
    fn produced(&self) -> u64 {
        self.inner.produced()
    }

    /// Bytes of input held for `drain` (copied from the last `write`).
    #[getter]
    fn pending_input(&self) -> usize {
        self.pending()
    }
}

/// One layout entry from Python: (offset, length, float width or 0 for opaque bytes,
/// offset of the same tensor in the reference or None).
type SegmentTuple = (u64, u64, u8, Option<u64>);

fn to_segments(py: Python<'_>, layout: &[SegmentTuple]) -> PyResult<Vec<core::Segment>> {
    layout
        .iter()
        .map(|&(offset, length, width, reference_offset)| {
            let kind = match width {
                0 => core::SegmentKind::Opaque,
                2 | 4 | 8 => core::SegmentKind::Float { width },
                _ => {
                    return Err(to_py_err(
                        py,
                        CodecError::InvalidArgument(format!(
                            "float width must be 0 (opaque), 2, 4 or 8 bytes, got {width}"
                        ))
                        .into(),
                    ))
                }
            };
            Ok(core::Segment {
                offset,
                length,
                kind,
                reference_offset,
            })
        })
        .collect()
}

/// Packs a model's bytes as tensors (see fl_sidecar.codec.pack_tensors).
#[pyfunction]
#[pyo3(text_signature = "(data, layout, reference, level, block_size, threads)")]
fn pack_tensors(
    py: Python<'_>,
    data: &PyAny,
    layout: Vec<SegmentTuple>,
    reference: Option<&PyAny>,
    level: i32,
    block_size: usize,
    threads: usize,
) -> PyResult<PyObject> {
    let segments = to_segments(py, &layout)?;
    let input = InputBuffer::get(py, data)?;
    let reference = reference.map(|r| InputBuffer::get(py, r)).transpose()?;
    let slice = input.as_slice();
    let reference_slice = reference.as_ref().map(|r| r.as_slice());
    let opts = core::TensorPackOptions {
        level,
        block_size,
        threads,
    };
    let blob = run_released(py, || {
        Ok(core::pack_tensors(
            slice,
            &segments,
            reference_slice,
            &opts,
        )?)
    })?;
    Ok(PyBytes::new(py, &blob).into())
}

/// Unpacks a tensor blob into a new bytes object of its size (checked before allocating).
#[pyfunction]
#[pyo3(text_signature = "(blob, reference, max_output_size, threads)")]
fn unpack_tensors(
    py: Python<'_>,
    blob: &PyAny,
    reference: Option<&PyAny>,
    max_output_size: u64,
    threads: usize,
) -> PyResult<PyObject> {
    let input = InputBuffer::get(py, blob)?;
    let reference = reference.map(|r| InputBuffer::get(py, r)).transpose()?;
    let slice = input.as_slice();
    let reference_slice = reference.as_ref().map(|r| r.as_slice());
    let plan = run_released(py, || {
        let plan = core::plan_tensors(slice, max_output_size)?;
        plan.check_reference(reference_slice)?;
        Ok(plan)
    })?;
    new_bytes(py, plan.output_size(), |out| {
        run_released(py, || {
            Ok(plan.decode_into(reference_slice, out, threads)?)
        })
    })
}

/// Unpacks a tensor blob into `out`, a writable buffer of exactly its size; returns it.
#[pyfunction]
#[pyo3(text_signature = "(blob, out, reference, threads)")]
fn unpack_tensors_into(
    py: Python<'_>,
    blob: &PyAny,
    out: &PyAny,
    reference: Option<&PyAny>,
    threads: usize,
) -> PyResult<usize> {
    let input = InputBuffer::get(py, blob)?;
    let mut output = InputBuffer::get_writable(py, out)?;
    let reference = reference.map(|r| InputBuffer::get(py, r)).transpose()?;
    let slice = input.as_slice();
    let reference_slice = reference.as_ref().map(|r| r.as_slice());
    let out_slice = output.as_mut_slice();
    run_released(py, || {
        Ok(core::unpack_tensors_into(
            slice,
            reference_slice,
            out_slice,
            threads,
        )?)
    })
}

/// Unpacks the tensor blob in file `src` into file `dst` a block at a time; returns its size.
#[pyfunction]
#[pyo3(text_signature = "(src, dst, reference, max_output_size)")]
fn unpack_tensors_file(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    reference: Option<&PyAny>,
    max_output_size: u64,
) -> PyResult<u64> {
    let reference = reference.map(|r| InputBuffer::get(py, r)).transpose()?;
    let reference_slice = reference.as_ref().map(|r| r.as_slice());
    run_released(py, || {
        Ok(core::unpack_tensors_file(
            &src,
            &dst,
            reference_slice,
            max_output_size,
        )?)
    })
}

/// (version, total_size, block_size, segments, blocks, uses_reference, reference_size)
/// from a tensor blob's header and checked index.
#[pyfunction]
#[pyo3(text_signature = "(blob)")]
#[allow(clippy::type_complexity)]
fn tensor_info(py: Python<'_>, blob: &PyAny) -> PyResult<(u16, u64, u32, u32, u32, bool, u64)> {
    let input = InputBuffer::get(py, blob)?;
    let slice = input.as_slice();
    let h = run_released(py, || Ok(*core::plan_tensors(slice, u64::MAX)?.header()))?;
    Ok((
        h.version,
        h.total_size,
        h.block_size,
        h.segment_count,
        h.block_count,
        h.uses_reference(),
        h.reference_size,
    ))
}

/// The libzstd the module is linked with, as "MAJOR.MINOR.RELEASE".
#[pyfunction]
#[pyo3(text_signature = "()")]
fn zstd_version() -> String {
    core::zstd_version()
}

#[pymodule]
fn _codec(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add("DEFAULT_LEVEL", core::DEFAULT_LEVEL)?;
    m.add("DEFAULT_CHUNK_SIZE", core::DEFAULT_CHUNK_SIZE)?;
    m.add("MAX_CHUNK_SIZE", core::MAX_CHUNK_SIZE)?;
    m.add("DEFAULT_MAX_OUTPUT_SIZE", core::DEFAULT_MAX_OUTPUT_SIZE)?;
    m.add("MIN_LEVEL", zstd_levels().0)?;
    m.add("MAX_LEVEL", zstd_levels().1)?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(unpack, m)?)?;
    m.add_function(wrap_pyfunction!(pack_file, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_file, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(zstd_version, m)?)?;
    m.add("MIN_PIECE_SIZE", core::MIN_BOUNDED_OUTPUT)?;
    m.add("DEFAULT_PIECE_SIZE", core::DECODE_STEP)?;
    m.add("MAX_FRAMES", core::MAX_FRAMES)?;
    m.add("TENSOR_FORMAT_VERSION", core::TENSOR_FORMAT_VERSION)?;
    m.add("DEFAULT_TENSOR_BLOCK_SIZE", core::DEFAULT_TENSOR_BLOCK_SIZE)?;
    m.add("DEFAULT_TENSOR_LEVEL", core::DEFAULT_TENSOR_LEVEL)?;
    m.add("MIN_TENSOR_BLOCK_SIZE", core::MIN_TENSOR_BLOCK_SIZE)?;
    m.add("MAX_TENSOR_BLOCK_SIZE", core::MAX_TENSOR_BLOCK_SIZE)?;
    m.add_function(wrap_pyfunction!(pack_tensors, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_tensors, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_tensors_into, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_info, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_tensors_file, m)?)?;
    m.add_class::<Packer>()?;
    m.add_class::<Unpacker>()?;
    Ok(())
}

fn zstd_levels() -> (i32, i32) {
    core::level_range()
}
