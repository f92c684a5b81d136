//! A small safetensors reader and writer of the tests' own (independent of the engine's
//! loader), for the naive reference models and hand-written checkpoints.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone)]
pub struct Tensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor {
            dtype: "F32".into(),
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn values(&self) -> Vec<f64> {
        match self.dtype.as_str() {
            "BF16" => self
                .data
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
                .collect(),
            "F32" => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            other => panic!("test reader: dtype {other}"),
        }
    }
}

pub type Tensors = BTreeMap<String, Tensor>;

pub fn read_checkpoint(dir: &Path) -> Tensors {
    let mut out = Tensors::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        for (name, t) in header.as_object().unwrap() {
            if name == "__metadata__" {
                continue;
            }
            let off: Vec<usize> = t["data_offsets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            out.insert(
                name.clone(),
                Tensor {
                    dtype: t["dtype"].as_str().unwrap().to_string(),
                    shape: t["shape"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as usize)
                        .collect(),
                    data: data[off[0]..off[1]].to_vec(),
                },
            );
        }
    }
    out
}

/// Writes `config.json` and one `model.safetensors` holding `tensors`.
pub fn write_checkpoint(dir: &Path, config: &Value, tensors: &Tensors) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, t) in tensors {
        header.insert(
            name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [data.len(), data.len() + t.data.len()]}),
        );
        data.extend_from_slice(&t.data);
    }
    let mut h = serde_json::to_string(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(h.as_bytes());
    file.extend_from_slice(&data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
}

pub fn read_config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}
