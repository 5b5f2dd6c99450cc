//! The store's one error type. The Python glue maps each variant to exactly
//! one exception class, so the variants are the operator-facing categories.

use std::fmt;

#[derive(Debug)]
pub enum StoreError {
    /// A malformed IP, CIDR, address, user or name; the text names it.
    InvalidInput(String),
    /// LMDB's map is full.
    MapFull { map_size: usize },
    /// The environment was created with other settings than asked for.
    ConfigMismatch(String),
    /// Any other LMDB or I/O failure.
    Storage(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::InvalidInput(m) => f.write_str(m),
            StoreError::MapFull { map_size } => write!(
                f,
                "LMDB map full at {} MiB; raise [server] core_map_size",
                map_size >> 20
            ),
            StoreError::ConfigMismatch(m) => f.write_str(m),
            StoreError::Storage(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        StoreError::InvalidInput(msg.into())
    }
}

/// Show at most this much of a hostile input in an error message.
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 80;
    let mut out: String = s.chars().take(MAX).flat_map(|c| c.escape_debug()).collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    format!("'{out}'")
}

pub(crate) fn lmdb(context: &str, e: heed::Error, map_size: usize) -> StoreError {
    match e {
        heed::Error::Mdb(heed::MdbError::MapFull) => StoreError::MapFull { map_size },
        other => StoreError::Storage(format!("{context}: LMDB: {other}")),
    }
}
