//! The byte layout: zstd frame headers and blocks (RFC 8878), skippable frames, and the
//! seek table of zstd's contrib/seekable_format, parsed without decompressing anything.

use crate::error::{CodecError, Result};

/// Magic number of a zstd frame (little-endian on the wire).
pub const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// Skippable frames use magics 0x184D2A50..=0x184D2A5F.
pub const SKIPPABLE_MAGIC_MASK: u32 = 0xFFFF_FFF0;
/// The low-nibble-cleared skippable magic.
pub const SKIPPABLE_MAGIC_BASE: u32 = 0x184D_2A50;
/// The skippable magic the seekable format uses for its seek table.
pub const SEEK_TABLE_SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// The last four bytes of a seekable blob.
pub const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
/// Size of the seek table footer: frame count, descriptor, magic.
pub const SEEK_TABLE_FOOTER_SIZE: usize = 9;
/// Size of a skippable frame header: magic and frame size.
pub const SKIPPABLE_HEADER_SIZE: usize = 8;
/// The seekable format's limit on the number of frames.
pub const SEEKABLE_MAX_FRAMES: u64 = 0x0800_0000;
/// The largest chunk size: frames must not need a window above 8 MiB (RFC 9659).
pub const MAX_CHUNK_SIZE: usize = 8 << 20;
/// The window log of the largest allowed window (8 MiB).
pub const MAX_WINDOW_LOG: u32 = 23;
/// The largest block a zstd frame may hold (and regenerate), in bytes.
pub const MAX_BLOCK_SIZE: usize = 128 * 1024;
/// The most frames a blob may have, packing and unpacking alike: each costs about 100
/// bytes of bookkeeping while walking, and a hostile blob packs one into 9 bytes, so this
/// bounds that memory (about 100 MiB); 2 MiB frames reach it only at 2 TiB. The seekable
/// format itself allows 2^27 (`SEEKABLE_MAX_FRAMES`).
pub const MAX_FRAMES: usize = 1 << 20;

/// The error for a blob with more than [`MAX_FRAMES`] frames; `count` says how many
/// ("its seek table lists 1048577"), the message names the limit, then `advice`.
pub(crate) fn too_many_frames(count: &str, advice: &str) -> CodecError {
    CodecError::FrameLimit(format!(
        "{count} zstd frames, more than the {MAX_FRAMES} one blob may have (MAX_FRAMES){advice}"
    ))
}
/// The largest frame header, in bytes.
pub const MAX_FRAME_HEADER_SIZE: usize = 18;

pub(crate) fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// True when `magic` is any skippable-frame magic.
pub fn is_skippable_magic(magic: u32) -> bool {
    magic & SKIPPABLE_MAGIC_MASK == SKIPPABLE_MAGIC_BASE
}

/// What a zstd frame header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Header length including the magic, in bytes.
    pub header_size: usize,
    /// The decompressed size, when the header records it.
    pub content_size: Option<u64>,
    /// The window the decoder needs, in bytes.
    pub window_size: u64,
    /// Whether a 4-byte content checksum follows the last block.
    pub has_checksum: bool,
    /// Dictionary id, 0 when none.
    pub dictionary_id: u32,
}

/// Bytes needed for the whole header once the descriptor byte (offset 4) is known.
pub fn frame_header_size(descriptor: u8) -> usize {
    let fcs_flag = descriptor >> 6;
    let single_segment = descriptor & 0x20 != 0;
    let did_size = [0usize, 1, 2, 4][(descriptor & 3) as usize];
    let fcs_size = match fcs_flag {
        0 => usize::from(single_segment),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    4 + 1 + usize::from(!single_segment) + did_size + fcs_size
}

/// Parses a frame header; `b` starts at the magic and holds at least the whole header.
pub fn parse_frame_header(b: &[u8], offset: u64) -> Result<FrameHeader> {
    debug_assert!(b.len() >= 5);
    let descriptor = b[4];
    if descriptor & 0x08 != 0 {
        return Err(CodecError::Corrupt(format!(
            "zstd frame at offset {offset}: reserved bit set in the frame header descriptor"
        )));
    }
    let header_size = frame_header_size(descriptor);
    debug_assert!(b.len() >= header_size);
    let single_segment = descriptor & 0x20 != 0;
    let mut at = 5;
    let mut window_size = 0u64;
    if !single_segment {
        let wd = b[at];
        at += 1;
        let window_log = 10 + u32::from(wd >> 3);
        if window_log > 41 {
            return Err(CodecError::Corrupt(format!(
                "zstd frame at offset {offset}: window log {window_log} is out of range"
            )));
        }
        let base = 1u64 << window_log;
        window_size = base + (base / 8) * u64::from(wd & 7);
    }
    let did_size = [0usize, 1, 2, 4][(descriptor & 3) as usize];
    let mut dictionary_id = 0u32;
    for i in 0..did_size {
        dictionary_id |= u32::from(b[at + i]) << (8 * i);
    }
    at += did_size;
    let content_size = match descriptor >> 6 {
        0 if single_segment => Some(u64::from(b[at])),
        0 => None,
        1 => Some(u64::from(u16::from_le_bytes([b[at], b[at + 1]])) + 256),
        2 => Some(u64::from(read_u32(b, at))),
        _ => {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            Some(u64::from_le_bytes(v))
        }
    };
    if single_segment {
        window_size = content_size.unwrap_or(0);
    }
    Ok(FrameHeader {
        header_size,
        content_size,
        window_size,
        has_checksum: descriptor & 0x04 != 0,
        dictionary_id,
    })
}

/// One block header (3 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// Whether this is the frame's last block.
    pub last: bool,
    /// Bytes of block content that follow the header.
    pub stored_size: usize,
    /// Largest number of bytes the block regenerates.
    pub max_regenerated: usize,
}

/// Parses a 3-byte block header.
pub fn parse_block_header(b: [u8; 3], offset: u64) -> Result<BlockHeader> {
    let v = u32::from(b[0]) | (u32::from(b[1]) << 8) | (u32::from(b[2]) << 16);
    let last = v & 1 != 0;
    let block_type = (v >> 1) & 3;
    let size = (v >> 3) as usize;
    let (stored_size, max_regenerated) = match block_type {
        0 => (size, size),
        1 => (1, size),
        2 => (size, MAX_BLOCK_SIZE),
        _ => {
            return Err(CodecError::Corrupt(format!(
                "zstd block at offset {offset}: reserved block type"
            )))
        }
    };
    if size > MAX_BLOCK_SIZE {
        return Err(CodecError::Corrupt(format!(
            "zstd block at offset {offset}: size {size} exceeds the 128 KiB block limit"
        )));
    }
    Ok(BlockHeader {
        last,
        stored_size,
        max_regenerated,
    })
}

/// Where one zstd frame lies in a blob and what its header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// Offset of the frame's magic in the blob, in bytes.
    pub offset: usize,
    /// Length of the whole frame (header, blocks, checksum), in bytes.
    pub compressed_size: usize,
    /// The parsed header.
    pub header: FrameHeader,
    /// The frame's stored checksum (low 32 bits of XXH64), when it has one.
    pub checksum: Option<u32>,
    /// Upper bound of the decompressed size from the block headers, in bytes.
    pub max_decompressed: u64,
    /// Decompressed size promised by a seek table, when one covers this frame.
    pub table_size: Option<u32>,
    /// Checksum recorded in a seek table, when one covers this frame with checksums.
    pub table_checksum: Option<u32>,
}

impl FrameInfo {
    /// The decompressed size: from the header, else from a seek table.
    pub fn known_size(&self) -> Option<u64> {
        self.header
            .content_size
            .or_else(|| self.table_size.map(u64::from))
    }
}

fn truncated(what: &str, offset: usize) -> CodecError {
    CodecError::Truncated(format!(
        "the data ends inside {what} that starts at offset {offset}"
    ))
}

/// Walks one zstd frame starting at `offset` (its magic already checked).
pub fn walk_frame(blob: &[u8], offset: usize) -> Result<FrameInfo> {
    if blob.len() - offset < 5 {
        return Err(truncated("a zstd frame header", offset));
    }
    let header_size = frame_header_size(blob[offset + 4]);
    if blob.len() - offset < header_size {
        return Err(truncated("a zstd frame header", offset));
    }
    let header = parse_frame_header(&blob[offset..offset + header_size], offset as u64)?;
    let mut at = offset + header_size;
    let mut max_decompressed = 0u64;
    loop {
        if blob.len() - at < 3 {
            return Err(truncated("a zstd frame", offset));
        }
        let block = parse_block_header([blob[at], blob[at + 1], blob[at + 2]], at as u64)?;
        at += 3;
        if blob.len() - at < block.stored_size {
            return Err(truncated("a zstd frame", offset));
        }
        at += block.stored_size;
        max_decompressed += block.max_regenerated as u64;
        if block.last {
            break;
        }
    }
    let checksum = if header.has_checksum {
        if blob.len() - at < 4 {
            return Err(truncated("a zstd frame", offset));
        }
        let c = read_u32(blob, at);
        at += 4;
        Some(c)
    } else {
        None
    };
    Ok(FrameInfo {
        offset,
        compressed_size: at - offset,
        header,
        checksum,
        max_decompressed,
        table_size: None,
        table_checksum: None,
    })
}

/// One seek table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeekEntry {
    /// Compressed size of the frame, in bytes.
    pub compressed_size: u32,
    /// Decompressed size of the frame, in bytes.
    pub decompressed_size: u32,
    /// Low 32 bits of XXH64 (seed 0) of the decompressed frame, when the table has checksums.
    pub checksum: Option<u32>,
}

/// Appends a seek table (a skippable frame) describing `entries` to `out`.
pub fn write_seek_table(entries: &[SeekEntry], with_checksums: bool, out: &mut Vec<u8>) {
    let entry_size = if with_checksums { 12 } else { 8 };
    let frame_size = entries.len() * entry_size + SEEK_TABLE_FOOTER_SIZE;
    out.reserve(SKIPPABLE_HEADER_SIZE + frame_size);
    out.extend_from_slice(&SEEK_TABLE_SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&(frame_size as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.compressed_size.to_le_bytes());
        out.extend_from_slice(&e.decompressed_size.to_le_bytes());
        if with_checksums {
            out.extend_from_slice(&e.checksum.unwrap_or(0).to_le_bytes());
        }
    }
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.push(if with_checksums { 0x80 } else { 0 });
    out.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
}

/// A parsed seek table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeekTable {
    /// One entry per frame, in order.
    pub entries: Vec<SeekEntry>,
    /// Whether the entries carry checksums.
    pub has_checksums: bool,
}

/// Parses the content of a skippable frame with the seek-table magic (without its
/// 8-byte skippable header); `Ok(None)` when it does not end with the seekable magic.
pub fn parse_seek_table_content(content: &[u8], offset: usize) -> Result<Option<SeekTable>> {
    let n = content.len();
    if n < SEEK_TABLE_FOOTER_SIZE || read_u32(content, n - 4) != SEEKABLE_MAGIC {
        return Ok(None);
    }
    let frames = u64::from(read_u32(content, n - 9));
    let descriptor = content[n - 5];
    if descriptor & 0x7C != 0 {
        return Err(CodecError::SeekTable(format!(
            "seek table at offset {offset}: reserved bits set in its descriptor"
        )));
    }
    let has_checksums = descriptor & 0x80 != 0;
    let entry_size: u64 = if has_checksums { 12 } else { 8 };
    if frames > SEEKABLE_MAX_FRAMES
        || frames * entry_size + SEEK_TABLE_FOOTER_SIZE as u64 != n as u64
    {
        return Err(CodecError::SeekTable(format!(
            "seek table at offset {offset}: {frames} entries do not fit its {n} bytes"
        )));
    }
    let entry_size = entry_size as usize;
    let entries = (0..frames as usize)
        .map(|i| {
            let at = i * entry_size;
            SeekEntry {
                compressed_size: read_u32(content, at),
                decompressed_size: read_u32(content, at + 4),
                checksum: has_checksums.then(|| read_u32(content, at + 8)),
            }
        })
        .collect();
    Ok(Some(SeekTable {
        entries,
        has_checksums,
    }))
}

/// Locates a seek table from the end of `blob`: `Ok(None)` when the blob does not end with
/// the seekable magic; an error when it does but the table around it is malformed.
pub fn seek_table_at_end(blob: &[u8]) -> Result<Option<(usize, SeekTable)>> {
    let n = blob.len();
    if n < SKIPPABLE_HEADER_SIZE + SEEK_TABLE_FOOTER_SIZE || read_u32(blob, n - 4) != SEEKABLE_MAGIC
    {
        return Ok(None);
    }
    let frames = u64::from(read_u32(blob, n - 9));
    let entry_size: u64 = if blob[n - 5] & 0x80 != 0 { 12 } else { 8 };
    let content = frames * entry_size + SEEK_TABLE_FOOTER_SIZE as u64;
    let total = content + SKIPPABLE_HEADER_SIZE as u64;
    if frames > SEEKABLE_MAX_FRAMES || total > n as u64 {
        return Err(CodecError::SeekTable(format!(
            "the seek table claims {frames} frames, more than the blob's {n} bytes can hold"
        )));
    }
    let start = n - total as usize;
    if read_u32(blob, start) != SEEK_TABLE_SKIPPABLE_MAGIC
        || u64::from(read_u32(blob, start + 4)) != content
    {
        return Err(CodecError::SeekTable(format!(
            "the seek table's skippable frame header at offset {start} does not match its footer"
        )));
    }
    let table = parse_seek_table_content(&blob[start + SKIPPABLE_HEADER_SIZE..], start)?
        .expect("footer magic checked above");
    Ok(Some((start, table)))
}

/// The structure of a whole blob, found without decompressing.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Every zstd frame, in order.
    pub frames: Vec<FrameInfo>,
    /// Whether the blob ends with a seek table (which was checked against its frames).
    pub has_seek_table: bool,
    /// Whether that final seek table carries checksums.
    pub seek_table_has_checksums: bool,
}

impl Layout {
    /// The total decompressed size, when every frame's size is known.
    pub fn known_total(&self) -> Option<u64> {
        self.frames
            .iter()
            .try_fold(0u64, |acc, f| f.known_size().map(|s| acc.saturating_add(s)))
    }

    /// Upper bound of the total decompressed size, in bytes.
    pub fn max_total(&self) -> u64 {
        self.frames.iter().fold(0u64, |acc, f| {
            acc.saturating_add(f.known_size().unwrap_or(f.max_decompressed))
        })
    }
}

/// Checks a seek table against the frames it describes (all of `run`: every zstd frame
/// since the stream start or the last skippable frame, ending where the table starts)
/// and records its promises in them.
fn apply_seek_table(run: &mut [FrameInfo], table: &SeekTable, table_offset: usize) -> Result<()> {
    let n = table.entries.len();
    if n != run.len() {
        return Err(CodecError::SeekTable(format!(
            "the seek table at offset {table_offset} lists {n} frames, but {} precede it",
            run.len()
        )));
    }
    let described = run;
    for (i, (frame, entry)) in described.iter_mut().zip(&table.entries).enumerate() {
        if entry.compressed_size as usize != frame.compressed_size {
            return Err(CodecError::SeekTable(format!(
                "seek table entry {i} says {} compressed bytes, the frame at offset {} has {}",
                entry.compressed_size, frame.offset, frame.compressed_size
            )));
        }
        if let Some(cs) = frame.header.content_size {
            if cs != u64::from(entry.decompressed_size) {
                return Err(CodecError::SeekTable(format!(
                    "seek table entry {i} says {} decompressed bytes, the frame header says {cs}",
                    entry.decompressed_size
                )));
            }
        }
        if u64::from(entry.decompressed_size) > frame.max_decompressed {
            return Err(CodecError::SeekTable(format!(
                "seek table entry {i} says {} decompressed bytes, more than its blocks can hold",
                entry.decompressed_size
            )));
        }
        frame.table_size = Some(entry.decompressed_size);
        frame.table_checksum = entry.checksum;
    }
    Ok(())
}

/// Walks a whole blob: every frame header and block header, every skippable frame, and
/// every seek table (each checked against the frames just before it).
///
/// A seek table describes every zstd frame since the previous skippable frame (or the
/// start), so concatenated seekable blobs (a valid zstd stream) are read correctly, and a
/// table that lists more or fewer frames than that is a `SeekTable` error.
pub fn scan(blob: &[u8]) -> Result<Layout> {
    if blob.is_empty() {
        return Err(CodecError::Truncated(
            "empty input: a zstd stream has at least one frame".into(),
        ));
    }
    let end_table = seek_table_at_end(blob)?;
    if let Some((_, table)) = &end_table {
        // Refused before walking a single frame.
        if table.entries.len() > MAX_FRAMES {
            let count = format!("its seek table lists {}", table.entries.len());
            return Err(too_many_frames(&count, ""));
        }
    }
    let data_end = end_table.as_ref().map_or(blob.len(), |(start, _)| *start);
    let mut layout = Layout::default();
    // Frames since the last skippable frame: the only ones a seek table may describe.
    let mut run_start = 0usize;
    let mut at = 0usize;
    while at < data_end {
        if data_end - at < 4 {
            return Err(truncated("a frame magic number", at));
        }
        let magic = read_u32(blob, at);
        if magic == ZSTD_MAGIC {
            let frame = walk_frame(&blob[..data_end], at)?;
            at += frame.compressed_size;
            if layout.frames.len() == MAX_FRAMES {
                return Err(too_many_frames(
                    &format!("the blob has {} or more", MAX_FRAMES + 1),
                    "",
                ));
            }
            layout.frames.push(frame);
        } else if is_skippable_magic(magic) {
            if data_end - at < SKIPPABLE_HEADER_SIZE {
                return Err(truncated("a skippable frame", at));
            }
            let size = read_u32(blob, at + 4) as usize;
            if data_end - at - SKIPPABLE_HEADER_SIZE < size {
                return Err(truncated("a skippable frame", at));
            }
            let content = &blob[at + SKIPPABLE_HEADER_SIZE..at + SKIPPABLE_HEADER_SIZE + size];
            if magic == SEEK_TABLE_SKIPPABLE_MAGIC {
                match parse_seek_table_content(content, at)? {
                    Some(table) => apply_seek_table(&mut layout.frames[run_start..], &table, at)?,
                    None if at + SKIPPABLE_HEADER_SIZE + size == blob.len() => {
                        return Err(CodecError::SeekTable(format!(
                            "the seek-table frame at offset {at} lacks the seekable footer"
                        )))
                    }
                    None => {}
                }
            }
            at += SKIPPABLE_HEADER_SIZE + size;
            run_start = layout.frames.len();
        } else {
            return Err(CodecError::Corrupt(format!(
                "unknown frame magic 0x{magic:08X} at offset {at}: not a zstd stream"
            )));
        }
    }
    if let Some((start, table)) = end_table {
        apply_seek_table(&mut layout.frames[run_start..], &table, start)?;
        layout.has_seek_table = true;
        layout.seek_table_has_checksums = table.has_checksums;
    }
    Ok(layout)
}
