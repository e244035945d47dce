//! Topics: a name, P partitions and L lanes; every (partition, lane) is one lane log.
//!
//! A topic's spec is stored in `DATA_DIR/meta/topics/<name>.json`, written atomically
//! after its lane logs exist; that write is the moment the topic exists. Its data is in
//! `DATA_DIR/topics/<name>/<partition>/<lane>/`. A data directory without a spec (a
//! create or delete cut short by a crash) is removed when the broker starts.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use lanes_protocol::messages::{CreateTopicRequest, TopicConfig, is_valid_topic_name};
use lanes_protocol::{ErrorCode, Lane, Offset, PartitionId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{Durability, FsyncMode, Settings, parse_lane_names};
use crate::durability::Syncer;
use crate::scheduler::{LanePolicy, WEIGHT_MAX, default_weights};
use crate::storage::{
    AppendOutcome, DirectReadStats, DirectReads, FsyncPolicy, LaneLog, LogConfig, Reaper, StorageError, files,
};

/// A topic's settings, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    /// Lane names, lane 0 (most urgent) first.
    pub lanes: Vec<String>,
    pub durability: Durability,
    /// -1 keeps everything.
    pub retention_ms: i64,
    /// Per lane log; -1 for no limit.
    pub retention_bytes: i64,
    /// How fetches share a response between the lanes.
    #[serde(default)]
    pub lane_policy: LanePolicy,
    /// Per lane, for `weighted`; empty in specs written before weights existed (then the
    /// defaults apply).
    #[serde(default)]
    pub lane_weights: Vec<u32>,
    /// Per-lane overrides of `retention_ms` and `retention_bytes`, by lane name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lane_retention_ms: BTreeMap<String, i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lane_retention_bytes: BTreeMap<String, i64>,
    /// Overrides of the broker's `segment_bytes_max`, `fsync` and `fsync_interval_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_bytes_max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsync: Option<FsyncMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsync_interval_ms: Option<u64>,
}

/// Why a topic operation failed, with its wire code.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("invalid topic name {0:?}: use 1 to 249 characters of [A-Za-z0-9._-]")]
    InvalidName(String),
    #[error("topic {0} already exists")]
    AlreadyExists(String),
    #[error("topic {0} does not exist")]
    Unknown(String),
    #[error("{0}")]
    InvalidConfig(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl TopicError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TopicError::InvalidName(_) => ErrorCode::InvalidTopicName,
            TopicError::AlreadyExists(_) => ErrorCode::TopicAlreadyExists,
            TopicError::Unknown(_) => ErrorCode::UnknownTopic,
            TopicError::InvalidConfig(_) => ErrorCode::InvalidConfig,
            TopicError::LimitExceeded(_) => ErrorCode::LimitExceeded,
            TopicError::Storage(error) => storage_error_code(error),
        }
    }
}

/// The wire code for a storage error.
pub fn storage_error_code(error: &StorageError) -> ErrorCode {
    use lanes_protocol::BatchError;
    match error {
        StorageError::InvalidBatch(BatchError::LengthOutOfRange { length, max, .. }) if length > max => {
            ErrorCode::BatchTooLarge
        }
        StorageError::InvalidBatch(_) => ErrorCode::InvalidBatch,
        StorageError::StorageFull { .. } => ErrorCode::StorageFull,
        StorageError::Io { .. } | StorageError::Failed { .. } => ErrorCode::StorageFailed,
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::Corrupt { .. } => ErrorCode::CorruptData,
        StorageError::ProducerFenced { .. } => ErrorCode::ProducerFenced,
        StorageError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
        StorageError::DuplicateSequence { .. } => ErrorCode::DuplicateSequence,
        StorageError::SequenceReused { .. } => ErrorCode::InvalidBatch,
        StorageError::Closed { .. } => ErrorCode::ShuttingDown,
        StorageError::Locked { .. } => ErrorCode::Internal,
        StorageError::InvalidConfig(_) => ErrorCode::Internal,
    }
}

impl TopicSpec {
    /// The spec a CreateTopic request asks for, with broker defaults filled in.
    pub fn from_request(request: &CreateTopicRequest, settings: &Settings) -> Result<TopicSpec, TopicError> {
        let mut spec = TopicSpec::with_defaults(&request.name, settings)?;
        if request.partitions > 0 {
            spec.partitions = request.partitions;
        }
        if !request.lanes.is_empty() {
            spec.lanes = parse_lane_names(&request.lanes.join(",")).map_err(TopicError::InvalidConfig)?;
            spec.lane_weights = default_weights(spec.lanes.len());
        }
        for config in &request.configs {
            spec.set(config)?;
        }
        spec.check(settings)?;
        Ok(spec)
    }

    /// A topic with every setting at the broker's default.
    pub fn with_defaults(name: &str, settings: &Settings) -> Result<TopicSpec, TopicError> {
        if !is_valid_topic_name(name) {
            return Err(TopicError::InvalidName(name.to_owned()));
        }
        let lanes = parse_lane_names(&settings.topic_lanes_default).map_err(TopicError::InvalidConfig)?;
        Ok(TopicSpec {
            name: name.to_owned(),
            partitions: settings.topic_partitions_default,
            lane_weights: default_weights(lanes.len()),
            lanes,
            durability: settings.topic_durability_default,
            retention_ms: settings.retention_ms,
            retention_bytes: settings.retention_bytes,
            lane_policy: settings.topic_lane_policy_default,
            lane_retention_ms: BTreeMap::new(),
            lane_retention_bytes: BTreeMap::new(),
            segment_bytes_max: None,
            fsync: None,
            fsync_interval_ms: None,
        })
    }

    fn set(&mut self, config: &TopicConfig) -> Result<(), TopicError> {
        let bad = |expected: &str| {
            TopicError::InvalidConfig(format!(
                "topic setting {}: {:?} is not {expected}",
                config.key, config.value
            ))
        };
        let retention = |value: &str| value.parse::<i64>().ok().filter(|v| *v >= -1);
        let key = config.key.as_str();
        match key {
            "durability" => self.durability = config.value.parse().map_err(|_| bad("written or durable"))?,
            "retention_ms" => self.retention_ms = retention(&config.value).ok_or_else(|| bad("-1 or ≥ 0"))?,
            "retention_bytes" => {
                self.retention_bytes = retention(&config.value).ok_or_else(|| bad("-1 or ≥ 0"))?
            }
            "lane_policy" => {
                self.lane_policy = config.value.parse().map_err(|_| bad("strict or weighted"))?
            }
            "lane_weights" => {
                self.lane_weights = config
                    .value
                    .split(',')
                    .map(|w| {
                        w.trim()
                            .parse::<u32>()
                            .ok()
                            .filter(|w| (1..=WEIGHT_MAX).contains(w))
                    })
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| bad("comma-separated weights from 1 to 1048576, one per lane"))?;
            }
            "segment_bytes_max" => {
                let value = config.value.parse().map_err(|_| bad("a number of bytes"))?;
                self.segment_bytes_max = Some(value);
            }
            "fsync" => {
                let value = config
                    .value
                    .parse()
                    .map_err(|_| bad("always, interval or never"))?;
                self.fsync = Some(value);
            }
            "fsync_interval_ms" => {
                let value = config.value.parse().ok().filter(|ms| *ms > 0);
                self.fsync_interval_ms = Some(value.ok_or_else(|| bad("at least 1 (ms)"))?);
            }
            _ if key.starts_with("retention_ms.") => {
                let value = retention(&config.value).ok_or_else(|| bad("-1 or ≥ 0"))?;
                self.lane_retention_ms
                    .insert(key["retention_ms.".len()..].to_owned(), value);
            }
            _ if key.starts_with("retention_bytes.") => {
                let value = retention(&config.value).ok_or_else(|| bad("-1 or ≥ 0"))?;
                self.lane_retention_bytes
                    .insert(key["retention_bytes.".len()..].to_owned(), value);
            }
            other => {
                return Err(TopicError::InvalidConfig(format!(
                    "unknown topic setting {other:?}; known: durability, retention_ms, retention_bytes, \
                     lane_policy, lane_weights, retention_ms.<lane>, retention_bytes.<lane>, \
                     segment_bytes_max, fsync, fsync_interval_ms"
                )));
            }
        }
        Ok(())
    }

    fn check(&self, settings: &Settings) -> Result<(), TopicError> {
        if self.partitions == 0 || self.partitions > settings.topic_partitions_max {
            return Err(TopicError::LimitExceeded(format!(
                "a topic has 1 to {} partitions (topic_partitions_max)",
                settings.topic_partitions_max
            )));
        }
        if self.lane_weights.len() != self.lanes.len() {
            return Err(TopicError::InvalidConfig(format!(
                "lane_weights has {} weights for {} lanes ({})",
                self.lane_weights.len(),
                self.lanes.len(),
                self.lanes.join(",")
            )));
        }
        for lane in self
            .lane_retention_ms
            .keys()
            .chain(self.lane_retention_bytes.keys())
        {
            if !self.lanes.contains(lane) {
                return Err(TopicError::InvalidConfig(format!(
                    "retention for lane {lane:?}, which the topic does not have (lanes: {})",
                    self.lanes.join(",")
                )));
            }
        }
        if self.fsync == Some(FsyncMode::Never) && self.durability == Durability::Durable {
            return Err(TopicError::InvalidConfig(
                "topic setting fsync: never cannot keep the promise durability=durable; \
                 add --config durability=written"
                    .into(),
            ));
        }
        // The overrides must make sense with the broker's other settings.
        self.log_settings(settings)
            .validate()
            .map_err(|error| TopicError::InvalidConfig(error.to_string()))
    }

    /// The lane weights (the defaults for specs written before weights existed).
    pub fn weights(&self) -> Vec<u32> {
        if self.lane_weights.len() == self.lanes.len() {
            // A hand-edited spec is not checked when it is loaded: keep weights in range.
            self.lane_weights
                .iter()
                .map(|w| (*w).clamp(1, WEIGHT_MAX))
                .collect()
        } else {
            default_weights(self.lanes.len())
        }
    }

    /// Retention of one lane's logs: `(retention_ms, retention_bytes)`.
    pub fn lane_retention(&self, lane: usize) -> (i64, i64) {
        let name = &self.lanes[lane];
        (
            self.lane_retention_ms
                .get(name)
                .copied()
                .unwrap_or(self.retention_ms),
            self.lane_retention_bytes
                .get(name)
                .copied()
                .unwrap_or(self.retention_bytes),
        )
    }

    /// The broker's settings with this topic's overrides of them.
    pub fn log_settings(&self, settings: &Settings) -> Settings {
        let mut settings = settings.clone();
        if let Some(value) = self.segment_bytes_max {
            settings.segment_bytes_max = value;
        }
        if let Some(value) = self.fsync {
            settings.fsync = value;
        }
        if let Some(value) = self.fsync_interval_ms {
            settings.fsync_interval_ms = value;
        }
        settings
    }

    /// The settings as key-value pairs, as Metadata shows them.
    pub fn configs(&self) -> Vec<TopicConfig> {
        let weights: Vec<String> = self.weights().iter().map(u32::to_string).collect();
        let mut configs: Vec<(String, String)> = vec![
            ("durability".into(), self.durability.to_string()),
            ("retention_ms".into(), self.retention_ms.to_string()),
            ("retention_bytes".into(), self.retention_bytes.to_string()),
            ("lane_policy".into(), self.lane_policy.to_string()),
            ("lane_weights".into(), weights.join(",")),
        ];
        for (lane, value) in &self.lane_retention_ms {
            configs.push((format!("retention_ms.{lane}"), value.to_string()));
        }
        for (lane, value) in &self.lane_retention_bytes {
            configs.push((format!("retention_bytes.{lane}"), value.to_string()));
        }
        if let Some(value) = self.segment_bytes_max {
            configs.push(("segment_bytes_max".into(), value.to_string()));
        }
        if let Some(value) = self.fsync {
            configs.push(("fsync".into(), value.to_string()));
        }
        if let Some(value) = self.fsync_interval_ms {
            configs.push(("fsync_interval_ms".into(), value.to_string()));
        }
        configs
            .into_iter()
            .map(|(key, value)| TopicConfig { key, value })
            .collect()
    }
}

/// How far a lane log can be read, published for waiters (long polls, durable acks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub visible: Offset,
    /// The lane log stopped taking writes (a failed fsync or write).
    pub failed: bool,
}

/// Per-lane counters of a lane log (shared by the partitions of a lane: same labels).
#[derive(Debug)]
pub struct LaneCounters {
    pub produce_bytes: metrics::Counter,
    pub produce_records: metrics::Counter,
    pub fetch_bytes: metrics::Counter,
    pub fetch_records: metrics::Counter,
}

impl LaneCounters {
    fn new(topic: &str, lane: &str) -> LaneCounters {
        let labels = [("topic", topic.to_owned()), ("lane", lane.to_owned())];
        LaneCounters {
            produce_bytes: metrics::counter!(crate::metrics::PRODUCE_BYTES, &labels),
            produce_records: metrics::counter!(crate::metrics::PRODUCE_RECORDS, &labels),
            fetch_bytes: metrics::counter!(crate::metrics::FETCH_BYTES, &labels),
            fetch_records: metrics::counter!(crate::metrics::FETCH_RECORDS, &labels),
        }
    }
}

/// A lane log as the broker serves it.
#[derive(Debug)]
pub struct LogHandle {
    pub log: LaneLog,
    pub counters: LaneCounters,
    /// What consumers may see: written records, or only durable ones.
    visibility: Durability,
    progress: watch::Sender<Progress>,
    /// Whether the log waits in the syncer's queue for an fsync.
    pub(crate) sync_queued: AtomicBool,
    /// Whether the log waits in the syncer's queue for its writeback to start.
    pub(crate) writeback_queued: AtomicBool,
    syncer: Arc<Syncer>,
}

impl LogHandle {
    fn new(
        log: LaneLog,
        counters: LaneCounters,
        visibility: Durability,
        syncer: Arc<Syncer>,
    ) -> Arc<LogHandle> {
        let visible = match visibility {
            Durability::Written => log.next_offset(),
            Durability::Durable => log.durable_offset(),
        };
        let handle = Arc::new(LogHandle {
            log,
            counters,
            visibility,
            progress: watch::Sender::new(Progress {
                visible,
                failed: false,
            }),
            sync_queued: AtomicBool::new(false),
            writeback_queued: AtomicBool::new(false),
            syncer,
        });
        // The clock queues interval logs once their oldest append is old enough; appends
        // queue the rest (every `always` append, and any log past its bound of unsynced
        // rolled segments: `AppendOutcome::fsync_due`).
        if matches!(handle.log.config().fsync, FsyncPolicy::Interval(_)) {
            handle.syncer.register(&handle);
        }
        handle
    }

    /// Offsets below this may be read by consumers.
    pub fn visible_offset(&self) -> Offset {
        match self.visibility {
            Durability::Written => self.log.next_offset(),
            Durability::Durable => self.log.durable_offset(),
        }
    }

    pub fn visibility(&self) -> Durability {
        self.visibility
    }

    /// Appends a batch and gets it on its way to durability.
    pub fn append(self: &Arc<Self>, batch: &mut [u8]) -> Result<AppendOutcome, StorageError> {
        let outcome = self.log.append(batch)?;
        if !outcome.duplicate {
            self.counters.produce_bytes.increment(batch.len() as u64);
            self.counters
                .produce_records
                .increment(outcome.last_offset.0 - outcome.base_offset.0 + 1);
        }
        if self.visibility == Durability::Written {
            self.publish_visible(self.log.next_offset());
        }
        if outcome.fsync_due {
            self.syncer.request(self);
        }
        if outcome.writeback_due {
            self.syncer.request_writeback(self);
        }
        Ok(outcome)
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Called by the syncer after an fsync round.
    pub(crate) fn synced(&self, result: Result<Offset, StorageError>) {
        match result {
            Ok(durable) if self.visibility == Durability::Durable => self.publish_visible(durable),
            Ok(_) => {}
            Err(error) => {
                // Once: a failed lane log stays failed, and every later flush says so.
                self.progress.send_if_modified(|p| {
                    if !p.failed {
                        tracing::error!(dir = %self.log.dir().display(), %error, "fsync failed");
                    }
                    !std::mem::replace(&mut p.failed, true)
                });
            }
        }
    }

    fn publish_visible(&self, visible: Offset) {
        self.progress.send_if_modified(|p| {
            let advanced = visible > p.visible;
            p.visible = p.visible.max(visible);
            advanced
        });
    }

    /// Waits until `offset` is visible (so as durable as the topic promises).
    /// Returns false if the lane log failed first.
    pub async fn wait_visible(&self, offset: Offset) -> bool {
        let mut progress = self.progress.subscribe();
        match progress.wait_for(|p| p.visible > offset || p.failed).await {
            Ok(p) => !p.failed || p.visible > offset,
            Err(_) => false,
        }
    }
}

/// A topic and its lane logs.
#[derive(Debug)]
pub struct Topic {
    pub spec: TopicSpec,
    /// `[partition][lane]`.
    logs: Vec<Vec<Arc<LogHandle>>>,
}

impl Topic {
    pub fn log(&self, partition: PartitionId, lane: Lane) -> Result<&Arc<LogHandle>, ErrorCode> {
        let lanes = self
            .logs
            .get(partition.0 as usize)
            .ok_or(ErrorCode::UnknownPartition)?;
        lanes.get(lane.0 as usize).ok_or(ErrorCode::UnknownLane)
    }

    /// Every lane log as `(partition, lane, log)`.
    pub fn logs(&self) -> impl Iterator<Item = (PartitionId, Lane, &Arc<LogHandle>)> {
        self.logs.iter().enumerate().flat_map(|(p, lanes)| {
            lanes
                .iter()
                .enumerate()
                .map(move |(l, log)| (PartitionId(p as u32), Lane(l as u8), log))
        })
    }
}

/// All topics of a broker.
#[derive(Debug)]
pub struct Topics {
    settings: Settings,
    data_dir: PathBuf,
    meta_dir: PathBuf,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Serializes creates and deletes.
    admin: Mutex<()>,
    /// Counts creates and deletes, so others can notice that topics changed.
    version: AtomicU64,
    syncer: Arc<Syncer>,
    reaper: Arc<Reaper>,
    /// Shared by every lane log; `None` with `direct_read_bytes_max` under one buffer.
    direct_reads: Option<Arc<DirectReads>>,
}

impl Topics {
    /// What direct reads have done since start; `None` with them off.
    pub fn direct_read_stats(&self) -> Option<DirectReadStats> {
        self.direct_reads.as_ref().map(|pool| pool.stats())
    }

    /// Opens every topic in the data directory, recovering its lane logs.
    pub fn open(settings: &Settings, syncer: Arc<Syncer>, reaper: Arc<Reaper>) -> Result<Topics, TopicError> {
        let data_dir = settings.data_dir.join("topics");
        let meta_dir = settings.data_dir.join("meta").join("topics");
        files::create_dir_all_durable(&data_dir)?;
        files::create_dir_all_durable(&meta_dir)?;
        let topics = Topics {
            settings: settings.clone(),
            data_dir,
            meta_dir,
            topics: RwLock::new(HashMap::new()),
            admin: Mutex::new(()),
            version: AtomicU64::new(0),
            syncer,
            reaper,
            direct_reads: DirectReads::new(settings.direct_read_bytes_max),
        };
        let mut specs = Vec::new();
        for entry in fs::read_dir(&topics.meta_dir).map_err(|e| StorageError::io(&topics.meta_dir, e))? {
            let path = entry.map_err(|e| StorageError::io(&topics.meta_dir, e))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = fs::read_to_string(&path).map_err(|e| StorageError::io(&path, e))?;
                let spec: TopicSpec = serde_json::from_str(&text)
                    .map_err(|e| TopicError::InvalidConfig(format!("{}: {e}", path.display())))?;
                specs.push(spec);
            } else if path.extension().is_some_and(|e| e == "tmp") {
                files::remove_if_exists(&path)?;
            }
        }
        for spec in specs {
            let topic = topics.open_topic(spec)?;
            topics.write().insert(topic.spec.name.clone(), topic);
        }
        topics.remove_orphan_data()?;
        Ok(topics)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Topic>>> {
        self.topics.write().expect("topics lock poisoned")
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Topic>>> {
        self.topics.read().expect("topics lock poisoned")
    }

    fn remove_orphan_data(&self) -> Result<(), TopicError> {
        for entry in fs::read_dir(&self.data_dir).map_err(|e| StorageError::io(&self.data_dir, e))? {
            let path = entry.map_err(|e| StorageError::io(&self.data_dir, e))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if !self.read().contains_key(&name) {
                tracing::warn!(dir = %path.display(), "removing data of a topic that has no spec (an interrupted create or delete)");
                fs::remove_dir_all(&path).map_err(|e| StorageError::io(&path, e))?;
            }
        }
        Ok(())
    }

    fn lane_dir(&self, topic: &str, partition: u32, lane: usize) -> PathBuf {
        self.data_dir
            .join(topic)
            .join(partition.to_string())
            .join(lane.to_string())
    }

    fn spec_path(&self, name: &str) -> PathBuf {
        self.meta_dir.join(format!("{name}.json"))
    }

    fn open_topic(&self, spec: TopicSpec) -> Result<Arc<Topic>, TopicError> {
        let settings = spec.log_settings(&self.settings);
        let visibility = match settings.fsync {
            FsyncMode::Never => Durability::Written,
            _ => spec.durability,
        };
        let mut logs = Vec::with_capacity(spec.partitions as usize);
        for partition in 0..spec.partitions {
            let mut lanes = Vec::with_capacity(spec.lanes.len());
            for lane in 0..spec.lanes.len() {
                let (retention_ms, retention_bytes) = spec.lane_retention(lane);
                let config = LogConfig {
                    reaper: Some(Arc::clone(&self.reaper)),
                    direct_reads: self.direct_reads.clone(),
                    ..settings.log_config(retention_ms, retention_bytes)
                };
                let log = LaneLog::open(self.lane_dir(&spec.name, partition, lane), config)?;
                let counters = LaneCounters::new(&spec.name, &spec.lanes[lane]);
                lanes.push(LogHandle::new(
                    log,
                    counters,
                    visibility,
                    Arc::clone(&self.syncer),
                ));
            }
            logs.push(lanes);
        }
        Ok(Arc::new(Topic { spec, logs }))
    }

    /// Changes whenever a topic is created or deleted.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.read().get(name).cloned()
    }

    /// Sets the per-lane gauges of the logs on disk: segments, bytes and records not yet
    /// fsynced, each summed over the topic's partitions.
    pub fn record_log_metrics(&self) {
        for topic in self.list() {
            let lanes = topic.spec.lanes.len();
            let (mut segments, mut bytes, mut unsynced) =
                (vec![0u64; lanes], vec![0u64; lanes], vec![0u64; lanes]);
            for (_, lane, handle) in topic.logs() {
                let stats = handle.log.stats();
                let lane = usize::from(lane.0);
                segments[lane] += stats.segments as u64;
                bytes[lane] += stats.size_bytes;
                unsynced[lane] += stats.next_offset.0.saturating_sub(stats.durable_offset.0);
            }
            for (lane, name) in topic.spec.lanes.iter().enumerate() {
                let labels = [("topic", topic.spec.name.clone()), ("lane", name.clone())];
                metrics::gauge!(crate::metrics::LOG_SEGMENTS, &labels).set(segments[lane] as f64);
                metrics::gauge!(crate::metrics::LOG_BYTES, &labels).set(bytes[lane] as f64);
                metrics::gauge!(crate::metrics::LOG_UNSYNCED_RECORDS, &labels).set(unsynced[lane] as f64);
            }
        }
    }

    /// Every topic, sorted by name.
    pub fn list(&self) -> Vec<Arc<Topic>> {
        let mut topics: Vec<Arc<Topic>> = self.read().values().cloned().collect();
        topics.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        topics
    }

    /// Creates a topic: its lane logs first, then its spec file, which makes it exist.
    pub fn create(&self, spec: TopicSpec) -> Result<Arc<Topic>, TopicError> {
        let _admin = self.admin.lock().expect("admin lock poisoned");
        if self.read().contains_key(&spec.name) {
            return Err(TopicError::AlreadyExists(spec.name));
        }
        if self.read().len() >= self.settings.topics_max as usize {
            return Err(TopicError::LimitExceeded(format!(
                "the broker holds topics_max = {} topics",
                self.settings.topics_max
            )));
        }
        let topic = match self.open_topic(spec.clone()) {
            Ok(topic) => topic,
            Err(error) => {
                let _ = fs::remove_dir_all(self.data_dir.join(&spec.name));
                return Err(error);
            }
        };
        let json = serde_json::to_vec_pretty(&spec).expect("specs serialize");
        files::write_file_atomic(&self.spec_path(&spec.name), &json)?;
        self.write().insert(spec.name.clone(), Arc::clone(&topic));
        self.version.fetch_add(1, Ordering::AcqRel);
        tracing::info!(topic = %spec.name, partitions = spec.partitions, lanes = ?spec.lanes, "topic created");
        Ok(topic)
    }

    /// The topic, created with the broker's defaults if it is missing and auto-creation
    /// is on.
    pub fn get_or_create(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        if let Some(topic) = self.get(name) {
            return Ok(topic);
        }
        if !self.settings.auto_create_topics {
            return Err(TopicError::Unknown(name.to_owned()));
        }
        match self.create(TopicSpec::with_defaults(name, &self.settings)?) {
            Err(TopicError::AlreadyExists(_)) => {
                self.get(name).ok_or_else(|| TopicError::Unknown(name.to_owned()))
            }
            other => other,
        }
    }

    /// Deletes a topic: its spec file first (from then on it is gone, even after a
    /// crash), then its lane logs and files. `forget` runs once the spec is gone and
    /// before another create of the name can start, for state kept about the topic
    /// elsewhere (the groups' committed offsets).
    pub fn delete(&self, name: &str, forget: impl FnOnce(&str)) -> Result<(), TopicError> {
        let _admin = self.admin.lock().expect("admin lock poisoned");
        let Some(topic) = self.write().remove(name) else {
            return Err(TopicError::Unknown(name.to_owned()));
        };
        self.version.fetch_add(1, Ordering::AcqRel);
        let spec_path = self.spec_path(name);
        files::remove_if_exists(&spec_path)?;
        files::fsync_dir(&self.meta_dir)?;
        forget(name);
        let mut doomed = Vec::new();
        for (_, _, log) in topic.logs() {
            doomed.extend(log.log.close_for_removal());
        }
        let dir = self.data_dir.join(name);
        // The segment files the reaper holds open are only unlinked here, not freed; it
        // shrinks them only once their unlinking is durable.
        fs::remove_dir_all(&dir).map_err(|e| StorageError::io(&dir, e))?;
        files::fsync_dir(&self.data_dir)?;
        self.reaper.reap(doomed);
        tracing::info!(topic = %name, "topic deleted");
        Ok(())
    }

    /// Runs retention on every lane log.
    pub fn enforce_retention(&self) {
        for topic in self.list() {
            for (_, _, handle) in topic.logs() {
                match handle.log.enforce_retention_now() {
                    Ok(outcome) if outcome.segments_deleted > 0 => {
                        tracing::info!(dir = %handle.log.dir().display(), segments = outcome.segments_deleted,
                            bytes = outcome.bytes_deleted, "retention deleted segments");
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(dir = %handle.log.dir().display(), %error, "retention failed")
                    }
                }
            }
        }
    }

    /// Queues every lane log with unsynced data for an fsync, whatever the policy.
    pub fn request_sync_all(&self) {
        for topic in self.list() {
            for (_, _, handle) in topic.logs() {
                if handle.log.next_offset() > handle.log.durable_offset() {
                    self.syncer.request(handle);
                }
            }
        }
    }

    /// Closes every lane log cleanly (fsync, clean checkpoint).
    pub fn close(&self) -> Result<(), StorageError> {
        let mut first_error = None;
        for topic in self.list() {
            for (_, _, handle) in topic.logs() {
                if let Err(error) = handle.log.close() {
                    tracing::error!(dir = %handle.log.dir().display(), %error, "closing a lane log failed");
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use lanes_protocol::record_batch::ProducerStamp;
    use lanes_protocol::{BatchLimits, RecordBatchBuilder};

    use super::*;

    #[test]
    fn the_fsync_clock_ticks_only_while_a_lane_log_fsyncs_on_an_interval() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start(1, Duration::from_millis(2));
        let handle = |fsync| {
            let config = LogConfig {
                fsync,
                ..LogConfig::default()
            };
            LogHandle::new(
                LaneLog::open(dir.path(), config).unwrap(),
                LaneCounters::new("orders", "bulk"),
                Durability::Written,
                Arc::clone(&syncer),
            )
        };
        // Nothing to tick for: it would have ticked about 25 times by now.
        let always = handle(FsyncPolicy::Always);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(syncer.ticks(), 0);
        drop(always);
        // An interval log wakes it, and its appends become durable by the clock alone.
        let interval = handle(FsyncPolicy::Interval(Duration::from_millis(4)));
        let mut builder = RecordBatchBuilder::new(BatchLimits::default());
        builder.push(0, None, b"order", &[]).unwrap();
        interval
            .append(&mut builder.finish(ProducerStamp::NONE).to_vec())
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while interval.log.durable_offset() < Offset(1) {
            assert!(
                Instant::now() < deadline,
                "the clock never fsynced the interval log"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(syncer.ticks() > 0);
        // Once it is gone, the clock sleeps again.
        drop(interval);
        let mut last = syncer.ticks();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = syncer.ticks();
            if now == last {
                break;
            }
            assert!(Instant::now() < deadline, "the clock still ticks");
            last = now;
        }
        syncer.stop();
    }

    #[test]
    fn a_log_past_its_bound_of_unsynced_segments_gets_an_fsync_round_whatever_its_policy() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            fsync: FsyncPolicy::Never,
            unsynced_segments_max: 1,
            // Every append after the first rolls.
            segment_ms_max: 0,
            ..LogConfig::default()
        };
        let log = LaneLog::open(dir.path(), config).unwrap();
        let syncer = Syncer::start(1, Duration::from_millis(10));
        let handle = LogHandle::new(
            log,
            LaneCounters::new("orders", "bulk"),
            Durability::Written,
            Arc::clone(&syncer),
        );
        let append = || {
            let mut builder = RecordBatchBuilder::new(BatchLimits::default());
            builder.push(0, None, b"order", &[]).unwrap();
            let mut batch = builder.finish(ProducerStamp::NONE).to_vec();
            handle.append(&mut batch).unwrap()
        };
        assert!(!append().fsync_due, "nothing rolled");
        assert!(!append().fsync_due, "one rolled segment unsynced: at the bound");
        assert!(append().fsync_due, "two: past it");
        // Nothing but that append asks for this round: a `never` log is not on the clock.
        let deadline = Instant::now() + Duration::from_secs(60);
        while handle.log.stats().sync_rounds == 0 {
            assert!(Instant::now() < deadline, "no fsync round ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            handle.log.durable_offset() >= Offset(2),
            "the rolled segments are durable"
        );
        syncer.stop();
    }
}
