//! Compiles every `cuda/*.cu` with nvcc and embeds the results.
//!
//! Each file becomes PTX for `compute_90` (loaded by the driver on any Hopper or newer GPU).
//! A file whose text contains the marker `DLLM_SM90A` (it uses Hopper-only instructions such as
//! `wgmma`) is also compiled to an `sm_90a` cubin. A file without the marker `DLLM_SM90` (which
//! `DLLM_SM90A` contains: TMA, mbarrier waits, clusters) is also compiled for Ampere: a fatbin
//! with `sm_80` machine code (run by compute capability 8.x: A100, RTX 30/40, Orin) and
//! `compute_80` PTX (JIT-compiled on newer GPUs, which is how `DLLM_CUDA_ARCH=80` checks the
//! Ampere build on a Hopper). The generated `$OUT_DIR/kernels.rs` defines `KERNELS_COMPILED` and
//! `MODULES: &[super::EmbeddedModule]` (stem, PTX, sm_90a cubin, sm_80 fatbin), included by
//! `src/backend/cuda/mod.rs`.
//! Without nvcc the crate still builds: `KERNELS_COMPILED` is false and `MODULES` is empty.
//! Set `DLLM_NO_CUDA=1` to skip kernel compilation; set `DLLM_REQUIRE_NVCC=1` (CI) to fail when
//! nvcc is missing. Warnings are errors.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = env::var("NVCC") {
        let p = PathBuf::from(p);
        if p.exists() {
            return Some(p);
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    let p = Path::new("/usr/local/cuda/bin/nvcc");
    if p.exists() {
        return Some(p.to_path_buf());
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.exists())
}

fn nvcc(nvcc: &Path, args: &[&str], src: &Path, out: &Path) {
    let status = Command::new(nvcc)
        .args(args)
        .args([
            "-O3",
            "-std=c++17",
            "-Werror",
            "all-warnings",
            "-lineinfo",
            "-Icuda",
        ])
        .arg(src)
        .arg("-o")
        .arg(out)
        .status()
        .unwrap_or_else(|e| panic!("failed to run {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("nvcc failed on {}", src.display());
    }
}

fn main() {
    println!("cargo:rerun-if-changed=cuda");
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
    let nvcc_path = if skip { None } else { find_nvcc() };
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
            for src in &sources {
                let stem = src.file_stem().unwrap().to_str().unwrap().to_string();
                let ptx = out_dir.join(format!("{stem}.ptx"));
                nvcc(&nvcc_path, &["-ptx", "-arch=compute_90"], src, &ptx);
                let text = std::fs::read_to_string(src).unwrap();
                let cubin = if text.contains("DLLM_SM90A") {
                    let cubin = out_dir.join(format!("{stem}.sm90a.cubin"));
                    nvcc(
                        &nvcc_path,
                        &["-cubin", "-gencode=arch=compute_90a,code=sm_90a"],
                        src,
                        &cubin,
                    );
                    format!("Some(include_bytes!({:?}))", cubin.display().to_string())
                } else {
                    "None".to_string()
                };
                let ampere = if text.contains("DLLM_SM90") {
                    "None".to_string()
                } else {
                    let fatbin = out_dir.join(format!("{stem}.sm80.fatbin"));
                    nvcc(
                        &nvcc_path,
                        &[
                            "-fatbin",
                            "-gencode=arch=compute_80,code=[sm_80,compute_80]",
                        ],
                        src,
                        &fatbin,
                    );
                    format!("Some(include_bytes!({:?}))", fatbin.display().to_string())
                };
                writeln!(
                    code,
                    "    super::EmbeddedModule {{ stem: {stem:?}, ptx: include_str!({:?}), \
                     sm90a: {cubin}, sm80: {ampere} }},",
                    ptx.display().to_string()
                )
                .unwrap();
            }
            code.push_str("];\n");
        }
    }
    std::fs::write(out_dir.join("kernels.rs"), code).unwrap();
}
