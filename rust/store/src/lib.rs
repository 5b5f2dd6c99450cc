//! kithmail-store: the hot tables of kithmail over LMDB (heed).
//!
//! Three tables in one environment — Recon, Reputation, Community — as
//! DESIGN.md describes them. Plain Rust with no Python in it, so `cargo test`
//! and the floor benchmark run it alone; `kithmail-py` is the PyO3 glue.
//!
//! Trusts nothing in its inputs: every address, CIDR, user and name is
//! parsed and bounded here, and no input can make it panic.

pub mod addr;
pub mod community;
pub mod error;
pub mod recon;
pub mod reputation;
pub mod store;

pub use error::{Result, StoreError};
pub use store::{Core, Options, Store};
