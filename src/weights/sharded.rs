//! `model.safetensors.index.json`: which shard file holds each tensor of a sharded checkpoint.
//!
//! Only the `weight_map` (tensor name → shard file name) is used; `metadata` is optional.
//! Shard names must be plain file names in the checkpoint directory.

use super::safetensors_file::UniqueMap;
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// File name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A parsed shard index.
#[derive(Debug, Clone)]
pub(crate) struct ShardIndex {
    /// Tensor name → shard file name, in file order (names are unique).
    pub weight_map: Vec<(String, String)>,
    /// The distinct shard file names, sorted.
    pub shards: Vec<String>,
    /// `metadata.total_size` when present.
    pub total_size: Option<u64>,
}

/// Reads and checks the index at `path`.
pub(crate) fn read_index(path: &Path) -> Result<ShardIndex> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => Error::format(path, "not valid UTF-8"),
        _ => Error::io(path, e),
    })?;
    parse_index(path, &text)
}

/// Parses the index text `text` read from `path`.
pub(crate) fn parse_index(path: &Path, text: &str) -> Result<ShardIndex> {
    let bad = |msg: String| Error::format(path, msg);
    #[derive(serde::Deserialize)]
    struct Root {
        weight_map: Option<UniqueMap>,
        metadata: Option<Value>,
    }
    let root: Root = serde_json::from_str(text)
        .map_err(|e| bad(format!("not a valid index JSON object: {e}")))?;
    let total_size = root
        .metadata
        .as_ref()
        .and_then(|m| m.get("total_size"))
        .and_then(Value::as_u64);
    let map = root
        .weight_map
        .ok_or_else(|| bad("missing `weight_map`".into()))?;

    let mut pairs = Vec::with_capacity(map.0.len());
    let mut shards: Vec<String> = Vec::new();
    for (name, file) in map.0 {
        let file = file
            .as_str()
            .ok_or_else(|| {
                bad(format!(
                    "weight_map entry for tensor `{name}` is not a string: {file}"
                ))
            })?
            .to_string();
        check_shard_name(path, &name, &file)?;
        shards.push(file.clone());
        pairs.push((name, file));
    }
    shards.sort();
    shards.dedup();
    Ok(ShardIndex {
        weight_map: pairs,
        shards,
        total_size,
    })
}

/// A shard must be a plain file name: no directory part, no `..`.
fn check_shard_name(path: &Path, tensor: &str, file: &str) -> Result<()> {
    let plain = !file.is_empty()
        && !file.contains('/')
        && !file.contains('\\')
        && !file.contains("..")
        && !file.contains('\0')
        && !Path::new(file).is_absolute();
    if plain {
        Ok(())
    } else {
        Err(Error::format(
            path,
            format!("tensor `{tensor}` names shard `{file}`, which is not a plain file name in the checkpoint directory"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_weight_map_and_sorted_shards() {
        let t = r#"{"metadata": {"total_size": 12}, "weight_map": {"b": "s2.safetensors", "a": "s1.safetensors", "c": "s2.safetensors"}}"#;
        let ix = parse_index(Path::new("i.json"), t).unwrap();
        assert_eq!(ix.total_size, Some(12));
        assert_eq!(ix.shards, vec!["s1.safetensors", "s2.safetensors"]);
        assert_eq!(
            ix.weight_map[0],
            ("b".to_string(), "s2.safetensors".to_string())
        );
    }

    #[test]
    fn rejects_duplicates_paths_and_missing_map() {
        let p = Path::new("i.json");
        let dup = r#"{"weight_map": {"a": "s.safetensors", "a": "t.safetensors"}}"#;
        assert!(parse_index(p, dup)
            .unwrap_err()
            .to_string()
            .contains("duplicate key `a`"));
        for bad in ["../s.safetensors", "sub/s.safetensors", "..", ""] {
            let t = format!(r#"{{"weight_map": {{"a": "{bad}"}}}}"#);
            let e = parse_index(p, &t).unwrap_err().to_string();
            assert!(e.contains("not a plain file name"), "{bad}: {e}");
        }
        let e = parse_index(p, r#"{"metadata": {}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing `weight_map`"), "{e}");
        let e = parse_index(p, r#"[1]"#).unwrap_err().to_string();
        assert!(e.contains("i.json") && e.contains("JSON object"), "{e}");
    }
}
