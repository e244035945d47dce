//! Reliability suite 2, simulated power loss: the workload and checks of suite 1
//! (`crash_support`), but after each SIGKILL the data directory is rewritten to what a
//! power loss at that moment could have left (`lanes_broker::storage::faults`): every
//! byte not yet fsynced is dropped, the last write to each file is torn at a random
//! byte, and files whose directory was not fsynced since their creation vanish.
//! Needs the test-only `faults` feature (`cargo test --workspace --all-features`).
//!
//! A second run keeps little (retention of two segments, checked every 50 ms), so that
//! rolls overwrite deleted segments' files: a power loss there leaves old batches with
//! good checksums where new ones were lost, as it would on a disk. The checks start at
//! each lane log's earliest offset.

mod crash_support;
mod process_support;

use std::time::Duration;

use crash_support::{
    Checked, KEEPING_TWO_SEGMENTS, KEPT_BYTES, Lcg, Workload, assert_lane_logs_keep, env_u64, seed,
};
use lanes_broker::storage::faults::{JOURNAL_ENV, PowerLossReport, simulate};
use process_support::{BrokerProcess, fixed_listen_address};

/// Small segments, so that rolls (a new file, its directory's fsync, sealed indexes,
/// producer snapshots) happen all through the run and are crashed into too.
const SMALL_SEGMENTS: [&str; 8] = [
    "--metrics-listen",
    "off",
    "--segment-bytes-max",
    "65536",
    "--batch-bytes-max",
    "65536",
    "--index-interval-bytes",
    "1024",
];

/// Runs the workload against a broker started with `args` while simulating
/// `LANES_POWER_LOSSES` power losses, and checks. Returns the last broker, still
/// running, and the directory holding its data directory (`data`).
async fn lose_power_repeatedly(
    args: Vec<&'static str>,
) -> (Checked, PowerLossReport, BrokerProcess, tempfile::TempDir) {
    let args = std::sync::Arc::new(args);
    let losses = env_u64("LANES_POWER_LOSSES", 20);
    let seed = seed("LANES_POWER_LOSS_SEED");
    eprintln!("power-loss suite: {losses} power losses, LANES_POWER_LOSS_SEED={seed}");
    let mut random = Lcg(seed);

    let listen = fixed_listen_address();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let journal = dir.path().join("journal");
    // Starting, killing and damaging block: they run off the runtime's workers, which the
    // producers need meanwhile.
    let start = || {
        let (listen, data, journal) = (listen.clone(), data.clone(), journal.clone());
        let args = std::sync::Arc::clone(&args);
        tokio::task::spawn_blocking(move || {
            BrokerProcess::start_on_with_env(&listen, &data, &args, &[(JOURNAL_ENV, journal.as_os_str())])
        })
    };
    let mut broker = start().await.unwrap();
    let workload = Workload::start(&broker.address).await;
    let mut total = PowerLossReport::default();
    let mut after_crash = 0;
    for _ in 0..losses {
        tokio::time::sleep(Duration::from_millis(100 + random.next(600))).await;
        // One power loss in three comes soon after a plain crash and restart, with the
        // journal kept: what the first life left unsynced must be made durable by the
        // second before it acknowledges anything (a segment's name, for one).
        if random.next(3) == 0 {
            after_crash += 1;
            tokio::task::spawn_blocking(move || broker.kill()).await.unwrap();
            broker = start().await.unwrap();
            tokio::time::sleep(Duration::from_millis(random.next(50))).await;
        }
        let seed = random.next(u64::MAX);
        let journal = journal.clone();
        let report = tokio::task::spawn_blocking(move || {
            broker.kill();
            let report = simulate(&journal, seed).unwrap();
            std::fs::remove_file(&journal).unwrap();
            report
        })
        .await
        .unwrap();
        total.files_removed += report.files_removed;
        total.files_damaged += report.files_damaged;
        total.bytes_dropped += report.bytes_dropped;
        total.writes_torn += report.writes_torn;
        total.old_bytes_restored += report.old_bytes_restored;
        broker = start().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let checked = workload.finish(&broker.address).await;
    // The simulation must have had something to drop, or this suite proved nothing more
    // than suite 1.
    assert!(
        total.bytes_dropped > 0 && total.writes_torn > 0,
        "the simulated power losses dropped nothing: {total:?}"
    );
    eprintln!(
        "power-loss suite: {losses} power losses, {after_crash} of them soon after a plain crash and restart ({} files lost their directory entry, {} files lost unsynced bytes, {} bytes dropped, {} writes torn, {} old bytes back in recycled files); {} records acknowledged, {} stored, {} deleted by retention, 0 lost, 0 duplicated, {} lane logs dense",
        total.files_removed,
        total.files_damaged,
        total.bytes_dropped,
        total.writes_torn,
        total.old_bytes_restored,
        checked.acknowledged,
        checked.stored,
        checked.deleted_by_retention,
        checked.lane_logs
    );
    (checked, total, broker, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_repeated_power_loss_exactly_once() {
    let (checked, ..) = lose_power_repeatedly(SMALL_SEGMENTS.to_vec()).await;
    assert_eq!(checked.deleted_by_retention, 0, "nothing deletes here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_that_retention_keeps_survive_power_loss_in_recycled_segment_files() {
    let args = [
        ["--metrics-listen", "off", "--index-interval-bytes", "1024"].as_slice(),
        &KEEPING_TWO_SEGMENTS,
    ]
    .concat();
    let (checked, total, mut broker, dir) = lose_power_repeatedly(args).await;
    assert!(
        checked.deleted_by_retention > 0,
        "retention deleted nothing acknowledged"
    );
    // Otherwise no power loss hit a recycled file, and this run proved nothing more.
    assert!(
        total.old_bytes_restored > 0,
        "no recycled file lost bytes: {total:?}"
    );
    broker.signal("TERM");
    assert!(broker.wait(), "a clean stop");
    assert_lane_logs_keep(&dir.path().join("data"), KEPT_BYTES);
}
