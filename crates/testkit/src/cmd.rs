//! Finding and running the machine's programs (curl, aria2c, glance, chromium, ...) from tests.

use std::path::PathBuf;

/// `name`'s path on `PATH`, if it is there.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether `program --version` runs at all (it is installed).
pub fn have(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok()
}

/// Runs `program args` off the async runtime: (exit status ok, stdout, stderr). Panics when
/// it cannot be started.
pub async fn run(program: &str, args: Vec<String>) -> (bool, Vec<u8>, String) {
    let program = program.to_string();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(&program)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        (
            out.status.success(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("command thread")
}
