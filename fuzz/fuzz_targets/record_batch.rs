//! Any bytes as a record batch, and as a run of batches: validation, then reading every
//! record and header of what passes. No panic.
#![no_main]

use bytes::Bytes;
use lanes_protocol::{BatchLimits, Batches, validate_batch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = validate_batch(data, BatchLimits::default());
    for batch in Batches::new(Bytes::copy_from_slice(data), BatchLimits::default()).flatten() {
        for record in batch.records() {
            for header in record.headers {
                let _ = (header.key.len(), header.value.map(|v| v.len()));
            }
        }
    }
});
