//! The Lanes broker: the storage engine ([`storage`]), topics of lane logs ([`topic`]),
//! the fsync threads ([`durability`]), and the server that speaks the Lanes protocol
//! ([`server`]). The binary `lanes-broker` (src/main.rs) runs it and carries the admin
//! commands.

pub mod config;
pub mod durability;
pub mod group;
pub mod metrics;
pub mod producer_ids;
pub mod scheduler;
pub mod server;
pub mod storage;
pub mod topic;

pub use config::Settings;
pub use server::Broker;
