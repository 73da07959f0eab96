//! Zero-copy read access to any C-contiguous Python buffer (bytes, bytearray, memoryview,
//! numpy arrays) under the abi3 build.
//!
//! The buffer protocol only joined the limited API in Python 3.11, but `Py_buffer`'s
//! layout and `PyObject_GetBuffer`/`PyBuffer_Release` have been ABI-stable and exported by
//! every CPython since 3.3, so the abi3-py38 module declares them itself.

use std::os::raw::{c_char, c_int, c_void};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::AsPyPointer;

#[repr(C)]
struct RawBuffer {
    buf: *mut c_void,
    obj: *mut ffi::PyObject,
    len: ffi::Py_ssize_t,
    itemsize: ffi::Py_ssize_t,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut ffi::Py_ssize_t,
    strides: *mut ffi::Py_ssize_t,
    suboffsets: *mut ffi::Py_ssize_t,
    internal: *mut c_void,
}

extern "C" {
    fn PyObject_GetBuffer(obj: *mut ffi::PyObject, view: *mut RawBuffer, flags: c_int) -> c_int;
    fn PyBuffer_Release(view: *mut RawBuffer);
}

/// PyBUF_C_CONTIGUOUS: the exporter refuses anything not laid out in one C-order run.
const PYBUF_C_CONTIGUOUS: c_int = 0x0020 | 0x0010 | 0x0008;
/// PyBUF_WRITABLE: the exporter refuses a read-only buffer.
const PYBUF_WRITABLE: c_int = 0x0001;

/// A held buffer export: the bytes stay valid and in place until this is dropped.
///
/// Holds raw pointers, so it is neither Send nor Sync: it is released on the thread that
/// holds the GIL, while the borrowed slice may travel into `allow_threads`.
pub struct InputBuffer {
    view: Box<RawBuffer>,
}

impl InputBuffer {
    /// Borrows `obj`'s bytes; TypeError when it has no buffer, ValueError when it is not
    /// C-contiguous.
    pub fn get(py: Python<'_>, obj: &PyAny) -> PyResult<Self> {
        Self::get_with(py, obj, PYBUF_C_CONTIGUOUS)
    }

    /// Borrows `obj`'s bytes for writing; as [`get`](Self::get), and TypeError when the
    /// buffer is read-only (`bytes`).
    pub fn get_writable(py: Python<'_>, obj: &PyAny) -> PyResult<Self> {
        Self::get_with(py, obj, PYBUF_C_CONTIGUOUS | PYBUF_WRITABLE)
    }

    fn get_with(py: Python<'_>, obj: &PyAny, flags: c_int) -> PyResult<Self> {
        // SAFETY: an all-zero Py_buffer is the documented "empty" state; GetBuffer fills it.
        let mut view: Box<RawBuffer> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: obj is a live object and we hold the GIL.
        let rc = unsafe { PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) };
        if rc != 0 {
            let err = PyErr::fetch(py);
            if err.is_instance_of::<PyTypeError>(py) {
                return Err(PyTypeError::new_err(format!(
                    "a bytes-like object is required, not '{}'",
                    obj.get_type().name().unwrap_or("?")
                )));
            }
            let new = PyValueError::new_err(format!(
                "the buffer must be C-contiguous (copy it with bytes(...) or \
                 numpy.ascontiguousarray): {err}"
            ));
            new.set_cause(py, Some(err));
            return Err(new);
        }
        Ok(InputBuffer { view })
    }

    /// The exported bytes.
    pub fn as_slice(&self) -> &[u8] {
        let len = self.view.len as usize;
        if len == 0 || self.view.buf.is_null() {
            return &[];
        }
        // SAFETY: the exporter guarantees `len` readable bytes at `buf` while the export
        // is held, which lasts as long as `self`.
        unsafe { std::slice::from_raw_parts(self.view.buf as *const u8, len) }
    }
}

impl InputBuffer {
    /// The exported bytes, for writing: only for a buffer from
    /// [`get_writable`](Self::get_writable).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.view.len as usize;
        if len == 0 || self.view.buf.is_null() || self.view.readonly != 0 {
            return &mut [];
        }
        // SAFETY: as `as_slice`, and the exporter granted write access (PyBUF_WRITABLE).
        unsafe { std::slice::from_raw_parts_mut(self.view.buf as *mut u8, len) }
    }
}

impl Drop for InputBuffer {
    fn drop(&mut self) {
        // Dropped where it was created, with the GIL held.
        Python::with_gil(|_| unsafe { PyBuffer_Release(&mut *self.view) });
    }
}
