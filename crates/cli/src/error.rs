//! Errors as one line: `imgcache: <message>: <cause>: <cause>`, never a panic or backtrace.

use std::io;

/// The error and its causes joined by ": ", skipping a cause whose text the line already
/// holds (many store errors already print their source), with newlines flattened.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let msg = cause
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if msg.is_empty() || line.contains(&msg) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&msg);
    }
    line
}

/// Prints the final error on stderr: `imgcache: <line>`, or under `--json` one object,
/// `{"error": "<line>", "exit_code": N}`, so a program reading stderr never parses prose.
/// An error with no text (an [`Exit`] alone, after the command reported for itself) prints
/// nothing.
pub fn report(err: &anyhow::Error, code: u8, json: bool) {
    let line = one_line(err);
    if line.is_empty() {
        return;
    }
    if json {
        let obj = serde_json::json!({ "error": line, "exit_code": code });
        eprintln!("{obj}");
    } else {
        eprintln!("imgcache: {line}");
    }
}

/// An exit status other than 1, carried by an error (`fsck`'s codes). Its own text is empty,
/// so the line printed is that of what it wraps, if anything.
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}

impl std::error::Error for Exit {}

/// `imgcache list | head` closes our stdout early; that is not an error.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .and_then(|e| e.io_error_kind())
                .is_some_and(|k| k == io::ErrorKind::BrokenPipe)
    })
}

/// A bug should still end as one line, not a panic message and a backtrace.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "imgcache: internal error{at}: {} (please report this bug)",
            msg.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn chain_is_joined_without_repeats() {
        let io = io::Error::new(io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(io).context("cannot read x.img");
        assert_eq!(one_line(&e), "cannot read x.img: No such file");

        // A store error that already prints its source.
        let store = imgcache_store::StoreError::io(
            "remove",
            "/c/k",
            io::Error::new(io::ErrorKind::PermissionDenied, "Permission denied"),
        );
        let e: anyhow::Error = store.into();
        assert_eq!(one_line(&e), "remove /c/k: Permission denied");

        let e = anyhow::anyhow!("two\nlines").context("ctx");
        assert_eq!(one_line(&e), "ctx: two lines");

        let r: Result<(), io::Error> = Err(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(is_broken_pipe(&r.context("writing").unwrap_err()));
    }
}
