//! Metric names and where they are recorded. Recorded with the `metrics` facade; the
//! `lanes-broker` binary exports them in Prometheus format on `metrics_listen`. Names
//! carry their units. Per-lane series are labelled `topic` and `lane` (the lane's name).
//!
//! Recording is per request and lane, never per record.

use lanes_protocol::{ErrorCode, Request};
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Record bytes appended, by topic and lane.
pub const PRODUCE_BYTES: &str = "lanes_produce_bytes_total";
/// Records appended, by topic and lane.
pub const PRODUCE_RECORDS: &str = "lanes_produce_records_total";
/// Record bytes sent in fetch responses, by topic and lane.
pub const FETCH_BYTES: &str = "lanes_fetch_bytes_total";
/// Records sent in fetch responses (whole batches), by topic and lane.
pub const FETCH_RECORDS: &str = "lanes_fetch_records_total";
/// Requests received, by API.
pub const REQUESTS: &str = "lanes_requests_total";
/// From a request's arrival to its response being ready (long polls and durability
/// waits included), by API.
pub const REQUEST_DURATION_SECONDS: &str = "lanes_request_duration_seconds";
/// Requests, or lane logs within a request, answered with an error, by API and code.
pub const REJECTED: &str = "lanes_rejected_total";
/// Produce requests with `acks = durable`: from their appends to their records being
/// durable (queueing for an fsync thread, and the fsync).
pub const PRODUCE_DURABILITY_WAIT_SECONDS: &str = "lanes_produce_durability_wait_seconds";
/// fsync rounds of lane logs (each covers every append before it).
pub const FSYNCS: &str = "lanes_fsync_total";
/// Segments that began as the file of a segment retention deleted (overwritten rather
/// than new; see docs/STORAGE.md).
pub const SEGMENTS_RECYCLED: &str = "lanes_segments_recycled_total";
/// Reads of batches mostly gone from the page cache, done with `O_DIRECT` (see
/// `direct_read_bytes_max`).
pub const DIRECT_READS: &str = "lanes_direct_reads_total";
/// Bytes those reads took from the disk.
pub const DIRECT_READ_BYTES: &str = "lanes_direct_read_bytes_total";
/// Direct reads that found their bytes read ahead.
pub const DIRECT_READS_READ_AHEAD: &str = "lanes_direct_reads_read_ahead_total";
/// Reads that went through the page cache because every direct read buffer was lent.
pub const DIRECT_READ_BUFFERS_EXHAUSTED: &str = "lanes_direct_read_buffers_exhausted_total";
/// How long each fsync round took.
pub const FSYNC_DURATION_SECONDS: &str = "lanes_fsync_duration_seconds";
/// Histogram: how long a fetch waited for the disk, on a blocking thread.
pub const FETCH_DISK_WAIT_SECONDS: &str = "lanes_fetch_disk_wait_seconds";
/// Per lane log (summed over partitions): records appended but not yet fsynced, the
/// distance from the end of the log to its durable watermark.
pub const LOG_UNSYNCED_RECORDS: &str = "lanes_log_unsynced_records";
/// Per topic and lane (summed over partitions): segment files.
pub const LOG_SEGMENTS: &str = "lanes_log_segments";
/// Per topic and lane (summed over partitions): bytes of segment files.
pub const LOG_BYTES: &str = "lanes_log_bytes";
/// Bytes of deleted segment files not yet freed (see `delete_bytes_per_s`).
pub const DELETE_PENDING_BYTES: &str = "lanes_delete_pending_bytes";
/// Assignment changes (new generations), by group.
pub const GROUP_REBALANCES: &str = "lanes_group_rebalances_total";
/// Client connections open now.
pub const CONNECTIONS: &str = "lanes_connections";
/// Client connections accepted since start (those over `connections_max` are not).
pub const CONNECTIONS_ACCEPTED: &str = "lanes_connections_total";
/// Per group, topic and lane: records not yet consumed (committed) by the group.
pub const GROUP_BACKLOG_RECORDS: &str = "lanes_group_backlog_records";
/// Per group, topic and lane: bytes of the batches holding those records.
pub const GROUP_BACKLOG_BYTES: &str = "lanes_group_backlog_bytes";
/// Per group, topic and lane: age of the oldest record the group has not consumed.
pub const GROUP_OLDEST_UNCONSUMED_AGE_SECONDS: &str = "lanes_group_oldest_unconsumed_age_seconds";

/// Registers the descriptions (shown as `# HELP` lines).
pub fn describe() {
    describe_counter!(
        FETCH_RECORDS,
        Unit::Count,
        "Records sent to fetches, by topic and lane."
    );
    describe_counter!(REQUESTS, Unit::Count, "Requests received, by API.");
    describe_counter!(
        DIRECT_READS,
        Unit::Count,
        "Reads of batches mostly gone from the page cache, done with O_DIRECT."
    );
    describe_counter!(DIRECT_READ_BYTES, Unit::Bytes, "Bytes read with O_DIRECT.");
    describe_counter!(
        DIRECT_READS_READ_AHEAD,
        Unit::Count,
        "Direct reads that found their bytes read ahead."
    );
    describe_counter!(
        DIRECT_READ_BUFFERS_EXHAUSTED,
        Unit::Count,
        "Reads that went through the page cache because every direct read buffer was lent."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "From a request's arrival to its response being ready (waits included), by API."
    );
    describe_counter!(
        REJECTED,
        Unit::Count,
        "Requests, or lane logs within requests, answered with an error, by API and error code."
    );
    describe_counter!(FSYNCS, Unit::Count, "fsync rounds of lane logs.");
    describe_counter!(
        SEGMENTS_RECYCLED,
        Unit::Count,
        "Segments that overwrote the file of a segment retention deleted."
    );
    describe_histogram!(
        PRODUCE_DURABILITY_WAIT_SECONDS,
        Unit::Seconds,
        "Durable produce requests: from their appends to their records being durable."
    );
    describe_histogram!(
        FSYNC_DURATION_SECONDS,
        Unit::Seconds,
        "How long each fsync round took."
    );
    describe_histogram!(
        FETCH_DISK_WAIT_SECONDS,
        Unit::Seconds,
        "Fetch reads that waited for the disk on a blocking thread (a direct read with no read-ahead for it or only a queued one, or one still running after 200 ms): how long."
    );
    describe_gauge!(
        LOG_UNSYNCED_RECORDS,
        Unit::Count,
        "Records appended but not yet fsynced (durable watermark lag), by topic and lane."
    );
    describe_gauge!(LOG_SEGMENTS, Unit::Count, "Segment files, by topic and lane.");
    describe_gauge!(
        LOG_BYTES,
        Unit::Bytes,
        "Bytes of segment files, by topic and lane."
    );
    describe_gauge!(
        DELETE_PENDING_BYTES,
        Unit::Bytes,
        "Bytes of deleted segment files not yet freed."
    );
    describe_counter!(
        GROUP_REBALANCES,
        Unit::Count,
        "Assignment changes (generations), by group."
    );
    describe_gauge!(CONNECTIONS, Unit::Count, "Client connections open.");
    describe_counter!(CONNECTIONS_ACCEPTED, Unit::Count, "Client connections accepted.");
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

/// The API name a request is counted under.
pub fn api_name(request: &Request) -> &'static str {
    match request {
        Request::ApiVersions(_) => "api_versions",
        Request::CreateTopic(_) => "create_topic",
        Request::DeleteTopic(_) => "delete_topic",
        Request::Metadata(_) => "metadata",
        Request::Produce(_) => "produce",
        Request::Fetch(_) => "fetch",
        Request::ListOffsets(_) => "list_offsets",
        Request::InitProducerId(_) => "init_producer_id",
        Request::JoinGroup(_) => "join_group",
        Request::Heartbeat(_) => "heartbeat",
        Request::LeaveGroup(_) => "leave_group",
        Request::OffsetCommit(_) => "offset_commit",
        Request::OffsetFetch(_) => "offset_fetch",
        Request::DescribeGroup(_) => "describe_group",
        Request::ListGroups(_) => "list_groups",
    }
}

/// Counts a request, or a lane log within one, answered with `code`.
pub fn rejected(api: &'static str, code: ErrorCode) {
    metrics::counter!(REJECTED, "api" => api, "code" => code.name()).increment(1);
}
