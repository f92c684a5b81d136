//! Building and running the CUDA kernels' CPU emulation harnesses (`cuda/emu/*.cpp`, compiled as
//! host C++ against `cuda/emu/cuda_emu.h`): the compiler call, and a scratch folder per run through
//! which the test and the harness exchange raw little-endian arrays.
//!
//! A harness is built with AddressSanitizer and UBSan (an out-of-bounds or misaligned access, or
//! undefined arithmetic, aborts the run), or with ThreadSanitizer: the emulation runs each CUDA
//! thread as an OS thread and each barrier, shuffle and `mma.sync` as a rendezvous, so a kernel's
//! shared- or global-memory access that no barrier orders against another thread's write is a
//! data race TSan reports (a missing `__syncthreads`, a slot refilled before every reader is done).
//!
//! Needs a C++20 compiler (`CXX`, else `c++`); CI (`CI` set) fails without one, elsewhere the
//! tests are skipped with a message.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The sanitizer a harness is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sanitizer {
    /// AddressSanitizer and UBSan.
    Address,
    /// ThreadSanitizer (data races).
    Thread,
}

impl Sanitizer {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Sanitizer::Address => &["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
            // -Wno-tsan: GCC's note that TSan does not model atomic_thread_fence (the emulated
            // __threadfence; the atomics around it are what order the kernels' hand-offs).
            Sanitizer::Thread => &["-fsanitize=thread", "-Wno-tsan", "-g"],
        }
    }
}

/// `cuda/emu/{source}` compiled with AddressSanitizer and UBSan (once per test binary, into
/// `built`), or `None` when there is no C++ compiler outside CI.
pub fn harness(
    built: &'static OnceLock<Result<PathBuf, String>>,
    source: &str,
) -> Option<&'static Path> {
    harness_with(built, source, Sanitizer::Address)
}

/// [`harness`] with the given sanitizer.
pub fn harness_with(
    built: &'static OnceLock<Result<PathBuf, String>>,
    source: &str,
    sanitizer: Sanitizer,
) -> Option<&'static Path> {
    let built = built.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let stem = source.trim_end_matches(".cpp");
        let suffix = match sanitizer {
            Sanitizer::Address => "",
            Sanitizer::Thread => "-tsan",
        };
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emu-{stem}{suffix}"));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&cxx)
            .args([
                "-std=c++20",
                "-O1",
                "-pthread",
                "-Wall",
                "-Werror",
                "-Wno-unknown-pragmas",
                // GCC's note on passing the 64-byte-aligned CUtensorMap by value.
                "-Wno-psabi",
                // Every floating-point operation rounded alone, as the kernels' *_rn intrinsics ask.
                "-ffp-contract=off",
            ])
            .args(sanitizer.flags())
            .arg("-I")
            .arg(root.join("cuda/emu"))
            .arg(root.join("cuda/emu").join(source))
            .arg("-o")
            .arg(&out)
            .status();
        match status {
            Ok(s) if s.success() => Ok(out),
            Ok(s) => Err(format!("{cxx} failed to build {source} ({s})")),
            Err(e) => Err(format!("skip: no C++ compiler `{cxx}`: {e}")),
        }
    });
    built_or_skip(built)
}

/// What a test built once: its path, or `None` (skipped, with the reason on stderr) when the
/// error starts with "skip" (a missing tool) outside CI; any other error, or any error in CI
/// (`CI` set), fails the test.
pub fn built_or_skip(built: &'static Result<PathBuf, String>) -> Option<&'static Path> {
    match built {
        Ok(p) => Some(p),
        Err(why) if why.starts_with("skip") && std::env::var_os("CI").is_none() => {
            eprintln!("{why}");
            None
        }
        Err(why) => panic!("{why}"),
    }
}

/// A scratch folder for one harness run.
pub struct Run {
    dir: tempfile::TempDir,
}

impl Run {
    /// A folder holding `dims.i32`.
    pub fn new(dims: &[usize]) -> Run {
        let run = Run {
            dir: tempfile::tempdir().unwrap(),
        };
        run.put(
            "dims.i32",
            &dims.iter().map(|&d| d as i32).collect::<Vec<_>>(),
        );
        run
    }

    /// Writes an input array.
    pub fn put<T: bytemuck::Pod>(&self, name: &str, v: &[T]) {
        std::fs::write(self.dir.path().join(name), bytemuck::cast_slice(v)).unwrap();
    }

    /// Reads an output array.
    pub fn get<T: bytemuck::Pod>(&self, name: &str) -> Vec<T> {
        let bytes = std::fs::read(self.dir.path().join(name)).unwrap();
        let mut out = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes);
        out
    }

    /// Runs `harness cmd DIR`, failing the test with the harness's stderr if it fails.
    pub fn exec(&self, harness: &Path, cmd: &str) {
        self.exec_with(harness, cmd, &[]);
    }

    /// [`Run::exec`] with extra environment variables: `DLLM_EMU_ASYNC=early` makes cp.async
    /// copies land at issue instead of at their wait, `wgmma-early` makes wgmma read its operands
    /// at issue instead of when its group retires.
    pub fn exec_with(&self, harness: &Path, cmd: &str, env: &[(&str, &str)]) {
        let run = |no_aslr: bool| {
            let mut c = if no_aslr {
                let mut c = Command::new("setarch");
                c.arg(std::env::consts::ARCH).arg("-R").arg(harness);
                c
            } else {
                Command::new(harness)
            };
            c.arg(cmd)
                .arg(self.dir.path())
                // A TSan build stops at its first report (and fails the run).
                .env("TSAN_OPTIONS", "halt_on_error=1")
                .envs(env.iter().copied())
                .output()
                .unwrap()
        };
        let mut out = run(false);
        // GCC 12's TSan cannot map its shadow under a kernel's high-entropy ASLR; without
        // randomisation it can.
        if String::from_utf8_lossy(&out.stderr).contains("unexpected memory mapping") {
            out = run(true);
        }
        assert!(
            out.status.success(),
            "harness {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
