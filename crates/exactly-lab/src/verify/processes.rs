//! The run's processes: relay and consumers supervised (restarted when they die, logs kept)
//! and the broker, started, restarted on its durable storage, stopped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process of the run, restarted when it dies, killed on drop.
pub(crate) struct Supervised {
    pub(super) name: String,
    pub(super) args: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    /// Where the process's stderr goes (appended across restarts).
    pub(super) log: PathBuf,
    pub(super) child: Mutex<Option<Child>>,
    pub(super) restarts: AtomicU64,
}

impl Supervised {
    pub(crate) fn new(name: &str, args: Vec<String>, log_dir: &Path) -> Arc<Self> {
        Supervised::with_env(name, args, Vec::new(), log_dir)
    }

    /// `env` reaches the child by environment: a database URL may hold a password, and a
    /// command line is visible to every user of the machine.
    pub(crate) fn with_env(
        name: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log_dir: &Path,
    ) -> Arc<Self> {
        Arc::new(Supervised {
            name: name.to_owned(),
            args,
            env,
            log: log_dir.join(format!("{name}.log")),
            child: Mutex::new(None),
            restarts: AtomicU64::new(0),
        })
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the process when it is not running (first start, or after it died).
    pub(crate) fn ensure_running(&self) -> Result<()> {
        let mut child = self.lock();
        let running = match child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        };
        if !running {
            if child.is_some() {
                self.restarts.fetch_add(1, Ordering::Relaxed);
            }
            let exe = std::env::current_exe().context("locating the exactly binary")?;
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .with_context(|| format!("opening {}", self.log.display()))?;
            *child = Some(
                Command::new(exe)
                    .args(&self.args)
                    .envs(self.env.iter().map(|(k, v)| (k, v)))
                    .env(
                        "EXACTLY_LOG",
                        std::env::var("EXACTLY_CHILD_LOG").unwrap_or_else(|_| {
                            "info,rdkafka=warn,librdkafka=warn,pg_walstream=warn".to_owned()
                        }),
                    )
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("starting {}", self.name))?,
            );
        }
        Ok(())
    }

    /// The running process's id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    /// How often the process was started again after it died.
    pub(crate) fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// SIGKILL: a crash, no clean-up.
    pub(crate) fn kill(&self) {
        if let Some(c) = self.lock().as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The broker of a run: the durable (sqlite) Tansu, which keeps its data across restarts, or
/// the in-memory one with transactions for the exactly-once relay.
pub(crate) struct Broker {
    pub(super) binary: PathBuf,
    pub(super) dir: tempfile::TempDir,
    /// Where Tansu listens.
    pub(super) port: u16,
    /// Where clients are told to connect: the port itself, or a fault proxy in front of it.
    pub(super) advertised: u16,
    pub(super) durable: bool,
    pub(super) child: Option<Child>,
}

pub(super) fn find_durable_tansu() -> Result<PathBuf> {
    let candidates = [
        std::env::var("EXACTLY_TANSU_DURABLE")
            .ok()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        std::env::var("HOME")
            .ok()
            .map(|h| Path::new(&h).join(".cargo/bin/tansu")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .context("no durable (sqlite) Tansu build: run scripts/setup --durable (cargo install, once)")
}

impl Broker {
    /// Starts Tansu on `port`, telling clients to connect to `advertised`.
    pub(crate) fn start(durable: bool, port: u16, advertised: u16) -> Result<Broker> {
        let binary = if durable {
            find_durable_tansu()?
        } else {
            crate::broker::find_tansu()?
        };
        let mut broker = Broker {
            binary,
            dir: tempfile::tempdir().context("broker dir")?,
            port,
            advertised,
            durable,
            child: None,
        };
        broker.launch()?;
        Ok(broker)
    }

    /// The bootstrap address clients use.
    pub(crate) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    pub(super) fn listen_address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(super) fn launch(&mut self) -> Result<()> {
        let mut command = Command::new(&self.binary);
        command
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{}", self.listen_address()),
                "--advertised-listener-url",
                &format!("tcp://{}", self.address()),
            ])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("broker.log"))?);
        if self.durable {
            // Tansu takes the path relative to its working directory.
            command.args(["--storage-engine", "sqlite://broker.db"]);
        }
        self.child = Some(command.spawn().context("starting Tansu")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.listen_address()).is_err() {
            if Instant::now() > deadline {
                bail!("Tansu did not listen on {} within 30 s", self.listen_address());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.durable {
            crate::broker::index_tansu_headers(&self.dir.path().join("broker.db"))?;
        }
        Ok(())
    }

    /// Stops the broker (SIGTERM, then waits) and starts it again on the same port and storage.
    pub(crate) fn restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        std::thread::sleep(Duration::from_millis(500));
        self.launch()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Crashes PostgreSQL and starts it again.
pub(crate) fn restart_postgres() -> Result<()> {
    let version = std::fs::read_dir("/etc/postgresql")
        .context("PostgreSQL restart needs a local Debian cluster (/etc/postgresql)")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max()
        .context("no cluster in /etc/postgresql")?;
    let status = Command::new("pg_ctlcluster")
        // Immediate: a crash, recovered from the WAL at start. (A fast shutdown would also wait
        // for the WAL relay's walsender, which holds it until the relay confirms the shutdown
        // checkpoint; see the README's known limits.)
        .args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            "immediate",
        ])
        .status()
        .context("running pg_ctlcluster")?;
    if !status.success() {
        bail!("pg_ctlcluster {version} main restart failed");
    }
    Ok(())
}
