//! Compiles every `cuda/*.cu` with nvcc and embeds the results.
//!
//! Which images each file gets (compute_90 PTX always, an sm_90a cubin where the file holds
//! the marker `DLLM_SM90A`, an sm_80 fatbin where it does not hold `DLLM_SM90`) and nvcc's
//! arguments are in `src/backend/cuda/nvcc.rs`, shared with the run-time kernel directory
//! (`dllm-gpu-check --compile-kernels`, `DLLM_KERNEL_DIR`). The images are compiled in parallel.
//! The generated `$OUT_DIR/kernels.rs` defines `KERNELS_COMPILED` and
//! `MODULES: &[super::EmbeddedModule]` (stem, PTX, sm_90a cubin, sm_80 fatbin), included by
//! `src/backend/cuda/mod.rs`.
//! Without nvcc the crate still builds: `KERNELS_COMPILED` is false and `MODULES` is empty.
//! Set `DLLM_NO_CUDA=1` to skip kernel compilation; set `DLLM_REQUIRE_NVCC=1` (CI) to fail when
//! nvcc is missing. Warnings are errors.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[allow(dead_code)] // the run-time compile helpers are not used here
#[path = "src/backend/cuda/nvcc.rs"]
mod nvcc;
use nvcc::Image;

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=src/backend/cuda/nvcc.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=DLLM_NO_CUDA");
    println!("cargo:rerun-if-env-changed=DLLM_REQUIRE_NVCC");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    for entry in std::fs::read_dir("cuda").into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    let skip = env::var("DLLM_NO_CUDA").is_ok_and(|v| v == "1");
    let nvcc_path = if skip { None } else { nvcc::find_nvcc() };
    if nvcc_path.is_none() && env::var("DLLM_REQUIRE_NVCC").is_ok_and(|v| v == "1") {
        panic!("DLLM_REQUIRE_NVCC=1 but nvcc was not found (set NVCC or CUDA_HOME)");
    }
    let mut code = String::new();
    match nvcc_path {
        None => {
            println!("cargo:warning=nvcc not found: building without CUDA kernels (CPU only)");
            code.push_str("pub const KERNELS_COMPILED: bool = false;\n");
            code.push_str("pub const MODULES: &[super::EmbeddedModule] = &[];\n");
        }
        Some(nvcc_path) => {
            code.push_str("pub const KERNELS_COMPILED: bool = true;\n");
            code.push_str("pub const MODULES: &[super::EmbeddedModule] = &[\n");
            let mut jobs = Vec::new();
            let mut entries = Vec::new();
            for src in &sources {
                let stem = src.file_stem().unwrap().to_str().unwrap().to_string();
                let text = std::fs::read_to_string(src).unwrap();
                let mut field = |image: Image| {
                    if !image.applies_to(&text) {
                        return None;
                    }
                    let out = out_dir.join(image.file_name(&stem));
                    jobs.push(nvcc::Job {
                        src: src.clone(),
                        image,
                        out: out.clone(),
                    });
                    Some(out.display().to_string())
                };
                let ptx = field(Image::Ptx90).expect("every file has PTX");
                let bytes = |p: Option<String>| {
                    p.map_or("None".to_string(), |p| {
                        format!("Some(include_bytes!({p:?}))")
                    })
                };
                let cubin = bytes(field(Image::Sm90a));
                let ampere = bytes(field(Image::Sm80));
                entries.push(format!(
                    "    super::EmbeddedModule {{ stem: {stem:?}, ptx: include_str!({ptx:?}), \
                     sm90a: {cubin}, sm80: {ampere} }},"
                ));
            }
            let build = nvcc::Build {
                nvcc: &nvcc_path,
                include_dir: Path::new("cuda"),
                defines: &[],
            };
            if let Err(e) = build.compile_all(&jobs) {
                panic!("{e}");
            }
            for e in entries {
                writeln!(code, "{e}").unwrap();
            }
            code.push_str("];\n");
        }
    }
    std::fs::write(out_dir.join("kernels.rs"), code).unwrap();
}
