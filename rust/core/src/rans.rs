//! Order-0 rANS for byte planes (method 2 of the tensor format, docs/tensor-codec.md):
//! static symbol frequencies scaled to 2^12, eight interleaved 32-bit states, 16-bit
//! renormalisation. It codes an exponent plane to within a few tenths of a percent of its
//! order-0 entropy, where zstd's match finder loses about 10 %.

use crate::error::{CodecError, Result};

/// Frequencies sum to 2^PROB_BITS.
const PROB_BITS: u32 = 12;
const PROB_SCALE: u32 = 1 << PROB_BITS;
/// The lower bound of a state; states live in [RANS_L, 2^32).
const RANS_L: u32 = 1 << 16;
const STATES: usize = 8;

fn corrupt(m: &str) -> CodecError {
    CodecError::Corrupt(format!("rANS plane: {m}"))
}

/// Scales the symbol counts of `data` to frequencies summing to `PROB_SCALE`, every
/// present symbol at least 1.
fn frequencies(data: &[u8]) -> [u32; 256] {
    let mut counts = [0u64; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let total = data.len() as u64;
    let mut freq = [0u32; 256];
    for s in 0..256 {
        if counts[s] > 0 {
            freq[s] = ((counts[s] * PROB_SCALE as u64 / total) as u32).max(1);
        }
    }
    let mut sum: u32 = freq.iter().sum();
    while sum != PROB_SCALE {
        // Adjust the symbol whose frequency can best absorb the change.
        let s = (0..256)
            .filter(|&s| freq[s] > 1 || (sum < PROB_SCALE && freq[s] > 0))
            .max_by_key(|&s| counts[s])
            .expect("some symbol is present");
        if sum > PROB_SCALE {
            let take = (sum - PROB_SCALE).min(freq[s] - 1);
            freq[s] -= take;
            sum -= take;
        } else {
            freq[s] += PROB_SCALE - sum;
            sum = PROB_SCALE;
        }
    }
    freq
}

/// Appends the rANS coding of `data` (at least one byte) to `out`:
/// `u16 k`, `k x (u8 symbol, u16 frequency)` in increasing symbol order, eight `u32` final
/// states, then the 16-bit words in the order the decoder reads them.
pub fn encode(data: &[u8], out: &mut Vec<u8>) {
    debug_assert!(!data.is_empty());
    let freq = frequencies(data);
    let mut cum = [0u32; 256];
    let mut acc = 0;
    for s in 0..256 {
        cum[s] = acc;
        acc += freq[s];
    }
    let present: Vec<usize> = (0..256).filter(|&s| freq[s] > 0).collect();
    out.extend_from_slice(&(present.len() as u16).to_le_bytes());
    for &s in &present {
        out.push(s as u8);
        out.extend_from_slice(&(freq[s] as u16).to_le_bytes());
    }
    let mut states = [RANS_L; STATES];
    let mut words: Vec<u16> = Vec::with_capacity(data.len() / 2 + 16);
    for (i, &b) in data.iter().enumerate().rev() {
        let x = &mut states[i % STATES];
        let f = freq[b as usize];
        // In u64: for a symbol of frequency 4096 the bound is 2^32.
        let x_max = (((RANS_L >> PROB_BITS) as u64) << 16) * f as u64;
        if *x as u64 >= x_max {
            words.push(*x as u16);
            *x >>= 16;
        }
        *x = ((*x / f) << PROB_BITS) + (*x % f) + cum[b as usize];
    }
    for x in states {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.reserve(words.len() * 2);
    for w in words.iter().rev() {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Decodes a plane coded by [`encode`] into `out` (its exact length), checking the table,
/// that every word is used and that the states end where the encoder started.
pub fn decode(src: &[u8], out: &mut [u8]) -> Result<()> {
    if src.len() < 2 {
        return Err(corrupt("shorter than its table"));
    }
    let k = u16::from_le_bytes([src[0], src[1]]) as usize;
    let table_end = 2 + 3 * k;
    let states_end = table_end + 4 * STATES;
    if k == 0 || k > 256 || src.len() < states_end {
        return Err(corrupt("its symbol table does not fit"));
    }
    // One entry per slot: (symbol, frequency, slot - cumulative), so each decoded symbol
    // costs one table lookup.
    // A fixed-size table, so the masked index needs no bounds check.
    let mut table = Box::new([(0u8, 0u16, 0u16); PROB_SCALE as usize]);
    let mut acc = 0u32;
    let mut last: Option<u8> = None;
    for i in 0..k {
        let at = 2 + 3 * i;
        let s = src[at];
        let f = u16::from_le_bytes([src[at + 1], src[at + 2]]) as u32;
        if last.is_some_and(|l| s <= l) || f == 0 || acc + f > PROB_SCALE {
            return Err(corrupt(
                "its symbol table is not increasing or does not sum to 4096",
            ));
        }
        last = Some(s);
        for (bias, entry) in table[acc as usize..(acc + f) as usize]
            .iter_mut()
            .enumerate()
        {
            *entry = (s, f as u16, bias as u16);
        }
        acc += f;
    }
    if acc != PROB_SCALE {
        return Err(corrupt("its frequencies do not sum to 4096"));
    }
    let mut states = [0u32; STATES];
    for (j, x) in states.iter_mut().enumerate() {
        let at = table_end + 4 * j;
        *x = u32::from_le_bytes(src[at..at + 4].try_into().expect("4 bytes"));
        if *x < RANS_L {
            return Err(corrupt("a state is out of range"));
        }
    }
    let words = &src[states_end..];
    if words.len() % 2 != 0 {
        return Err(corrupt("an odd number of word bytes"));
    }
    let mut next = 0usize;
    let mask = PROB_SCALE - 1;
    let mut chunks = out.chunks_exact_mut(STATES);
    for q in &mut chunks {
        // Each state reads at most one word per symbol: with that many words left, the
        // round needs no bounds checks of its own.
        if next + 2 * STATES <= words.len() {
            for (x, o) in states.iter_mut().zip(q.iter_mut()) {
                let (s, f, bias) = table[(*x & mask) as usize];
                *o = s;
                // f * (x >> 12) + bias < f * 2^20 <= 2^32: no overflow.
                let y = f as u32 * (*x >> PROB_BITS) + bias as u32;
                // Branch-free renormalisation: whether a word is read is data, not
                // something a branch predictor can guess.
                let read = y < RANS_L;
                let w = u16::from_le_bytes([words[next], words[next + 1]]) as u32;
                *x = if read { (y << 16) | w } else { y };
                next += 2 * read as usize;
            }
        } else {
            for (x, o) in states.iter_mut().zip(q.iter_mut()) {
                decode_checked(&table, words, &mut next, x, o)?;
            }
        }
    }
    for (x, o) in states.iter_mut().zip(chunks.into_remainder()) {
        decode_checked(&table, words, &mut next, x, o)?;
    }
    if next != words.len() || states.iter().any(|&x| x != RANS_L) {
        return Err(corrupt("its words or final states do not match its length"));
    }
    Ok(())
}

type Table = [(u8, u16, u16); PROB_SCALE as usize];

fn decode_checked(
    table: &Table,
    words: &[u8],
    next: &mut usize,
    x: &mut u32,
    o: &mut u8,
) -> Result<()> {
    let (s, f, bias) = table[(*x & (PROB_SCALE - 1)) as usize];
    *o = s;
    let mut y = f as u32 * (*x >> PROB_BITS) + bias as u32;
    if y < RANS_L {
        let Some(w) = words.get(*next..*next + 2) else {
            return Err(corrupt("its words end early"));
        };
        y = (y << 16) | u16::from_le_bytes([w[0], w[1]]) as u32;
        *next += 2;
    }
    *x = y;
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;

    fn skewed(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (120 + (x % 7) * (x % 5) / 3) as u8
            })
            .collect()
    }

    #[test]
    fn round_trips_and_nears_the_entropy() {
        for n in [1usize, 2, 3, 4, 5, 17, 1000, 300_000] {
            let data = skewed(n, n as u64);
            let mut coded = Vec::new();
            encode(&data, &mut coded);
            let mut back = vec![0u8; n];
            decode(&coded, &mut back).unwrap();
            assert_eq!(back, data, "n = {n}");
        }
        let data = skewed(300_000, 3);
        let mut counts = [0f64; 256];
        data.iter().for_each(|&b| counts[b as usize] += 1.0);
        let n = data.len() as f64;
        let bits: f64 = counts
            .iter()
            .filter(|&&c| c > 0.0)
            .map(|&c| -c * (c / n).log2())
            .sum();
        let mut coded = Vec::new();
        encode(&data, &mut coded);
        assert!(
            (coded.len() as f64) < bits / 8.0 * 1.01 + 200.0,
            "{} vs {}",
            coded.len(),
            bits / 8.0
        );
        // One symbol only, and all 256.
        for data in [vec![7u8; 5000], (0..=255u8).cycle().take(10_000).collect()] {
            let mut coded = Vec::new();
            encode(&data, &mut coded);
            let mut back = vec![0u8; data.len()];
            decode(&coded, &mut back).unwrap();
            assert_eq!(back, data);
        }
    }

    #[test]
    fn damage_is_an_error_or_detected_length_mismatch() {
        let data = skewed(5000, 9);
        let mut coded = Vec::new();
        encode(&data, &mut coded);
        let mut out = vec![0u8; data.len()];
        for cut in [0, 1, 2, 10, coded.len() - 1] {
            assert!(decode(&coded[..cut], &mut out).is_err(), "cut {cut}");
        }
        let mut longer = vec![0u8; data.len() + 1];
        assert!(decode(&coded, &mut longer).is_err());
        let mut bad = coded.clone();
        bad[3] ^= 0xff; // a frequency
        assert!(decode(&bad, &mut out).is_err());
    }
}

#[cfg(test)]
mod speed {
    #[test]
    #[ignore = "timing only: cargo test --release -- --ignored rans_speed --nocapture"]
    fn rans_speed() {
        let mut x = 5u64;
        let data: Vec<u8> = (0..(64usize << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (120 + (x % 7) * (x % 5) / 3) as u8
            })
            .collect();
        let mut coded = Vec::new();
        let t = std::time::Instant::now();
        for chunk in data.chunks(256 << 10) {
            super::encode(chunk, &mut coded);
        }
        let enc = t.elapsed();
        let mut out = vec![0u8; 256 << 10];
        let mut blobs = Vec::new();
        for chunk in data.chunks(256 << 10) {
            let mut c = Vec::new();
            super::encode(chunk, &mut c);
            blobs.push(c);
        }
        let t = std::time::Instant::now();
        for b in &blobs {
            super::decode(b, &mut out).unwrap();
        }
        let dec = t.elapsed();
        println!(
            "encode {:.0} MB/s decode {:.0} MB/s",
            data.len() as f64 / enc.as_secs_f64() / 1e6,
            data.len() as f64 / dec.as_secs_f64() / 1e6
        );
    }
}
