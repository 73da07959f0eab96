//! The byte-plane transform of float blocks (docs/tensor-codec.md, "Decoding a block"),
//! and the XOR with a reference.

/// Splits `W`-byte little-endian elements into `W` byte planes of `n` bytes each, after
/// rotating each element left by one bit (the sign moves to bit 0, so the exponent fills
/// the top byte on its own): `dst[p * n + i]` = byte `p` of `rotl1(element i)`.
pub(crate) fn split_planes(src: &[u8], width: usize, dst: &mut [u8]) {
    match width {
        2 => split_rotated::<2>(src, dst),
        4 => split_rotated::<4>(src, dst),
        8 => split_rotated::<8>(src, dst),
        _ => unreachable!("float widths are checked"),
    }
}

fn split_rotated<const W: usize>(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / W;
    let bits = 8 * W as u32;
    let mask = if W == 8 { u64::MAX } else { (1u64 << bits) - 1 };
    let mut planes: Vec<&mut [u8]> = dst.chunks_exact_mut(n.max(1)).take(W).collect();
    for (i, element) in src.chunks_exact(W).enumerate() {
        let mut raw = [0u8; 8];
        raw[..W].copy_from_slice(element);
        let v = u64::from_le_bytes(raw);
        let r = ((v << 1) | (v >> (bits - 1))) & mask;
        let bytes = r.to_le_bytes();
        for (plane, byte) in planes.iter_mut().zip(bytes) {
            plane[i] = byte;
        }
    }
}

/// The inverse of [`split_planes`]: gathers byte `i` of each plane, rotates right by one.
pub(crate) fn merge_planes(planes: &[&[u8]], width: usize, dst: &mut [u8]) {
    match width {
        2 => merge_rotated::<2>(planes, dst),
        4 => merge_rotated::<4>(planes, dst),
        8 => merge_rotated::<8>(planes, dst),
        _ => unreachable!("float widths are checked"),
    }
}

fn merge_rotated<const W: usize>(planes: &[&[u8]], dst: &mut [u8]) {
    let bits = 8 * W as u32;
    let mask = if W == 8 { u64::MAX } else { (1u64 << bits) - 1 };
    let planes: [&[u8]; W] = std::array::from_fn(|p| planes[p]);
    for (i, element) in dst.chunks_exact_mut(W).enumerate() {
        let mut r = 0u64;
        for (p, plane) in planes.iter().enumerate() {
            r |= (plane[i] as u64) << (8 * p);
        }
        let v = ((r >> 1) | (r << (bits - 1))) & mask;
        element.copy_from_slice(&v.to_le_bytes()[..W]);
    }
}

pub(crate) fn xor_into(dst: &mut [u8], other: &[u8]) {
    for (d, o) in dst.iter_mut().zip(other) {
        *d ^= *o;
    }
}
