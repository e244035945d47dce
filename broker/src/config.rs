//! Broker settings: every one is a flag (`--segment-bytes-max`), an environment variable
//! (`LANES_SEGMENT_BYTES_MAX`) and a key in the optional TOML file
//! (`segment_bytes_max = …`), with the same name. Precedence: flag, then environment,
//! then file, then the default. Each setting is listed once, in `settings!`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lanes_protocol::BatchLimits;
use lanes_protocol::messages::is_valid_lane_name;
use serde::{Deserialize, Serialize};

use crate::scheduler::LanePolicy;
use crate::storage::{FsyncPolicy, LogConfig};

/// When lane logs call fsync (see docs/STORAGE.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// As soon as there is unsynced data, with group commit.
    Always,
    /// Every `fsync_interval_ms`.
    Interval,
    /// Never (only on clean shutdown); nothing is ever durable before that, so topics
    /// can only promise `written`.
    Never,
}

/// What a topic promises about the records it lets consumers see and `acks = durable`
/// producers acknowledge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// In the broker's page cache: survives a broker crash, not a power loss.
    Written,
    /// Fsynced: survives a power loss.
    Durable,
}

macro_rules! text_enum {
    ($ty:ident { $($variant:ident = $text:literal),* }) => {
        impl FromStr for $ty {
            type Err = String;
            fn from_str(text: &str) -> Result<$ty, String> {
                match text {
                    $($text => Ok($ty::$variant),)*
                    _ => Err(String::from(concat!("expected one of:", $(" ", $text),*))),
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $($ty::$variant => $text,)* })
            }
        }
    };
}

text_enum!(FsyncMode { Always = "always", Interval = "interval", Never = "never" });
text_enum!(Durability { Written = "written", Durable = "durable" });

macro_rules! settings {
    ($($(#[doc = $doc:literal])* $name:ident: $ty:ty = $default:expr, $env:literal;)*) => {
        /// Every broker setting. Field names are the TOML keys.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Settings {
            $($(#[doc = $doc])* pub $name: $ty,)*
        }

        impl Default for Settings {
            fn default() -> Settings {
                Settings { $($name: $default,)* }
            }
        }

        /// The settings as command-line flags; each is also read from its environment
        /// variable. Unset ones fall back to the file, then the default.
        #[derive(Clone, Debug, Default, clap::Args)]
        pub struct SettingsArgs {
            $($(#[doc = $doc])* #[arg(long, env = $env, value_name = "VALUE")] pub $name: Option<$ty>,)*
        }

        impl Settings {
            fn apply(&mut self, args: &SettingsArgs) {
                $(if let Some(value) = &args.$name { self.$name = value.clone(); })*
            }

            /// `(toml key, environment variable)` of every setting.
            pub fn names() -> &'static [(&'static str, &'static str)] {
                &[$((stringify!($name), $env),)*]
            }
        }
    };
}

const MIB: u32 = 1 << 20;
const DAY_MS: u64 = 24 * 3600 * 1000;

settings! {
    /// Address to serve the Lanes protocol on.
    listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7070)), "LANES_LISTEN";
    /// Where topics and metadata are stored.
    data_dir: PathBuf = PathBuf::from("./data"), "LANES_DATA_DIR";
    /// When lane logs fsync: always (group commit), interval or never.
    fsync: FsyncMode = FsyncMode::Always, "LANES_FSYNC";
    /// With `fsync = interval`: fsync when the oldest unsynced append is this old (ms).
    fsync_interval_ms: u64 = 10, "LANES_FSYNC_INTERVAL_MS";
    /// Threads that run fsyncs; fsyncs of different lane logs run in parallel.
    fsync_threads: u32 = 2, "LANES_FSYNC_THREADS";
    /// Without `fsync = always`: the fsync threads start the writeback of each this many
    /// appended bytes of a lane log, instead of leaving it all to the kernel; 0 leaves it.
    writeback_bytes: u32 = MIB, "LANES_WRITEBACK_BYTES";
    /// Per lane log: how many of its newest bytes stay in the page cache once written
    /// to the disk; the pages behind them are dropped, so that appends reuse that memory
    /// instead of taking new memory, and consumers further behind read from the disk
    /// (pages from the lowest offset committed by a group with a member subscribed stay),
    /// with O_DIRECT (`direct_read_bytes_max`). 0 leaves the page cache to the kernel.
    cached_tail_bytes: u64 = 64 * MIB as u64, "LANES_CACHED_TAIL_BYTES";
    /// Buffers for reads of batches mostly gone from the page cache, which are read from
    /// the disk with O_DIRECT instead of through it (bytes, over all lane logs, in
    /// buffers of 1 MiB and 12 KiB); with every buffer lent, or 0, reads go through the
    /// page cache.
    direct_read_bytes_max: u64 = 32 * MIB as u64, "LANES_DIRECT_READ_BYTES_MAX";
    /// A segment rolls before it would exceed this size (bytes).
    segment_bytes_max: u32 = 1024 * MIB, "LANES_SEGMENT_BYTES_MAX";
    /// A segment rolls once it has been active this long (ms).
    segment_ms_max: u64 = 7 * DAY_MS, "LANES_SEGMENT_MS_MAX";
    /// Bytes of log per sparse index entry.
    index_interval_bytes: u32 = 4096, "LANES_INDEX_INTERVAL_BYTES";
    /// Size bound of each segment index file (bytes).
    index_bytes_max: u32 = 10 * MIB, "LANES_INDEX_BYTES_MAX";
    /// Default for topics: delete segments whose newest record is older (ms); -1 keeps all.
    retention_ms: i64 = 7 * DAY_MS as i64, "LANES_RETENTION_MS";
    /// Default for topics: per lane log, delete the oldest segments above this size
    /// (bytes); -1 for no size limit.
    retention_bytes: i64 = -1, "LANES_RETENTION_BYTES";
    /// How often retention runs (ms). Each pass recycles at most one deleted segment
    /// file per lane log as its next segment, so a pass per segment a busy log fills
    /// keeps its appends overwriting; a pass that finds nothing to delete costs little.
    retention_check_ms: u64 = 10_000, "LANES_RETENTION_CHECK_MS";
    /// Deleted segment files are freed a chunk at a time at this rate (faster when the
    /// backlog would take over 10 s), so that a large delete does not stall fsyncs and
    /// the machine; 0 frees them at once.
    delete_bytes_per_s: u64 = 256 * MIB as u64, "LANES_DELETE_BYTES_PER_S";
    /// Largest record batch a producer may send (bytes).
    batch_bytes_max: u32 = MIB, "LANES_BATCH_BYTES_MAX";
    /// Most records in one batch.
    batch_records_max: u32 = 65_536, "LANES_BATCH_RECORDS_MAX";
    /// Largest request frame (bytes); a larger length prefix closes the connection.
    frame_bytes_max: u32 = 16 * MIB, "LANES_FRAME_BYTES_MAX";
    /// Requests a connection may have in flight; the broker stops reading beyond it.
    requests_in_flight_max: u32 = 64, "LANES_REQUESTS_IN_FLIGHT_MAX";
    /// Bytes of requests being received or handled, over all connections; readers wait
    /// beyond it.
    requests_bytes_max: u64 = 256 * MIB as u64, "LANES_REQUESTS_BYTES_MAX";
    /// Open client connections; more are closed as they arrive.
    connections_max: u32 = 1024, "LANES_CONNECTIONS_MAX";
    /// Once a request starts arriving, all of it must arrive within this time (ms).
    request_receive_ms_max: u64 = 30_000, "LANES_REQUEST_RECEIVE_MS_MAX";
    /// A response must be taken by the client within this time, or the connection is
    /// closed (ms).
    response_send_ms_max: u64 = 30_000, "LANES_RESPONSE_SEND_MS_MAX";
    /// A connection with nothing in flight and no request for this long is closed (ms).
    connection_idle_ms_max: u64 = 600_000, "LANES_CONNECTION_IDLE_MS_MAX";
    /// Cap on a fetch's long-poll wait (ms).
    fetch_wait_ms_max: u32 = 30_000, "LANES_FETCH_WAIT_MS_MAX";
    /// Cap on a fetch response's record bytes (bytes).
    fetch_bytes_max: u32 = 8 * MIB, "LANES_FETCH_BYTES_MAX";
    /// Cap on how long a produce waits for durability (ms).
    produce_timeout_ms_max: u32 = 30_000, "LANES_PRODUCE_TIMEOUT_MS_MAX";
    /// Most topics.
    topics_max: u32 = 10_000, "LANES_TOPICS_MAX";
    /// Most partitions per topic.
    topic_partitions_max: u32 = 1024, "LANES_TOPIC_PARTITIONS_MAX";
    /// Partitions of a topic created without a count, or on first produce.
    topic_partitions_default: u32 = 1, "LANES_TOPIC_PARTITIONS_DEFAULT";
    /// Lanes of a topic created without lane names, most urgent first, comma-separated.
    topic_lanes_default: String = "express,standard,bulk".into(), "LANES_TOPIC_LANES_DEFAULT";
    /// How a topic's lanes share fetches by default: weighted (deficit round robin with
    /// the lane weights, 16:4:1 for three lanes) or strict (all of a more urgent lane
    /// first).
    topic_lane_policy_default: LanePolicy = LanePolicy::Weighted, "LANES_TOPIC_LANE_POLICY_DEFAULT";
    /// Durability topics promise by default: durable or written.
    topic_durability_default: Durability = Durability::Durable, "LANES_TOPIC_DURABILITY_DEFAULT";
    /// Whether producing to a missing topic creates it with the defaults.
    auto_create_topics: bool = true, "LANES_AUTO_CREATE_TOPICS";
    /// Idempotent producers remembered per lane log.
    producer_ids_max: u32 = 10_000, "LANES_PRODUCER_IDS_MAX";
    /// Shortest session timeout a group member may ask for (ms).
    group_session_timeout_ms_min: u32 = 1_000, "LANES_GROUP_SESSION_TIMEOUT_MS_MIN";
    /// Longest session timeout a group member may ask for (ms).
    group_session_timeout_ms_max: u32 = 300_000, "LANES_GROUP_SESSION_TIMEOUT_MS_MAX";
    /// A group without members is deleted, with its committed offsets, after this (ms).
    group_empty_expiry_ms: u64 = 7 * DAY_MS, "LANES_GROUP_EMPTY_EXPIRY_MS";
    /// Most consumer groups.
    groups_max: u32 = 10_000, "LANES_GROUPS_MAX";
    /// Most members of one group.
    group_members_max: u32 = 1_000, "LANES_GROUP_MEMBERS_MAX";
    /// Segment size of the group offsets log (bytes); it is rewritten and trimmed after
    /// about this much (or twice its live size) has been appended.
    offsets_segment_bytes_max: u32 = 16 * MIB, "LANES_OFFSETS_SEGMENT_BYTES_MAX";
    /// Where Prometheus scrapes the metrics (`/metrics`), or `off`.
    metrics_listen: String = "127.0.0.1:9464".into(), "LANES_METRICS_LISTEN";
    /// How often the per-lane group backlog metrics are computed (ms).
    metrics_backlog_interval_ms: u64 = 5_000, "LANES_METRICS_BACKLOG_INTERVAL_MS";
    /// On shutdown, how long in-flight requests may take to finish (ms).
    shutdown_ms_max: u64 = 30_000, "LANES_SHUTDOWN_MS_MAX";
}

/// A setting with a bad value, named.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Settings {
    /// The effective settings: the file (if any), overridden by flags and environment.
    pub fn load(args: &SettingsArgs, file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut settings = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|error| ConfigError::Parse {
                    path: path.to_owned(),
                    message: error.to_string(),
                })?
            }
            None => Settings::default(),
        };
        settings.apply(args);
        settings.validate()?;
        Ok(settings)
    }

    /// The settings as TOML, as `--print-config` shows them.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("settings serialize")
    }

    /// Checks each value and the relationships between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if self.fsync == FsyncMode::Interval && self.fsync_interval_ms == 0 {
            return invalid(
                "fsync_interval_ms",
                "must be at least 1 with fsync = interval".into(),
            );
        }
        if self.fsync_threads == 0 {
            return invalid("fsync_threads", "must be at least 1".into());
        }
        let overhead = 64 * 1024;
        if u64::from(self.frame_bytes_max) < u64::from(self.batch_bytes_max) + overhead {
            return invalid(
                "frame_bytes_max",
                format!(
                    "must exceed batch_bytes_max ({}) by at least {overhead} bytes",
                    self.batch_bytes_max
                ),
            );
        }
        if self.frame_bytes_max > u32::MAX - 4 {
            return invalid("frame_bytes_max", format!("must be at most {}", u32::MAX - 4));
        }
        // A frame reserves its length and its 4-byte prefix.
        if self.requests_bytes_max < u64::from(self.frame_bytes_max) + 4 {
            return invalid(
                "requests_bytes_max",
                "must be at least frame_bytes_max + 4".into(),
            );
        }
        for (key, value) in [
            ("requests_in_flight_max", self.requests_in_flight_max),
            ("connections_max", self.connections_max),
            ("topics_max", self.topics_max),
            ("topic_partitions_default", self.topic_partitions_default),
            ("producer_ids_max", self.producer_ids_max),
            ("groups_max", self.groups_max),
            ("group_members_max", self.group_members_max),
            ("group_session_timeout_ms_min", self.group_session_timeout_ms_min),
        ] {
            if value == 0 {
                return invalid(key, "must be at least 1".into());
            }
        }
        self.metrics_address()?;
        if self.group_session_timeout_ms_min > self.group_session_timeout_ms_max {
            return invalid(
                "group_session_timeout_ms_min",
                "exceeds group_session_timeout_ms_max".into(),
            );
        }
        if self.topic_partitions_default > self.topic_partitions_max {
            return invalid("topic_partitions_default", "exceeds topic_partitions_max".into());
        }
        if let Err(message) = parse_lane_names(&self.topic_lanes_default) {
            return invalid("topic_lanes_default", message);
        }
        if self.retention_ms < -1 || self.retention_bytes < -1 {
            return invalid(
                "retention_ms",
                "retention is -1 (unlimited) or a positive value".into(),
            );
        }
        self.log_config(self.retention_ms, self.retention_bytes)
            .validate()
            .map_err(|error| ConfigError::Invalid {
                key: "segment_bytes_max",
                message: error.to_string(),
            })
    }

    /// Where to serve metrics: `None` when `metrics_listen` is `off`.
    pub fn metrics_address(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_listen == "off" {
            return Ok(None);
        }
        self.metrics_listen
            .parse()
            .map(Some)
            .map_err(|_| ConfigError::Invalid {
                key: "metrics_listen",
                message: format!(
                    "{:?} is not off or an address like 127.0.0.1:9464",
                    self.metrics_listen
                ),
            })
    }

    /// Storage settings of a lane log with the given retention.
    pub fn log_config(&self, retention_ms: i64, retention_bytes: i64) -> LogConfig {
        LogConfig {
            segment_bytes_max: self.segment_bytes_max,
            segment_ms_max: self.segment_ms_max,
            index_interval_bytes: self.index_interval_bytes,
            index_bytes_max: self.index_bytes_max,
            batch: self.batch_limits(),
            fsync: match self.fsync {
                FsyncMode::Always => FsyncPolicy::Always,
                FsyncMode::Interval => FsyncPolicy::Interval(Duration::from_millis(self.fsync_interval_ms)),
                FsyncMode::Never => FsyncPolicy::Never,
            },
            writeback_bytes: self.writeback_bytes,
            cached_tail_bytes: self.cached_tail_bytes,
            retention_ms: u64::try_from(retention_ms).ok(),
            retention_bytes: u64::try_from(retention_bytes).ok(),
            producer_ids_max: self.producer_ids_max as usize,
            ..LogConfig::default()
        }
    }

    pub fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            batch_bytes_max: self.batch_bytes_max,
            batch_records_max: self.batch_records_max,
        }
    }
}

/// Parses comma-separated lane names: 1 to 8 valid, distinct names.
pub fn parse_lane_names(text: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = text.split(',').map(|s| s.trim().to_owned()).collect();
    if names.is_empty() || names.len() > lanes_protocol::LANES_MAX {
        return Err(format!("a topic has 1 to {} lanes", lanes_protocol::LANES_MAX));
    }
    for (i, name) in names.iter().enumerate() {
        if !is_valid_lane_name(name) {
            return Err(format!(
                "lane name {name:?} is not 1 to 32 characters of [a-z0-9_-]"
            ));
        }
        if names[..i].contains(name) {
            return Err(format!("lane name {name:?} appears twice"));
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_names_follow_the_keys() {
        for (key, env) in Settings::names() {
            assert_eq!(*env, format!("LANES_{}", key.to_uppercase()));
        }
    }

    #[test]
    fn defaults_are_valid_and_print_as_toml() {
        let settings = Settings::default();
        settings.validate().unwrap();
        let text = settings.to_toml();
        assert!(text.contains("listen = \"127.0.0.1:7070\""), "{text}");
        let parsed: Settings = toml::from_str(&text).unwrap();
        assert_eq!(parsed, settings);
    }

    #[test]
    fn bad_values_name_their_key() {
        let settings = Settings {
            topic_lanes_default: "express,Express".into(),
            ..Settings::default()
        };
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("topic_lanes_default"), "{error}");
        let settings = Settings {
            frame_bytes_max: 1000,
            ..Settings::default()
        };
        assert!(
            settings
                .validate()
                .unwrap_err()
                .to_string()
                .contains("frame_bytes_max")
        );
    }

    #[test]
    fn lane_names() {
        assert_eq!(
            parse_lane_names("express, bulk").unwrap(),
            vec!["express", "bulk"]
        );
        assert!(parse_lane_names("a,b,c,d,e,f,g,h,i").is_err());
        assert!(parse_lane_names("").is_err());
    }
}
