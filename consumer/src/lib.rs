//! The Lanes consumer: fetches record batches from a broker, checks them and hands out
//! records, alone or in a consumer group.
//!
//! Not built yet; it arrives with the end-to-end path (issue 3), on top of
//! [`lanes_protocol::RecordBatch`], which already checks and reads fetched batches.
