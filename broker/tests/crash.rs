//! Reliability suite 1, process crash: idempotent producers with `acks = durable` log
//! every acknowledgement while the broker is SIGKILLed at random moments and restarted,
//! 20 times (`LANES_CRASH_KILLS`). The checks (in `crash_support`), as Jepsen's Kafka
//! checker does them: every acknowledged record is read exactly once, at the offset it
//! was acknowledged with; each lane log's offsets run 0, 1, 2… with no gap or repeat;
//! and no record, acknowledged or not, is stored twice.

mod crash_support;
mod process_support;

use std::time::Duration;

use crash_support::{Lcg, Workload, env_u64, seed};
use process_support::{BrokerProcess, fixed_listen_address};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_repeated_sigkill_exactly_once() {
    let kills = env_u64("LANES_CRASH_KILLS", 20);
    let seed = seed("LANES_CRASH_SEED");
    eprintln!("crash suite: {kills} kills, LANES_CRASH_SEED={seed}");
    let mut random = Lcg(seed);

    let listen = fixed_listen_address();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--metrics-listen", "off"];
    let mut broker = BrokerProcess::start_on(&listen, dir.path(), &args);
    let workload = Workload::start(&broker.address).await;
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(100 + random.next(600))).await;
        broker.kill();
        tokio::time::sleep(Duration::from_millis(random.next(200))).await;
        broker = BrokerProcess::start_on(&listen, dir.path(), &args);
    }
    // Some traffic on the last incarnation, then stop and settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let checked = workload.finish(&broker.address).await;
    eprintln!(
        "crash suite: {kills} SIGKILLs; {} records acknowledged, {} stored (the rest were in flight at a kill and retried or not), 0 lost, 0 duplicated, {} lane logs dense",
        checked.acknowledged, checked.stored, checked.lane_logs
    );
}
