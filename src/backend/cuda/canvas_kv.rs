//! Per-canvas K/V caches of a packed cached step: the span rows of several Session canvases run
//! through one forward, each canvas writing its K/V into, and attending against, its own cache
//! slot (separate allocations, at different positions and lengths). [`CanvasKv`] holds, for
//! every layer, the device addresses of each canvas's K and V rows, plus each canvas's first
//! position and key count, on the device and on the host (where every launch checks them);
//! `rope_qkv_bf16` and the attention kernels read the addresses through their `kv_canvas`
//! parameter.

use super::{cuda_err, CudaDevice};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr};

/// One canvas of a packed cached step: its cache's K and V buffers (one per layer), where its
/// rows start, and how many keys it attends to (its canvas length).
pub struct CanvasCache<'a> {
    pub k: &'a [CudaSlice<u16>],
    pub v: &'a [CudaSlice<u16>],
    /// Position of the canvas's first computed row.
    pub start: usize,
    /// Keys the canvas's queries attend to (positions `0..keys` of its cache).
    pub keys: usize,
}

/// What the host knows of the canvases of a [`CanvasKv`] (the launches check against it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanvasHost {
    /// Position of each canvas's first row.
    pub starts: Vec<usize>,
    /// Keys per canvas.
    pub keys: Vec<usize>,
    /// Rows each canvas's cache holds (the smallest over its layers and K/V).
    pub rows: Vec<usize>,
    /// Whether every cache address is 16-byte aligned (the vector and tensor-core paths).
    pub aligned: bool,
}

impl CanvasHost {
    /// Canvases described.
    pub fn canvases(&self) -> usize {
        self.starts.len()
    }

    /// Checks that every canvas's cache holds the positions `start..start + rows_per_canvas` a
    /// forward of `rows_per_canvas` rows per canvas writes, and its keys.
    pub fn check_rows(&self, rows_per_canvas: usize) -> Result<()> {
        for c in 0..self.canvases() {
            let end = self.starts[c] + rows_per_canvas;
            if end.max(self.keys[c]) > self.rows[c] {
                return Err(Error::invalid(format!(
                    "packed cached step: canvas {c} writes rows {}..{end} and reads {} keys of \
                     a cache of {} rows",
                    self.starts[c], self.keys[c], self.rows[c]
                )));
            }
            if end > i32::MAX as usize || self.keys[c] > i32::MAX as usize {
                return Err(Error::invalid(format!(
                    "packed cached step: canvas {c}'s positions exceed i32"
                )));
            }
        }
        Ok(())
    }
}

/// The per-canvas caches of one packed cached step, uploaded (see the module docs).
pub struct CanvasKv {
    /// `[layers][2·canvases]` addresses: layer `l`'s K rows of canvas `c` at
    /// `l·2·canvases + c`, its V rows at `l·2·canvases + canvases + c`.
    table: CudaSlice<u64>,
    /// `[canvases]` first positions (i32).
    starts: CudaSlice<i32>,
    /// `[canvases]` key counts (i32).
    keys: CudaSlice<i32>,
    host: CanvasHost,
    layers: usize,
    kv_width: usize,
}

/// One layer's view of a [`CanvasKv`]: what `rope_qkv` and attention take.
pub struct CanvasKvLayer<'a> {
    /// `2·canvases` addresses: K of canvas `c` at `c`, V at `canvases + c`.
    pub table: CudaView<'a, u64>,
    pub starts: CudaView<'a, i32>,
    pub keys: CudaView<'a, i32>,
    pub host: &'a CanvasHost,
    /// Elements of one K (or V) row.
    pub kv_width: usize,
}

impl CanvasKv {
    /// Uploads the addresses, starts and key counts of `canvases` (each with `layers` K and V
    /// buffers of rows `kv_width` wide).
    pub fn upload(
        dev: &CudaDevice,
        canvases: &[CanvasCache<'_>],
        layers: usize,
        kv_width: usize,
    ) -> Result<CanvasKv> {
        let n = canvases.len();
        if n == 0 || kv_width == 0 {
            return Err(Error::invalid(
                "packed cached step: no canvases or empty K/V rows",
            ));
        }
        let stream = &dev.stream;
        let mut table = vec![0u64; layers * 2 * n];
        let mut rows = vec![usize::MAX; n];
        let mut aligned = true;
        for (c, cc) in canvases.iter().enumerate() {
            if cc.k.len() != layers || cc.v.len() != layers {
                return Err(Error::invalid(format!(
                    "packed cached step: canvas {c}'s cache has {} K and {} V layers, the model {layers}",
                    cc.k.len(),
                    cc.v.len()
                )));
            }
            for l in 0..layers {
                for (which, buf) in [(0, &cc.k[l]), (1, &cc.v[l])] {
                    let (addr, _guard) = buf.device_ptr(stream);
                    aligned &= addr.is_multiple_of(16);
                    table[l * 2 * n + which * n + c] = addr;
                    rows[c] = rows[c].min(buf.len() / kv_width);
                }
            }
        }
        let host = CanvasHost {
            starts: canvases.iter().map(|c| c.start).collect(),
            keys: canvases.iter().map(|c| c.keys).collect(),
            rows,
            aligned,
        };
        let to_i32 = |v: &[usize]| -> Result<Vec<i32>> {
            v.iter()
                .map(|&x| {
                    i32::try_from(x).map_err(|_| {
                        Error::invalid(format!("packed cached step: position {x} exceeds i32"))
                    })
                })
                .collect()
        };
        let upload = |what: &str, e| cuda_err(&format!("upload the packed step's {what}"), e);
        Ok(CanvasKv {
            table: stream
                .clone_htod(&table)
                .map_err(|e| upload("cache table", e))?,
            starts: stream
                .clone_htod(&to_i32(&host.starts)?)
                .map_err(|e| upload("starts", e))?,
            keys: stream
                .clone_htod(&to_i32(&host.keys)?)
                .map_err(|e| upload("key counts", e))?,
            host,
            layers,
            kv_width,
        })
    }

    /// The host's copy of the canvases' starts, keys and cache rows.
    pub fn host(&self) -> &CanvasHost {
        &self.host
    }

    /// Layer `l`'s addresses with the starts and key counts.
    pub fn layer(&self, l: usize) -> Result<CanvasKvLayer<'_>> {
        if l >= self.layers {
            return Err(Error::invalid(format!(
                "packed cached step: layer {l} of {}",
                self.layers
            )));
        }
        let n = self.host.canvases();
        Ok(CanvasKvLayer {
            table: self.table.slice(l * 2 * n..(l + 1) * 2 * n),
            starts: self.starts.slice(0..n),
            keys: self.keys.slice(0..n),
            host: &self.host,
            kv_width: self.kv_width,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_canvas_must_hold_what_it_writes_and_reads() {
        let host = CanvasHost {
            starts: vec![96, 40],
            keys: vec![128, 72],
            rows: vec![128, 80],
            aligned: true,
        };
        // 32 rows per canvas: 96..128 in 128 rows, 40..72 in 80 rows.
        assert!(host.check_rows(32).is_ok());
        // 33 rows: canvas 0 would write row 128.
        let e = host.check_rows(33).unwrap_err().to_string();
        assert!(e.contains("canvas 0 writes rows 96..129"), "{e}");
        // Keys beyond the cache.
        let mut wide = host.clone();
        wide.keys[1] = 81;
        let e = wide.check_rows(8).unwrap_err().to_string();
        assert!(e.contains("canvas 1") && e.contains("reads 81 keys"), "{e}");
    }
}
