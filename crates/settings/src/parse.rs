//! The value parsers every source of a setting goes through (file, environment, flags, and
//! the table's own defaults), so a value means the same wherever it is written.

use std::time::Duration;

pub const KIB: u64 = 1024;
pub const MIB: u64 = KIB * 1024;
pub const GIB: u64 = MIB * 1024;

/// A value a setting does not accept; the message says what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(String);

impl InvalidValue {
    pub fn new(message: impl Into<String>) -> InvalidValue {
        InvalidValue(message.into())
    }
}

pub type Result<T> = std::result::Result<T, InvalidValue>;

/// Parses a human size. Units are binary whatever their spelling: `K`, `KB`, `KiB` are all
/// 1024 bytes, `G`/`GB`/`GiB` 1024³ (as Glance and `df -h` mean them). Case does not matter,
/// fractions are allowed (`1.5G`), a bare number is bytes (`B` may be written).
pub fn parse_size(s: &str) -> Result<u64> {
    let err = || {
        InvalidValue(format!(
            "invalid size {s:?}: expected a number of bytes or a number with a unit \
             K, M, G, T, P (binary: 10G = 10 GiB), e.g. 512M, 1.5GiB"
        ))
    };
    let too_large = || InvalidValue(format!("invalid size {s:?}: too large"));
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => GIB * KIB,
        "p" | "pb" | "pib" => GIB * MIB,
        _ => return Err(err()),
    };
    if num.is_empty() || num.matches('.').count() > 1 || num.starts_with('.') || num.ends_with('.')
    {
        return Err(err());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(too_large);
    }
    let f: f64 = num.parse().map_err(|_| err())?;
    let bytes = (f * mult as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(too_large());
    }
    Ok(bytes as u64)
}

/// Parses a humantime duration (`24h`, `7d`, `90s`, `1h 30m`).
pub fn parse_duration(s: &str) -> Result<Duration> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        InvalidValue(format!(
            "invalid duration {s:?}: {e} (expected e.g. 90s, 30m, 24h, 7d)"
        ))
    })
}

/// A duration that paces a loop or bounds a wait, so it cannot be zero.
pub fn parse_interval(s: &str) -> Result<Duration> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(InvalidValue(format!(
            "invalid interval {s:?}: must be more than 0s"
        )));
    }
    Ok(d)
}

/// A whole number, 0 included.
pub fn parse_count(s: &str) -> Result<u32> {
    s.trim()
        .parse()
        .map_err(|_| InvalidValue(format!("{s:?} is not a count (a whole number)")))
}

/// A whole number of at least 1.
pub fn parse_nonzero_count(s: &str) -> Result<u32> {
    nonzero_count(parse_count(s)?)
}

/// `n`, unless it is 0 (for a count a file gives as a TOML integer).
pub fn nonzero_count(n: u32) -> Result<u32> {
    match n {
        0 => Err(InvalidValue::new("0 is not a count of at least 1")),
        n => Ok(n),
    }
}

/// `true`/`false`, also `1`/`0`, `yes`/`no`, `on`/`off`, in any case.
pub fn parse_bool(s: &str) -> Result<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(InvalidValue(format!(
            "invalid boolean {s:?}: expected true or false"
        ))),
    }
}

/// An address to listen on, `HOST:PORT`: an IP address (`[::1]:9292` for IPv6) or a host name
/// (`localhost:9292`), which `serve` resolves when it binds. Only the form is checked here.
pub fn parse_listen(s: &str) -> Result<String> {
    let t = s.trim();
    let err = |why: &str| {
        InvalidValue(format!(
            "invalid listen address {s:?}: {why}; expected HOST:PORT, e.g. 127.0.0.1:9292, \
             [::1]:9292 or localhost:9292"
        ))
    };
    if t.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(t.to_owned());
    }
    let Some((host, port)) = t.rsplit_once(':') else {
        return Err(err("no port"));
    };
    if port.parse::<u16>().is_err() {
        return Err(err("the port is not a number from 0 to 65535"));
    }
    if host.contains(':') || host.starts_with('[') {
        return Err(err("an IPv6 address goes in brackets, [ADDR]:PORT"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(err("not an IP address or host name"));
    }
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("123B").unwrap(), 123);
        assert_eq!(parse_size("10G").unwrap(), 10 * GIB);
        assert_eq!(parse_size("10g").unwrap(), 10 * GIB);
        assert_eq!(parse_size("10GB").unwrap(), 10 * GIB);
        assert_eq!(parse_size("10GiB").unwrap(), 10 * GIB);
        assert_eq!(parse_size("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 * GIB / 2);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size(" 2 T ").unwrap(), 2 * GIB * KIB);
        assert_eq!(parse_size("1P").unwrap(), GIB * MIB);
        for bad in [
            "", "10Q", "G", "-1", "1.2.3", ".5G", "5.G", "ten", "1e3", "10 GBs",
        ] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
        assert!(parse_size("99999999999P").is_err());
        assert!(parse_size("18446744073709551615").is_ok());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        let e = parse_duration("soon").unwrap_err().to_string();
        assert!(e.contains("invalid duration \"soon\""), "{e}");
        assert!(parse_duration("24").is_err());
        assert_eq!(parse_interval("10m").unwrap(), Duration::from_secs(600));
        let e = parse_interval("0s").unwrap_err().to_string();
        assert!(e.contains("must be more than 0s"), "{e}");
    }

    #[test]
    fn counts_and_bools() {
        assert_eq!(parse_count(" 3 ").unwrap(), 3);
        assert_eq!(parse_count("0").unwrap(), 0);
        assert!(parse_count("-1").is_err());
        assert_eq!(parse_nonzero_count("4").unwrap(), 4);
        let e = parse_nonzero_count("0").unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
        assert!(parse_bool("Yes").unwrap());
        assert!(!parse_bool("off").unwrap());
        assert!(parse_bool("maybe").is_err());
    }

    #[test]
    fn listen_addresses() {
        for ok in [
            "127.0.0.1:9292",
            "[::1]:9292",
            "localhost:9292",
            "a-b.example:0",
        ] {
            assert_eq!(parse_listen(ok).unwrap(), ok);
        }
        for bad in ["9292", "host:port", "::1:9292", ":9292", "-a:1"] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }
}
