//! Little-endian field access shared by the heartbeat and witness wire formats.
//!
//! Callers check the total length of a packet before reading fixed offsets, so these helpers take
//! offsets that are known to be in bounds; they still never panic: an out-of-range read yields zero,
//! which the callers' own length checks make unreachable.

/// Reads a little-endian `u64` at `at`.
pub(crate) fn get_u64(buf: &[u8], at: usize) -> u64 {
    buf.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes)
}

/// Writes a little-endian `u64` at `at`. `buf` must be long enough (callers size it).
pub(crate) fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    if let Some(s) = buf.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_out_of_range() {
        let mut b = [0u8; 10];
        put_u64(&mut b, 2, 0x0102_0304_0506_0708);
        assert_eq!(get_u64(&b, 2), 0x0102_0304_0506_0708);
        assert_eq!(get_u64(&b, 5), 0); // out of range reads zero
        put_u64(&mut b, 9, 1); // out of range writes nothing
    }
}
