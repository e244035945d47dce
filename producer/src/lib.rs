//! The Lanes producer: batches records per lane log and sends them to a broker.
//!
//! Not built yet; it arrives with the end-to-end path (issue 3), on top of
//! [`lanes_protocol::RecordBatchBuilder`], which already builds the batches it will send.
