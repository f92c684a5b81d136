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
    let sources = nvcc::sources(Path::new("cuda")).unwrap_or_default();
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
            let jobs =
                nvcc::plan(&sources, &Image::ALL, &out_dir).unwrap_or_else(|e| panic!("{e}"));
            for src in &sources {
                let stem = nvcc::stem(src).unwrap_or_else(|e| panic!("{e}"));
                // This file's image of each kind, as the generated code names it.
                let field = |image: Image| {
                    jobs.iter()
                        .find(|j| &j.src == src && j.image == image)
                        .map(|j| j.out.display().to_string())
                };
                let bytes = |p: Option<String>| {
                    p.map_or("None".to_string(), |p| {
                        format!("Some(include_bytes!({p:?}))")
                    })
                };
                let ptx = field(Image::Ptx90).expect("every file has PTX");
                writeln!(
                    code,
                    "    super::EmbeddedModule {{ stem: {stem:?}, ptx: include_str!({ptx:?}), \
                     sm90a: {}, sm80: {} }},",
                    bytes(field(Image::Sm90a)),
                    bytes(field(Image::Sm80))
                )
                .unwrap();
            }
            let build = nvcc::Build {
                nvcc: &nvcc_path,
                include_dir: Path::new("cuda"),
                defines: &[],
            };
            if let Err(e) = build.compile_all(&jobs) {
                panic!("{e}");
            }
            code.push_str("];\n");
        }
    }
    std::fs::write(out_dir.join("kernels.rs"), code).unwrap();
}
