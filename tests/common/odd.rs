//! Shared by the tests that feed odd inputs (`mutated_inputs`, `odd_parameters`,
//! `c_abi_odd_calls`): a seeded xorshift generator and the message of a caught panic.

/// xorshift64: deterministic choices for the odd-input tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as usize
    }

    pub fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.next() % xs.len()].clone()
    }

    /// Overwrites 1–3 random bytes of `b[range]` with characters that keep JSON text
    /// plausible (digits, signs, quotes, brackets, separators, escapes).
    pub fn edit(&mut self, b: &mut [u8], range: std::ops::Range<usize>) {
        const CHARS: &[u8] = b"0123456789-\"{}[],:.eE \\uFBI";
        for _ in 0..1 + self.next() % 3 {
            let i = range.start + self.next() % range.len();
            b[i] = CHARS[self.next() % CHARS.len()];
        }
    }
}

/// The message of a caught panic (empty when it carried none).
pub fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}
