//! Reliability suite 1, process crash: idempotent producers with `acks = durable` log
//! every acknowledgement while the broker is SIGKILLed at random moments and restarted,
//! 20 times (`LANES_CRASH_KILLS`). The checks (in `crash_support`), as Jepsen's Kafka
//! checker does them: every acknowledged record is read exactly once, at the offset it
//! was acknowledged with; each lane log's offsets run 0, 1, 2… with no gap or repeat;
//! and no record, acknowledged or not, is stored twice.
//!
//! A second run keeps little (retention of two small segments, checked every 50 ms), so
//! that retention deletes segments all through it and rolls overwrite the deleted files
//! (docs/STORAGE.md, "Segment files"): kills land between a file's rename, its
//! overwrite and the fsync round's cut of its old bytes. There the checks start at each
//! lane log's earliest offset.

mod crash_support;
mod process_support;

use std::path::Path;
use std::time::Duration;

use crash_support::{
    Checked, KEEPING_TWO_SEGMENTS, KEPT_BYTES, Lcg, Workload, assert_lane_logs_keep, env_u64, seed,
};
use process_support::{BrokerProcess, fixed_listen_address, http_get, series_value};

/// Starts a broker on `dir` with `args`, runs the workload while SIGKILLing and
/// restarting it `LANES_CRASH_KILLS` times, and checks. `before_kill` sees each broker
/// before it goes: before each kill, and the last one before the check. Returns the
/// last broker, still running.
async fn crash_repeatedly(
    dir: &Path,
    args: &[&str],
    mut before_kill: impl FnMut(&BrokerProcess),
) -> (Checked, BrokerProcess) {
    let kills = env_u64("LANES_CRASH_KILLS", 20);
    let seed = seed("LANES_CRASH_SEED");
    eprintln!("crash suite: {kills} kills, LANES_CRASH_SEED={seed}");
    let mut random = Lcg(seed);

    let listen = fixed_listen_address();
    let mut broker = BrokerProcess::start_on(&listen, dir, args);
    let workload = Workload::start(&broker.address).await;
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(100 + random.next(600))).await;
        before_kill(&broker);
        broker.kill();
        tokio::time::sleep(Duration::from_millis(random.next(200))).await;
        broker = BrokerProcess::start_on(&listen, dir, args);
    }
    // Some traffic on the last incarnation, then stop and settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    before_kill(&broker);
    let checked = workload.finish(&broker.address).await;
    eprintln!(
        "crash suite: {kills} SIGKILLs; {} records acknowledged, {} stored (the rest were in flight at a kill and retried or not), {} deleted by retention, 0 lost, 0 duplicated, {} lane logs dense",
        checked.acknowledged, checked.stored, checked.deleted_by_retention, checked.lane_logs
    );
    (checked, broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_repeated_sigkill_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (checked, _) = crash_repeatedly(dir.path(), &["--metrics-listen", "off"], |_| {}).await;
    assert_eq!(checked.deleted_by_retention, 0, "nothing deletes here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_that_retention_keeps_survive_sigkill_while_segment_files_are_recycled() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = fixed_listen_address();
    let args = [
        ["--metrics-listen", metrics.as_str()].as_slice(),
        &KEEPING_TWO_SEGMENTS,
    ]
    .concat();
    // The counter starts again with each process: summed over lives, read just before
    // each kill (so a file recycled after the read is not counted).
    let mut recycled = 0.0;
    let (checked, mut broker) = crash_repeatedly(dir.path(), &args, |_| {
        let text = http_get(&metrics, "/metrics");
        recycled += series_value(&text, "lanes_segments_recycled_total", &[]).unwrap_or(0.0);
    })
    .await;
    eprintln!("crash suite with retention: {recycled} segment files recycled");
    // Otherwise this run proved nothing more than the first.
    assert!(recycled > 0.0, "no segment file was recycled");
    assert!(
        checked.deleted_by_retention > 0,
        "retention deleted nothing acknowledged"
    );
    broker.signal("TERM");
    assert!(broker.wait(), "a clean stop");
    assert_lane_logs_keep(dir.path(), KEPT_BYTES);
}
