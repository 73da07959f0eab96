//! Unit tests of the tensor codec: round trips per width, with and without a reference,
//! raw and compressed planes, seeking, and hostile blobs (truncated, lying, bombs, bit
//! flips, wrong references).

use crate::error::CodecError;
use crate::tensor::*;

/// Float-like bytes: `width`-byte little-endian values whose top byte (sign and exponent)
/// takes few values and whose low bytes are noise, as trained weights look.
fn floats(count: usize, width: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(count * width);
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut bytes = x.to_le_bytes()[..width].to_vec();
        bytes[width - 1] = ((x >> 56) as u8 & 0x80) | (0x3c + (x >> 60) as u8 % 3);
        out.extend_from_slice(&bytes);
    }
    out
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn opts(block_size: usize, threads: usize) -> TensorPackOptions {
    TensorPackOptions {
        level: 3,
        block_size,
        threads,
    }
}

fn float_segment(offset: usize, length: usize, width: u8) -> Segment {
    Segment {
        offset: offset as u64,
        length: length as u64,
        kind: SegmentKind::Float { width },
        reference_offset: None,
    }
}

const LIMIT: u64 = 1 << 30;
const BLOCK: usize = MIN_TENSOR_BLOCK_SIZE;

/// A model-like input: a text header, one tensor, a gap, another tensor, a tail.
fn model(width: usize, seed: u64) -> (Vec<u8>, Vec<Segment>) {
    let mut data = b"{\"header\": \"json-like text\"}".repeat(40);
    let first = data.len();
    data.extend(floats(3 * BLOCK / width + 7, width, seed));
    let second = data.len() + 100;
    data.extend(noise(100, seed + 1));
    data.extend(floats(1000, width, seed + 2));
    let tail = data.len();
    data.extend_from_slice(b"tail record");
    let segments = vec![
        float_segment(first, second - 100 - first, width as u8),
        float_segment(second, tail - second, width as u8),
    ];
    (data, segments)
}

/// Recomputes the index checksum after a test edits the index.
fn reseal(blob: &mut [u8]) {
    let segments = u32::from_le_bytes(blob[20..24].try_into().unwrap()) as usize;
    let blocks = u32::from_le_bytes(blob[24..28].try_into().unwrap()) as usize;
    let end = HEADER_SIZE + SEGMENT_RECORD_SIZE * segments + BLOCK_RECORD_SIZE * blocks;
    let sum = xxhash_rust::xxh64::xxh64(&blob[..end], 0);
    blob[end..end + 8].copy_from_slice(&sum.to_le_bytes());
}

#[test]
fn round_trips_every_width_and_opaque() {
    for width in [2usize, 4, 8] {
        let (data, segments) = model(width, width as u64);
        for threads in [1, 0] {
            let blob = pack_tensors(&data, &segments, None, &opts(BLOCK, threads)).unwrap();
            assert!(
                blob.len() < data.len(),
                "width {width}: {} >= {}",
                blob.len(),
                data.len()
            );
            let back = unpack_tensors(&blob, None, LIMIT, threads).unwrap();
            assert_eq!(back, data, "width {width}");
        }
    }
    // No segments at all: one opaque segment; and an empty input.
    let text = b"plain bytes ".repeat(20000);
    let blob = pack_tensors(&text, &[], None, &opts(BLOCK, 0)).unwrap();
    assert_eq!(unpack_tensors(&blob, None, LIMIT, 0).unwrap(), text);
    let blob = pack_tensors(&[], &[], None, &opts(BLOCK, 0)).unwrap();
    assert_eq!(
        unpack_tensors(&blob, None, LIMIT, 0).unwrap(),
        Vec::<u8>::new()
    );
}

#[test]
fn segments_are_sorted_merged_and_gaps_become_opaque() {
    let (data, mut segments) = model(4, 9);
    segments.reverse();
    let blob = pack_tensors(&data, &segments, None, &opts(BLOCK, 0)).unwrap();
    let plan = plan_tensors(&blob, LIMIT).unwrap();
    let kinds: Vec<SegmentKind> = plan.segments().iter().map(|s| s.kind).collect();
    let f = SegmentKind::Float { width: 4 };
    assert_eq!(
        kinds,
        [
            SegmentKind::Opaque,
            f,
            SegmentKind::Opaque,
            f,
            SegmentKind::Opaque
        ]
    );
    assert_eq!(plan.output_size(), data.len());
    // Blocks never cross a segment and hold at most one block size.
    for b in plan.blocks() {
        let s = plan.segments()[b.segment as usize];
        assert!(b.output_offset >= s.offset);
        assert!(b.output_offset + b.raw_length as u64 <= s.offset + s.length);
        assert!(b.raw_length as usize <= BLOCK);
    }
}

#[test]
fn float_planes_beat_plain_zstd_and_noise_planes_are_stored_raw() {
    let data = floats(4 * BLOCK / 4, 4, 5);
    let seg = [float_segment(0, data.len(), 4)];
    let blob = pack_tensors(&data, &seg, None, &opts(BLOCK, 0)).unwrap();
    let plain = crate::pack(&data, &crate::PackOptions::default()).unwrap();
    assert!(
        blob.len() < plain.len(),
        "planes {} vs zstd {}",
        blob.len(),
        plain.len()
    );
    let plan = plan_tensors(&blob, LIMIT).unwrap();
    for b in plan.blocks() {
        // The noise planes (0-2) are raw, the exponent plane (3) coded.
        assert_eq!(b.methods[..3], [1, 1, 1], "methods {:?}", b.methods);
        assert_ne!(b.methods[3], 1);
        assert!(b.plane_sizes[3] < b.raw_length / 4 / 2);
    }
    let random = noise(2 * BLOCK, 6);
    let blob = pack_tensors(&random, &[], None, &opts(BLOCK, 0)).unwrap();
    let plan = plan_tensors(&blob, LIMIT).unwrap();
    assert!(plan.blocks().iter().all(|b| b.methods[0] == 1));
    assert_eq!(unpack_tensors(&blob, None, LIMIT, 0).unwrap(), random);
}

/// A reference like the global model, and an update that changes a few low bits.
fn update_of(reference: &[u8], width: usize) -> Vec<u8> {
    let mut update = reference.to_vec();
    for (i, element) in update.chunks_exact_mut(width).enumerate() {
        if i % 3 == 0 {
            element[0] ^= (i % 7) as u8 + 1;
        }
    }
    update
}

#[test]
fn reference_round_trips_and_shrinks_the_blob() {
    for width in [2usize, 4, 8] {
        let (reference, segments) = model(width, 11);
        let update = update_of(&reference, width);
        let with_ref: Vec<Segment> = segments
            .iter()
            .map(|s| Segment {
                reference_offset: Some(s.offset),
                ..*s
            })
            .collect();
        let full = pack_tensors(&update, &segments, None, &opts(BLOCK, 0)).unwrap();
        let delta = pack_tensors(&update, &with_ref, Some(&reference), &opts(BLOCK, 0)).unwrap();
        assert!(
            delta.len() * 2 < full.len(),
            "width {width}: delta {} full {}",
            delta.len(),
            full.len()
        );
        let header = read_tensor_header(&delta).unwrap();
        assert!(header.uses_reference());
        assert_eq!(header.reference_size, reference.len() as u64);
        let back = unpack_tensors(&delta, Some(&reference), LIMIT, 0).unwrap();
        assert_eq!(back, update);
        // A blob without a reference ignores one given.
        assert_eq!(
            unpack_tensors(&full, Some(&reference), LIMIT, 0).unwrap(),
            update
        );
    }
}

#[test]
fn wrong_or_missing_reference_is_a_reference_mismatch() {
    let (reference, segments) = model(4, 12);
    let update = update_of(&reference, 4);
    let with_ref: Vec<Segment> = segments
        .iter()
        .map(|s| Segment {
            reference_offset: Some(s.offset),
            ..*s
        })
        .collect();
    let blob = pack_tensors(&update, &with_ref, Some(&reference), &opts(BLOCK, 0)).unwrap();
    let mismatch = |r: Option<&[u8]>| match unpack_tensors(&blob, r, LIMIT, 0) {
        Err(CodecError::ReferenceMismatch(m)) => m,
        other => panic!("expected ReferenceMismatch, got {other:?}"),
    };
    assert!(mismatch(None).contains("none was given"));
    assert!(mismatch(Some(&reference[1..])).contains("the one given has"));
    let mut other = reference.clone();
    let at = segments[1].offset as usize + 8;
    other[at] ^= 1;
    assert!(mismatch(Some(&other)).contains("other reference bytes"));
    let mut out = vec![0u8; update.len()];
    assert!(matches!(
        unpack_tensors_into(&blob, Some(&other), &mut out, 0),
        Err(CodecError::ReferenceMismatch(_))
    ));
}

#[test]
fn bad_segments_and_options_are_invalid_arguments() {
    let data = floats(1000, 4, 1);
    let cases: Vec<(Vec<Segment>, Option<&[u8]>)> = vec![
        (vec![float_segment(0, data.len() + 4, 4)], None),
        (vec![float_segment(0, 8, 4), float_segment(4, 8, 4)], None),
        (vec![float_segment(0, 6, 4)], None),
        (vec![float_segment(0, 6, 3)], None),
        (
            vec![Segment {
                reference_offset: Some(0),
                ..float_segment(0, 8, 4)
            }],
            None,
        ),
        (
            vec![Segment {
                reference_offset: Some(4),
                ..float_segment(0, 8, 4)
            }],
            Some(&data[..8]),
        ),
    ];
    for (segments, reference) in cases {
        let r = pack_tensors(&data, &segments, reference, &opts(BLOCK, 0));
        assert!(
            matches!(r, Err(CodecError::InvalidArgument(_))),
            "{segments:?}: {r:?}"
        );
    }
    for block_size in [
        0,
        1000,
        MIN_TENSOR_BLOCK_SIZE - 8,
        MAX_TENSOR_BLOCK_SIZE + 8,
        BLOCK + 4,
    ] {
        let r = pack_tensors(&data, &[], None, &opts(block_size, 0));
        assert!(
            matches!(r, Err(CodecError::InvalidArgument(_))),
            "{block_size}"
        );
    }
}

#[test]
fn blocks_decode_alone_from_the_index() {
    let (data, segments) = model(2, 13);
    let blob = pack_tensors(&data, &segments, None, &opts(BLOCK, 0)).unwrap();
    let plan = plan_tensors(&blob, LIMIT).unwrap();
    assert!(plan.blocks().len() > 3);
    for (i, b) in plan.blocks().iter().enumerate().rev() {
        let mut out = vec![0u8; b.raw_length as usize];
        plan.decode_block(i, None, &mut out).unwrap();
        let at = b.output_offset as usize;
        assert_eq!(out, data[at..at + out.len()]);
    }
    let mut small = vec![0u8; 3];
    assert!(matches!(
        plan.decode_block(0, None, &mut small),
        Err(CodecError::InvalidArgument(_))
    ));
}

#[test]
fn every_truncation_is_a_typed_error() {
    let (data, segments) = model(4, 14);
    let blob = pack_tensors(&data, &segments, None, &opts(BLOCK, 0)).unwrap();
    let step = (blob.len() / 300).max(1);
    for cut in (0..blob.len()).step_by(step).chain([blob.len() - 1]) {
        match unpack_tensors(&blob[..cut], None, LIMIT, 0) {
            Err(CodecError::Truncated(_)) => {}
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[test]
fn every_bit_flip_is_detected() {
    let (data, segments) = model(2, 15);
    let blob = pack_tensors(&data, &segments, None, &opts(BLOCK, 0)).unwrap();
    let step = (blob.len() / 500).max(1);
    for at in (0..blob.len()).step_by(step) {
        let mut bad = blob.clone();
        bad[at] ^= 0x10;
        let r = unpack_tensors(&bad, None, LIMIT, 0);
        assert!(
            matches!(
                r,
                Err(CodecError::Corrupt(_)
                    | CodecError::Truncated(_)
                    | CodecError::ChecksumMismatch(_)
                    | CodecError::SizeLimitExceeded { .. })
            ),
            "flip at {at}: {:?}",
            r.map(|v| v.len())
        );
    }
}

#[test]
fn a_flipped_raw_plane_is_a_checksum_mismatch() {
    let random = noise(BLOCK, 16);
    let mut blob = pack_tensors(&random, &[], None, &opts(BLOCK, 0)).unwrap();
    let last = blob.len() - 1;
    blob[last] ^= 1;
    assert!(matches!(
        unpack_tensors(&blob, None, LIMIT, 0),
        Err(CodecError::ChecksumMismatch(_))
    ));
}

#[test]
fn lying_sizes_are_refused_before_decoding() {
    let (data, segments) = model(4, 17);
    let blob = pack_tensors(&data, &segments, None, &opts(BLOCK, 0)).unwrap();
    let segs = u32::from_le_bytes(blob[20..24].try_into().unwrap()) as usize;
    let first_block = HEADER_SIZE + SEGMENT_RECORD_SIZE * segs;
    // A total that disagrees with the segments, resealed.
    let mut bad = blob.clone();
    bad[8..16].copy_from_slice(&(data.len() as u64 + 1).to_le_bytes());
    reseal(&mut bad);
    assert!(matches!(
        plan_tensors(&bad, LIMIT),
        Err(CodecError::Corrupt(_))
    ));
    // Without resealing, the index checksum catches it.
    bad[8..16].copy_from_slice(&(data.len() as u64 - 1).to_le_bytes());
    assert!(matches!(
        plan_tensors(&bad, LIMIT),
        Err(CodecError::ChecksumMismatch(_))
    ));
    // A block claiming more bytes than it has.
    let mut bad = blob.clone();
    let raw_len_at = first_block + 8;
    let claimed = u32::from_le_bytes(bad[raw_len_at..raw_len_at + 4].try_into().unwrap());
    bad[raw_len_at..raw_len_at + 4].copy_from_slice(&(claimed + 1).to_le_bytes());
    reseal(&mut bad);
    assert!(matches!(
        plan_tensors(&bad, LIMIT),
        Err(CodecError::Corrupt(_))
    ));
    // A plane size that runs past the end of the blob.
    let mut bad = blob.clone();
    let plane_at = first_block + 32;
    let size = u32::from_le_bytes(bad[plane_at..plane_at + 4].try_into().unwrap());
    bad[plane_at..plane_at + 4].copy_from_slice(&(size + 1).to_le_bytes());
    reseal(&mut bad);
    assert!(matches!(
        plan_tensors(&bad, LIMIT),
        Err(CodecError::Truncated(_) | CodecError::Corrupt(_))
    ));
    // Counts that need more index than the blob holds.
    let mut bad = blob.clone();
    bad[24..28].copy_from_slice(&(MAX_BLOCKS as u32).to_le_bytes());
    assert!(matches!(
        plan_tensors(&bad, LIMIT),
        Err(CodecError::Truncated(_))
    ));
    bad[24..28].copy_from_slice(&(MAX_BLOCKS as u32 + 1).to_le_bytes());
    assert!(matches!(
        plan_tensors(&bad, LIMIT),
        Err(CodecError::Corrupt(_))
    ));
    // Trailing bytes.
    let mut bad = blob.clone();
    bad.push(0);
    assert!(matches!(
        plan_tensors(&bad, LIMIT),
        Err(CodecError::Corrupt(_))
    ));
    // Another version, unknown flags.
    let mut bad = blob.clone();
    bad[4] = 2;
    assert!(
        matches!(plan_tensors(&bad, LIMIT), Err(CodecError::Corrupt(m)) if m.contains("version"))
    );
    let mut bad = blob;
    bad[6] = 4;
    assert!(matches!(
        plan_tensors(&bad, LIMIT),
        Err(CodecError::Corrupt(_))
    ));
}

#[test]
fn a_bomb_is_refused_before_allocating() {
    // 1 TiB of zeros claimed by a 48-byte header and nothing else.
    let zeros = vec![0u8; 4 * BLOCK];
    let blob = pack_tensors(&zeros, &[], None, &opts(BLOCK, 0)).unwrap();
    assert!(blob.len() < 1000);
    match unpack_tensors(&blob, None, zeros.len() as u64 - 1, 0) {
        Err(CodecError::SizeLimitExceeded { limit, needed }) => {
            assert_eq!(
                (limit, needed),
                (zeros.len() as u64 - 1, zeros.len() as u64)
            )
        }
        other => panic!("{other:?}"),
    }
    let mut header = blob[..HEADER_SIZE].to_vec();
    header[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        unpack_tensors(&header, None, LIMIT, 0),
        Err(CodecError::SizeLimitExceeded { needed, .. }) if needed == 1 << 40
    ));
    // An into-buffer decode is limited by its buffer.
    let mut out = vec![0u8; 10];
    assert!(matches!(
        unpack_tensors_into(&blob, None, &mut out, 0),
        Err(CodecError::SizeLimitExceeded { .. })
    ));
}

#[test]
fn not_a_tensor_blob() {
    assert!(!is_tensor_blob(b"PK\x03\x04"));
    assert!(matches!(
        unpack_tensors(b"PK\x03\x04 zip bytes", None, LIMIT, 0),
        Err(CodecError::Corrupt(_))
    ));
    assert!(matches!(
        unpack_tensors(b"FL", None, LIMIT, 0),
        Err(CodecError::Truncated(_))
    ));
    let zstd = crate::pack(b"hello", &crate::PackOptions::default()).unwrap();
    assert!(matches!(
        unpack_tensors(&zstd, None, LIMIT, 0),
        Err(CodecError::Corrupt(_))
    ));
}

#[test]
fn streams_round_trip_one_block_at_a_time() {
    let (reference, segments) = model(4, 21);
    let update = update_of(&reference, 4);
    let with_ref: Vec<Segment> = segments
        .iter()
        .map(|s| Segment {
            reference_offset: Some(s.offset),
            ..*s
        })
        .collect();
    for (blob, r) in [
        (
            pack_tensors(&update, &segments, None, &opts(BLOCK, 0)).unwrap(),
            None,
        ),
        (
            pack_tensors(&update, &with_ref, Some(&reference), &opts(BLOCK, 0)).unwrap(),
            Some(&reference[..]),
        ),
    ] {
        let mut out = Vec::new();
        let n = unpack_tensors_stream(&mut &blob[..], &mut out, r, LIMIT).unwrap();
        assert_eq!((n, out), (update.len() as u64, update.clone()));
        // Truncated anywhere, or with a byte more: typed errors.
        for cut in (0..blob.len()).step_by(blob.len() / 50) {
            let e = unpack_tensors_stream(&mut &blob[..cut], &mut Vec::new(), r, LIMIT);
            assert!(
                matches!(e, Err(CodecError::Truncated(_))),
                "cut {cut}: {e:?}"
            );
        }
        let mut longer = blob.clone();
        longer.push(7);
        let e = unpack_tensors_stream(&mut &longer[..], &mut Vec::new(), r, LIMIT);
        assert!(matches!(e, Err(CodecError::Corrupt(_))), "{e:?}");
        let e = unpack_tensors_stream(&mut &blob[..], &mut Vec::new(), r, update.len() as u64 - 1);
        assert!(
            matches!(e, Err(CodecError::SizeLimitExceeded { .. })),
            "{e:?}"
        );
    }
}

#[test]
fn a_stream_whose_header_lies_about_its_index_costs_only_its_bytes() {
    let blob = pack_tensors(b"small", &[], None, &opts(BLOCK, 0)).unwrap();
    let mut lying = blob[..HEADER_SIZE].to_vec();
    lying[24..28].copy_from_slice(&(MAX_BLOCKS as u32).to_le_bytes()); // a 256 MiB index
    let e = unpack_tensors_stream(&mut &lying[..], &mut Vec::new(), None, LIMIT);
    assert!(matches!(e, Err(CodecError::Truncated(_))), "{e:?}");
}

#[test]
fn a_file_is_replaced_only_by_a_whole_output() {
    let dir = std::env::temp_dir().join(format!("fl-tensor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (data, segments) = model(2, 22);
    let blob = pack_tensors(&data, &segments, None, &opts(BLOCK, 0)).unwrap();
    let (src, dst) = (dir.join("m.fltc"), dir.join("m.bin"));
    std::fs::write(&src, &blob).unwrap();
    assert_eq!(
        unpack_tensors_file(&src, &dst, None, LIMIT).unwrap(),
        data.len() as u64
    );
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    let mut bad = blob.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&src, &bad).unwrap();
    std::fs::write(&dst, b"old").unwrap();
    assert!(unpack_tensors_file(&src, &dst, None, LIMIT).is_err());
    assert_eq!(std::fs::read(&dst).unwrap(), b"old");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        2,
        "no partial file left"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
