//! Resources parsed from YAML with the real schema, shared by the test files.

use std::path::Path;

use sinew_model::Resource;

/// Every document of `yaml`, validated; a rejected one fails the test with its errors.
pub fn resources(yaml: &str) -> Vec<Resource> {
    sinew_model::parse_file(Path::new("test.yaml"), yaml)
        .unwrap_or_else(|e| panic!("YAML: {e}"))
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("rejected: {:?}", e.errors)))
        .collect()
}

/// A Namespace document.
#[allow(dead_code, reason = "each test file compiles this module; not every one uses all of it")]
pub fn namespace(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n---\n"
    )
}

/// Deterministic xorshift64*, so a failure reproduces.
#[allow(dead_code, reason = "each test file compiles this module; not every one uses all of it")]
pub struct Rng(pub u64);

#[allow(dead_code, reason = "each test file compiles this module; not every one uses all of it")]
impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// One of `items`.
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    /// A flow list of 1-2 quoted items, or `None` (field absent) half the time.
    pub fn list(&mut self, items: &[&str]) -> Option<String> {
        (self.below(2) == 0).then(|| {
            let n = 1 + self.below(2);
            let picked: Vec<String> = (0..n).map(|_| format!("\"{}\"", self.pick(items))).collect();
            format!("[{}]", picked.join(", "))
        })
    }
}
