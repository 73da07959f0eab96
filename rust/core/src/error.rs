//! The codec's error type: one variant per category a caller can act on.

use std::fmt;

/// Everything that can go wrong while packing or unpacking.
///
/// The Python binding maps each variant to one class of `fl_sidecar.errors`.
#[derive(Debug)]
pub enum CodecError {
    /// A parameter is out of range (level, chunk size, thread count).
    InvalidArgument(String),
    /// The bytes are not a valid zstd stream: bad magic, bad header, bad block.
    Corrupt(String),
    /// The bytes end before the stream does.
    Truncated(String),
    /// A frame's content does not match its checksum.
    ChecksumMismatch(String),
    /// The seek table is malformed or disagrees with the frames it describes.
    SeekTable(String),
    /// The output would exceed the caller's limit.
    SizeLimitExceeded {
        /// The caller's limit, in bytes.
        limit: u64,
        /// What the stream needs (or has produced so far), in bytes.
        needed: u64,
    },
    /// A blob has (or packing would make) more frames than the codec handles (`MAX_FRAMES`).
    FrameLimit(String),
    /// A frame needs a larger decoding window than allowed (a memory bomb).
    WindowTooLarge {
        /// The largest window allowed, in bytes.
        limit: u64,
        /// The window the frame asks for, in bytes.
        needed: u64,
    },
    /// zstd could not allocate what a frame needs (its window): a resource limit of this
    /// process, not damage in the data.
    OutOfMemory(String),
    /// A tensor blob needs a reference other than the one given (none, another size, or
    /// other bytes where a tensor was coded against it).
    ReferenceMismatch(String),
    /// Reading or writing a file failed.
    Io(std::io::Error),
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecError::InvalidArgument(m)
            | CodecError::Corrupt(m)
            | CodecError::Truncated(m)
            | CodecError::ChecksumMismatch(m)
            | CodecError::SeekTable(m)
            | CodecError::FrameLimit(m)
            | CodecError::OutOfMemory(m)
            | CodecError::ReferenceMismatch(m) => f.write_str(m),
            CodecError::SizeLimitExceeded { limit, needed } => write!(
                f,
                "output of {needed} bytes exceeds the limit of {limit} bytes (max_output_size)"
            ),
            CodecError::WindowTooLarge { limit, needed } => write!(
                f,
                "a frame needs a decoding window of {needed} bytes, more than the {limit} bytes \
                 allowed (8 MiB, or up to 128 MiB when max_output_size allows)"
            ),
            CodecError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CodecError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for CodecError {
    fn from(e: std::io::Error) -> Self {
        CodecError::Io(e)
    }
}

/// The codec's result type.
pub type Result<T> = std::result::Result<T, CodecError>;

// zstd's stable error codes (zstd_errors.h); zstd.h does not expose
// ZSTD_getErrorCode, but every libzstd exports it.
extern "C" {
    fn ZSTD_getErrorCode(function_result: usize) -> u32;
}
const ZSTD_ERROR_CHECKSUM_WRONG: u32 = 22;
const ZSTD_ERROR_DST_SIZE_TOO_SMALL: u32 = 70;
const ZSTD_ERROR_MEMORY_ALLOCATION: u32 = 64;

/// What a failed zstd call means for us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZstdFailure {
    Checksum,
    OutputTooSmall,
    OutOfMemory,
    Other,
}

pub(crate) fn classify_zstd_error(code: usize) -> ZstdFailure {
    // SAFETY: a pure function of its integer argument.
    match unsafe { ZSTD_getErrorCode(code) } {
        ZSTD_ERROR_CHECKSUM_WRONG => ZstdFailure::Checksum,
        ZSTD_ERROR_DST_SIZE_TOO_SMALL => ZstdFailure::OutputTooSmall,
        ZSTD_ERROR_MEMORY_ALLOCATION => ZstdFailure::OutOfMemory,
        _ => ZstdFailure::Other,
    }
}

pub(crate) fn zstd_error_name(code: usize) -> &'static str {
    zstd_safe::get_error_name(code)
}
