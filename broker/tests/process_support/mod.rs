//! A `lanes-broker` process for integration tests: started on 127.0.0.1, its log kept,
//! killed when dropped.
#![allow(dead_code, unreachable_pub)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Generous: the machine may be busy. Tests wait for conditions, not for time.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A free port on 127.0.0.1 (taken from the OS, then let go), for a listener whose
/// address must be known before the broker starts: a restarted broker's, so that
/// producers reconnect to it, or the metrics listener.
pub fn fixed_listen_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// GET `path` over plain HTTP/1.0; the body.
pub fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The value of the first series named `name` whose labels include all of `labels`.
pub fn series_value(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// A broker process; killed when dropped.
pub struct BrokerProcess {
    pub child: Child,
    pub address: String,
    pub log: Arc<Mutex<String>>,
}

impl BrokerProcess {
    pub fn start(data_dir: &Path) -> BrokerProcess {
        BrokerProcess::start_with(data_dir, &["--metrics-listen", "off"])
    }

    pub fn start_with(data_dir: &Path, args: &[&str]) -> BrokerProcess {
        BrokerProcess::start_on("127.0.0.1:0", data_dir, args)
    }

    /// Listening on `listen` (a fixed port, to restart where clients reconnect).
    pub fn start_on(listen: &str, data_dir: &Path, args: &[&str]) -> BrokerProcess {
        BrokerProcess::start_on_with_env(listen, data_dir, args, &[])
    }

    /// As [`BrokerProcess::start_on`], with extra environment variables.
    pub fn start_on_with_env(
        listen: &str,
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &OsStr)],
    ) -> BrokerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lanes-broker"))
            .args(["--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lanes-broker");
        let log = Arc::new(Mutex::new(String::new()));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn({
            let log = Arc::clone(&log);
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains(" listening ")
                        && let Some(address) = line.split("address=").nth(1)
                    {
                        let _ = address_tx.send(address.split_whitespace().next().unwrap().to_owned());
                    }
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            }
        });
        // Owned by the guard before anything can fail: a panicking test kills it too.
        let mut broker = BrokerProcess {
            child,
            address: String::new(),
            log,
        };
        broker.address = address_rx.recv_timeout(DEADLINE).unwrap_or_else(|_| {
            panic!(
                "the broker did not start listening:\n{}",
                broker.log.lock().unwrap()
            )
        });
        broker
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the process to exit; returns whether it exited successfully.
    pub fn wait(&mut self) -> bool {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not exit:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
