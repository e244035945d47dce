//! Reliability suite 6, fsync discipline: the broker runs under `strace` while topics
//! are created, segments roll, producer snapshots and group offsets are written. From
//! the trace: every file created in the data directory (segments, indexes, metadata)
//! and every directory made there is followed by an fsync of its parent directory, and
//! every atomic metadata write is temp file, fsync of it, rename, fsync of the directory.
//! A segment file that retention deleted and a roll will overwrite (recycled, renamed to
//! `next-segment.tmp`) needs no fsync of its own, whose bytes are to be overwritten; its
//! rename must be made durable by a directory fsync before the roll renames it into
//! place, or a power loss could leave a deleted segment's name on a later segment's
//! bytes.
//! Skipped, with a message, where `strace` is missing or may not trace (`.ci/run`
//! installs it).

mod process_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use lanes_producer::{LaneSelector, Producer, ProducerConfig, ProducerRecord};
use lanes_protocol::Lane;
use lanes_protocol::client::{Client, ClientConfig};
use lanes_protocol::messages::{Acks, CreateTopicRequest, TopicConfig};
use process_support::DEADLINE;

/// One traced system call that matters here, in trace order.
#[derive(Debug)]
enum Event {
    /// A file or directory opened; `created`: with O_CREAT.
    Open {
        fd: i32,
        path: PathBuf,
        created: bool,
    },
    Fsync {
        fd: i32,
    },
    Close {
        fd: i32,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    Mkdir {
        path: PathBuf,
    },
}

/// The first quoted string in `text`, and what follows it.
fn quoted(text: &str) -> Option<(&str, &str)> {
    let start = text.find('"')? + 1;
    let end = start + text[start..].find('"')?;
    Some((&text[start..end], &text[end + 1..]))
}

/// The return value of a complete strace line (`… = 12`), if it succeeded.
fn returned(line: &str) -> Option<i32> {
    line.rsplit_once(" = ")?.1.split_whitespace().next()?.parse().ok()
}

fn parse(trace: &str) -> Vec<Event> {
    let mut events = Vec::new();
    // With several threads, strace splits a call that another interrupts into
    // `call(args <unfinished ...>` and, later, `<... call resumed>rest`; the call
    // happened when it resumed.
    let mut unfinished: HashMap<&str, &str> = HashMap::new();
    for line in trace.lines() {
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        if pid.parse::<u32>().is_err() {
            continue;
        }
        let call = call.trim_start();
        if let Some(start) = call.strip_suffix(" <unfinished ...>") {
            // Except a close: it frees the descriptor before it returns, and another
            // thread's open may get the same number before the close's resumption line.
            if let Some(args) = start.strip_prefix("close(") {
                if let Ok(fd) = args.trim_end_matches(')').parse() {
                    events.push(Event::Close { fd });
                }
                continue;
            }
            unfinished.insert(pid, start);
            continue;
        }
        let joined;
        let call = if call.starts_with("<... ") {
            let Some(start) = unfinished.remove(pid) else {
                continue;
            };
            let Some((_, rest)) = call.split_once("resumed>") else {
                continue;
            };
            joined = format!("{start}{rest}");
            joined.as_str()
        } else {
            call
        };
        let Some(result) = returned(call) else {
            continue; // failed (-1), or unfinished: nothing happened we must check
        };
        if result < 0 {
            continue;
        }
        if call.starts_with("openat(") {
            let Some((path, rest)) = quoted(call) else {
                continue;
            };
            events.push(Event::Open {
                fd: result,
                path: PathBuf::from(path),
                created: rest.contains("O_CREAT"),
            });
        } else if let Some(args) = call
            .strip_prefix("fsync(")
            .or_else(|| call.strip_prefix("fdatasync("))
        {
            if let Ok(fd) = args.split(')').next().unwrap_or("").parse() {
                events.push(Event::Fsync { fd });
            }
        } else if let Some(args) = call.strip_prefix("close(") {
            if let Ok(fd) = args.split(')').next().unwrap_or("").parse() {
                events.push(Event::Close { fd });
            }
        } else if call.starts_with("rename") {
            let Some((from, rest)) = quoted(call) else {
                continue;
            };
            let Some((to, _)) = quoted(rest) else { continue };
            events.push(Event::Rename {
                from: PathBuf::from(from),
                to: PathBuf::from(to),
            });
        } else if call.starts_with("mkdir")
            && let Some((path, _)) = quoted(call)
        {
            events.push(Event::Mkdir {
                path: PathBuf::from(path),
            });
        }
    }
    events
}

/// The paths each event's fsync made durable, with the index of the event.
fn fsynced_paths(events: &[Event]) -> Vec<(usize, PathBuf)> {
    // The broker's threads share its descriptors (strace -f reports thread ids), and
    // the trace is in time order: the last open of a descriptor is what it names.
    let mut open: HashMap<i32, PathBuf> = HashMap::new();
    let mut synced = Vec::new();
    for (index, event) in events.iter().enumerate() {
        match event {
            Event::Open { fd, path, .. } => {
                open.insert(*fd, path.clone());
            }
            Event::Close { fd, .. } => {
                open.remove(fd);
            }
            Event::Fsync { fd, .. } => {
                if let Some(path) = open.get(fd) {
                    synced.push((index, path.clone()));
                }
            }
            _ => {}
        }
    }
    synced
}

fn strace_works() -> bool {
    Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=fsync", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_creation_and_metadata_write_is_fsynced_in_order() {
    if !strace_works() {
        eprintln!("skipped: strace is missing or may not trace here (apt install strace)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let trace_path = dir.path().join("trace");
    let mut child = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=openat,fsync,fdatasync,close,rename,renameat,renameat2,mkdir,mkdirat",
        ])
        .arg("-o")
        .arg(&trace_path)
        .arg(env!("CARGO_BIN_EXE_lanes-broker"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args([
            "--segment-bytes-max",
            "65536",
            "--batch-bytes-max",
            "16384",
            "--index-bytes-max",
            "4096",
            // For the `never` topic: writeback, and next segments made ahead and renamed
            // into place at the roll.
            "--writeback-bytes",
            "8192",
            // For the topic with retention: deleted segments' files recycled.
            "--retention-check-ms",
            "50",
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start strace");
    let stderr = child.stderr.take().unwrap();
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(" listening ")
                && let Some(address) = line.split("address=").nth(1)
            {
                let _ = address_tx.send(address.split_whitespace().next().unwrap().to_owned());
            }
        }
    });
    let address = match address_rx.recv_timeout(DEADLINE) {
        Ok(address) => address,
        Err(_) => {
            let _ = child.kill();
            panic!("the broker did not start under strace");
        }
    };

    // Topics (spec files, directories), rolls (segments, indexes, producer snapshots),
    // producer ids; `second` fsyncs never; `third` keeps two segments, so that its one
    // lane log recycles deleted segments' files.
    let client = Client::connect(&address, ClientConfig::default()).await.unwrap();
    for (name, partitions, configs) in [
        ("first", 2, vec![]),
        ("second", 2, vec![("fsync", "never"), ("durability", "written")]),
        ("third", 1, vec![("retention_bytes", "131072")]),
    ] {
        client
            .request(&CreateTopicRequest {
                name: name.into(),
                partitions,
                lanes: vec!["express".into(), "bulk".into()],
                configs: configs
                    .into_iter()
                    .map(|(key, value)| TopicConfig {
                        key: key.into(),
                        value: value.into(),
                    })
                    .collect(),
            })
            .await
            .unwrap();
    }
    for (topic, acks) in [("first", Acks::Durable), ("second", Acks::Written)] {
        let mut config = ProducerConfig::new(&address);
        config.batch_bytes_max = 8 * 1024;
        config.acks = acks;
        let producer = Producer::connect(config).await.unwrap();
        for i in 0..600u32 {
            let record = ProducerRecord::new(topic, vec![b'x'; 1000])
                .key(format!("k{}", i % 7))
                .lane(LaneSelector::Index(Lane((i % 2) as u8)));
            producer.send(record).await.unwrap();
        }
        producer.flush().await.unwrap();
        producer.close().await.unwrap();
    }
    // Into one lane log, 1.2 MB in rounds with retention passes between them.
    // The default batch size (larger than this broker's batches): the producer keeps to
    // the broker's, told in the handshake.
    let producer = Producer::connect(ProducerConfig::new(&address)).await.unwrap();
    for round in 0..12u32 {
        for i in 0..100u32 {
            let record = ProducerRecord::new("third", vec![b'x'; 1000])
                .key(format!("k{round}-{i}"))
                .lane(LaneSelector::Index(Lane(0)));
            producer.send(record).await.unwrap();
        }
        producer.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    producer.close().await.unwrap();
    drop(client);
    // A clean stop, so the trace holds the close of everything: SIGTERM to the broker,
    // strace's child (strace itself would only detach).
    let pid = child.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let broker = children
        .split_whitespace()
        .next()
        .expect("the broker runs under strace");
    let _ = Command::new("kill").args(["-TERM", broker]).status();
    let deadline = std::time::Instant::now() + DEADLINE;
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "the broker did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let trace = std::fs::read_to_string(&trace_path).unwrap();
    let events = parse(&trace);
    let synced = fsynced_paths(&events);
    let under_data = |path: &Path| path.starts_with(&data);
    let dir_synced_after =
        |index: usize, dir: &Path| synced.iter().any(|(at, path)| *at > index && path == dir);
    let file_synced_before =
        |index: usize, file: &Path| synced.iter().any(|(at, path)| *at < index && path == file);
    // Whether the file at `path` just before `index` got there by a rename from a
    // segment (`.log`): recycled, rather than created there.
    let recycled_file_at = |index: usize, path: &Path| {
        events[..index]
            .iter()
            .rev()
            .find_map(|event| match event {
                Event::Open {
                    path: opened,
                    created: true,
                    ..
                } if opened == path => Some(false),
                Event::Rename { from, to } if to == path => {
                    Some(from.extension().is_some_and(|e| e == "log"))
                }
                _ => None,
            })
            .unwrap_or(false)
    };

    let mut created = 0;
    let mut renames = 0;
    let mut segments_made_ahead = 0;
    let mut segments_recycled = 0;
    let mut seen_created: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    for (index, event) in events.iter().enumerate() {
        match event {
            Event::Open {
                path, created: true, ..
            } if under_data(path) && seen_created.insert(path.clone()) => {
                // Temp files are checked at their rename instead.
                if path.extension().is_some_and(|e| e == "tmp") {
                    continue;
                }
                created += 1;
                let parent = path.parent().unwrap();
                assert!(
                    dir_synced_after(index, parent),
                    "{} was created, but {} was never fsynced after it",
                    path.display(),
                    parent.display()
                );
            }
            Event::Mkdir { path } if under_data(path) => {
                let parent = path.parent().unwrap();
                assert!(
                    dir_synced_after(index, parent),
                    "directory {} was made, but {} was never fsynced after it",
                    path.display(),
                    parent.display()
                );
            }
            Event::Rename { from, to } if under_data(to) && from.extension().is_some_and(|e| e == "log") => {
                // A deleted segment's file kept as the next segment's: durably renamed
                // before the roll renames it again (and writes it).
                segments_recycled += 1;
                let parent = to.parent().unwrap();
                let installed = events[index + 1..]
                    .iter()
                    .position(|event| matches!(event, Event::Rename { from, .. } if from == to))
                    .map_or(events.len(), |at| index + 1 + at);
                assert!(
                    synced
                        .iter()
                        .any(|(at, path)| *at > index && *at < installed && path == parent),
                    "{} was recycled as {}, but {} was not fsynced before its next rename",
                    from.display(),
                    to.display(),
                    parent.display()
                );
            }
            Event::Rename { from, to } if under_data(to) => {
                renames += 1;
                let recycled = recycled_file_at(index, from);
                if to.extension().is_some_and(|e| e == "log") && !recycled {
                    segments_made_ahead += 1;
                }
                assert!(
                    recycled || file_synced_before(index, from),
                    "{} was renamed to {} without an fsync of its own first",
                    from.display(),
                    to.display()
                );
                let parent = to.parent().unwrap();
                assert!(
                    dir_synced_after(index, parent),
                    "{} was renamed into place, but {} was never fsynced after it",
                    to.display(),
                    parent.display()
                );
            }
            _ => {}
        }
    }
    let segments = seen_created
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log") && p.to_string_lossy().contains("/topics/"))
        .count();
    assert!(
        segments >= 8 + 2,
        "the workload should roll segments: {segments} created"
    );
    assert!(
        renames >= 2,
        "the workload should write metadata atomically: {renames} renames"
    );
    assert!(
        segments_made_ahead >= 1,
        "the never topic should roll into segments made ahead: {segments_made_ahead}"
    );
    assert!(
        segments_recycled >= 1,
        "the topic with retention should recycle segment files: {segments_recycled}"
    );
    eprintln!(
        "fsync discipline: {created} files created ({segments} segments), {renames} renames into place ({segments_made_ahead} of segments made ahead), each followed by its directory's fsync; {segments_recycled} segment files recycled, each rename made durable before the next"
    );
}
