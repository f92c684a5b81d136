//! One safetensors file: memory-mapped, its header parsed and every entry checked.
//!
//! Layout: an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON (an object
//! mapping tensor names to `{dtype, shape, data_offsets}`, plus an optional `__metadata__`),
//! then the data section; offsets are relative to the start of the data section. Every
//! malformation gives an [`Error`] naming the file and, where relevant, the tensor.

use super::view::DType;
use crate::error::{Error, Result};
use memmap2::Mmap;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The dtype of a stored tensor: one dllm computes with, or another safetensors dtype whose
/// element size is known (the file still opens; using that tensor is an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoredDType {
    Supported(DType),
    Other(&'static str),
}

impl StoredDType {
    /// Parses a safetensors dtype string; `None` when the spelling is unknown.
    pub(crate) fn parse(s: &str) -> Option<(StoredDType, usize)> {
        let supported = match s {
            "BF16" => Some(DType::BF16),
            "F16" => Some(DType::F16),
            "F32" => Some(DType::F32),
            _ => None,
        };
        if let Some(d) = supported {
            return Some((StoredDType::Supported(d), d.size()));
        }
        const OTHERS: [(&str, usize); 12] = [
            ("F64", 8),
            ("I64", 8),
            ("U64", 8),
            ("I32", 4),
            ("U32", 4),
            ("I16", 2),
            ("U16", 2),
            ("I8", 1),
            ("U8", 1),
            ("BOOL", 1),
            ("F8_E4M3", 1),
            ("F8_E5M2", 1),
        ];
        OTHERS
            .iter()
            .find(|(name, _)| *name == s)
            .map(|&(name, size)| (StoredDType::Other(name), size))
    }

    /// The safetensors spelling.
    pub(crate) fn name(self) -> &'static str {
        match self {
            StoredDType::Supported(d) => d.name(),
            StoredDType::Other(n) => n,
        }
    }
}

/// One checked header entry; `start..end` are absolute byte offsets into the file.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub name: String,
    pub dtype: StoredDType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// A mapped safetensors file and its checked entries (in header order).
pub(crate) struct SafetensorsFile {
    pub path: PathBuf,
    pub mmap: Mmap,
    pub entries: Vec<Entry>,
}

impl SafetensorsFile {
    /// Maps `path` read-only and parses its header.
    pub(crate) fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::format(
                path,
                format!("file is {len} bytes, shorter than the 8-byte safetensors header length"),
            ));
        }
        // SAFETY: the mapping is read-only; like every mmap-based loader we assume the
        // checkpoint is not truncated or rewritten by another process while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let entries = parse(path, &mmap)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            entries,
        })
    }
}

/// Parses and checks the header of the safetensors bytes `bytes` (read from `path`).
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<Entry>> {
    let fmt_err = |msg: String| Error::format(path, msg);
    if bytes.len() < 8 {
        return Err(fmt_err(format!(
            "file is {} bytes, shorter than the 8-byte safetensors header length",
            bytes.len()
        )));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    let available = (bytes.len() - 8) as u64;
    if header_len > available {
        return Err(fmt_err(format!(
            "header length {header_len} runs beyond the end of the file ({available} bytes after the length field)"
        )));
    }
    let data_start = 8 + header_len as usize;
    let header = std::str::from_utf8(&bytes[8..data_start])
        .map_err(|e| fmt_err(format!("header is not valid UTF-8: {e}")))?;
    let map: UniqueMap = serde_json::from_str(header)
        .map_err(|e| fmt_err(format!("header is not a valid JSON object: {e}")))?;
    let data_len = bytes.len() - data_start;

    let mut entries = Vec::with_capacity(map.0.len());
    for (name, value) in map.0 {
        if name == "__metadata__" {
            continue;
        }
        entries.push(parse_entry(path, &name, &value, data_start, data_len)?);
    }
    check_overlaps(path, &entries)?;
    Ok(entries)
}

fn parse_entry(
    path: &Path,
    name: &str,
    value: &Value,
    data_start: usize,
    data_len: usize,
) -> Result<Entry> {
    let bad = |msg: String| Error::format(path, format!("tensor `{name}`: {msg}"));
    let obj = value
        .as_object()
        .ok_or_else(|| bad(format!("entry is not a JSON object: {value}")))?;

    let dtype_str = match obj.get("dtype") {
        None => return Err(bad("missing `dtype`".into())),
        Some(v) => v
            .as_str()
            .ok_or_else(|| bad(format!("`dtype` is not a string: {v}")))?,
    };
    let (dtype, elem_size) = StoredDType::parse(dtype_str).ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: tensor `{name}` has unknown dtype `{dtype_str}`",
            path.display()
        ))
    })?;

    let shape: Vec<usize> = match obj.get("shape") {
        None => return Err(bad("missing `shape`".into())),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(as_usize).collect::<Option<Vec<_>>>())
            .ok_or_else(|| {
                bad(format!(
                    "`shape` is not a list of non-negative integers: {v}"
                ))
            })?,
    };

    let offsets: Vec<usize> = match obj.get("data_offsets") {
        None => return Err(bad("missing `data_offsets`".into())),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(as_usize).collect::<Option<Vec<_>>>())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| {
                bad(format!(
                    "`data_offsets` is not a pair of non-negative integers: {v}"
                ))
            })?,
    };
    let (begin, end) = (offsets[0], offsets[1]);
    if begin > end {
        return Err(bad(format!("data_offsets [{begin}, {end}] are reversed")));
    }
    if end > data_len {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] run beyond the data section ({data_len} bytes)"
        )));
    }
    let expected = shape
        .iter()
        .try_fold(elem_size, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if end - begin != expected {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] span {} bytes but shape {shape:?} of {} needs {expected}",
            end - begin,
            dtype.name()
        )));
    }
    Ok(Entry {
        name: name.to_string(),
        dtype,
        shape,
        start: data_start + begin,
        end: data_start + end,
    })
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

/// Two non-empty tensors may not share bytes.
fn check_overlaps(path: &Path, entries: &[Entry]) -> Result<()> {
    let mut ranges: Vec<&Entry> = entries.iter().filter(|e| e.end > e.start).collect();
    ranges.sort_by_key(|e| (e.start, e.end));
    for pair in ranges.windows(2) {
        if pair[1].start < pair[0].end {
            return Err(Error::format(
                path,
                format!(
                    "tensors `{}` and `{}` overlap in the data section",
                    pair[0].name, pair[1].name
                ),
            ));
        }
    }
    Ok(())
}

/// A JSON object read in order, rejecting duplicate keys (serde_json would keep the last).
pub(crate) struct UniqueMap(pub Vec<(String, Value)>);

impl<'de> Deserialize<'de> for UniqueMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<UniqueMap, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
                    }
                    let value: Value = map.next_value()?;
                    out.push((key, value));
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(7u8, data));
        v
    }

    #[test]
    fn absolute_offsets_and_zero_sized_tensors() {
        let h = json!({"__metadata__": {"format": "pt"},
                       "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "e": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [8, 8]},
                       "s": {"dtype": "F16", "shape": [], "data_offsets": [8, 10]}})
        .to_string();
        let bytes = file(&h, 10);
        let es = parse(Path::new("x.safetensors"), &bytes).unwrap();
        let hl = 8 + h.len();
        let a = es.iter().find(|e| e.name == "a").unwrap();
        assert_eq!((a.start, a.end), (hl, hl + 8));
        let e = es.iter().find(|e| e.name == "e").unwrap();
        assert_eq!((e.start, e.end), (hl + 8, hl + 8));
        let s = es.iter().find(|e| e.name == "s").unwrap();
        assert_eq!(s.shape, Vec::<usize>::new());
        assert_eq!(s.end - s.start, 2);
    }

    #[test]
    fn duplicate_top_level_keys_are_rejected() {
        let r: std::result::Result<UniqueMap, _> =
            serde_json::from_str(r#"{"a": 1, "b": 2, "a": 3}"#);
        assert!(r.err().unwrap().to_string().contains("duplicate key `a`"));
        let ok: UniqueMap = serde_json::from_str(r#"{"a": {"x": 1}, "b": 2}"#).unwrap();
        assert_eq!(ok.0.len(), 2);
        assert_eq!(ok.0[0].0, "a");
    }

    #[test]
    fn dtype_table() {
        assert_eq!(
            StoredDType::parse("BF16"),
            Some((StoredDType::Supported(DType::BF16), 2))
        );
        assert_eq!(
            StoredDType::parse("I64"),
            Some((StoredDType::Other("I64"), 8))
        );
        assert_eq!(StoredDType::parse("bf16"), None);
    }
}
