//! Progress on stderr, one type for every command that moves bytes (`fetch`, `add`, `verify`,
//! `fsck`): on a terminal a bar with the total, percentage, rate and ETA whenever the size is
//! known, and a spinner only when it is not; when stderr is a file or a pipe, one line per
//! phase when it ends (a JSON object under `--json`); nothing under `--quiet`.

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::time::Instant;

use imgcache_fetch::{Phase, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::config::format_size;

enum Mode {
    Hidden,
    Terminal(ProgressBar),
    Lines { json: bool },
}

/// The phase being shown.
struct Current {
    name: &'static str,
    total: Option<u64>,
    done: u64,
    started: Instant,
}

pub struct PhaseBar {
    mode: Mode,
    current: Mutex<Option<Current>>,
}

/// What a finished phase prints under `--json`.
#[derive(Serialize)]
struct PhaseLine<'a> {
    event: &'static str,
    phase: &'a str,
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
    seconds: f64,
}

impl PhaseBar {
    pub fn new(quiet: bool, json: bool) -> PhaseBar {
        let mode = if quiet {
            Mode::Hidden
        } else if io::stderr().is_terminal() && !json {
            Mode::Terminal(ProgressBar::with_draw_target(
                None,
                ProgressDrawTarget::stderr(),
            ))
        } else {
            Mode::Lines { json }
        };
        PhaseBar {
            mode,
            current: Mutex::new(None),
        }
    }

    /// A phase starts (ending the previous one, if any).
    pub fn begin(&self, name: &'static str, total: Option<u64>) {
        self.end();
        if let Mode::Terminal(bar) = &self.mode {
            // Style first: every other call may draw, and must draw this phase's look.
            bar.set_style(style(total.is_some()));
            bar.set_message(name);
            match total {
                Some(t) => bar.set_length(t),
                None => bar.unset_length(),
            }
            bar.reset();
        }
        *self.lock() = Some(Current {
            name,
            total,
            done: 0,
            started: Instant::now(),
        });
    }

    pub fn inc(&self, n: u64) {
        if let Some(c) = self.lock().as_mut() {
            c.done += n;
        }
        if let Mode::Terminal(bar) = &self.mode {
            bar.inc(n);
        }
    }

    /// The phase ends: the bar is cleared, or its line printed.
    pub fn end(&self) {
        let Some(c) = self.lock().take() else {
            return;
        };
        match &self.mode {
            Mode::Hidden => {}
            Mode::Terminal(bar) => bar.finish_and_clear(),
            Mode::Lines { json } => {
                let secs = c.started.elapsed().as_secs_f64();
                let line = if *json {
                    serde_json::to_string(&PhaseLine {
                        event: "phase",
                        phase: c.name,
                        bytes: c.done,
                        total: c.total,
                        seconds: (secs * 1000.0).round() / 1000.0,
                    })
                    .unwrap_or_default()
                } else {
                    text_line(&c, secs)
                };
                // Progress is best effort: a closed stderr must not fail the command.
                let _ = writeln!(io::stderr().lock(), "{line}");
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `imgcache: download: 24.0 MiB of 24.0 MiB (100%) in 1.2s, 20.0 MiB/s`.
fn text_line(c: &Current, secs: f64) -> String {
    let rate = if secs > 0.0 {
        format!(", {}/s", format_size((c.done as f64 / secs) as u64))
    } else {
        String::new()
    };
    let of = match c.total {
        Some(t) if t > 0 => format!(
            " of {} ({}%)",
            format_size(t),
            (c.done.min(t) as u128 * 100 / t as u128)
        ),
        _ => String::new(),
    };
    format!(
        "imgcache: {}: {}{of} in {secs:.1}s{rate}",
        c.name,
        format_size(c.done)
    )
}

/// With a total: bar, bytes of total, percentage, rate and ETA. Without: a spinner. No
/// colours when `NO_COLOR` is set (<https://no-color.org>).
fn style(known: bool) -> ProgressStyle {
    let plain = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let template = match (known, plain) {
        (true, false) => {
            "{msg:>8} {bar:30.cyan/blue} {bytes}/{total_bytes} {percent:>3}% {bytes_per_sec} eta {eta}"
        }
        (true, true) => {
            "{msg:>8} {bar:30} {bytes}/{total_bytes} {percent:>3}% {bytes_per_sec} eta {eta}"
        }
        (false, _) => "{msg:>8} {spinner} {bytes} {bytes_per_sec}",
    };
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Progress for PhaseBar {
    fn start(&self, phase: Phase, total: Option<u64>) {
        self.begin(phase.name(), total);
    }
    fn advance(&self, done: u64) {
        self.inc(done);
    }
    fn finish(&self) {
        self.end();
    }
}

impl imgcache_store::FsckProgress for PhaseBar {
    fn start(&self, files: usize, bytes: u64) {
        if files > 0 {
            self.begin("hash", Some(bytes));
        }
    }
    fn advance(&self, bytes: u64) {
        self.inc(bytes);
    }
    fn finish(&self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_phase_says_how_much_of_what_in_how_long() {
        let c = Current {
            name: "download",
            total: Some(4 << 20),
            done: 2 << 20,
            started: Instant::now(),
        };
        let line = text_line(&c, 2.0);
        assert!(line.starts_with("imgcache: download: 2"), "{line}");
        assert!(line.contains("(50%) in 2.0s"), "{line}");
        assert!(line.ends_with("/s"), "{line}");
        let unknown = Current { total: None, ..c };
        assert!(!text_line(&unknown, 1.0).contains('%'));
    }
}
