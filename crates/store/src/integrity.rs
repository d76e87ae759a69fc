//! Checksums carried as a type: an algorithm and its digest, parsed from and shown as `algo:hex`.

use std::fmt;
use std::str::FromStr;

use md5::Md5;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};

use crate::error::StoreError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Md5,
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "md5",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 => 32,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

impl FromStr for Algorithm {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s.to_ascii_lowercase().as_str() {
            "md5" => Ok(Algorithm::Md5),
            "sha256" => Ok(Algorithm::Sha256),
            "sha512" => Ok(Algorithm::Sha512),
            _ => Err(StoreError::BadIntegrity(s.to_string())),
        }
    }
}

/// A digest of an image's bytes. Hex is kept lower-case so equality is a string compare.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Integrity {
    pub algorithm: Algorithm,
    hex: String,
}

impl Integrity {
    pub fn new(algorithm: Algorithm, hex: &str) -> Result<Self, StoreError> {
        let hex = hex.to_ascii_lowercase();
        if hex.len() != algorithm.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::BadIntegrity(format!(
                "{}:{hex}",
                algorithm.name()
            )));
        }
        Ok(Integrity { algorithm, hex })
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Digest of a byte slice; for tests and small inputs (images stream through [`Hasher`]).
    pub fn of(algorithm: Algorithm, data: &[u8]) -> Self {
        let mut h = Hasher::new(algorithm);
        h.update(data);
        h.finish()
    }
}

impl fmt::Display for Integrity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl FromStr for Integrity {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        let (algo, hex) = s
            .split_once(':')
            .ok_or_else(|| StoreError::BadIntegrity(s.to_string()))?;
        Integrity::new(algo.parse()?, hex)
    }
}

impl Serialize for Integrity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Integrity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Streaming digest; sha2 picks its SHA-NI code path at run time where the CPU has it.
pub enum Hasher {
    Md5(Md5),
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Md5 => Hasher::Md5(Md5::new()),
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Integrity {
        let (algorithm, hex) = match self {
            Hasher::Md5(h) => (Algorithm::Md5, hex::encode(h.finalize())),
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Integrity { algorithm, hex }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(
            Integrity::of(Algorithm::Sha256, b"abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            Integrity::of(Algorithm::Md5, b"abc").to_string(),
            "md5:900150983cd24fb0d6963f7d28e17f72"
        );
        assert!(
            Integrity::of(Algorithm::Sha512, b"abc")
                .hex()
                .starts_with("ddaf35a193617aba")
        );
    }

    #[test]
    fn parse_round_trip_and_errors() {
        let i: Integrity = "MD5:900150983CD24FB0D6963F7D28E17F72".parse().unwrap();
        assert_eq!(i.to_string(), "md5:900150983cd24fb0d6963f7d28e17f72");
        assert!("sha1:abc".parse::<Integrity>().is_err());
        assert!("sha256:abc".parse::<Integrity>().is_err());
        assert!("nocolon".parse::<Integrity>().is_err());
    }
}
