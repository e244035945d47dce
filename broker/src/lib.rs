//! The Lanes broker.
//!
//! So far this is the storage engine ([`storage`]): lane logs made of checksummed,
//! indexed segments with group-commit durability and crash recovery. The server,
//! topics, lanes and consumer groups build on it.

pub mod storage;
