//! Metric names and where they are recorded. Recorded with the `metrics` facade; the
//! `lanes-broker` binary exports them in Prometheus format on `metrics_listen`. Names
//! carry their units. Per-lane series are labelled `topic` and `lane` (the lane's name).
//!
//! Recording is per request and lane, never per record.

use metrics::{Unit, describe_counter, describe_gauge};

/// Record bytes appended, by topic and lane.
pub const PRODUCE_BYTES: &str = "lanes_produce_bytes_total";
/// Records appended, by topic and lane.
pub const PRODUCE_RECORDS: &str = "lanes_produce_records_total";
/// Record bytes sent in fetch responses, by topic and lane.
pub const FETCH_BYTES: &str = "lanes_fetch_bytes_total";
/// Per group, topic and lane: records not yet consumed (committed) by the group.
pub const GROUP_BACKLOG_RECORDS: &str = "lanes_group_backlog_records";
/// Per group, topic and lane: bytes of the batches holding those records.
pub const GROUP_BACKLOG_BYTES: &str = "lanes_group_backlog_bytes";
/// Per group, topic and lane: age of the oldest record the group has not consumed.
pub const GROUP_OLDEST_UNCONSUMED_AGE_SECONDS: &str = "lanes_group_oldest_unconsumed_age_seconds";

/// Registers the descriptions (shown as `# HELP` lines).
pub fn describe() {
    describe_counter!(
        PRODUCE_BYTES,
        Unit::Bytes,
        "Record bytes appended, by topic and lane."
    );
    describe_counter!(
        PRODUCE_RECORDS,
        Unit::Count,
        "Records appended, by topic and lane."
    );
    describe_counter!(
        FETCH_BYTES,
        Unit::Bytes,
        "Record bytes sent to fetches, by topic and lane."
    );
    describe_gauge!(
        GROUP_BACKLOG_RECORDS,
        Unit::Count,
        "Records a group has not consumed yet, by group, topic and lane."
    );
    describe_gauge!(
        GROUP_BACKLOG_BYTES,
        Unit::Bytes,
        "Bytes of the records a group has not consumed yet, by group, topic and lane."
    );
    describe_gauge!(
        GROUP_OLDEST_UNCONSUMED_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest record a group has not consumed, by group, topic and lane (0 when none waits)."
    );
}
