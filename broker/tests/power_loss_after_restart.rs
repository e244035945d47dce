//! Reliability suite 2, storage level: a power loss after a crash and a restart. The
//! restart makes what the crash left durable before it counts any of it as durable,
//! the names of new segment files included (a roll leaves its directory's fsync to the
//! fsync threads). Runs the storage engine in this process, journaled as the broker is
//! in `power_loss.rs`, so it has its own test binary.

mod support;

use std::time::Duration;

use lanes_broker::storage::faults::{journal_to, simulate};
use lanes_broker::storage::{FsyncPolicy, LaneLog, LogConfig};
use lanes_protocol::Offset;
use lanes_protocol::record_batch::ProducerStamp;
use support::{batch, small_config};

#[test]
fn records_durable_after_a_restart_survive_a_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    assert!(
        journal_to(&journal),
        "the only test in this binary journals first"
    );
    let data = dir.path().join("log");
    let config = LogConfig {
        // The fsync threads would come: the roll leaves the directory fsync to them.
        fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
        // Every append after the first rolls.
        segment_ms_max: 0,
        ..small_config()
    };
    let log = LaneLog::open(&data, config.clone()).unwrap();
    for tag in 0..2u8 {
        log.append(&mut batch(&[vec![tag; 100]], 0, ProducerStamp::NONE))
            .unwrap();
    }
    // One roll, whose directory fsync was left to an fsync round; a crash before any:
    // the second segment's name was never made durable.
    drop(log);
    let log = LaneLog::open(&data, config.clone()).unwrap();
    let written = log.next_offset();
    assert_eq!(written, Offset(2));
    assert_eq!(
        log.durable_offset(),
        written,
        "a restart counts what it kept as durable"
    );
    // Now the power goes.
    drop(log);
    let report = simulate(&journal, 7).unwrap();
    let log = LaneLog::open(&data, config).unwrap();
    assert_eq!(
        log.next_offset(),
        written,
        "records durable after the restart were lost ({report:?})"
    );
}
