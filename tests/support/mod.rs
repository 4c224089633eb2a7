//! Helpers shared by the integration tests. Each test binary uses a different
//! part, so unused items are expected.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod client;
pub mod gateway;
pub mod ledger;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod relay;
pub mod sdk;
