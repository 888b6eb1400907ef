//! The CPUs this process may run on, and `--reader-cpu` values checked
//! against them.
//!
//! Owns: reading the affinity mask (a container's cpuset, not merely the CPU
//! count), the kernel's cpulist form (`0-3,8`) for messages, and the
//! `--reader-cpu` value parser.
//! Never: pins a thread or changes the affinity mask; only reads it.

/// `--reader-cpu`: a CPU in this process's affinity mask (not merely below
/// the CPU count: a container may be limited to, say, CPUs 4-7).
pub(super) fn parse_reader_cpu(s: &str) -> Result<usize, String> {
    let cpu: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a CPU number"))?;
    let Some(allowed) = allowed_cpus() else {
        return Err("cannot read the CPUs this process may run on".to_string());
    };
    if allowed.contains(&cpu) {
        Ok(cpu)
    } else {
        Err(format!(
            "CPU {cpu} is not one this process may run on (allowed CPUs: {})",
            cpu_list(&allowed)
        ))
    }
}

/// The CPUs this process may run on (its affinity mask, so a container's
/// cpuset), ascending; `None` if they cannot be read.
pub fn allowed_cpus() -> Option<Vec<usize>> {
    let mut allowed: Vec<usize> = core_affinity::get_core_ids()?
        .into_iter()
        .map(|id| id.id)
        .collect();
    allowed.sort_unstable();
    Some(allowed)
}

/// `sorted` in the kernel's cpulist form: `0-3,8,10-11`.
fn cpu_list(sorted: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if end == start {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn reader_cpu_must_be_one_this_process_may_run_on() {
        let allowed: Vec<usize> = core_affinity::get_core_ids()
            .expect("affinity mask")
            .into_iter()
            .map(|c| c.id)
            .collect();
        let cpu = allowed[0];
        assert_eq!(
            parse(&["--reader-cpu", &cpu.to_string()])
                .unwrap()
                .reader_cpu,
            vec![cpu]
        );
        assert_eq!(parse(&["-reader-cpu=0"]).is_ok(), allowed.contains(&0));
        let err = parse(&["--reader-cpu", "100000"]).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.exit_code(), 2);
        assert!(
            msg.contains("--reader-cpu") && msg.contains("CPU 100000"),
            "{msg}"
        );
        let mut sorted = allowed.clone();
        sorted.sort_unstable();
        assert!(
            msg.contains(&format!("allowed CPUs: {}", cpu_list(&sorted))),
            "{msg}"
        );
    }

    #[test]
    fn cpu_list_is_the_kernels_cpulist_form() {
        assert_eq!(cpu_list(&[]), "");
        assert_eq!(cpu_list(&[0]), "0");
        assert_eq!(cpu_list(&[0, 1]), "0-1");
        assert_eq!(cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }

    #[test]
    fn reader_cpu_that_is_not_a_number_is_named() {
        let err = parse(&["--reader-cpu", "one"]).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.exit_code(), 2, "{msg}");
        assert!(
            msg.contains("--reader-cpu") && msg.contains("not a CPU number"),
            "{msg}"
        );
    }
}
