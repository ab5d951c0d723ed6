//! Deterministic randomness shared by the test files, so a failure reproduces.

/// xorshift64.
pub struct XorShift(pub u64);

#[allow(dead_code, reason = "each test file compiles this module; not every one uses all of it")]
impl XorShift {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// One of `xs`.
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    /// A random subset of `xs`, in random order, without repeats.
    pub fn subset<T: Copy>(&mut self, xs: &[T], max: usize) -> Vec<T> {
        let mut pool = xs.to_vec();
        let n = self.below(max + 1).min(pool.len());
        (0..n).map(|_| pool.remove(self.below(pool.len()))).collect()
    }
}
