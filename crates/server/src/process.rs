//! `process_*` metrics, the ones every Prometheus client library exports under the same
//! names: CPU time, resident and virtual memory, open and maximum file descriptors, start
//! time. Read from `/proc/self` at each scrape.
//!
//! By hand rather than with a crate: prometheus-client has no process collector, and the
//! crates that read `/proc` in full (procfs and its kin) bring far more than the six numbers
//! needed here, which two small files and one directory give. The server is Linux-only
//! anyway (`sendfile`, `statvfs`, flock). On a system without `/proc` the metrics are left
//! out, never reported as zero.

use std::sync::OnceLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The collector registered with the root registry (unprefixed names).
#[derive(Debug)]
pub struct ProcessCollector;

/// What one read of `/proc/self/stat` tells.
#[derive(Debug, PartialEq)]
pub struct Stat {
    pub cpu_seconds: f64,
    pub virtual_bytes: u64,
    pub resident_bytes: u64,
    /// Clock ticks after boot at which the process started.
    pub start_ticks: u64,
}

/// Parses `/proc/self/stat` (proc(5)): the fields after the command name, which is in
/// parentheses and may itself contain spaces and parentheses.
pub fn parse_stat(stat: &str, ticks_per_second: u64, page_size: u64) -> Option<Stat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `f[0]` is field 3 (state): field N is `f[N - 3]`.
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    let ticks = ticks_per_second.max(1) as f64;
    Some(Stat {
        cpu_seconds: (num(14)? + num(15)?) as f64 / ticks,
        start_ticks: num(22)?,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)?.saturating_mul(page_size),
    })
}

/// The boot time in seconds since the epoch (`btime` of `/proc/stat`).
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ticks = rustix::param::clock_ticks_per_second();
        let page = rustix::param::page_size() as u64;
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| parse_stat(&s, ticks, page));
        if let Some(s) = &stat {
            let m = ConstCounter::new(s.cpu_seconds);
            m.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                m.metric_type(),
            )?)?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                s.resident_bytes as f64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                s.virtual_bytes as f64,
            )?;
            // Fixed for the process's life: computed once.
            static START: OnceLock<Option<f64>> = OnceLock::new();
            let start = *START.get_or_init(|| {
                Some(boot_time()? as f64 + s.start_ticks as f64 / ticks.max(1) as f64)
            });
            if let Some(start) = start {
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    start,
                )?;
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The listing's own descriptor is counted, as other exporters count it.
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                dir.count() as f64,
            )?;
        }
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        if let Some(max) = limit.current {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                max as f64,
            )?;
        }
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let m = ConstGauge::new(value);
    m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        // A command name with a space and a parenthesis, as proc(5) allows.
        let line = "4242 (img cache) ) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 150 0 0 20 0 \
                    9 0 777000 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 \
                    1 0 0 0 0 0";
        let s = parse_stat(line, 100, 4096).unwrap();
        assert_eq!(
            s,
            Stat {
                cpu_seconds: 4.0,
                start_ticks: 777000,
                virtual_bytes: 123456789,
                resident_bytes: 2048 * 4096,
            }
        );
        assert_eq!(parse_stat("garbage", 100, 4096), None);
    }

    #[test]
    fn this_process() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let s = parse_stat(
            &stat,
            rustix::param::clock_ticks_per_second(),
            rustix::param::page_size() as u64,
        )
        .unwrap();
        assert!(s.resident_bytes > 0 && s.virtual_bytes >= s.resident_bytes);
        assert!(boot_time().unwrap() > 1_000_000_000);
    }
}
