//! How the CUDA backend reads its `DLLM_*` environment switches, in one place: an on/off flag
//! with a default ("0" turns it off, "1" on, anything else or unset leaves the default), whether
//! a flag was set to "1" explicitly (asking for a kernel that the device then must support), and
//! a count within a range. Values are trimmed, so `DLLM_PDL=" 0"` reads as `0`.

/// The trimmed value of `name`, if set.
fn value(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string())
}

/// An on/off switch: off for "0", on for "1", `default` when unset or anything else.
pub fn flag(name: &str, default: bool) -> bool {
    match value(name).as_deref() {
        Some("0") => false,
        Some("1") => true,
        _ => default,
    }
}

/// Whether `name` is set to "1" (the feature is asked for explicitly, so a device that cannot
/// provide it is reported rather than silently skipped).
pub fn explicitly_on(name: &str) -> bool {
    value(name).as_deref() == Some("1")
}

/// A count from `name` when it parses and lies in `range`, else `None`.
pub fn count(name: &str, range: std::ops::RangeInclusive<usize>) -> Option<usize> {
    value(name)
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| range.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each test uses its own variable: tests run on parallel threads sharing one environment.
    #[test]
    fn flag_reads_zero_and_one_and_keeps_the_default_otherwise() {
        const V: &str = "DLLM_TEST_ENV_SWITCH_FLAG";
        std::env::remove_var(V);
        assert!(flag(V, true));
        assert!(!flag(V, false));
        std::env::set_var(V, " 0 ");
        assert!(!flag(V, true));
        std::env::set_var(V, "1");
        assert!(flag(V, false));
        std::env::set_var(V, "yes");
        assert!(flag(V, true));
        assert!(!flag(V, false));
        std::env::remove_var(V);
    }

    #[test]
    fn explicitly_on_needs_a_one() {
        const V: &str = "DLLM_TEST_ENV_SWITCH_EXPLICIT";
        std::env::remove_var(V);
        assert!(!explicitly_on(V));
        std::env::set_var(V, "0");
        assert!(!explicitly_on(V));
        std::env::set_var(V, "1 ");
        assert!(explicitly_on(V));
        std::env::remove_var(V);
    }

    #[test]
    fn count_parses_within_its_range() {
        const V: &str = "DLLM_TEST_ENV_SWITCH_COUNT";
        std::env::remove_var(V);
        assert_eq!(count(V, 1..=16), None);
        std::env::set_var(V, " 3");
        assert_eq!(count(V, 1..=16), Some(3));
        std::env::set_var(V, "17");
        assert_eq!(count(V, 1..=16), None);
        std::env::set_var(V, "x");
        assert_eq!(count(V, 1..=16), None);
        std::env::remove_var(V);
    }
}
