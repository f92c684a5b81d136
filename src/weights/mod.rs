//! Weights: memory-mapped safetensors (single file or sharded), validated, zero-copy.
//!
//! [`WeightStore::open`] maps every shard read-only, checks every header (`safetensors_file`)
//! and the shard index (`sharded`), and then hands out [`TensorView`]s that borrow the
//! mappings: tensor bytes are never copied.

mod safetensors_file;
mod sharded;
pub mod view;

pub use sharded::INDEX_FILE;
pub use view::{DType, TensorView};

use crate::error::{Error, Result};
use safetensors_file::{SafetensorsFile, StoredDType};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// A tensor a model expects: its name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: Vec<usize>) -> Self {
        TensorSpec {
            name: name.into(),
            shape,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What [`WeightStore::validate`] found besides the expected tensors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationReport {
    /// Number of expected tensors checked (all present with the right shape and dtype).
    pub checked: usize,
    /// Elements in the expected tensors.
    pub parameters: usize,
    /// Tensors in the checkpoint that nobody asked for, sorted (not an error).
    pub unexpected: Vec<String>,
}

struct Slot {
    shard: usize,
    dtype: StoredDType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened checkpoint: the mapped shard files and an index of their tensors.
pub struct WeightStore {
    dir: PathBuf,
    shards: Vec<SafetensorsFile>,
    shard_paths: Vec<PathBuf>,
    tensors: BTreeMap<String, Slot>,
    index_total_size: Option<u64>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("dir", &self.dir)
            .field("shards", &self.shard_paths)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl WeightStore {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` if present (sharded), else
    /// `model.safetensors`, else the only `*.safetensors` file. `dir` may also be the path of
    /// one `.safetensors` file.
    pub fn open(dir: &Path) -> Result<WeightStore> {
        if dir.is_file() {
            let parent = dir.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Self::open_single(parent, dir);
        }
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "checkpoint directory not found",
                ),
            ));
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_sharded(dir, &index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_single(dir.to_path_buf(), &single);
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            if path.is_file() && path.extension().is_some_and(|x| x == "safetensors") {
                found.push(path);
            }
        }
        found.sort();
        match found.len() {
            1 => Self::open_single(dir.to_path_buf(), &found[0]),
            0 => Err(Error::format(
                dir,
                format!("no checkpoint: neither {INDEX_FILE}, {SINGLE_FILE} nor any *.safetensors file"),
            )),
            n => Err(Error::format(
                dir,
                format!(
                    "{n} *.safetensors files but no {INDEX_FILE} saying how they form one checkpoint: {}",
                    found
                        .iter()
                        .filter_map(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    fn open_single(dir: PathBuf, file: &Path) -> Result<WeightStore> {
        let shard = SafetensorsFile::open(file)?;
        let mut tensors = BTreeMap::new();
        for e in &shard.entries {
            tensors.insert(e.name.clone(), slot(0, e));
        }
        Ok(WeightStore {
            dir,
            shard_paths: vec![shard.path.clone()],
            shards: vec![shard],
            tensors,
            index_total_size: None,
        })
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<WeightStore> {
        let index = sharded::read_index(index_path)?;
        let mut shards = Vec::with_capacity(index.shards.len());
        for name in &index.shards {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(Error::format(
                    &path,
                    format!("shard named by {INDEX_FILE} does not exist"),
                ));
            }
            shards.push(SafetensorsFile::open(&path)?);
        }

        let mut tensors: BTreeMap<String, Slot> = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for e in &shard.entries {
                if let Some(prev) = tensors.get(&e.name) {
                    return Err(Error::tensor(
                        &e.name,
                        format!(
                            "present in two shards: {} and {}",
                            shards[prev.shard].path.display(),
                            shard.path.display()
                        ),
                    ));
                }
                tensors.insert(e.name.clone(), slot(i, e));
            }
        }

        let shard_of: HashMap<&str, &str> = index
            .weight_map
            .iter()
            .map(|(t, f)| (t.as_str(), f.as_str()))
            .collect();
        for (name, s) in &tensors {
            let actual = &index.shards[s.shard];
            match shard_of.get(name.as_str()) {
                None => {
                    return Err(Error::tensor(
                        name,
                        format!("in shard {actual} but absent from the weight_map of {INDEX_FILE}"),
                    ))
                }
                Some(named) if named != actual => {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "{INDEX_FILE} puts it in shard {named}, but it is in shard {actual}"
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        for (name, file) in &index.weight_map {
            if !tensors.contains_key(name) {
                return Err(Error::tensor(
                    name,
                    format!(
                        "{INDEX_FILE} puts it in shard {file}, but that shard does not hold it"
                    ),
                ));
            }
        }

        Ok(WeightStore {
            dir: dir.to_path_buf(),
            shard_paths: shards.iter().map(|s| s.path.clone()).collect(),
            shards,
            tensors,
            index_total_size: index.total_size,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A borrowed view of tensor `name`.
    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        let (key, s) = self
            .tensors
            .get_key_value(name)
            .ok_or_else(|| Error::tensor(name, "missing from the checkpoint"))?;
        let dtype = match s.dtype {
            StoredDType::Supported(d) => d,
            StoredDType::Other(other) => {
                return Err(Error::Unsupported(format!(
                    "tensor `{name}` has dtype {other} (supported: BF16, F16, F32)"
                )))
            }
        };
        Ok(TensorView {
            name: key,
            dtype,
            shape: &s.shape,
            data: &self.shards[s.shard].mmap[s.start..s.end],
        })
    }

    /// Like [`get`](Self::get), but also checks the shape.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<TensorView<'_>> {
        let v = self.get(name)?;
        if v.shape != shape {
            return Err(Error::tensor(
                name,
                format!("expected shape {shape:?}, found {:?}", v.shape),
            ));
        }
        Ok(v)
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// The mapped files, in shard order.
    pub fn shard_files(&self) -> &[PathBuf] {
        &self.shard_paths
    }

    /// Bytes of tensor data (headers excluded).
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|s| (s.end - s.start) as u64)
            .sum()
    }

    /// `metadata.total_size` of the shard index, if any (informational: not checked against
    /// [`total_bytes`](Self::total_bytes), since some converters write it loosely).
    pub fn index_total_size(&self) -> Option<u64> {
        self.index_total_size
    }

    /// How many tensors of each supported dtype, most common first (ties in BF16, F16, F32
    /// order). Tensors of other dtypes are not counted.
    pub fn dtypes(&self) -> Vec<(DType, usize)> {
        let mut counts: Vec<(DType, usize)> = [DType::BF16, DType::F16, DType::F32]
            .iter()
            .map(|&d| (d, 0))
            .collect();
        for s in self.tensors.values() {
            if let StoredDType::Supported(d) = s.dtype {
                if let Some(c) = counts.iter_mut().find(|(x, _)| *x == d) {
                    c.1 += 1;
                }
            }
        }
        counts.retain(|&(_, n)| n > 0);
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts
    }

    /// Checks that every `expected` tensor is present with that shape and a supported dtype;
    /// reports the checkpoint's other tensors.
    pub fn validate(&self, expected: &[TensorSpec]) -> Result<ValidationReport> {
        let mut report = ValidationReport::default();
        let mut wanted = std::collections::HashSet::with_capacity(expected.len());
        for spec in expected {
            let view = self.get(&spec.name)?;
            if view.shape != spec.shape.as_slice() {
                return Err(Error::tensor(
                    &spec.name,
                    format!("expected shape {:?}, found {:?}", spec.shape, view.shape),
                ));
            }
            wanted.insert(spec.name.as_str());
            report.checked += 1;
            report.parameters += spec.numel();
        }
        report.unexpected = self
            .tensors
            .keys()
            .filter(|k| !wanted.contains(k.as_str()))
            .cloned()
            .collect();
        Ok(report)
    }
}

fn slot(shard: usize, e: &safetensors_file::Entry) -> Slot {
    Slot {
        shard,
        dtype: e.dtype,
        shape: e.shape.clone(),
        start: e.start,
        end: e.end,
    }
}
