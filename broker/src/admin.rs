//! `lanes-broker topics …` and `lanes-broker groups …`: admin commands against a
//! running broker.

use anyhow::{Context, bail};
use clap::Subcommand;
use lanes_protocol::ErrorCode;
use lanes_protocol::client::{Client, ClientConfig};
use lanes_protocol::messages::{
    Assignment, CreateTopicRequest, DeleteTopicRequest, DescribeGroupRequest, DescribeGroupResponse,
    ListGroupsRequest, MetadataRequest, TopicConfig, TopicMetadata,
};

/// Prints a line; a closed stdout (`| head`) ends the program quietly, as for any
/// Unix tool, instead of panicking as `println!` does.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write;
        if let Err(error) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("lanes-broker: cannot write to stdout: {error}");
            std::process::exit(1);
        }
    }};
}

#[derive(Debug, Subcommand)]
pub(crate) enum TopicsCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Partitions (default: the broker's topic_partitions_default).
        #[arg(long)]
        partitions: Option<u32>,
        /// Lane names, most urgent first (default: the broker's topic_lanes_default).
        #[arg(long, value_delimiter = ',')]
        lanes: Vec<String>,
        /// A topic setting, KEY=VALUE: durability, retention_ms, retention_bytes. Repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_setting)]
        configs: Vec<TopicConfig>,
    },
    /// List topics.
    List,
    /// Show a topic's settings and, per partition and lane, its offsets and size.
    Describe { name: String },
    /// Delete a topic and all its records.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub(crate) enum GroupsCommand {
    /// List consumer groups.
    List,
    /// Show a group's members and what they hold, and per partition and lane its
    /// committed offset and lag.
    Describe { name: String },
}

#[derive(Debug)]
pub(crate) enum Admin {
    Topics(TopicsCommand),
    Groups(GroupsCommand),
}

fn parse_setting(text: &str) -> Result<TopicConfig, String> {
    let (key, value) = text.split_once('=').ok_or("expected KEY=VALUE")?;
    Ok(TopicConfig {
        key: key.trim().to_owned(),
        value: value.trim().to_owned(),
    })
}

pub(crate) fn run(broker: &str, command: Admin) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let config = ClientConfig {
            client_id: "lanes-broker-admin".into(),
            ..ClientConfig::default()
        };
        let client = Client::connect(broker, config)
            .await
            .context("connecting to the broker")?;
        match command {
            Admin::Topics(command) => topics(&client, command).await,
            Admin::Groups(GroupsCommand::List) => {
                let response = client.request(&ListGroupsRequest).await?;
                out!(
                    "{:<32} {:<12} {:>10} {:>8}",
                    "GROUP",
                    "STATE",
                    "GENERATION",
                    "MEMBERS"
                );
                for group in response.groups {
                    out!(
                        "{:<32} {:<12} {:>10} {:>8}",
                        group.name,
                        group.state,
                        group.generation,
                        group.members
                    );
                }
                Ok(())
            }
            Admin::Groups(GroupsCommand::Describe { name }) => {
                let group = client.request(&DescribeGroupRequest { group: name }).await?;
                let lanes = lane_names(&client, &group).await;
                print_group(&group, &lanes);
                Ok(())
            }
        }
    })
}

async fn topics(client: &Client, command: TopicsCommand) -> anyhow::Result<()> {
    {
        match command {
            TopicsCommand::Create {
                name,
                partitions,
                lanes,
                configs,
            } => {
                let request = CreateTopicRequest {
                    name: name.clone(),
                    partitions: partitions.unwrap_or(0),
                    lanes,
                    configs,
                };
                client.request(&request).await?;
                let topic = metadata(client, &name).await?;
                out!(
                    "created topic {name}: {} partitions, lanes {}",
                    topic.partitions.len(),
                    topic.lanes.join(",")
                );
            }
            TopicsCommand::List => {
                let response = client.request(&MetadataRequest::default()).await?;
                out!("{:<32} {:>10}  {:<10} LANES", "TOPIC", "PARTITIONS", "DURABILITY");
                for topic in response.topics {
                    out!(
                        "{:<32} {:>10}  {:<10} {}",
                        topic.name,
                        topic.partitions.len(),
                        config_value(&topic, "durability"),
                        topic.lanes.join(",")
                    );
                }
            }
            TopicsCommand::Describe { name } => print_description(&metadata(client, &name).await?),
            TopicsCommand::Delete { name } => {
                client.request(&DeleteTopicRequest { name: name.clone() }).await?;
                out!("deleted topic {name}");
            }
        }
        Ok(())
    }
}

/// Lane names of the topics a group description mentions (numbers where unknown).
async fn lane_names(client: &Client, group: &DescribeGroupResponse) -> Vec<(String, Vec<String>)> {
    let mut names = Vec::new();
    for topic in &group.offsets {
        let lanes = metadata(client, &topic.name)
            .await
            .map(|t| t.lanes)
            .unwrap_or_default();
        names.push((topic.name.clone(), lanes));
    }
    names
}

fn format_assignment(assignment: &Assignment) -> String {
    let parts: Vec<String> = assignment
        .iter()
        .map(|t| {
            let partitions: Vec<String> = t.partitions.iter().map(|p| p.0.to_string()).collect();
            format!("{}/{}", t.topic, partitions.join(","))
        })
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn print_group(group: &DescribeGroupResponse, lanes: &[(String, Vec<String>)]) {
    out!("group {}", group.group);
    out!("  state       {}", group.state);
    out!("  generation  {}", group.generation);
    out!("  members     {}", group.members.len());
    out!();
    out!("{:<40} {:<20} {:<24} MOVING TO IT", "MEMBER", "CLIENT", "HOLDS");
    for member in &group.members {
        let mut incoming = member.target.clone();
        for topic in &mut incoming {
            let held = member.owned.iter().find(|t| t.topic == topic.topic);
            topic
                .partitions
                .retain(|p| held.is_none_or(|h| !h.partitions.contains(p)));
        }
        incoming.retain(|t| !t.partitions.is_empty());
        out!(
            "{:<40} {:<20} {:<24} {}",
            member.member_id,
            member.client_id,
            format_assignment(&member.owned),
            format_assignment(&incoming)
        );
    }
    out!();
    out!(
        "{:<24} {:>9}  {:<14} {:<40} {:>12} {:>12} {:>10} {:>12} {:>12}",
        "TOPIC",
        "PARTITION",
        "LANE",
        "OWNER",
        "COMMITTED",
        "END",
        "LAG",
        "LAG_BYTES",
        "OLDEST_MS"
    );
    let mut total_lag = 0u64;
    for topic in &group.offsets {
        let names = lanes
            .iter()
            .find(|(name, _)| *name == topic.name)
            .map(|(_, l)| l.as_slice());
        for (name, partition, lane) in topic.lanes() {
            let owner = group
                .members
                .iter()
                .find(|m| {
                    m.owned
                        .iter()
                        .any(|t| t.topic == name && t.partitions.contains(&partition))
                })
                .map_or("-", |m| m.member_id.as_str());
            let lane_name = names
                .and_then(|n| n.get(lane.lane.0 as usize))
                .map_or(String::new(), |n| format!(":{n}"));
            total_lag += lane.lag;
            out!(
                "{:<24} {:>9}  {:<14} {:<40} {:>12} {:>12} {:>10} {:>12} {:>12}",
                name,
                partition.0,
                format!("{}{lane_name}", lane.lane.0),
                owner,
                lane.committed.map_or("-".to_owned(), |o| o.0.to_string()),
                lane.end_offset.0,
                lane.lag,
                lane.lag_bytes,
                lane.oldest_age_ms.map_or("-".to_owned(), |age| age.to_string())
            );
        }
    }
    out!();
    out!("total lag {total_lag}");
}

async fn metadata(client: &Client, name: &str) -> anyhow::Result<TopicMetadata> {
    let response = client
        .request(&MetadataRequest {
            topics: vec![name.to_owned()],
        })
        .await?;
    let Some(topic) = response.topics.into_iter().next() else {
        bail!("the broker did not describe topic {name}");
    };
    if topic.error_code != ErrorCode::None {
        bail!("{}: {}", topic.error_code, topic.error_message);
    }
    Ok(topic)
}

fn config_value<'a>(topic: &'a TopicMetadata, key: &str) -> &'a str {
    topic
        .configs
        .iter()
        .find(|c| c.key == key)
        .map_or("", |c| c.value.as_str())
}

fn print_description(topic: &TopicMetadata) {
    out!("topic {}", topic.name);
    out!("  {:<22} {}", "partitions", topic.partitions.len());
    out!("  {:<22} {}", "lanes", topic.lanes.join(","));
    for config in &topic.configs {
        out!("  {:<22} {}", config.key, config.value);
    }
    out!();
    out!(
        "{:>9}  {:<10} {:>12} {:>12} {:>12} {:>12} {:>14} {:>8}",
        "PARTITION",
        "LANE",
        "EARLIEST",
        "LATEST",
        "DURABLE",
        "VISIBLE",
        "BYTES",
        "SEGMENTS"
    );
    for partition in &topic.partitions {
        for lane in &partition.lanes {
            let name = topic.lanes.get(lane.lane.0 as usize).map_or("?", String::as_str);
            out!(
                "{:>9}  {:<10} {:>12} {:>12} {:>12} {:>12} {:>14} {:>8}",
                partition.partition.0,
                format!("{}:{name}", lane.lane.0),
                lane.start_offset.0,
                lane.end_offset.0,
                lane.durable_offset.0,
                lane.visible_offset.0,
                lane.size_bytes,
                lane.segments
            );
        }
    }
}
