//! `exactly verify`: seeds events through concurrent writers (some transactions roll back),
//! runs the relay and the consumers as separate OS processes, kills and restarts them, the
//! broker and PostgreSQL while they run, injects bad input, then checks the history with
//! [`exactly_core::check`] and reconciles the bad input (applied + parked = total).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use exactly_core::check::{check, Anomaly, CommittedEvent, ConsumerHistory, Findings, History};
use rand::{Rng, SeedableRng};

use crate::demo::with_database;
use crate::fault_proxy::{Condition, FaultProxy};

/// Which relay moves the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VerifyRelay {
    Poll,
    Wal,
    WalExactlyOnce,
}

/// Faults that can be switched off one by one.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct FaultSwitches {
    /// No relay kills.
    #[arg(long)]
    pub no_relay_kills: bool,
    /// No consumer kills.
    #[arg(long)]
    pub no_consumer_kills: bool,
    /// No broker restarts.
    #[arg(long)]
    pub no_broker_restarts: bool,
    /// No PostgreSQL restart.
    #[arg(long)]
    pub no_pg_restart: bool,
    /// No malformed rows, payloads or foreign records.
    #[arg(long)]
    pub no_bad_input: bool,
    /// Kills per process kind (broker restarts at most 2, PostgreSQL once).
    #[arg(long, default_value_t = 3)]
    pub fault_rounds: usize,
    /// Also network faults, through a loopback proxy in front of the broker and another in
    /// front of the relay's PostgreSQL: added latency, connection resets, a blackhole longer
    /// than the session, lease and delivery timeouts, and one-way partitions, at random points.
    #[arg(long)]
    pub network_faults: bool,
}

impl FaultSwitches {
    fn relay_kills(&self) -> bool {
        !self.no_relay_kills
    }
    fn consumer_kills(&self) -> bool {
        !self.no_consumer_kills
    }
    fn broker_restarts(&self) -> bool {
        !self.no_broker_restarts
    }
    fn pg_restart(&self) -> bool {
        !self.no_pg_restart
    }
    fn bad_input(&self) -> bool {
        !self.no_bad_input
    }
}

/// Settings of `exactly verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyOptions {
    /// The PostgreSQL server (a fresh database per run).
    #[arg(
        long,
        env = "EXACTLY_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database: String,
    /// Events to commit per run.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub events: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub writers: usize,
    /// Consumer processes.
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub consumers: usize,
    /// Which relay moves the events.
    #[arg(long, value_enum, default_value = "poll")]
    pub relay: VerifyRelay,
    /// Poll relay key kind: event-id (consumers keep key sets) or sequence (watermarks).
    #[arg(long, default_value = "event-id")]
    pub keys: String,
    /// Runs, each with the next seed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Seed of the first run's workload and fault schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub faults: FaultSwitches,
    /// Write the runs' reports here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Give up a run after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout_secs: u64,
}

const EVENT_TYPE: &str = "VerifyEvent";
const AGGREGATES_PER_WRITER: u64 = 10;
/// Outbox rows of the corpus the relay must refuse (oversized payload, NULL and oversized
/// aggregate id), and those that reach consumers and must be parked there (not JSON, not
/// UTF-8, unknown type), and foreign records (no headers, garbled key, duplicate key header).
const BAD_AT_RELAY: u64 = 3;
const BAD_AT_CONSUMER: u64 = 3;
const FOREIGN: u64 = 3;

/// One run's outcome.
#[derive(Debug, serde::Serialize)]
struct RunReport {
    seed: u64,
    relay: String,
    events_committed: u64,
    /// Records on the topic, resends and bad input included: what dedupe had to absorb.
    records_on_topic: u64,
    rolled_back: u64,
    seconds: f64,
    faults: BTreeMap<String, u64>,
    anomalies: BTreeMap<String, (u64, Vec<String>)>,
    applied: BTreeMap<String, u64>,
    parked: BTreeMap<String, u64>,
    relay_dead: u64,
    bad_input_total: u64,
    bad_input_reconciled: bool,
    verdict: String,
    /// A failed run keeps its logs and databases here (relay.log, consumer-N.log, broker.log).
    #[serde(skip_serializing_if = "Option::is_none")]
    kept_logs: Option<PathBuf>,
}

/// A child process of the run, restarted when it dies, killed on drop.
pub(crate) struct Supervised {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Where the process's stderr goes (appended across restarts).
    log: PathBuf,
    child: Mutex<Option<Child>>,
    restarts: AtomicU64,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
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
    binary: PathBuf,
    dir: tempfile::TempDir,
    /// Where Tansu listens.
    port: u16,
    /// Where clients are told to connect: the port itself, or a fault proxy in front of it.
    advertised: u16,
    durable: bool,
    child: Option<Child>,
}

fn find_durable_tansu() -> Result<PathBuf> {
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

    fn listen_address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) -> Result<()> {
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

/// What the writers did, shared with the fault loop.
#[derive(Default)]
struct Writes {
    committed: AtomicU64,
    rolled_back: Mutex<HashSet<String>>,
    /// Writers pause once this many events are committed, so each fault lands while events
    /// are still being written (not after a fast run has already finished).
    gate: AtomicU64,
}

impl Writes {
    async fn wait_for_gate(&self) {
        while self.committed.load(Ordering::Relaxed) >= self.gate.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub(crate) async fn connect_retrying(url: &str) -> tokio_postgres::Client {
    loop {
        match exactly_postgres::connect(url).await {
            Ok(c) => return c,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// One writer: transactions of 1–4 events on its own aggregates; 5% roll back. An ordinal per
/// aggregate grows only when its transaction commits; a commit whose outcome is unknown (the
/// server restarted) is settled by looking for its rows.
async fn writer(
    url: String,
    topic: String,
    writer: usize,
    quota: u64,
    seed: u64,
    writes: Arc<Writes>,
) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (writer as u64) << 32);
    let mut ordinals = vec![0u64; AGGREGATES_PER_WRITER as usize];
    let mut client = connect_retrying(&url).await;
    let mut done = 0u64;
    while done < quota {
        writes.wait_for_gate().await;
        let n = rng.random_range(1..=4u64).min(quota - done);
        let rollback = rng.random_bool(0.05);
        let mut events = Vec::new();
        let mut next = ordinals.clone();
        for _ in 0..n {
            let a = rng.random_range(0..AGGREGATES_PER_WRITER) as usize;
            let aggregate = format!("A-{writer}-{a}");
            let payload = serde_json::json!({"aggregate": aggregate, "ordinal": next[a]}).to_string();
            next[a] += 1;
            events.push(exactly_core::Envelope {
                event_id: uuid::Uuid::now_v7(),
                event_type: EVENT_TYPE.into(),
                aggregate_type: "verify".into(),
                aggregate_id: aggregate,
                occurred_at: exactly_kafka::now(),
                payload: payload.into_bytes(),
                headers: vec![],
            });
        }
        let attempt = async {
            let tx = client.transaction().await?;
            for e in &events {
                exactly_postgres::enqueue(&tx, &topic, e)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            if rollback {
                tx.rollback().await?;
            } else {
                tx.commit().await?;
            }
            anyhow::Ok(())
        }
        .await;
        let committed = match attempt {
            Ok(()) => !rollback,
            Err(_) => {
                client = connect_retrying(&url).await;
                let id = events[0].event_id.hyphenated().to_string();
                client
                    .query_opt("SELECT 1 FROM outbox WHERE event_id = $1::text::uuid", &[&id])
                    .await
                    .ok()
                    .flatten()
                    .is_some()
            }
        };
        if committed {
            ordinals = next;
            done += n;
            writes.committed.fetch_add(n, Ordering::Relaxed);
        } else if rollback {
            let mut rolled = writes
                .rolled_back
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            rolled.extend(events.iter().map(|e| e.event_id.hyphenated().to_string()));
        }
        // A failed non-rollback attempt is simply retried with new event ids.
    }
    Ok(())
}

async fn inject_bad_rows(url: &str, topic: &str) -> Result<()> {
    let client = connect_retrying(url).await;
    let insert =
        "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, topic, payload, occurred_at)
                  VALUES (gen_random_uuid(), $1, 'verify', $2, $3, $4, now())";
    let rows: [(&str, Option<String>, Vec<u8>); 6] = [
        (EVENT_TYPE, Some("bad-json".into()), b"{not json".to_vec()),
        (EVENT_TYPE, Some("bad-utf8".into()), vec![0xff, 0xfe, 0x00, 0x80]),
        ("Mystery", Some("bad-type".into()), b"{}".to_vec()),
        (EVENT_TYPE, Some("bad-size".into()), vec![b' '; 1024 * 1024]),
        (EVENT_TYPE, None, b"{}".to_vec()),
        (EVENT_TYPE, Some("x".repeat(10_000)), b"{}".to_vec()),
    ];
    for (event_type, aggregate, payload) in rows {
        client
            .execute(insert, &[&event_type, &aggregate, &topic, &payload])
            .await
            .context("inserting a bad outbox row")?;
    }
    Ok(())
}

fn inject_foreign_records(brokers: &str, topic: &str) -> Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let producer: ThreadedProducer<_> = exactly_kafka::producer_config(brokers, false)
        .create()
        .context("foreign producer")?;
    let header = |k: &'static str, v: &'static str| Header {
        key: k,
        value: Some(v),
    };
    let records = [
        OwnedHeaders::new(),
        OwnedHeaders::new().insert(header("exactly-key", "garbage")),
        OwnedHeaders::new()
            .insert(header("exactly-key", "v7:0190b2a4-8f11-7000-8000-000000000001"))
            .insert(header("exactly-key", "v7:0190b2a4-8f11-7000-8000-000000000002")),
    ];
    for headers in records {
        producer
            .send(
                BaseRecord::<str, str>::to(topic)
                    .key("foreign")
                    .payload("{}")
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .context("producing a foreign record")?;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing foreign records")?;
    Ok(())
}

fn consumer_db(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("consumer-{i}.db"))
}

/// Distinct good events applied, per consumer (0 while its database is not there yet).
fn applied_counts(dir: &Path, consumers: usize) -> Vec<u64> {
    (0..consumers)
        .map(|i| {
            rusqlite::Connection::open(consumer_db(dir, i))
                .and_then(|c| {
                    c.query_row(
                        "SELECT COUNT(DISTINCT event_id) FROM exactly_consumed WHERE event_type = ?1",
                        [EVENT_TYPE],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .map_or(0, |n| n.max(0) as u64)
        })
        .collect()
}

/// Distinct inputs parked by consumer `i`.
fn parked_count(dir: &Path, i: usize) -> u64 {
    rusqlite::Connection::open(consumer_db(dir, i))
        .and_then(|c| {
            // A relay rewind may resend a record the consumer parks: the same key parked again
            // is one bad input (records without a readable key are told apart by position).
            c.query_row(
                "SELECT COUNT(DISTINCT COALESCE(key_text, topic || '/' || partition || '@' || \"offset\")) FROM exactly_parked",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .map_or(0, |n| n.max(0) as u64)
}

fn event_id_from_headers(json: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    value.as_array()?.iter().find_map(|pair| {
        let pair = pair.as_array()?;
        if pair.first()?.as_str()? != exactly_core::envelope::header::EVENT_ID {
            return None;
        }
        let bytes: Vec<u8> = pair
            .get(1)?
            .as_array()?
            .iter()
            .filter_map(|b| Some(b.as_u64()? as u8))
            .collect();
        String::from_utf8(bytes).ok()
    })
}

fn consumer_history(dir: &Path, i: usize) -> Result<ConsumerHistory> {
    let conn = rusqlite::Connection::open(consumer_db(dir, i))?;
    let mut applied_query = conn.prepare("SELECT event_id FROM exactly_consumed ORDER BY applied_seq")?;
    let applied = applied_query
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut parked_query = conn.prepare("SELECT headers FROM exactly_parked")?;
    let parked = parked_query
        .query_map([], |r| r.get::<_, String>(0))?
        .filter_map(|h| event_id_from_headers(&h.ok()?))
        .collect();
    Ok(ConsumerHistory {
        name: format!("consumer-{i}"),
        applied,
        parked,
    })
}

/// The event ids on the topic and how many records it holds in all (resends included).
fn topic_event_ids(brokers: &str, topic: &str) -> Result<(HashSet<String>, u64)> {
    use rdkafka::message::{Headers, Message};
    let partitions = exactly_kafka::partition_count(brokers, topic)?;
    let (mut ids, mut records) = (HashSet::new(), 0u64);
    exactly_kafka::scan_topic(
        brokers,
        topic,
        partitions,
        "read_committed",
        Duration::from_secs(120),
        |m| {
            records += 1;
            let id = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == exactly_core::envelope::header::EVENT_ID)
                    .and_then(|h| String::from_utf8(h.value?.to_vec()).ok())
            });
            ids.extend(id);
        },
    )?;
    Ok((ids, records))
}

/// The network faults of `--network-faults`, one of each kind per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NetworkFault {
    /// 250 ms each way for 15 s.
    Latency,
    /// Every open connection reset.
    Reset,
    /// Nothing passes for 40 s: past the consumers' 6 s session, the polling relay's 30 s
    /// lease and its 30 s delivery timeout.
    Blackhole,
    /// For 20 s requests arrive and take effect, their answers do not.
    AnswersLost,
    /// For 20 s answers would pass, requests do not.
    RequestsLost,
}

impl NetworkFault {
    const ALL: [NetworkFault; 5] = [
        NetworkFault::Latency,
        NetworkFault::Reset,
        NetworkFault::Blackhole,
        NetworkFault::AnswersLost,
        NetworkFault::RequestsLost,
    ];

    fn name(self) -> &'static str {
        match self {
            NetworkFault::Latency => "network latency",
            NetworkFault::Reset => "network reset",
            NetworkFault::Blackhole => "network blackhole",
            NetworkFault::AnswersLost => "one-way partition, answers lost",
            NetworkFault::RequestsLost => "one-way partition, requests lost",
        }
    }

    fn named(name: &str) -> Option<NetworkFault> {
        NetworkFault::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The proxy condition and how long it lasts (a reset is instant).
    fn condition(self) -> Option<(Condition, Duration)> {
        match self {
            NetworkFault::Latency => Some((
                Condition::Latency(Duration::from_millis(250)),
                Duration::from_secs(15),
            )),
            NetworkFault::Reset => None,
            NetworkFault::Blackhole => Some((Condition::Blackhole, Duration::from_secs(40))),
            NetworkFault::AnswersLost => Some((Condition::AnswersLost, Duration::from_secs(20))),
            NetworkFault::RequestsLost => Some((Condition::RequestsLost, Duration::from_secs(20))),
        }
    }
}

/// The fault proxies of a run: one the broker advertises (every client reaches the broker
/// through it), one in front of the relay's PostgreSQL.
struct Network {
    broker: FaultProxy,
    postgres: FaultProxy,
    /// When the fault in force heals.
    heals_at: Option<Instant>,
}

impl Network {
    /// Injects `fault` on the broker's link, PostgreSQL's or both (chosen by `rng`), and
    /// names the target.
    fn inject(&mut self, fault: NetworkFault, rng: &mut rand::rngs::StdRng) -> &'static str {
        let (target, proxies): (&'static str, Vec<&FaultProxy>) = match rng.random_range(0..3) {
            0 => ("broker", vec![&self.broker]),
            1 => ("postgres", vec![&self.postgres]),
            _ => ("broker and postgres", vec![&self.broker, &self.postgres]),
        };
        match fault.condition() {
            Some((condition, lasting)) => {
                for proxy in proxies {
                    proxy.set(condition);
                }
                self.heals_at = Some(Instant::now() + lasting);
            }
            None => {
                for proxy in proxies {
                    proxy.reset_connections();
                }
            }
        }
        target
    }

    fn heal_when_due(&mut self) {
        if self.heals_at.is_some_and(|at| Instant::now() >= at) {
            self.broker.set(Condition::Healthy);
            self.postgres.set(Condition::Healthy);
            self.heals_at = None;
        }
    }
}

/// The PostgreSQL server a URL names, as a socket address for a proxy to forward to.
pub(crate) fn postgres_address(url: &str) -> Result<SocketAddr> {
    let parsed = url::Url::parse(url).context("network faults need a postgres:// URL")?;
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .context("network faults need PostgreSQL over TCP (a host in the URL)")?;
    let port = parsed.port().unwrap_or(5432);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .with_context(|| format!("resolving {host}:{port}"))?
        .next()
        .with_context(|| format!("{host}:{port} resolves to no address"))
}

/// `url` pointed at `proxy` instead of the server.
pub(crate) fn through_proxy(url: &str, proxy: &FaultProxy) -> Result<String> {
    let mut parsed = url::Url::parse(url).context("network faults need a postgres:// URL")?;
    let address = proxy.address();
    parsed
        .set_host(Some(&address.ip().to_string()))
        .context("pointing the URL at the proxy")?;
    parsed
        .set_port(Some(address.port()))
        .map_err(|()| anyhow::anyhow!("pointing the URL at the proxy"))?;
    Ok(parsed.into())
}

/// Runs one seeded run and returns its report.
async fn run_once(
    options: &VerifyOptions,
    seed: u64,
    progress: &indicatif::ProgressBar,
) -> Result<RunReport> {
    let started = Instant::now();
    let run_id = exactly_kafka::now().0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let exactly_once = options.relay == VerifyRelay::WalExactlyOnce;
    // The durable broker lacks transactions (EndTxn): the exactly-once relay runs on the
    // in-memory one, which cannot be restarted without losing the topic. Runs without broker
    // restarts use the in-memory one too.
    let broker_restarts = options.faults.broker_restarts() && !exactly_once;
    let broker_port = crate::broker::free_port()?;
    let broker_proxy = if options.faults.network_faults {
        Some(FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], broker_port))).await?)
    } else {
        None
    };
    let advertised = broker_proxy.as_ref().map_or(broker_port, |p| p.address().port());
    let mut broker = Broker::start(broker_restarts, broker_port, advertised)?;
    let brokers = broker.address();
    let topic = format!("verify-{run_id}");
    exactly_kafka::ensure_topics(&brokers, &[&topic], 3).await?;

    let admin = exactly_postgres::connect(&options.database).await?;
    let name = format!("exactly_verify_{run_id}");
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    let url = with_database(&options.database, &name);
    {
        let mut client = exactly_postgres::connect(&url).await?;
        exactly_postgres::migrations::migrate(&mut client).await?;
    }
    let slot = format!("exactly_verify_{run_id}");
    if options.relay != VerifyRelay::Poll {
        let mut config = exactly_postgres::WalConfig::new(&url);
        config.slot = slot.clone();
        exactly_postgres::wal::ensure_slot(&config).await?;
    }
    let dir = tempfile::tempdir()?;

    let mut relay_args: Vec<String> = ["relay", "--brokers", &brokers, "--no-metrics"]
        .map(String::from)
        .to_vec();
    match options.relay {
        VerifyRelay::Poll => relay_args.extend(["--mode", "poll", "--keys", &options.keys].map(String::from)),
        VerifyRelay::Wal => relay_args.extend(["--mode", "wal", "--slot", &slot].map(String::from)),
        VerifyRelay::WalExactlyOnce => {
            relay_args.extend(["--mode", "wal", "--slot", &slot, "--exactly-once"].map(String::from))
        }
    }
    // With network faults the relay reaches PostgreSQL through a proxy of its own; the
    // writers keep their direct connections, so commits go on while the relay is cut off.
    let mut network = match broker_proxy {
        Some(broker) => Some(Network {
            broker,
            postgres: FaultProxy::start(postgres_address(&url)?).await?,
            heals_at: None,
        }),
        None => None,
    };
    let relay_url = match &network {
        Some(network) => through_proxy(&url, &network.postgres)?,
        None => url.clone(),
    };
    let relay = Supervised::with_env(
        "relay",
        relay_args,
        vec![("EXACTLY_DATABASE".to_owned(), relay_url)],
        dir.path(),
    );
    let consumers: Vec<Arc<Supervised>> = (0..options.consumers)
        .map(|i| {
            let db = consumer_db(dir.path(), i);
            Supervised::new(
                &format!("consumer-{i}"),
                [
                    "consume",
                    "--database",
                    &db.to_string_lossy(),
                    "--brokers",
                    &brokers,
                    "--group",
                    &format!("verify-{run_id}-{i}"),
                    "--topic",
                    &topic,
                    "--event-types",
                    EVENT_TYPE,
                    "--no-metrics",
                ]
                .map(String::from)
                .to_vec(),
                dir.path(),
            )
        })
        .collect();
    relay.ensure_running()?;
    for c in &consumers {
        c.ensure_running()?;
    }

    // Fault schedule, in fractions of the slowest consumer's progress.
    let mut schedule: Vec<(f64, &'static str)> = Vec::new();
    let jitter = |rng: &mut rand::rngs::StdRng| rng.random_range(0.0..0.05);
    let rounds = options.faults.fault_rounds;
    if options.faults.relay_kills() {
        for at in [0.2, 0.4, 0.6].into_iter().take(rounds) {
            schedule.push((at + jitter(&mut rng), "relay kill"));
        }
    }
    if options.faults.consumer_kills() {
        for at in [0.25, 0.5, 0.75].into_iter().take(rounds) {
            schedule.push((at + jitter(&mut rng), "consumer kills"));
        }
    }
    if broker_restarts {
        for at in [0.35, 0.65].into_iter().take(rounds.min(2)) {
            schedule.push((at + jitter(&mut rng), "broker restart"));
        }
    }
    if options.faults.pg_restart() {
        schedule.push((0.45 + jitter(&mut rng), "postgres restart"));
    }
    if options.faults.bad_input() {
        schedule.push((0.3, "bad input"));
    }
    if network.is_some() {
        for fault in NetworkFault::ALL {
            schedule.push((rng.random_range(0.1..0.85), fault.name()));
        }
    }
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Writers stay at most 10% of the events ahead of the next fault's point.
    let total = options.events;
    let gate_for = |schedule: &[(f64, &str)]| match schedule.first() {
        Some((at, _)) => ((at + 0.1).min(1.0) * total as f64) as u64,
        None => total,
    };
    let writes = Arc::new(Writes::default());
    writes.gate.store(gate_for(&schedule), Ordering::Relaxed);
    let per_writer = options.events / options.writers as u64;
    let mut writer_tasks = Vec::new();
    for w in 0..options.writers {
        let quota = if w == 0 {
            options.events - per_writer * (options.writers as u64 - 1)
        } else {
            per_writer
        };
        writer_tasks.push(tokio::spawn(writer(
            url.clone(),
            topic.clone(),
            w,
            quota,
            seed,
            writes.clone(),
        )));
    }

    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(options.timeout_secs);
    let stalled = AtomicBool::new(false);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        relay.ensure_running()?;
        for c in &consumers {
            c.ensure_running()?;
        }
        let applied = applied_counts(dir.path(), options.consumers);
        let slowest = applied.iter().copied().min().unwrap_or(0);
        progress.set_position(slowest);
        let fraction = slowest as f64 / total.max(1) as f64;
        if let Some(network) = network.as_mut() {
            network.heal_when_due();
        }
        let network_fault_on = network.as_ref().is_some_and(|n| n.heals_at.is_some());
        // One fault per turn, so every killed process is restarted before the next fault, and
        // none while a network fault is in force.
        let due = schedule
            .first()
            .copied()
            .filter(|(at, _)| fraction >= *at && !network_fault_on);
        if let Some((_, what)) = due {
            schedule.remove(0);
            writes.gate.store(gate_for(&schedule), Ordering::Relaxed);
            progress.set_message(what);
            match what {
                "relay kill" => relay.kill(),
                "consumer kills" => {
                    for c in &consumers {
                        c.kill();
                    }
                }
                "broker restart" => broker.restart()?,
                "postgres restart" => restart_postgres()?,
                "bad input" => {
                    inject_bad_rows(&url, &topic).await?;
                    let (b, t) = (brokers.clone(), topic.clone());
                    tokio::task::spawn_blocking(move || inject_foreign_records(&b, &t)).await??;
                }
                other => {
                    if let (Some(fault), Some(network)) = (NetworkFault::named(other), network.as_mut()) {
                        let target = network.inject(fault, &mut rng);
                        *faults.entry(format!("{what} ({target})")).or_insert(0) += 1;
                        continue;
                    }
                }
            }
            *faults.entry(what.to_owned()).or_insert(0) += 1;
        }
        let writers_done = writer_tasks.iter().all(|t| t.is_finished());
        let parked_done = !options.faults.bad_input()
            || (0..options.consumers).all(|i| parked_count(dir.path(), i) >= BAD_AT_CONSUMER + FOREIGN);
        if writers_done && slowest >= total && schedule.is_empty() && parked_done && !network_fault_on {
            // A little longer, so a late repeat would still show up as a duplicate.
            tokio::time::sleep(Duration::from_secs(2)).await;
            break;
        }
        if Instant::now() > deadline {
            stalled.store(true, Ordering::Relaxed);
            break;
        }
    }
    for t in writer_tasks {
        if t.is_finished() {
            t.await??;
        } else {
            t.abort();
        }
    }
    relay.kill();
    for c in &consumers {
        c.kill();
    }
    faults.insert("relay restarts".into(), relay.restarts.load(Ordering::Relaxed));
    faults.insert(
        "consumer restarts".into(),
        consumers.iter().map(|c| c.restarts.load(Ordering::Relaxed)).sum(),
    );

    // The history.
    let client = connect_retrying(&url).await;
    let rows = client
        .query(
            "SELECT event_id::text, aggregate_id, convert_from(payload, 'UTF8') FROM outbox WHERE event_type = $1 AND aggregate_id LIKE 'A-%' ORDER BY id",
            &[&EVENT_TYPE],
        )
        .await?;
    let mut committed = Vec::with_capacity(rows.len());
    for row in rows {
        let payload: String = row.get(2);
        let v: serde_json::Value = serde_json::from_str(&payload)?;
        committed.push(CommittedEvent {
            id: row.get(0),
            aggregate: row.get(1),
            ordinal: v["ordinal"].as_u64().context("ordinal in a verify payload")?,
        });
    }
    let relay_dead: i64 = match options.relay {
        VerifyRelay::Poll => client
            .query_one("SELECT COUNT(*) FROM outbox WHERE status = 'DEAD'", &[])
            .await?
            .get(0),
        _ => client
            .query_one("SELECT COUNT(*) FROM exactly_relay_dead", &[])
            .await?
            .get(0),
    };
    let (b, t) = (brokers.clone(), topic.clone());
    let (on_topic, records_on_topic) = tokio::task::spawn_blocking(move || topic_event_ids(&b, &t)).await??;
    let consumers_history = (0..options.consumers)
        .map(|i| consumer_history(dir.path(), i))
        .collect::<Result<Vec<_>>>()?;
    let rolled_back = writes
        .rolled_back
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let history = History {
        committed,
        rolled_back,
        on_topic,
        consumers: consumers_history,
    };
    let findings = check(&history);
    let bad_total = if options.faults.bad_input() {
        BAD_AT_RELAY + BAD_AT_CONSUMER + FOREIGN
    } else {
        0
    };
    // applied + parked = total: every good event applied once (the checker), and every bad
    // input refused by the relay or parked by each consumer, none more.
    let reconciled = !options.faults.bad_input()
        || (relay_dead as u64 == BAD_AT_RELAY
            && (0..options.consumers).all(|i| parked_count(dir.path(), i) == BAD_AT_CONSUMER + FOREIGN));
    let parked: BTreeMap<String, u64> = (0..options.consumers)
        .map(|i| (format!("consumer-{i}"), parked_count(dir.path(), i)))
        .collect();
    let ok = findings.ok() && reconciled && !stalled.load(Ordering::Relaxed);
    let broker_log = broker.dir.path().join("broker.log");
    drop(broker);
    let kept_logs = if ok {
        None
    } else {
        let _ = std::fs::copy(&broker_log, dir.path().join("broker.log"));
        Some(dir.keep())
    };
    if options.relay != VerifyRelay::Poll {
        let _ = exactly_postgres::wal::drop_slot(&url, &slot).await;
    }
    drop(client);
    if ok {
        // A failed run keeps its database for inspection (scripts/setup drops leftovers).
        let admin = connect_retrying(&options.database).await;
        if let Err(e) = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
        {
            tracing::warn!("cannot drop {name}: {e}");
        }
    }
    let mut report = report(
        parked,
        seed,
        options,
        &history,
        &findings,
        faults,
        relay_dead as u64,
        bad_total,
        reconciled,
        if ok {
            "exactly once".into()
        } else if stalled.load(Ordering::Relaxed) {
            format!("FAILED (not done within {} s)", options.timeout_secs)
        } else {
            "FAILED".into()
        },
        started.elapsed().as_secs_f64(),
    );
    report.kept_logs = kept_logs;
    report.records_on_topic = records_on_topic;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn report(
    parked: BTreeMap<String, u64>,
    seed: u64,
    options: &VerifyOptions,
    history: &History,
    findings: &Findings,
    faults: BTreeMap<String, u64>,
    relay_dead: u64,
    bad_input_total: u64,
    bad_input_reconciled: bool,
    verdict: String,
    seconds: f64,
) -> RunReport {
    RunReport {
        seed,
        relay: format!("{:?}", options.relay),
        events_committed: history.committed.len() as u64,
        records_on_topic: 0,
        rolled_back: history.rolled_back.len() as u64,
        seconds,
        faults,
        anomalies: Anomaly::ALL
            .iter()
            .map(|k| {
                let f = findings.anomalies.get(k).cloned().unwrap_or_default();
                (k.name().to_owned(), (f.count, f.examples))
            })
            .collect(),
        applied: findings.applied.clone(),
        parked,
        relay_dead,
        bad_input_total,
        bad_input_reconciled,
        verdict,
        kept_logs: None,
    }
}

fn print(report: &RunReport) {
    println!();
    println!(
        "  run seed {} · relay {} · {:.1} s",
        report.seed, report.relay, report.seconds
    );
    println!("  {:<46} {:>10}", "events committed", report.events_committed);
    println!("  {:<46} {:>10}", "rolled back", report.rolled_back);
    println!(
        "  {:<46} {:>10}  (resends and bad input included)",
        "records on the topic", report.records_on_topic
    );
    for (what, n) in &report.faults {
        println!("  {:<46} {:>10}", what, n);
    }
    println!("  {:<46} {:>10}  first examples", "anomaly", "count");
    for (name, (count, examples)) in &report.anomalies {
        println!("  {:<46} {:>10}  {}", name, count, examples.join(", "));
    }
    for (name, n) in &report.applied {
        println!(
            "  {:<46} {:>10}  (parked {})",
            format!("{name} applied"),
            n,
            report.parked.get(name).copied().unwrap_or(0)
        );
    }
    println!(
        "  {:<46} {:>10}  (relay refused {}; reconciled: {})",
        "bad input injected", report.bad_input_total, report.relay_dead, report.bad_input_reconciled
    );
    println!("  verdict: {}", report.verdict);
    if let Some(dir) = &report.kept_logs {
        println!("  logs and consumer databases kept in {}", dir.display());
    }
}

/// Runs `--runs` seeded runs; Ok(true) when every run is exactly once.
pub async fn verify(options: VerifyOptions) -> Result<bool> {
    let mut reports = Vec::new();
    for run in 0..options.runs {
        let seed = options.seed + u64::from(run);
        let progress = if options.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(options.events)
        };
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "  run {prefix} [{bar:40}] {pos}/{len} applied by the slowest consumer · {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        progress.set_prefix(format!("{}/{}", run + 1, options.runs));
        let report = run_once(&options, seed, &progress).await?;
        progress.finish_and_clear();
        print(&report);
        reports.push(report);
    }
    if let Some(path) = &options.report {
        std::fs::write(path, serde_json::to_string_pretty(&reports)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(reports.iter().all(|r| r.verdict == "exactly once"))
}
