//! ptxas's resource report of a kernel file, read into one record per kernel: registers per
//! thread, stack frame, spill stores and loads, static shared memory. A spill is a register
//! the compiler could not keep and moved to local memory (device memory behind L1), which in a
//! GEMM's inner loop costs bandwidth the weights need; `tests/kernel_resources.rs` compiles every
//! kernel for Hopper and Ampere ([`super::nvcc::Build::resource_usage`]) and fails on a spill
//! or stack frame that is not on its list, so a change that makes a kernel spill is caught
//! without a GPU.

/// What ptxas reports for one kernel (`extern "C" __global__` entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    /// The entry's name.
    pub kernel: String,
    /// The machine it was compiled for (`sm_90a`, `sm_90`, `sm_80`).
    pub arch: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of local-memory stack frame per thread (spills and local arrays).
    pub stack_bytes: u32,
    /// Bytes stored to local memory by spills, per thread.
    pub spill_store_bytes: u32,
    /// Bytes loaded back from local memory by spills, per thread.
    pub spill_load_bytes: u32,
    /// Static shared memory per block (dynamic shared memory is set at launch, not here).
    pub static_shared_bytes: u32,
}

impl KernelResources {
    /// Whether any register was spilled to local memory.
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// The number before `unit` in a comma-separated ptxas list such as `Used 128 registers, used 1
/// barriers, 40 bytes cumulative stack size, 128 bytes smem` (`unit` = "registers", "bytes smem").
fn count_before(list: &str, unit: &str) -> Option<u32> {
    list.split(',').find_map(|item| {
        let item = item.trim();
        let number = item.strip_suffix(unit)?.trim();
        number.rsplit(' ').next()?.parse().ok()
    })
}

/// The text between the first two single quotes after `marker` in `line`.
fn quoted_after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let start = rest.find('\'')? + 1;
    let len = rest[start..].find('\'')?;
    Some(&rest[start..start + len])
}

/// Reads every kernel of a `--resource-usage` report (nvcc 12–13 wording: `Compiling entry
/// function 'K' for 'sm_90'`, `Function properties for K` followed by `N bytes stack frame, N
/// bytes spill stores, N bytes spill loads`, then `Used N registers, …`). Device functions that
/// are not entries are skipped. The error names the kernel whose record is incomplete.
pub fn parse_resource_usage(report: &str) -> Result<Vec<KernelResources>, String> {
    let mut found = Vec::new();
    let mut current: Option<KernelResources> = None;
    let mut in_properties = false;
    for line in report.lines() {
        if let Some(kernel) = quoted_after(line, "Compiling entry function") {
            if let Some(k) = current.take() {
                return Err(format!("kernel {}: no register count reported", k.kernel));
            }
            let arch = quoted_after(line, "' for")
                .ok_or_else(|| format!("no architecture in {line:?}"))?;
            current = Some(KernelResources {
                kernel: kernel.to_string(),
                arch: arch.to_string(),
                registers: 0,
                stack_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
                static_shared_bytes: 0,
            });
            in_properties = false;
        } else if let Some(pos) = line.find("Function properties for ") {
            let name = line[pos + "Function properties for ".len()..].trim();
            in_properties = current.as_ref().is_some_and(|k| k.kernel == name);
        } else if line.contains("bytes stack frame") {
            if let (true, Some(k)) = (in_properties, current.as_mut()) {
                let field = |unit| {
                    count_before(line, unit).ok_or_else(|| {
                        format!("kernel {}: no '{unit}' in {line:?}", k.kernel.as_str())
                    })
                };
                let (stack, stores, loads) = (
                    field("bytes stack frame")?,
                    field("bytes spill stores")?,
                    field("bytes spill loads")?,
                );
                k.stack_bytes = stack;
                k.spill_store_bytes = stores;
                k.spill_load_bytes = loads;
            }
            in_properties = false;
        } else if line.contains("Used ") && line.contains(" registers") {
            if let Some(mut k) = current.take() {
                k.registers = count_before(line, "registers")
                    .ok_or_else(|| format!("kernel {}: no register count in {line:?}", k.kernel))?;
                k.static_shared_bytes = count_before(line, "bytes smem").unwrap_or(0);
                found.push(k);
            }
        }
    }
    match current {
        Some(k) => Err(format!("kernel {}: no register count reported", k.kernel)),
        None => Ok(found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written after nvcc 13.0's output, with a device function's properties between two entries.
    const REPORT: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gemm_wide' for 'sm_90'
ptxas info    : Function properties for gemm_wide
    40 bytes stack frame, 196 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 40 bytes cumulative stack size, 128 bytes smem
ptxas info    : Compile time = 25.657 ms
ptxas info    : Function properties for helper_not_an_entry
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function 'gemm_wgmma_wg3' for 'sm_90a'
ptxas info    : Function properties for gemm_wgmma_wg3
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 154 registers, used 1 barriers
";

    #[test]
    fn every_entry_is_read_with_its_numbers() {
        let got = parse_resource_usage(REPORT).unwrap();
        assert_eq!(
            got,
            vec![
                KernelResources {
                    kernel: "gemm_wide".into(),
                    arch: "sm_90".into(),
                    registers: 128,
                    stack_bytes: 40,
                    spill_store_bytes: 196,
                    spill_load_bytes: 12,
                    static_shared_bytes: 128,
                },
                KernelResources {
                    kernel: "gemm_wgmma_wg3".into(),
                    arch: "sm_90a".into(),
                    registers: 154,
                    stack_bytes: 0,
                    spill_store_bytes: 0,
                    spill_load_bytes: 0,
                    static_shared_bytes: 0,
                },
            ]
        );
        assert!(got[0].spills());
        assert!(!got[1].spills());
    }

    #[test]
    fn an_entry_without_its_register_line_is_an_error_naming_it() {
        let cut = REPORT.replace(
            "ptxas info    : Used 128 registers, used 1 barriers, 40 bytes cumulative stack size, 128 bytes smem\n",
            "",
        );
        let err = parse_resource_usage(&cut).unwrap_err();
        assert!(err.contains("gemm_wide"), "{err}");
        let tail = &REPORT[..REPORT.find("ptxas info    : Used 154").unwrap()];
        let err = parse_resource_usage(tail).unwrap_err();
        assert!(err.contains("gemm_wgmma_wg3"), "{err}");
    }

    #[test]
    fn a_garbled_properties_line_is_an_error_naming_the_kernel() {
        let bad = REPORT.replace("196 bytes spill stores", "many bytes spill stores");
        let err = parse_resource_usage(&bad).unwrap_err();
        assert!(
            err.contains("gemm_wide") && err.contains("spill stores"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_report_has_no_kernels() {
        assert_eq!(parse_resource_usage("").unwrap(), vec![]);
    }
}
