//! Unit tests of the core: round trips, the exact seek-table layout, foreign zstd, and
//! hostile input (bit flips, truncation, lying seek tables, bombs).

use crate::decode::{plan, unpack, Unpacker};
use crate::encode::{pack, PackOptions, Packer, MAX_CHUNK_SIZE};
use crate::error::CodecError;
use crate::format::{scan, SEEKABLE_MAGIC, SEEK_TABLE_SKIPPABLE_MAGIC};
use crate::{inspect, is_zstd};

/// Deterministic pseudo-random bytes (xorshift), compressible when `text` is set.
fn sample(len: usize, seed: u64, text: bool) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if text {
                b"abcdefgh  \n"[(x % 11) as usize]
            } else {
                x as u8
            }
        })
        .collect()
}

fn opts(level: i32, chunk_size: usize, threads: usize) -> PackOptions {
    PackOptions {
        level,
        chunk_size,
        threads,
    }
}

const LIMIT: u64 = 1 << 30;

fn stream_unpack(blob: &[u8], piece: usize, limit: u64) -> Result<Vec<u8>, CodecError> {
    let mut u = Unpacker::new(limit);
    let mut out = Vec::new();
    for p in blob.chunks(piece.max(1)) {
        u.write(p, &mut out)?;
    }
    u.finish()?;
    Ok(out)
}

#[test]
fn round_trips_sizes_around_chunk_multiples() {
    for chunk in [1usize, 7, 64, 1000] {
        for len in [
            0,
            1,
            chunk - 1,
            chunk,
            chunk + 1,
            3 * chunk - 1,
            3 * chunk,
            3 * chunk + 1,
        ] {
            for threads in [0, 1, 3] {
                let data = sample(len, len as u64 + 1, len % 2 == 0);
                let blob = pack(&data, &opts(3, chunk, threads)).unwrap();
                assert_eq!(unpack(&blob, LIMIT, threads).unwrap(), data, "len {len}");
                assert_eq!(stream_unpack(&blob, 5, LIMIT).unwrap(), data);
                let info = inspect(&blob).unwrap();
                assert_eq!(info.frames as usize, len.div_ceil(chunk).max(1));
                assert_eq!(info.decompressed_size, Some(len as u64));
                assert!(info.has_checksums && info.has_seek_table);
                assert!(is_zstd(&blob));
            }
        }
    }
}

#[test]
fn every_level_round_trips() {
    let data = sample(5000, 9, true);
    for level in [-5, -1, 0, 1, 2, 3, 5, 9, 12, 15, 19, 20, 22] {
        let blob = pack(&data, &opts(level, 1024, 2)).unwrap();
        assert_eq!(unpack(&blob, LIMIT, 2).unwrap(), data, "level {level}");
    }
}

#[test]
fn rejects_bad_parameters() {
    let data = [1u8; 10];
    for o in [
        opts(3, 0, 0),
        opts(3, MAX_CHUNK_SIZE + 1, 0),
        opts(99, 10, 0),
        opts(3, 10, 100_000),
    ] {
        assert!(matches!(
            pack(&data, &o),
            Err(CodecError::InvalidArgument(_))
        ));
    }
}

#[test]
fn streaming_packer_matches_one_shot() {
    let data = sample(10_000, 3, true);
    let o = opts(3, 512, 2);
    for piece in [1usize, 100, 1024, 20_000] {
        let mut p = Packer::new(o).unwrap();
        let mut out = Vec::new();
        for part in data.chunks(piece) {
            p.write(part, &mut out).unwrap();
        }
        let stats = p.finish(&mut out).unwrap();
        assert_eq!(out, pack(&data, &o).unwrap(), "piece {piece}");
        assert_eq!(stats.raw_size, data.len() as u64);
        assert_eq!(stats.packed_size, out.len() as u64);
        assert!(p.finish(&mut out).is_err(), "finish twice");
    }
}

#[test]
fn seek_table_is_laid_out_per_the_spec() {
    let data = sample(2500, 5, false);
    let blob = pack(&data, &opts(3, 1000, 1)).unwrap();
    let n = blob.len();
    let u32_at = |at: usize| u32::from_le_bytes(blob[at..at + 4].try_into().unwrap());
    assert_eq!(u32_at(n - 4), SEEKABLE_MAGIC);
    assert_eq!(blob[n - 5], 0x80, "checksum flag set, reserved bits clear");
    assert_eq!(u32_at(n - 9), 3);
    let table_start = n - (8 + 3 * 12 + 9);
    assert_eq!(u32_at(table_start), SEEK_TABLE_SKIPPABLE_MAGIC);
    assert_eq!(u32_at(table_start + 4), 3 * 12 + 9);
    let layout = scan(&blob).unwrap();
    for (i, frame) in layout.frames.iter().enumerate() {
        let e = table_start + 8 + 12 * i;
        assert_eq!(u32_at(e) as usize, frame.compressed_size);
        let raw = &data[i * 1000..((i + 1) * 1000).min(data.len())];
        assert_eq!(u32_at(e + 4) as usize, raw.len());
        let xxh = xxhash_rust::xxh64::xxh64(raw, 0) as u32;
        assert_eq!(u32_at(e + 8), xxh);
        assert_eq!(frame.header.content_size, Some(raw.len() as u64));
        assert!(frame.header.has_checksum);
    }
}

#[test]
fn frames_never_need_more_than_an_8_mib_window() {
    let data = vec![7u8; MAX_CHUNK_SIZE + 10];
    let blob = pack(&data, &opts(19, MAX_CHUNK_SIZE, 0)).unwrap();
    for frame in scan(&blob).unwrap().frames {
        assert!(frame.header.window_size <= 8 << 20, "{frame:?}");
    }
    assert_eq!(opts(3, MAX_CHUNK_SIZE, 0).window_log(), 23);
    assert_eq!(opts(3, 4 << 20, 0).window_log(), 22);
    assert_eq!(opts(3, 100, 0).window_log(), 10);
}

fn foreign_frame(data: &[u8], checksum: bool, content_size: bool) -> Vec<u8> {
    use zstd_safe::{CCtx, CParameter};
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::ChecksumFlag(checksum))
        .unwrap();
    cctx.set_parameter(CParameter::ContentSizeFlag(content_size))
        .unwrap();
    let mut out = Vec::new();
    if content_size {
        out.reserve(zstd_safe::compress_bound(data.len()));
        cctx.compress2(&mut out, data).unwrap();
    } else {
        // Streaming without a pledged size leaves the content size out of the header.
        let mut buf = vec![0u8; zstd_safe::compress_bound(data.len()) + 64];
        let mut ob = zstd_safe::OutBuffer::around(&mut buf[..]);
        let mut ib = zstd_safe::InBuffer::around(data);
        cctx.compress_stream2(
            &mut ob,
            &mut ib,
            zstd_sys::ZSTD_EndDirective::ZSTD_e_continue,
        )
        .unwrap();
        loop {
            let left = cctx
                .compress_stream2(&mut ob, &mut ib, zstd_sys::ZSTD_EndDirective::ZSTD_e_end)
                .unwrap();
            if left == 0 {
                break;
            }
        }
        let n = ob.pos();
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[test]
fn decodes_plain_zstd_from_others() {
    let a = sample(70_000, 11, true);
    let b = sample(3_000, 12, false);
    for (checksum, content_size) in [(false, true), (true, false), (false, false)] {
        let mut blob = foreign_frame(&a, checksum, content_size);
        let info = inspect(&blob).unwrap();
        assert!(!info.has_seek_table);
        assert_eq!(info.decompressed_size.is_some(), content_size);
        assert_eq!(unpack(&blob, LIMIT, 0).unwrap(), a);
        blob.extend(foreign_frame(&b, checksum, content_size));
        let expected = [a.clone(), b.clone()].concat();
        assert_eq!(unpack(&blob, LIMIT, 0).unwrap(), expected);
        assert_eq!(stream_unpack(&blob, 777, LIMIT).unwrap(), expected);
    }
}

#[test]
fn concatenated_seekable_blobs_decode() {
    let a = sample(3000, 1, true);
    let b = sample(2000, 2, true);
    let mut blob = pack(&a, &opts(3, 1000, 0)).unwrap();
    blob.extend(pack(&b, &opts(3, 700, 0)).unwrap());
    let expected = [a, b].concat();
    assert_eq!(unpack(&blob, LIMIT, 0).unwrap(), expected);
    assert_eq!(stream_unpack(&blob, 33, LIMIT).unwrap(), expected);
}

#[test]
fn no_single_bit_flip_yields_different_data() {
    let data = sample(600, 21, true);
    let blob = pack(&data, &opts(3, 256, 1)).unwrap();
    let table_descriptor = blob.len() - 5;

    let frame_descriptors: Vec<usize> = scan(&blob)
        .unwrap()
        .frames
        .iter()
        .map(|f| f.offset + 4)
        .collect();
    for byte in 0..blob.len() {
        for bit in 0..8 {
            let mut bad = blob.clone();
            bad[byte] ^= 1 << bit;
            let one_shot = unpack(&bad, LIMIT, 1);
            let streamed = stream_unpack(&bad, 50, LIMIT);
            // Bits the specs leave unused, which decoders must ignore: bit 4 of a frame
            // header descriptor (RFC 8878) and bits 0-1 of the seek table descriptor.
            if (frame_descriptors.contains(&byte) && bit == 4)
                || (byte == table_descriptor && bit < 2)
            {
                assert_eq!(one_shot.unwrap(), data);
                assert_eq!(streamed.unwrap(), data);
                continue;
            }
            for (name, r) in [("one-shot", one_shot), ("streamed", streamed)] {
                match r {
                    Err(CodecError::Corrupt(_))
                    | Err(CodecError::Truncated(_))
                    | Err(CodecError::ChecksumMismatch(_))
                    | Err(CodecError::SeekTable(_))
                    | Err(CodecError::SizeLimitExceeded { .. })
                    | Err(CodecError::WindowTooLarge { .. }) => {}
                    // Some entropy-coded bits are don't-cares: the same content comes out,
                    // and its checksum proves it. Different content never does.
                    Ok(ref v) if *v == data => {}
                    other => panic!(
                        "{name}: flip of bit {bit} in byte {byte} gave {:?}",
                        other.map(|v| v.len())
                    ),
                }
            }
        }
    }
}

#[test]
fn truncation_is_a_prefix_at_frame_ends_and_an_error_elsewhere() {
    let data = sample(900, 4, true);
    let blob = pack(&data, &opts(3, 300, 1)).unwrap();
    let layout = scan(&blob).unwrap();
    let frame_ends: Vec<usize> = layout
        .frames
        .iter()
        .map(|f| f.offset + f.compressed_size)
        .collect();
    for cut in 0..blob.len() {
        let r = unpack(&blob[..cut], LIMIT, 1);
        let s = stream_unpack(&blob[..cut], 7, LIMIT);
        if let Some(i) = frame_ends.iter().position(|&e| e == cut) {
            // Whole frames are a valid zstd stream; only the seek table tells they are few.
            let prefix = &data[..(i + 1) * 300];
            assert_eq!(r.unwrap(), prefix);
            assert_eq!(s.unwrap(), prefix);
            assert!(!inspect(&blob[..cut]).unwrap().has_seek_table);
        } else {
            assert!(
                matches!(r, Err(CodecError::Truncated(_))),
                "cut {cut}: {r:?}"
            );
            assert!(
                matches!(s, Err(CodecError::Truncated(_))),
                "cut {cut}: {s:?}"
            );
        }
    }
}

/// Rewrites the seek table of `blob` with `edit` applied to its entries.
fn with_table(blob: &[u8], edit: impl FnOnce(&mut Vec<[u32; 3]>)) -> Vec<u8> {
    let layout = scan(blob).unwrap();
    let last = layout.frames.last().unwrap();
    let data_end = last.offset + last.compressed_size;
    let n = layout.frames.len();
    let mut entries: Vec<[u32; 3]> = (0..n)
        .map(|i| {
            let at = data_end + 8 + 12 * i;
            let r = |k: usize| u32::from_le_bytes(blob[at + k..at + k + 4].try_into().unwrap());
            [r(0), r(4), r(8)]
        })
        .collect();
    edit(&mut entries);
    let mut out = blob[..data_end].to_vec();
    let table: Vec<crate::format::SeekEntry> = entries
        .iter()
        .map(|e| crate::format::SeekEntry {
            compressed_size: e[0],
            decompressed_size: e[1],
            checksum: Some(e[2]),
        })
        .collect();
    crate::format::write_seek_table(&table, true, &mut out);
    out
}

#[test]
fn lying_seek_tables_are_refused() {
    let data = sample(1000, 8, true);
    let blob = pack(&data, &opts(3, 250, 1)).unwrap();
    assert_eq!(with_table(&blob, |_| {}), blob);
    type Lie = Box<dyn Fn(&mut Vec<[u32; 3]>)>;
    let lies: Vec<Lie> = vec![
        Box::new(|e| e[1][1] += 1),
        Box::new(|e| e[1][1] -= 1),
        Box::new(|e| e[2][0] += 1),
        Box::new(|e| e[0][2] ^= 1),
        Box::new(|e| {
            e.remove(0);
        }),
        Box::new(|e| e.push([10, 10, 0])),
        Box::new(|e| e.clear()),
    ];
    for (i, lie) in lies.iter().enumerate() {
        let bad = with_table(&blob, lie);
        let r = unpack(&bad, LIMIT, 1);
        assert!(matches!(r, Err(CodecError::SeekTable(_))), "lie {i}: {r:?}");
        let s = stream_unpack(&bad, 64, LIMIT);
        assert!(
            matches!(s, Err(CodecError::SeekTable(_))),
            "lie {i} streamed: {s:?}"
        );
    }
}

/// A frame with no content size and `blocks` RLE blocks of 128 KiB: a few bytes per
/// 128 KiB of output.
fn rle_bomb(blocks: usize) -> Vec<u8> {
    let mut b = 0xFD2F_B528u32.to_le_bytes().to_vec();
    b.push(0x00); // no content size, not single segment, no checksum
    b.push(13 << 3); // window 8 MiB
    for i in 0..blocks {
        let last = u32::from(i + 1 == blocks);
        let h = last | (1 << 1) | ((128 * 1024) << 3);
        b.extend_from_slice(&h.to_le_bytes()[..3]);
        b.push(0xAB);
    }
    b
}

#[test]
fn bombs_stop_at_the_limit() {
    let bomb = rle_bomb(8192); // 1 GiB of output from 32 KiB
    assert!(bomb.len() < 40_000);
    let limit = 1 << 20;
    let r = unpack(&bomb, limit, 0);
    assert!(
        matches!(r, Err(CodecError::SizeLimitExceeded { .. })),
        "{r:?}"
    );
    let mut u = Unpacker::new(limit);
    let mut out = Vec::new();
    let r = u.write(&bomb, &mut out);
    assert!(
        matches!(r, Err(CodecError::SizeLimitExceeded { .. })),
        "{r:?}"
    );
    assert!(u.produced() <= limit + 1, "decoded {} bytes", u.produced());
    assert!(out.len() as u64 <= limit);
    // A small bomb within the limit decodes.
    let ok = unpack(&rle_bomb(4), limit, 0).unwrap();
    assert_eq!(ok, vec![0xAB; 4 * 128 * 1024]);
}

#[test]
fn claimed_sizes_are_checked_before_allocating() {
    let blob = pack(&vec![0u8; 4 << 20], &opts(3, 1 << 20, 0)).unwrap();
    let r = plan(&blob, 1 << 20);
    assert!(matches!(
        r,
        Err(CodecError::SizeLimitExceeded { needed, .. }) if needed == 4 << 20
    ));
    // A header that claims 2^40 bytes: refused from the header alone.
    let mut claim = 0xFD2F_B528u32.to_le_bytes().to_vec();
    claim.push(0xE0); // 8-byte content size, single segment
    claim.extend_from_slice(&(1u64 << 40).to_le_bytes());
    claim.extend_from_slice(&(1 | (1 << 1) | (16 << 3) as u32).to_le_bytes()[..3]);
    claim.push(0);
    let r = unpack(&claim, LIMIT, 0);
    assert!(
        matches!(r, Err(CodecError::SizeLimitExceeded { .. })),
        "{r:?}"
    );
    let r = stream_unpack(&claim, 3, LIMIT);
    assert!(
        matches!(r, Err(CodecError::SizeLimitExceeded { .. })),
        "{r:?}"
    );
}

#[test]
fn garbage_and_empty_input_get_typed_errors() {
    assert!(matches!(
        unpack(b"", LIMIT, 0),
        Err(CodecError::Truncated(_))
    ));
    assert!(matches!(
        stream_unpack(b"", 1, LIMIT),
        Err(CodecError::Truncated(_))
    ));
    assert!(matches!(
        unpack(b"\x28\xb5", LIMIT, 0),
        Err(CodecError::Truncated(_))
    ));
    assert!(matches!(
        unpack(b"hello world", LIMIT, 0),
        Err(CodecError::Corrupt(_))
    ));
    assert!(matches!(
        stream_unpack(b"hello world", 3, LIMIT),
        Err(CodecError::Corrupt(_))
    ));
    for seed in 0..200u64 {
        let junk = sample(64, seed, false);
        let mut framed = 0xFD2F_B528u32.to_le_bytes().to_vec();
        framed.extend(&junk);
        assert!(unpack(&framed, LIMIT, 0).is_err());
        assert!(stream_unpack(&framed, 9, LIMIT).is_err());
    }
}

#[test]
fn files_round_trip_in_parallel_and_streamed() {
    let dir = std::env::temp_dir().join(format!("fl-codec-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = sample(50_000, 31, true);
    let src = dir.join("src.bin");
    std::fs::write(&src, &data).unwrap();
    let o = opts(3, 4096, 2);
    let stats = crate::pack_file(&src, &dir.join("p.zst"), &o).unwrap();
    assert_eq!(stats.frames, 13);
    let blob = std::fs::read(dir.join("p.zst")).unwrap();
    assert_eq!(blob, pack(&data, &o).unwrap());
    for threads in [0, 1, 3] {
        let n = crate::unpack_file(&dir.join("p.zst"), &dir.join("out"), LIMIT, threads).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(std::fs::read(dir.join("out")).unwrap(), data);
    }
    // Over the limit: refused from the seek table before anything is written.
    let r = crate::unpack_file(&dir.join("p.zst"), &dir.join("big"), 1000, 0);
    assert!(
        matches!(r, Err(CodecError::SizeLimitExceeded { .. })),
        "{r:?}"
    );
    assert!(!dir.join("big").exists());
    // A lying table in a file: the batch check catches it.
    std::fs::write(dir.join("lie.zst"), with_table(&blob, |e| e[5][1] -= 1)).unwrap();
    let r = crate::unpack_file(&dir.join("lie.zst"), &dir.join("x"), LIMIT, 2);
    assert!(matches!(r, Err(CodecError::SeekTable(_))), "{r:?}");
    // Concatenated blobs and foreign zstd take the streaming path.
    let mut two = blob.clone();
    two.extend(&blob);
    std::fs::write(dir.join("two.zst"), &two).unwrap();
    crate::unpack_file(&dir.join("two.zst"), &dir.join("y"), LIMIT, 2).unwrap();
    assert_eq!(
        std::fs::read(dir.join("y")).unwrap(),
        [&data[..], &data[..]].concat()
    );
    std::fs::write(dir.join("f.zst"), foreign_frame(&data, false, false)).unwrap();
    crate::unpack_file(&dir.join("f.zst"), &dir.join("z"), LIMIT, 2).unwrap();
    assert_eq!(std::fs::read(dir.join("z")).unwrap(), data);
    // Truncated inside a frame: typed error, nothing left behind.
    std::fs::write(dir.join("cut.zst"), &blob[..blob.len() / 2]).unwrap();
    let r = crate::unpack_file(&dir.join("cut.zst"), &dir.join("w"), LIMIT, 2);
    assert!(matches!(r, Err(CodecError::Truncated(_))), "{r:?}");
    assert!(!dir.join("w").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn frame_count_is_bounded_while_walking() {
    // 9-byte empty frames, one more than the walker keeps track of.
    let empty: [u8; 9] = [0x28, 0xB5, 0x2F, 0xFD, 0x20, 0x00, 0x01, 0x00, 0x00];
    let n = crate::format::MAX_FRAMES + 1;
    let mut blob = Vec::with_capacity(n * 9);
    for _ in 0..n {
        blob.extend_from_slice(&empty);
    }
    assert_eq!(unpack(&blob[..9 * 3], LIMIT, 0).unwrap(), b"");
    let r = unpack(&blob, LIMIT, 0);
    // A limit reached, named as such: never a claim of corruption.
    assert!(
        matches!(&r, Err(CodecError::FrameLimit(m)) if m.contains("1048576")),
        "{r:?}"
    );
    // Streaming needs no per-frame bookkeeping without a seek table.
    assert_eq!(stream_unpack(&blob, 1 << 20, LIMIT).unwrap(), b"");
}

#[test]
fn unpacker_refuses_use_after_finish() {
    let blob = pack(b"abc", &opts(3, 10, 1)).unwrap();
    let mut u = Unpacker::new(LIMIT);
    let mut out = Vec::new();
    u.write(&blob, &mut out).unwrap();
    u.finish().unwrap();
    assert!(matches!(
        u.write(&blob, &mut out),
        Err(CodecError::InvalidArgument(_))
    ));
    assert!(matches!(u.finish(), Err(CodecError::InvalidArgument(_))));
}

/// Decodes `blob` fed in `piece`-byte writes, each drained in outputs of at most `bound`
/// bytes; returns the data and the largest output one call appended.
fn bounded_unpack(blob: &[u8], piece: usize, bound: usize) -> Result<(Vec<u8>, usize), CodecError> {
    let mut u = Unpacker::new(LIMIT);
    let (mut data, mut largest) = (Vec::new(), 0);
    for mut p in blob.chunks(piece.max(1)) {
        while !p.is_empty() {
            let mut out = Vec::new();
            let used = u.write_bounded(p, &mut out, bound)?;
            assert!(used > 0 || !out.is_empty(), "a call made no progress");
            largest = largest.max(out.len());
            data.extend_from_slice(&out);
            p = &p[used..];
        }
    }
    u.finish()?;
    Ok((data, largest))
}

#[test]
fn bounded_writes_never_exceed_their_bound() {
    use crate::decode::MIN_BOUNDED_OUTPUT;
    // A bomb of zeros in one write: 256 MiB from 8 KiB, behind ordinary data.
    let mut blob = pack(&sample(3 << 20, 7, false), &opts(3, 1 << 20, 1)).unwrap();
    blob.extend_from_slice(&rle_bomb(2048));
    for bound in [MIN_BOUNDED_OUTPUT, MIN_BOUNDED_OUTPUT + 1, 1 << 20, 4 << 20] {
        let (data, largest) = bounded_unpack(&blob, blob.len(), bound).unwrap();
        assert_eq!(data.len(), (3 << 20) + (256 << 20));
        assert!(
            largest <= bound,
            "bound {bound}: a call returned {largest} bytes"
        );
        assert!(
            largest + MIN_BOUNDED_OUTPUT > bound,
            "bound {bound}: pieces of {largest} only"
        );
        assert!(data[3 << 20..].iter().all(|&b| b == 0xAB));
        assert_eq!(data[..3 << 20], sample(3 << 20, 7, false));
    }
    // Any write size; ours, foreign frames, and a cut blob (the same error either way).
    let text = sample(5 << 20, 3, true);
    let ours = pack(&text, &opts(3, 1 << 20, 2)).unwrap();
    let foreign = foreign_frame(&text, true, false);
    let truncated = &ours[..ours.len() / 2];
    for blob in [truncated, &ours, &foreign] {
        let whole = stream_unpack(blob, blob.len(), LIMIT);
        for piece in [1, 4096, 1 << 20, blob.len()] {
            let bounded = bounded_unpack(blob, piece, MIN_BOUNDED_OUTPUT);
            match (&whole, bounded) {
                (Ok(w), Ok((data, largest))) => {
                    assert_eq!(&data, w);
                    assert!(largest <= MIN_BOUNDED_OUTPUT);
                }
                (Err(_), Err(_)) => {}
                (w, b) => panic!("piece {piece}: unbounded {w:?}, bounded {b:?}"),
            }
        }
    }
}

#[test]
fn bounded_writes_keep_the_limit_and_refuse_tiny_bounds() {
    let mut u = Unpacker::new(LIMIT);
    let mut out = Vec::new();
    assert!(matches!(
        u.write_bounded(b"", &mut out, 1000),
        Err(CodecError::InvalidArgument(_))
    ));
    // The total limit still stops a bomb, piece by piece.
    let bomb = rle_bomb(64); // 8 MiB
    let mut u = Unpacker::new(1 << 20);
    let mut rest = &bomb[..];
    let r = loop {
        out.clear();
        match u.write_bounded(rest, &mut out, 256 << 10) {
            Ok(used) => rest = &rest[used..],
            Err(e) => break e,
        }
        assert!(out.len() <= 256 << 10);
    };
    assert!(matches!(r, CodecError::SizeLimitExceeded { .. }), "{r:?}");
    assert!(u.produced() <= (1 << 20) + 1);
}

/// A writer that records the largest single write it was given.
#[derive(Default)]
struct WriteSizes {
    total: u64,
    largest: usize,
}

impl std::io::Write for WriteSizes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.total += buf.len() as u64;
        self.largest = self.largest.max(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn unpack_stream_hands_on_bounded_steps_whatever_the_expansion() {
    use crate::decode::{unpack_stream, DECODE_STEP};
    // 64 MiB from 2 KiB: one 1 MiB read of it must not become one 64 MiB buffer.
    let bomb = rle_bomb(512);
    let mut sink = WriteSizes::default();
    let n = unpack_stream(&mut &bomb[..], &mut sink, LIMIT).unwrap();
    assert_eq!(n, 64 << 20);
    assert_eq!(sink.total, 64 << 20);
    assert!(
        sink.largest <= DECODE_STEP,
        "one write of {} bytes",
        sink.largest
    );
    // And the limit still stops it.
    let r = unpack_stream(&mut &bomb[..], &mut WriteSizes::default(), 8 << 20);
    assert!(
        matches!(r, Err(CodecError::SizeLimitExceeded { .. })),
        "{r:?}"
    );
}

#[test]
fn one_shot_without_sizes_measures_first_and_allocates_the_result_only() {
    // Frames without sizes: measured in bounded steps, then decoded into an exact buffer.
    let text = sample(3 << 20, 5, true);
    let foreign = foreign_frame(&text, true, false);
    let p = plan(&foreign, LIMIT).unwrap();
    assert_eq!(p.output_size(), None);
    assert_eq!(p.measure().unwrap(), text.len());
    let mut out = vec![0u8; text.len()];
    p.decode_into(&mut out, 0).unwrap();
    assert_eq!(out, text);
    let mut short = vec![0u8; text.len() - 1];
    assert!(matches!(
        p.decode_into(&mut short, 0),
        Err(CodecError::InvalidArgument(_))
    ));
    let r = plan(&rle_bomb(8192), 1 << 20).unwrap().measure();
    assert!(
        matches!(r, Err(CodecError::SizeLimitExceeded { .. })),
        "{r:?}"
    );
}

#[test]
fn a_header_claiming_more_than_its_blocks_hold_is_refused_before_allocating() {
    // Claims 512 MiB (within the limit) but holds one 16-byte RLE block.
    let mut claim = 0xFD2F_B528u32.to_le_bytes().to_vec();
    claim.push(0xA0); // 4-byte content size, single segment
    claim.extend_from_slice(&(512u32 << 20).to_le_bytes());
    claim.extend_from_slice(&(1 | (1 << 1) | (16 << 3) as u32).to_le_bytes()[..3]);
    claim.push(7);
    let r = plan(&claim, LIMIT);
    assert!(
        matches!(&r, Err(CodecError::Corrupt(m)) if m.contains("claims")),
        "{r:?}"
    );
    assert!(stream_unpack(&claim, 5, LIMIT).is_err());
}

#[test]
fn files_with_huge_frames_stream_instead_of_holding_a_frame() {
    // A seek table may list frames of up to 4 GiB; this one lists a 64 MiB RLE frame.
    let dir = std::env::temp_dir().join(format!("fl-codec-huge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let frame = rle_bomb(512);
    let mut blob = frame.clone();
    crate::format::write_seek_table(
        &[crate::format::SeekEntry {
            compressed_size: frame.len() as u32,
            decompressed_size: 64 << 20,
            checksum: None,
        }],
        false,
        &mut blob,
    );
    assert_eq!(unpack(&blob, LIMIT, 0).unwrap().len(), 64 << 20);
    std::fs::write(dir.join("huge.zst"), &blob).unwrap();
    let n = crate::unpack_file(&dir.join("huge.zst"), &dir.join("out"), LIMIT, 2).unwrap();
    assert_eq!(n, 64 << 20);
    let out = std::fs::read(dir.join("out")).unwrap();
    assert!(out.len() == 64 << 20 && out.iter().all(|&b| b == 0xAB));
    // The streaming path still checks the table: a lie is caught.
    let mut lie = frame.clone();
    crate::format::write_seek_table(
        &[crate::format::SeekEntry {
            compressed_size: frame.len() as u32,
            decompressed_size: (64 << 20) - 1,
            checksum: None,
        }],
        false,
        &mut lie,
    );
    std::fs::write(dir.join("lie.zst"), &lie).unwrap();
    let r = crate::unpack_file(&dir.join("lie.zst"), &dir.join("x"), LIMIT, 2);
    assert!(matches!(r, Err(CodecError::SeekTable(_))), "{r:?}");
    assert!(!dir.join("x").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pack_and_unpack_agree_on_the_frame_limit() {
    use crate::format::{write_seek_table, SeekEntry, MAX_FRAMES};
    // Packing refuses a blob its own unpacking would refuse, before compressing.
    let one_too_many = vec![7u8; MAX_FRAMES + 1];
    let r = pack(&one_too_many, &opts(1, 1, 0));
    assert!(
        matches!(&r, Err(CodecError::FrameLimit(m)) if m.contains("1048576") && m.contains("chunk_size")),
        "{r:?}"
    );
    let mut p = Packer::new(opts(1, 64, 16)).unwrap();
    let mut out = Vec::new();
    p.write(&vec![0u8; MAX_FRAMES * 64], &mut out).unwrap();
    let before = out.len();
    let r = p.write(&[1], &mut out);
    assert!(matches!(r, Err(CodecError::FrameLimit(_))), "{r:?}");
    assert_eq!(
        out.len(),
        before,
        "nothing of the refused input was compressed"
    );
    // Refused whole and at once, however large the write.
    let mut p = Packer::new(opts(1, 1, 0)).unwrap();
    let r = p.write(&one_too_many, &mut Vec::new());
    assert!(matches!(r, Err(CodecError::FrameLimit(_))), "{r:?}");
    assert_eq!(p.stats().frames, 0);
    // A blob of exactly MAX_FRAMES frames (1-byte chunks) round-trips on every path.
    let data = sample(MAX_FRAMES, 11, false);
    let blob = pack(&data, &opts(1, 1, 0)).unwrap();
    assert_eq!(inspect(&blob).unwrap().frames, MAX_FRAMES as u64);
    assert_eq!(unpack(&blob, LIMIT, 0).unwrap(), data);
    assert_eq!(stream_unpack(&blob, 1 << 20, LIMIT).unwrap(), data);
    // One more frame (empty ones, 9 bytes each) behind a matching seek table: a limit
    // on every path, never a claim that the table is wrong.
    let empty: [u8; 9] = [0x28, 0xB5, 0x2F, 0xFD, 0x20, 0x00, 0x01, 0x00, 0x00];
    let entries = vec![
        SeekEntry {
            compressed_size: 9,
            decompressed_size: 0,
            checksum: None,
        };
        MAX_FRAMES + 1
    ];
    let mut big = empty.repeat(MAX_FRAMES + 1);
    write_seek_table(&entries, false, &mut big);
    let r = unpack(&big, LIMIT, 0);
    assert!(matches!(r, Err(CodecError::FrameLimit(_))), "{r:?}");
    let r = stream_unpack(&big, 1 << 20, LIMIT);
    assert!(matches!(r, Err(CodecError::FrameLimit(_))), "{r:?}");
    let dir = std::env::temp_dir().join(format!("fl-codec-frames-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("big.zst"), &big).unwrap();
    let r = crate::unpack_file(&dir.join("big.zst"), &dir.join("out"), LIMIT, 0);
    assert!(matches!(r, Err(CodecError::FrameLimit(_))), "{r:?}");
    std::fs::write(dir.join("one.bin"), &one_too_many).unwrap();
    let r = crate::pack_file(&dir.join("one.bin"), &dir.join("one.zst"), &opts(1, 1, 0));
    assert!(matches!(r, Err(CodecError::FrameLimit(_))), "{r:?}");
    assert!(!dir.join("one.zst").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
