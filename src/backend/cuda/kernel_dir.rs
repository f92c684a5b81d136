//! A directory of kernel images loaded instead of the embedded ones: `DLLM_KERNEL_DIR=DIR`.
//!
//! `dllm-gpu-check --compile-kernels DIR [--define NAME=VALUE]…` compiles `cuda/*.cu` into `DIR`
//! with the same targets and flags as `build.rs` ([`super::nvcc`]), plus the defines; a model
//! opened with `DLLM_KERNEL_DIR=DIR` then loads each module's image from `DIR` where the file is
//! there ([`super::nvcc::Image::file_name`]) and the embedded one otherwise. This lets a GPU
//! machine with nvcc but no Rust toolchain build and time a kernel variant (a compile-time
//! constant, an older code path kept behind a define) without rebuilding dllm. The images must be
//! built from the same kernel sources as the binary: the host code launches them with the
//! signatures and shared-memory sizes of its own build, except where it reads a setting from the
//! loaded module ([`super::CudaDevice::module_int`]). A define may therefore change only what
//! stays inside the device code (`DLLM_PREFETCH_CHUNK`) or what the host reads back
//! (`STREAM_STAGES`, the stream GEMM's ring depth, 2..=8). A development tool; `dllm info` and the
//! bench reports name the directory and the images found there.

use super::nvcc::{self, Image};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The environment variable naming the directory.
pub const ENV: &str = "DLLM_KERNEL_DIR";

/// `DLLM_KERNEL_DIR` when set (and not empty); an error when it names no directory.
pub fn from_env() -> Result<Option<PathBuf>> {
    let Some(v) = std::env::var_os(ENV).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let dir = PathBuf::from(v);
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "{ENV}={} is not a directory",
            dir.display()
        )));
    }
    Ok(Some(dir))
}

/// The bytes of `stem`'s `image` in `dir`, or `None` when `dir` holds no image of `stem`. An
/// error when it holds another image of `stem` but not this one (built with other `--images`:
/// the embedded image would run in its place unnoticed).
pub fn read(dir: &Path, stem: &str, image: Image) -> Result<Option<Vec<u8>>> {
    let path = dir.join(image.file_name(stem));
    if !path.exists() {
        let others = images_in(dir, &[stem]);
        if let Some(other) = others.first() {
            return Err(Error::invalid(format!(
                "{ENV}={} holds {other} but not {}, the image this device loads (compile it with --images {})",
                dir.display(),
                image.file_name(stem),
                image.name()
            )));
        }
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    if bytes.is_empty() {
        return Err(Error::invalid(format!(
            "kernel image {} is empty",
            path.display()
        )));
    }
    Ok(Some(bytes))
}

/// The images of `stems` present in `dir` (file names, sorted).
pub fn images_in(dir: &Path, stems: &[&str]) -> Vec<String> {
    let mut found: Vec<String> = stems
        .iter()
        .flat_map(|stem| Image::ALL.map(|i| i.file_name(stem)))
        .filter(|name| dir.join(name).is_file())
        .collect();
    found.sort();
    found
}

/// For `dllm info` and the bench reports: "embedded", or the directory and the images found in
/// it ("DIR: gemm_tma.sm90a.cubin, …", "DIR: no kernel images" when none match).
pub fn report(stems: &[&str]) -> String {
    match from_env() {
        Ok(None) => "embedded".into(),
        Err(e) => format!("unusable: {e}"),
        Ok(Some(dir)) => {
            let found = images_in(&dir, stems);
            if found.is_empty() {
                format!("{}: no kernel images", dir.display())
            } else {
                format!("{}: {}", dir.display(), found.join(", "))
            }
        }
    }
}

/// Compiles every `*.cu` of `src_dir` (headers from there too) into `out_dir` (created if
/// missing) for `images` (each only where it applies to the file, [`Image::applies_to`]), with
/// `-D` for each of `defines` (`NAME` or `NAME=VALUE`). Returns the images written.
pub fn compile(
    src_dir: &Path,
    out_dir: &Path,
    defines: &[String],
    images: &[Image],
) -> Result<Vec<PathBuf>> {
    if let Some(bad) = defines
        .iter()
        .find(|d| d.is_empty() || d.starts_with('=') || d.contains(char::is_whitespace))
    {
        return Err(Error::invalid(format!(
            "--define {bad:?}: expected NAME or NAME=VALUE without spaces"
        )));
    }
    let nvcc = nvcc::find_nvcc().ok_or_else(|| {
        Error::Unsupported("nvcc not found (set NVCC or CUDA_HOME, or put it on PATH)".into())
    })?;
    let sources = nvcc::sources(src_dir).map_err(|e| Error::io(src_dir, e))?;
    if sources.is_empty() {
        return Err(Error::invalid(format!(
            "{} holds no .cu kernel sources",
            src_dir.display()
        )));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    // The images of an earlier build (other defines or images) go first: a directory holds one
    // build, never a mix.
    for src in &sources {
        let stem = nvcc::stem(src).map_err(Error::invalid)?;
        for image in Image::ALL {
            let old = out_dir.join(image.file_name(stem));
            if old.exists() {
                std::fs::remove_file(&old).map_err(|e| Error::io(&old, e))?;
            }
        }
    }
    let jobs = nvcc::plan(&sources, images, out_dir).map_err(Error::invalid)?;
    let build = nvcc::Build {
        nvcc: &nvcc,
        include_dir: src_dir,
        defines,
    };
    build.compile_all(&jobs).map_err(Error::Backend)?;
    Ok(jobs.into_iter().map(|j| j.out).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("dllm-kernel-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn images_are_read_by_file_name_and_missing_ones_fall_back() {
        let dir = temp_dir("read");
        std::fs::write(dir.join("gemm_tma.sm90a.cubin"), b"cubin").unwrap();
        std::fs::write(dir.join("attention.ptx"), b"ptx").unwrap();
        std::fs::write(dir.join("gemm.sm80.fatbin"), b"").unwrap();
        std::fs::write(dir.join("unrelated.txt"), b"x").unwrap();
        assert_eq!(
            read(&dir, "gemm_tma", Image::Sm90a).unwrap(),
            Some(b"cubin".to_vec())
        );
        // gemm_tma's PTX is not there but its cubin is: loading the embedded PTX would hide that.
        let e = read(&dir, "gemm_tma", Image::Ptx90).unwrap_err();
        assert!(
            e.to_string()
                .contains("holds gemm_tma.sm90a.cubin but not gemm_tma.ptx"),
            "{e}"
        );
        assert_eq!(read(&dir, "sampling", Image::Ptx90).unwrap(), None);
        assert_eq!(
            read(&dir, "attention", Image::Ptx90).unwrap(),
            Some(b"ptx".to_vec())
        );
        let e = read(&dir, "gemm", Image::Sm80).unwrap_err();
        assert!(e.to_string().contains("gemm.sm80.fatbin is empty"), "{e}");
        assert_eq!(
            images_in(&dir, &["gemm", "gemm_tma", "attention", "sampling"]),
            ["attention.ptx", "gemm.sm80.fatbin", "gemm_tma.sm90a.cubin"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_defines_are_refused_before_nvcc_runs() {
        let dir = temp_dir("defines");
        for bad in ["", "=1", "A B=1"] {
            let e = compile(Path::new("cuda"), &dir, &[bad.to_string()], &Image::ALL).unwrap_err();
            assert!(e.to_string().contains("--define"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_define_reaches_the_compiled_kernels() {
        // Needs nvcc (CI has it: DLLM_REQUIRE_NVCC=1); without it there is nothing to compile.
        if nvcc::find_nvcc().is_none() {
            return;
        }
        let src = temp_dir("src");
        std::fs::write(
            src.join("probe.cu"),
            "extern \"C\" __global__ void probe(int* out) { *out = DLLM_PROBE_VALUE; }\n",
        )
        .unwrap();
        let out = temp_dir("out");
        let written = compile(
            &src,
            &out,
            &["DLLM_PROBE_VALUE=1234567".to_string()],
            &[Image::Ptx90, Image::Sm90a],
        )
        .unwrap();
        // No DLLM_SM90A marker: PTX only.
        assert_eq!(written, [out.join("probe.ptx")]);
        let ptx = std::fs::read_to_string(out.join("probe.ptx")).unwrap();
        assert!(ptx.contains("1234567"), "the define is not in the PTX");
        assert!(ptx.contains(".target sm_90"), "not compute_90 PTX");
        // Without the define the same file does not compile, and the error carries nvcc's words;
        // the earlier build's image is gone (a directory never mixes two builds).
        let e = compile(&src, &out, &[], &[Image::Ptx90]).unwrap_err();
        assert!(e.to_string().contains("DLLM_PROBE_VALUE"), "{e}");
        assert!(!out.join("probe.ptx").exists());
        std::fs::remove_dir_all(&src).unwrap();
        std::fs::remove_dir_all(&out).unwrap();
    }
}
