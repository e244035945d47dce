//! The broker a scenario runs against: an embedded one (the default) or a running one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use lanes_broker::config::{FsyncMode, SettingsArgs};
use lanes_broker::{Broker, Settings};
use lanes_protocol::ErrorCode;
use lanes_protocol::client::{Client, ClientConfig, ClientError};
use lanes_protocol::messages::{CreateTopicRequest, DeleteTopicRequest, DescribeGroupRequest};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A broker serving on `address`.
#[derive(Debug)]
pub struct Target {
    pub address: String,
    embedded: Option<Embedded>,
}

#[derive(Debug)]
struct Embedded {
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    runtime: BrokerRuntime,
    _dir: tempfile::TempDir,
}

/// The embedded broker's own runtime, as `lanes-broker` has: its tasks do not share
/// worker threads with the scenario's clients, which no deployment does. On one
/// runtime, the broker's connection tasks ran between every few hundred records a
/// client sent, and produce requests came out half the size they are against a broker
/// of its own (docs/BENCHMARKS.md, "The embedded broker on a runtime of its own").
#[derive(Debug)]
struct BrokerRuntime(Option<tokio::runtime::Runtime>);

impl Drop for BrokerRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async context does not allow; a run that
        // fails part-way drops its target there.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Settings the bench sets for its embedded broker, whatever the environment says.
const BENCH_OWN_SETTINGS: [&str; 4] = ["listen", "data_dir", "metrics_listen", "fsync"];

impl Target {
    /// Connects to `broker`, or starts one in this process on a temp dir with `fsync`
    /// and, for the other settings, what `LANES_<SETTING>` says in the environment, as
    /// for `lanes-broker` (so `LANES_WRITEBACK_BYTES=0 lanes-bench produce` measures that
    /// setting). `listen`, `data_dir`, `metrics_listen` and `fsync` are the bench's own
    /// (`BENCH_OWN_SETTINGS`); every variable is parsed, so a bad value in any of them
    /// fails the run.
    pub async fn start(broker: Option<String>, fsync: FsyncMode) -> anyhow::Result<Target> {
        if let Some(address) = broker {
            return Ok(Target {
                address,
                embedded: None,
            });
        }
        let dir = tempfile::Builder::new()
            .prefix("lanes-bench-")
            .tempdir()
            .context("creating the embedded broker's data directory")?;
        let settings = Settings {
            data_dir: dir.path().to_owned(),
            metrics_listen: "off".into(),
            fsync,
            ..settings_from_environment()?
        };
        settings
            .validate()
            .context("the embedded broker's settings (LANES_* environment variables)")?;
        let runtime = BrokerRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("lanes-worker")
                .build()
                .context("starting the embedded broker's runtime")?,
        ));
        let handle = runtime.0.as_ref().expect("just built").handle().clone();
        let broker = handle
            .spawn_blocking(move || Broker::open(settings))
            .await?
            .context("opening the embedded broker")?;
        // Bound on the broker's runtime, whose reactor serves it.
        let listener = handle.spawn(TcpListener::bind("127.0.0.1:0")).await??;
        let address = listener.local_addr()?.to_string();
        let shutdown = CancellationToken::new();
        let task = handle.spawn({
            let (broker, shutdown) = (Arc::clone(&broker), shutdown.clone());
            async move { broker.serve(listener, shutdown).await }
        });
        Ok(Target {
            address,
            embedded: Some(Embedded {
                broker,
                shutdown,
                task,
                runtime,
                _dir: dir,
            }),
        })
    }

    /// The `LANES_<SETTING>` variables an embedded broker takes from the environment, by
    /// setting: part of what a run measures, so its report carries them.
    pub fn broker_environment() -> serde_json::Map<String, serde_json::Value> {
        Settings::names()
            .iter()
            .filter(|(key, _)| !BENCH_OWN_SETTINGS.contains(key))
            .filter_map(|(key, variable)| {
                let value = std::env::var(variable).ok()?;
                Some(((*key).to_owned(), serde_json::Value::String(value)))
            })
            .collect()
    }

    /// Stops an embedded broker (and removes its data).
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Some(embedded) = self.embedded {
            embedded.shutdown.cancel();
            // Closed even if serving failed: its fsync and reaper threads stop, and its
            // files are closed before the temp dir goes.
            let served = embedded.task.await;
            let broker = embedded.broker;
            let mut runtime = embedded.runtime;
            tokio::task::spawn_blocking(move || {
                let closed = broker.close();
                drop(runtime.0.take());
                closed
            })
            .await??;
            served?;
        }
        Ok(())
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        let config = ClientConfig {
            client_id: "lanes-bench".into(),
            ..ClientConfig::default()
        };
        Client::connect(&self.address, config)
            .await
            .with_context(|| format!("connecting to {}", self.address))
    }

    /// Waits until `group` is stable with `members` members that hold all `partitions`
    /// between them, each its share (at least `partitions / members`): a scenario
    /// measures the group at work, not the rebalance that spreads it (a member that
    /// joins gets its partitions within a heartbeat or two).
    pub async fn settled_group(&self, group: &str, members: usize, partitions: u32) -> anyhow::Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let request = DescribeGroupRequest { group: group.into() };
        let share = partitions as usize / members.max(1);
        loop {
            if let Ok(described) = client.request(&request).await
                && described.state == "stable"
                && described.members.len() == members
            {
                let held: Vec<usize> = described
                    .members
                    .iter()
                    .map(|m| m.owned.iter().map(|t| t.partitions.len()).sum())
                    .collect();
                if held.iter().sum::<usize>() == partitions as usize && held.iter().all(|h| *h >= share) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "consumer group {group} did not settle: {members} members holding {partitions} partitions"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Creates `name` afresh (deleting an old one of that name on a running broker).
    pub async fn fresh_topic(&self, name: &str, partitions: u32, lanes: &[&str]) -> anyhow::Result<()> {
        let client = self.client().await?;
        match client.request(&DeleteTopicRequest { name: name.into() }).await {
            Ok(_) => {}
            Err(ClientError::Broker {
                code: ErrorCode::UnknownTopic,
                ..
            }) => {}
            Err(error) => return Err(error).with_context(|| format!("deleting topic {name}")),
        }
        client
            .request(&CreateTopicRequest {
                name: name.into(),
                partitions,
                lanes: lanes.iter().map(|l| (*l).to_owned()).collect(),
                configs: Vec::new(),
            })
            .await
            .with_context(|| format!("creating topic {name}"))?;
        Ok(())
    }
}

/// The broker settings the environment gives (`LANES_<SETTING>`), defaults for the rest.
fn settings_from_environment() -> anyhow::Result<Settings> {
    /// No flags: clap reads each setting's environment variable.
    #[derive(Debug, Parser)]
    struct Environment {
        #[command(flatten)]
        settings: SettingsArgs,
    }
    let environment = Environment::try_parse_from(["lanes-bench"]).map_err(|error| {
        // clap names the flag and suggests `--help`; the first line is what went wrong.
        let error = error.to_string();
        let what = error
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ");
        anyhow::anyhow!("the embedded broker's settings (LANES_* environment variables): {what}")
    })?;
    Ok(Settings::load(&environment.settings, None)?)
}
