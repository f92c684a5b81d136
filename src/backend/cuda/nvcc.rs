//! How a kernel file `cuda/<stem>.cu` is compiled: which images it gets, their file names, and
//! nvcc's arguments. One source of truth for `build.rs` (which includes this file with `#[path]`,
//! so it uses nothing but `std`) and for compiling a kernel directory at run time
//! (`dllm-gpu-check --compile-kernels DIR --define NAME=VALUE`), whose images
//! `DLLM_KERNEL_DIR=DIR` then loads instead of the embedded ones (see
//! [`super::kernel_dir`]): a kernel variant can be built and timed on a GPU machine that has nvcc
//! but no Rust toolchain.
//!
//! Images: PTX for `compute_90` (every file: loaded by the driver on Hopper or newer); an `sm_90a`
//! cubin for files whose text contains the marker `DLLM_SM90A` (wgmma, setmaxnreg); an Ampere
//! fatbin (`sm_80` machine code + `compute_80` PTX) for files without the marker `DLLM_SM90`
//! (which `DLLM_SM90A` contains: TMA, cluster barriers). Warnings are errors.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One compiled image of a kernel file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Image {
    /// `compute_90` PTX (`<stem>.ptx`).
    Ptx90,
    /// `sm_90a` cubin (`<stem>.sm90a.cubin`).
    Sm90a,
    /// `sm_80` machine code + `compute_80` PTX (`<stem>.sm80.fatbin`).
    Sm80,
}

impl Image {
    /// Every image, in the order they are built.
    pub const ALL: [Image; 3] = [Image::Ptx90, Image::Sm90a, Image::Sm80];

    /// Whether a file with text `source` gets this image.
    pub fn applies_to(self, source: &str) -> bool {
        match self {
            Image::Ptx90 => true,
            Image::Sm90a => source.contains("DLLM_SM90A"),
            Image::Sm80 => !source.contains("DLLM_SM90"),
        }
    }

    /// The image's file name for kernel file `stem` (in `OUT_DIR` and in a kernel directory).
    pub fn file_name(self, stem: &str) -> String {
        match self {
            Image::Ptx90 => format!("{stem}.ptx"),
            Image::Sm90a => format!("{stem}.sm90a.cubin"),
            Image::Sm80 => format!("{stem}.sm80.fatbin"),
        }
    }

    /// Its name on the command line (`--images ptx,sm90a,sm80`).
    pub fn name(self) -> &'static str {
        match self {
            Image::Ptx90 => "ptx",
            Image::Sm90a => "sm90a",
            Image::Sm80 => "sm80",
        }
    }

    /// The image named `name` ([`Image::name`]).
    pub fn from_name(name: &str) -> Option<Image> {
        Image::ALL.into_iter().find(|i| i.name() == name)
    }

    /// nvcc's output kind and target for this image.
    fn target_args(self) -> &'static [&'static str] {
        match self {
            Image::Ptx90 => &["-ptx", "-arch=compute_90"],
            Image::Sm90a => &["-cubin", "-gencode=arch=compute_90a,code=sm_90a"],
            Image::Sm80 => &[
                "-fatbin",
                "-gencode=arch=compute_80,code=[sm_80,compute_80]",
            ],
        }
    }
}

/// A GPU family whose machine code ptxas's resource report describes ([`Build::resource_usage`]):
/// what the driver runs there, registers, stack and spills included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MachineTarget {
    /// Hopper: the `sm_90a` cubin of a file with `DLLM_SM90A`, otherwise the `sm_90` code the
    /// driver makes of the `compute_90` PTX.
    Hopper,
    /// Ampere: the `sm_80` code of the fatbin (files without `DLLM_SM90`).
    Ampere,
}

impl MachineTarget {
    /// Both families.
    pub const ALL: [MachineTarget; 2] = [MachineTarget::Hopper, MachineTarget::Ampere];

    /// Whether a file with text `source` has machine code for this family.
    pub fn applies_to(self, source: &str) -> bool {
        match self {
            MachineTarget::Hopper => true,
            MachineTarget::Ampere => Image::Sm80.applies_to(source),
        }
    }

    /// nvcc's `-gencode` for a file with text `source`.
    fn gencode(self, source: &str) -> &'static str {
        match self {
            MachineTarget::Hopper if Image::Sm90a.applies_to(source) => {
                "-gencode=arch=compute_90a,code=sm_90a"
            }
            MachineTarget::Hopper => "-gencode=arch=compute_90,code=sm_90",
            MachineTarget::Ampere => "-gencode=arch=compute_80,code=sm_80",
        }
    }
}

/// Arguments every image is compiled with.
const COMMON_ARGS: [&str; 5] = ["-O3", "-std=c++17", "-Werror", "all-warnings", "-lineinfo"];

/// nvcc: `NVCC`, then `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, `/usr/local/cuda/bin/nvcc`,
/// then `PATH`.
pub fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NVCC") {
        let p = PathBuf::from(p);
        if p.exists() {
            return Some(p);
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = std::env::var(var) {
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
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.exists())
}

/// One file to compile: `src` to `image` at `out`.
#[derive(Clone, Debug)]
pub struct Job {
    pub src: PathBuf,
    pub image: Image,
    pub out: PathBuf,
}

/// The kernel files (`*.cu`) of `dir`, sorted.
pub fn sources(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    found.sort();
    Ok(found)
}

/// The file stem of kernel file `src` (`gemm` for `cuda/gemm.cu`).
pub fn stem(src: &Path) -> Result<&str, String> {
    src.file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("odd kernel file name {}", src.display()))
}

/// The jobs that compile each of `sources` to those of `images` that apply to it
/// ([`Image::applies_to`]) into `out_dir` ([`Image::file_name`]), in source order.
pub fn plan(sources: &[PathBuf], images: &[Image], out_dir: &Path) -> Result<Vec<Job>, String> {
    let mut jobs = Vec::new();
    for src in sources {
        let text = std::fs::read_to_string(src)
            .map_err(|e| format!("cannot read {}: {e}", src.display()))?;
        let stem = stem(src)?;
        for &image in images {
            if image.applies_to(&text) {
                jobs.push(Job {
                    src: src.clone(),
                    image,
                    out: out_dir.join(image.file_name(stem)),
                });
            }
        }
    }
    Ok(jobs)
}

/// How every job of a build is compiled: the nvcc binary, the header directory, and a `-D` for
/// each of `defines` (`NAME` or `NAME=VALUE`).
pub struct Build<'a> {
    pub nvcc: &'a Path,
    pub include_dir: &'a Path,
    pub defines: &'a [String],
}

impl Build<'_> {
    /// The nvcc command of `job`.
    pub fn command(&self, job: &Job) -> Command {
        self.nvcc_command(job.image.target_args(), &job.src, &job.out)
    }

    /// nvcc with `target_args`, the common arguments, the header directory and the defines,
    /// compiling `src` to `out`.
    fn nvcc_command(&self, target_args: &[&str], src: &Path, out: &Path) -> Command {
        let mut cmd = Command::new(self.nvcc);
        cmd.args(target_args)
            .args(COMMON_ARGS)
            .arg(format!("-I{}", self.include_dir.display()));
        for d in self.defines {
            cmd.arg(format!("-D{d}"));
        }
        cmd.arg(src).arg("-o").arg(out);
        cmd
    }

    /// ptxas's resource report (`--resource-usage`: per kernel its registers, stack frame,
    /// spill stores and loads, static shared memory) of `src`'s machine code for `target`,
    /// compiled with every image's arguments to a cubin at `out`. The error holds nvcc's output.
    pub fn resource_usage(
        &self,
        src: &Path,
        target: MachineTarget,
        out: &Path,
    ) -> Result<String, String> {
        let text = std::fs::read_to_string(src)
            .map_err(|e| format!("cannot read {}: {e}", src.display()))?;
        let output = self
            .nvcc_command(
                &["-cubin", target.gencode(&text), "--resource-usage"],
                src,
                out,
            )
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.nvcc.display()))?;
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        if output.status.success() {
            Ok(report)
        } else {
            Err(format!(
                "nvcc failed on {} ({target:?}): {report}",
                src.display()
            ))
        }
    }

    /// Runs `job`'s command; the error holds nvcc's own output.
    pub fn compile(&self, job: &Job) -> Result<(), String> {
        let output = self
            .command(job)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.nvcc.display()))?;
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "nvcc failed on {} ({}): {}{}",
            job.src.display(),
            job.image.name(),
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        ))
    }

    /// Compiles every job on a pool of worker threads, one per available core; the error holds
    /// every failed job's nvcc output.
    pub fn compile_all(&self, jobs: &[Job]) -> Result<(), String> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let failures: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers.min(jobs.len()))
                .map(|_| {
                    s.spawn(|| {
                        let mut errors = Vec::new();
                        while let Some(job) =
                            jobs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                        {
                            errors.extend(self.compile(job).err());
                        }
                        errors
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|_| vec!["an nvcc worker thread panicked".to_string()])
                })
                .collect()
        });
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("\n"))
        }
    }
}
