//! The header of a benchmark report: when, on what machine, from which commit, with
//! which command.
//!
//! A number in `perf-reports/` means nothing without the machine that produced it, so
//! every tool that writes one (the end-to-end driver, the mesh benchmark) prints this
//! header first, in plain text, and the report is saved exactly as printed.
//!
//! Everything here is read from the running system (`/proc`, `uname`, `git`, the clock);
//! a field that cannot be read says `unknown` rather than failing the benchmark. This
//! module is for tools only: the deterministic parts of the load generator must not
//! call it.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

/// The report header: title, date (UTC), machine, CPUs this process may run on, commit and
/// command line, one `key: value` per line, ending with an empty line.
///
/// The commit comes from `STOCKPLANE_COMMIT` when set (the Makefile sets it), otherwise
/// from `git rev-parse --short HEAD`.
pub fn report_header(title: &str) -> String {
    let command: Vec<String> = std::env::args().collect();
    let commit = std::env::var("STOCKPLANE_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| command_output("git", &["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let mut out = String::new();
    out.push_str(&format!("# {title}\n"));
    out.push_str(&format!("date: {}\n", report_header_date_utc(SystemTime::now())));
    out.push_str(&format!("machine: {}\n", report_header_machine()));
    out.push_str(&format!("kernel: {}\n", command_output("uname", &["-srvm"]).unwrap_or_else(|| "unknown".into())));
    out.push_str(&format!(
        "cpus allowed: {}\n",
        proc_field("/proc/self/status", "Cpus_allowed_list").unwrap_or("unknown".into())
    ));
    out.push_str(&format!("commit: {commit}\n"));
    out.push_str(&format!("command: {}\n\n", command.join(" ")));
    out
}

/// CPU model, online CPUs and memory, like `make bench`'s header.
fn report_header_machine() -> String {
    let model = proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .map(|text| text.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let memory_kib: u64 = proc_field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    format!("{model}, {cpus} cores, {:.1} GiB", memory_kib as f64 / (1u64 << 20) as f64)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for `time` (days to civil date: Howard Hinnant's algorithm).
fn report_header_date_utc(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3_600, rem % 3_600 / 60, rem % 60)
}

/// Time the hypervisor ran something else while a virtual CPU had work: the `steal`
/// column of `/proc/stat`, per CPU, over a window. A virtual machine whose CPUs are
/// stolen for milliseconds at a time has latency tails that no server on it can avoid.
pub struct Stolen {
    window: Duration,
    /// (CPU, ticks of 1/100 s stolen in the window).
    cpus: Vec<(String, u64)>,
}

impl Stolen {
    /// The steal ticks of every CPU (`/proc/stat` counts in USER_HZ, 100 per second on Linux).
    pub fn sample() -> anyhow::Result<Vec<(String, u64)>> {
        let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        stat.lines()
            .filter(|line| line.starts_with("cpu") && line.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .map(|line| {
                let mut fields = line.split_whitespace();
                let cpu = fields.next().unwrap_or_default().to_string();
                // user nice system idle iowait irq softirq steal
                let steal =
                    fields.nth(7).and_then(|f| f.parse().ok()).context("parse the steal column of /proc/stat")?;
                Ok((cpu, steal))
            })
            .collect()
    }

    /// What was stolen over `window`, from two samples taken at its ends.
    pub fn between(window: Duration, before: &[(String, u64)], after: &[(String, u64)]) -> Stolen {
        Stolen { window, cpus: counter_differences(before, after) }
    }

    /// One line: `stolen by the hypervisor in <what> (/proc/stat steal): cpu0 … ms (…%), …`.
    pub fn line(&self, what: &str) -> String {
        let each: Vec<String> = self
            .cpus
            .iter()
            .map(|(cpu, ticks)| {
                let ms = *ticks as f64 * 10.0;
                format!("{cpu} {ms:.0} ms ({:.2}%)", ms / self.window.as_secs_f64() / 10.0)
            })
            .collect();
        format!("stolen by the hypervisor in {what} (/proc/stat steal): {}", each.join(", "))
    }
}

/// How much each of a sample's counters grew since an earlier sample, matched by key (a
/// key missing from `before` counts from zero; a counter that went back, as zero).
pub fn counter_differences<K: PartialEq + Clone>(before: &[(K, u64)], after: &[(K, u64)]) -> Vec<(K, u64)> {
    after
        .iter()
        .map(|(key, count)| {
            let was = before.iter().find(|(k, _)| k == key).map_or(0, |(_, c)| *c);
            (key.clone(), count.saturating_sub(was))
        })
        .collect()
}

/// The value of the first `key: value` line of a `/proc` file whose key is `key`.
fn proc_field(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// The trimmed standard output of a command that succeeded.
fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_grow_by_key_from_zero_and_never_below() {
        let before = [("cpu0".to_string(), 10), ("cpu1".to_string(), 50)];
        let after = [("cpu1".to_string(), 40), ("cpu0".to_string(), 25), ("cpu2".to_string(), 7)];
        let grown = counter_differences(&before, &after);
        assert_eq!(grown, [("cpu1".to_string(), 0), ("cpu0".to_string(), 15), ("cpu2".to_string(), 7)]);
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(report_header_date_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723); // 2000-02-29 01:02:03
        assert_eq!(report_header_date_utc(leap), "2000-02-29T01:02:03Z");
        let later = UNIX_EPOCH + Duration::from_secs(1_795_568_078); // 2026-11-25T00:54:38Z
        assert_eq!(report_header_date_utc(later), "2026-11-25T00:54:38Z");
    }
}
