//! The test application's protocol and data: one ASCII header line, then data.
//!
//! - `XFER <up> <down> <seed>`: the client sends `up` bytes and half-closes; the server sends
//!   `down` bytes, then the checksum of what it received as 16 hex digits, and closes.
//! - `ADDR`: the server answers with the local address the connection arrived at.
//! - `SINK`: the server counts bytes until EOF and answers with the count.
//! - `PING`: the server answers `P`.
//! - `RESET`: the server aborts the connection (RST).

use std::hash::Hasher;

/// A deterministic byte stream (xorshift64*), the same on both ends for a seed.
pub struct Stream(u64);

impl Stream {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A 64-bit checksum (SipHash with fixed keys: the same binary computes both ends).
#[derive(Default)]
pub struct Checksum(std::hash::DefaultHasher);

impl Checksum {
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.write(data);
    }

    /// The checksum as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0.finish())
    }
}

/// The checksum of `len` bytes of the stream for `seed`, written in chunks of `chunk`.
pub fn expected(seed: u64, len: usize, chunk: usize) -> String {
    let mut s = Stream::new(seed);
    let mut c = Checksum::default();
    let mut buf = vec![0u8; chunk];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk);
        s.fill(&mut buf[..n]);
        c.update(&buf[..n]);
        left -= n;
    }
    c.hex()
}

/// Chunk size for generating and hashing; both ends use it so the streams line up.
pub const CHUNK: usize = 64 * 1024;
