//! Helpers shared by the integration tests. Each test binary uses a different
//! part, so unused items are expected.
#![allow(dead_code)]

pub mod client;
pub mod gateway;
pub mod ledger;
pub mod postgres;
pub mod relay;
pub mod sdk;
