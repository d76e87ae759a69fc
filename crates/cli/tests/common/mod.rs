//! What the `imgcache serve` tests share: the real binary started on 127.0.0.1:0 (its
//! address read from the first stdout line), and SIGTERM. Their origins are the test kit's
//! (`imgcache_testkit::origin::Origin`, throttled where a test needs a slow download).
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};

pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `imgcache --cache-dir CACHE serve --listen 127.0.0.1:0 ARGS...`; `scheme` is what
/// the first stdout line announces (`http`, or `https` with `--tls-cert`).
pub fn serve(cache: &Path, scheme: &str, args: &[&str]) -> Server {
    serve_env(cache, scheme, args, &[])
}

/// [`serve`] with these environment variables set (the rest of the environment is cleared).
pub fn serve_env(cache: &Path, scheme: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
    start(cache, scheme, args, env, None)
}

/// [`serve_env`], its stderr (the logs) collected line by line in the returned [`Log`].
pub fn serve_logged(
    cache: &Path,
    scheme: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Server, Log) {
    let log = Log::default();
    let server = start(cache, scheme, args, env, Some(&log));
    (server, log)
}

fn start(
    cache: &Path,
    scheme: &str,
    args: &[&str],
    env: &[(&str, &str)],
    log: Option<&Log>,
) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .arg("--cache-dir")
        .arg(cache)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(if log.is_some() {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .unwrap();
    if let Some(log) = log {
        log.drain(child.stderr.take().unwrap());
    }
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix(&format!("imgcache: serving on {scheme}://"))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Server { child, addr }
}

/// The lines a process wrote to stderr, as they come (read by a thread of their own, so the
/// pipe never fills), and whether it closed.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Lines>, Condvar)>);

/// The lines so far, and whether the stream closed.
type Lines = (Vec<String>, bool);

impl Log {
    fn drain(&self, stderr: impl std::io::Read + Send + 'static) {
        let log = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lock, cond) = &*log.0;
                lock.lock().unwrap().0.push(line);
                cond.notify_all();
            }
            let (lock, cond) = &*log.0;
            lock.lock().unwrap().1 = true;
            cond.notify_all();
        });
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.0.lock().unwrap().0.clone()
    }

    /// The first line that `matches`, waiting for it as lines arrive (panics after `within`
    /// or when stderr closes without one, naming `what`).
    pub fn wait_for(
        &self,
        what: &str,
        within: std::time::Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = std::time::Instant::now() + within;
        let (lock, cond) = &*self.0;
        let mut state = lock.lock().unwrap();
        loop {
            if let Some(l) = state.0.iter().find(|l| matches(l)) {
                return l.clone();
            }
            let now = std::time::Instant::now();
            assert!(
                !state.1 && now < deadline,
                "no log line for {what}; the log:\n{}",
                state.0.join("\n")
            );
            state = cond.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Waits for stderr to close (the process exited), then every line.
    pub fn closed(&self, within: std::time::Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + within;
        let (lock, cond) = &*self.0;
        let mut state = lock.lock().unwrap();
        while !state.1 {
            let now = std::time::Instant::now();
            assert!(now < deadline, "stderr still open after {within:?}");
            state = cond.wait_timeout(state, deadline - now).unwrap().0;
        }
        state.0.clone()
    }
}

/// `kill -TERM pid` through the kill(1) command (no libc dependency for one call).
pub fn sigterm(pid: i32) -> i32 {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map(|s| s.code().unwrap_or(1))
        .unwrap_or(1)
}
