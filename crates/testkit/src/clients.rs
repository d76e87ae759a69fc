//! Running the real OpenStack clients (python-glanceclient, openstacksdk, Ironic) from tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Gives `cmd` a fresh HOME (no cached schemas, no clouds.yaml) and no `OS_*` variables from
/// the environment, keeping `PYENV_ROOT` (pyenv's shims find their root through HOME unless
/// told).
pub fn client_env(cmd: &mut Command, home: &Path) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OS_") {
            cmd.env_remove(&k);
        }
    }
    if std::env::var_os("PYENV_ROOT").is_none()
        && let Some(h) = std::env::var_os("HOME")
    {
        let root = PathBuf::from(h).join(".pyenv");
        if root.is_dir() {
            cmd.env("PYENV_ROOT", root);
        }
    }
    cmd.env("HOME", home);
}
