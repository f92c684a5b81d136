//! Building canvases: token sequences where mask tokens mark the positions to generate.

/// A generation canvas: `prompt` followed by `gen_len` mask tokens.
pub fn generation_canvas(prompt: &[u32], gen_len: usize, mask: u32) -> Vec<u32> {
    let mut c = Vec::with_capacity(prompt.len() + gen_len);
    c.extend_from_slice(prompt);
    c.resize(prompt.len() + gen_len, mask);
    c
}

/// An infill canvas: `prefix`, `n` mask tokens, then `suffix`.
pub fn infill_canvas(prefix: &[u32], n: usize, suffix: &[u32], mask: u32) -> Vec<u32> {
    let mut c = generation_canvas(prefix, n, mask);
    c.extend_from_slice(suffix);
    c
}

/// Positions of `canvas` holding `mask`, in increasing order.
pub fn masked_positions(canvas: &[u32], mask: u32) -> Vec<usize> {
    canvas
        .iter()
        .enumerate()
        .filter_map(|(i, &t)| (t == mask).then_some(i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_canvases() {
        assert_eq!(generation_canvas(&[5, 6], 3, 1), vec![5, 6, 1, 1, 1]);
        assert_eq!(generation_canvas(&[], 2, 9), vec![9, 9]);
        assert_eq!(infill_canvas(&[5], 2, &[7, 8], 1), vec![5, 1, 1, 7, 8]);
        assert_eq!(masked_positions(&[1, 5, 1, 1, 7, 1], 1), vec![0, 2, 3, 5]);
    }
}
