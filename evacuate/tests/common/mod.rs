//! Helpers shared by the volume integration tests.

/// Deterministic incompressible bytes (xorshift64), different for each `seed`.
pub fn pattern(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Restores `version` of `image` from `b` and checks it is `want`, bit for bit.
pub async fn restores_exactly<B: evacuate::volume::Backend>(
    b: &B,
    image: &str,
    version: u64,
    want: &[u8],
    dir: &std::path::Path,
) {
    let out = dir.join(format!("restored-{image}-{version}.img"));
    evacuate::volume::restore(b, image, version, &out, &|_| {})
        .await
        .unwrap_or_else(|e| panic!("restore {image} v{version}: {e}"));
    assert!(
        std::fs::read(&out).expect("read the restored image") == want,
        "{image} v{version} is not bit-exact"
    );
}
