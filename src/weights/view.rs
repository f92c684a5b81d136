//! Borrowed views of tensors inside a memory-mapped checkpoint, and dtype conversion.
//!
//! A [`TensorView`] is the name, dtype, shape and the exact bytes of one tensor in the mapping;
//! nothing is copied. Bytes may sit at any alignment, so conversion reads little-endian words.

use half::{bf16, f16};

/// Element types dllm reads from checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// The safetensors spelling.
    pub fn name(self) -> &'static str {
        match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
        }
    }
}

/// One tensor inside a mapped checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    /// Exactly `numel() * dtype.size()` bytes, little-endian.
    pub data: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts elements `[start, start + out.len())` (flat index) to f32.
    pub fn to_f32_range(&self, start: usize, out: &mut [f32]) {
        let s = self.dtype.size();
        let bytes = &self.data[start * s..(start + out.len()) * s];
        convert_to_f32(self.dtype, bytes, out);
    }

    /// The whole tensor as f32 (use only for small tensors such as norm weights).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0f32; self.numel()];
        self.to_f32_range(0, &mut v);
        v
    }
}

/// Converts little-endian `bytes` of `dtype` into `out` (`out.len()` elements).
pub fn convert_to_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    match dtype {
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

/// Rounds f32 to bf16 (round to nearest even), as PyTorch does.
pub fn f32_to_bf16(x: f32) -> bf16 {
    bf16::from_f32(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_each_dtype_from_unaligned_bytes() {
        let vals = [1.5f32, -2.25, 0.0, 3.0e-3];
        let mut buf = vec![0u8]; // force odd alignment
        for v in vals {
            buf.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
        }
        let mut out = [0f32; 4];
        convert_to_f32(DType::BF16, &buf[1..], &mut out);
        for (o, v) in out.iter().zip(vals) {
            assert_eq!(*o, bf16::from_f32(v).to_f32());
        }
        let f16bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        convert_to_f32(DType::F16, &f16bytes, &mut out);
        assert_eq!(out[1], -2.25);
        let f32bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        convert_to_f32(DType::F32, &f32bytes, &mut out);
        assert_eq!(out, vals);
    }
}
