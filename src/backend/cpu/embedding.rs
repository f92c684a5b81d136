//! Embedding gather: token ids → rows of a 2-D weight tensor, decoded to fp32.

use rayon::prelude::*;

use super::simd;
use crate::error::{Error, Result};
use crate::weights::view::TensorView;

/// Gathers rows of `w` (`[rows, d]`, bf16/f16/f32) for `ids` into `out` (`[ids.len(), d]`).
///
/// Errors: `w` not 2-D, `out` of the wrong length, or an id `≥ rows` (the message names the
/// tensor, the id and its position).
pub fn embedding(w: &TensorView, ids: &[u32], out: &mut [f32]) -> Result<()> {
    if w.shape.len() != 2 {
        return Err(Error::tensor(
            w.name,
            format!("embedding needs a 2-D tensor, shape is {:?}", w.shape),
        ));
    }
    let (rows, d) = (w.shape[0], w.shape[1]);
    let es = w.dtype.size();
    if w.data.len() != rows * d * es {
        return Err(Error::tensor(
            w.name,
            format!("{} bytes for shape {:?}", w.data.len(), w.shape),
        ));
    }
    if out.len() != ids.len() * d {
        return Err(Error::invalid(format!(
            "embedding `{}`: output holds {} values, {} ids × {d} need {}",
            w.name,
            out.len(),
            ids.len(),
            ids.len() * d
        )));
    }
    if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= rows) {
        return Err(Error::invalid(format!(
            "token id {id} at position {pos} is out of range for `{}` ({rows} rows)",
            w.name
        )));
    }
    if d == 0 {
        return Ok(());
    }
    out.par_chunks_mut(d)
        .zip(ids.par_iter())
        .with_min_len(16)
        .for_each(|(o, &id)| {
            let r = id as usize;
            simd::decode(w.dtype, &w.data[r * d * es..(r + 1) * d * es], o);
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{encode, rand_vec};
    use crate::weights::view::DType;

    #[test]
    fn gathers_rows_for_each_dtype_and_alignment() {
        let (rows, d) = (11, 37);
        let vals = rand_vec(9, rows * d, -2.0, 2.0);
        let ids = [3u32, 0, 10, 3, 7];
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for offset in [0, 1, 3] {
                let (bytes, stored) = encode(dtype, &vals, offset);
                let shape = [rows, d];
                let w = TensorView {
                    name: "wte",
                    dtype,
                    shape: &shape,
                    data: &bytes[offset..],
                };
                let mut out = vec![f32::NAN; ids.len() * d];
                embedding(&w, &ids, &mut out).unwrap();
                for (p, &id) in ids.iter().enumerate() {
                    for c in 0..d {
                        assert_eq!(
                            out[p * d + c] as f64,
                            stored[id as usize * d + c],
                            "{dtype:?} +{offset}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_ids_and_shapes() {
        let (bytes, _) = encode(DType::BF16, &[0.0; 8], 0);
        let shape = [4, 2];
        let w = TensorView {
            name: "wte",
            dtype: DType::BF16,
            shape: &shape,
            data: &bytes,
        };
        let mut out = vec![0f32; 4];
        let err = embedding(&w, &[1, 4], &mut out).unwrap_err().to_string();
        assert!(
            err.contains("token id 4") && err.contains("wte") && err.contains("position 1"),
            "{err}"
        );
        let err = embedding(&w, &[1], &mut out).unwrap_err().to_string();
        assert!(err.contains("wte"), "{err}");
        let flat = [8];
        let w1 = TensorView {
            name: "wte",
            dtype: DType::BF16,
            shape: &flat,
            data: &bytes,
        };
        assert!(embedding(&w1, &[0], &mut out[..2]).is_err());
        assert!(embedding(&w, &[], &mut []).is_ok());
    }
}
