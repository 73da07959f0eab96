//! File and memory helpers shared by packing and unpacking: atomic file replacement,
//! reading a buffer full, and the transparent-huge-page hint for large output buffers.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{CodecError, Result};

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

/// Asks Linux to back a large output buffer with transparent huge pages: filling a fresh
/// buffer otherwise costs one page fault per 4 KiB, a large share of decoding time.
/// Only a hint; where THP is off or unsupported nothing changes.
pub(crate) fn advise_huge_pages(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        if buf.len() < 2 * HUGE {
            return;
        }
        let start = buf.as_mut_ptr() as usize;
        let aligned = (start + HUGE - 1) & !(HUGE - 1);
        let end = (start + buf.len()) & !(HUGE - 1);
        if end > aligned {
            // SAFETY: the range lies inside `buf`, which we own mutably; MADV_HUGEPAGE
            // changes no contents.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    end - aligned,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Reads until `buf` is full or the reader ends (retrying interrupted reads); returns
/// the bytes read, fewer than `buf.len()` only at the end of the input.
pub(crate) fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
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
