//! A throwaway PostgreSQL server for tests: `initdb` in a temporary directory, `pg_ctl start`
//! on a free loopback port, trust authentication, stopped (`-m immediate`) and removed when
//! dropped. As root (CI), the cluster belongs to `nobody`, since PostgreSQL refuses to run as
//! root. Starts in about a second.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    as_nobody: bool,
    /// Whether commits are flushed to disk (`fsync`), as a production server's are; off for
    /// tests, which never crash the machine.
    durable: bool,
}

/// Why no server could be started (no PostgreSQL installed, initdb failed, ...).
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The directory holding `initdb` and `pg_ctl`: `pg_config --bindir`, else Debian's layout.
fn bindir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").is_file() {
            return Some(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl Postgres {
    /// Initialises and starts a server (`fsync=off`: quick, and crash-safe but for the
    /// machine's own crash).
    pub fn start() -> Result<Postgres, Unavailable> {
        Postgres::start_with(false)
    }

    /// [`Postgres::start`] with `fsync` on, as a production server runs: for benchmarks of
    /// what a commit costs.
    pub fn start_durable() -> Result<Postgres, Unavailable> {
        Postgres::start_with(true)
    }

    fn start_with(durable: bool) -> Result<Postgres, Unavailable> {
        let bin = bindir().ok_or_else(|| Unavailable("PostgreSQL is not installed".into()))?;
        let dir = tempfile::Builder::new()
            .prefix("imgcache-pg")
            .tempdir()
            .map_err(|e| Unavailable(format!("temp dir: {e}")))?;
        let as_nobody = is_root();
        if as_nobody {
            chown_nobody(dir.path())?;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Unavailable(format!("free port: {e}")))?
            .port();
        let pg = Postgres {
            bin,
            dir,
            port,
            as_nobody,
            durable,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        pg.resume()?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgresql://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn resume(&self) -> Result<(), Unavailable> {
        let data = self.data();
        let opts = format!(
            "-k {} -h 127.0.0.1 -p {} -c fsync={}",
            self.dir.path().display(),
            self.port,
            if self.durable { "on" } else { "off" }
        );
        let log = self.dir.path().join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        )
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn stop_immediate(&self) -> Result<(), Unavailable> {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), Unavailable> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Unavailable(format!("{tool}: {e}")))?;
        if !out.status.success() {
            return Err(Unavailable(format!(
                "{tool} {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop_immediate();
    }
}

fn chown_nobody(p: &Path) -> Result<(), Unavailable> {
    let ok = Command::new("chown")
        .args(["nobody:", p.to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(Unavailable(format!("chown nobody {}", p.display())))
    }
}
