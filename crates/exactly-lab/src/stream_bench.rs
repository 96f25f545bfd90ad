//! `exactly bench stream`: the orders-agg job with exactly-once (Kafka transactions every
//! commit interval) against the same job at least once (no transactions), on the same input in
//! one run; then the restore of a changelog holding 1M store keys (time and store size).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use exactly_core::changelog::TxnSeq;
use exactly_core::window::TumblingWindows;
use exactly_core::{Envelope, IdempotencyKey, UnixMillis};
use exactly_stream::changelog::{records_for, TXN_HEADER};
use exactly_stream::{Batch, Change, GroupBy, Guarantee, Processor, StreamConfig, StreamCounters};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use crate::broker::given_or_local;

/// Settings of `exactly bench stream`.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamBench {
    /// Use this broker instead of starting one.
    #[arg(long, env = "EXACTLY_BENCH_BROKERS")]
    pub brokers: Option<String>,
    /// Input events.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Store keys of the restore measured.
    #[arg(long, default_value_t = 1_000_000)]
    pub restore_keys: u64,
    /// Bytes added to each store key of the restore (a larger changelog with as many records).
    #[arg(long, default_value_t = 0)]
    pub key_padding: usize,
    /// Only the restore, not the jobs.
    #[arg(long)]
    pub restore_only: bool,
    /// The restore reader's prefetch and fetch size, in KiB (librdkafka's
    /// `queued.max.messages.kbytes`, `fetch.max.bytes`, `max.partition.fetch.bytes`); unset, the
    /// restore's defaults (16 MiB).
    #[arg(long)]
    pub restore_buffer_kib: Option<u32>,
    /// Commit interval of the exactly-once run.
    #[arg(long, default_value_t = 100)]
    pub commit_interval_ms: u64,
    /// DSL job tables to run besides the built-in job, each at least once and exactly once
    /// (count per product, regrouped through a repartition topic, a result on every update),
    /// against a plain read + produce of the same records: tumbling, hopping, session; none to
    /// skip them.
    #[arg(long, value_delimiter = ',', default_value = "tumbling,hopping,session")]
    pub window_kinds: Vec<String>,
    /// The job tables' emit mode: `final` (one result per window when it closes; with the
    /// bench's day of grace none closes during the run, so this measures the processing) or
    /// `update` (a result per window per record: hopping sends five per record).
    #[arg(long, default_value = "final")]
    pub emit: String,
}

/// The job table of a window kind the bench runs.
fn bench_job(kind: &str, emit: &str, input: &str, output: &str) -> Result<exactly_stream::dsl::JobSpec> {
    if !matches!(emit, "final" | "update") {
        bail!("unknown emit mode {emit:?}: final or update");
    }
    let window = match kind {
        "tumbling" => "{ kind = \"tumbling\", size_ms = 300000, grace_ms = 86400000 }",
        "hopping" => "{ kind = \"hopping\", size_ms = 300000, advance_ms = 60000, grace_ms = 86400000 }",
        "session" => "{ kind = \"session\", gap_ms = 60000, grace_ms = 86400000 }",
        other => bail!("unknown window kind {other:?}: tumbling, hopping or session"),
    };
    Ok(toml::from_str(&format!(
        "input = \"{input}\"\nkey = \"/product_id\"\nwindow = {window}\naggregate = \"count\"\nemit = \"{emit}\"\noutput = \"{output}\"\n"
    ))?)
}

const WINDOW_MS: i64 = 300_000;

fn send_all<'a>(
    producer: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    records: impl Iterator<Item = BaseRecord<'a, str, [u8]>>,
) -> Result<()> {
    for mut record in records {
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("producing bench input: {e}"),
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing bench input")?;
    Ok(())
}

/// `events` orders over 4 windows, 100 products, 1% sent twice.
fn produce_orders(brokers: &str, topic: &str, events: u64) -> Result<u64> {
    let producer: ThreadedProducer<_> = exactly_kafka::producer_config(brokers, false)
        .create()
        .context("creating the input producer")?;
    let base = (exactly_kafka::now().0 / WINDOW_MS) * WINDOW_MS - 3 * WINDOW_MS;
    let orders: Vec<(Envelope, OwnedHeaders)> = (0..events)
        .map(|i| {
            let envelope = Envelope {
                event_id: uuid::Uuid::now_v7(),
                event_type: "OrderPlaced".into(),
                aggregate_type: "order".into(),
                aggregate_id: format!("O-{}", i % 1000),
                occurred_at: UnixMillis(base + (i as i64 * 7919) % (4 * WINDOW_MS)),
                payload: format!("{{\"product_id\":\"P-{}\"}}", i % 100).into_bytes(),
                headers: vec![],
            };
            let headers = exactly_kafka::record_headers(
                &envelope.to_headers(&IdempotencyKey::UuidV7(envelope.event_id)),
            );
            (envelope, headers)
        })
        .collect();
    let repeats = orders.iter().step_by(100);
    let sent = orders.len() + repeats.len();
    send_all(
        &producer,
        orders.iter().chain(orders.iter().step_by(100)).map(|(e, h)| {
            BaseRecord::to(topic)
                .key(e.aggregate_id.as_str())
                .payload(e.payload.as_slice())
                .headers(h.clone())
        }),
    )?;
    Ok(sent as u64)
}

struct Run {
    /// The built-in job, or a job table's window kind.
    job: String,
    guarantee: Guarantee,
    seconds: f64,
    records: u64,
    commits: u64,
}

/// Runs the job on `input` until every record is counted or found a duplicate; the clock runs
/// from the first record processed (group join and restore excluded) to the last.
fn run_job(
    brokers: &str,
    input: &str,
    sent: u64,
    guarantee: Guarantee,
    commit_interval: Duration,
    run_id: i64,
    kind: Option<(&str, &str)>,
) -> Result<Run> {
    let name = match guarantee {
        Guarantee::ExactlyOnce => "eos",
        Guarantee::AtLeastOnce => "alos",
    };
    let output = format!("bench-agg-out-{name}-{run_id}");
    let topology = match kind {
        Some((kind, emit)) => Some(Arc::new(
            bench_job(kind, emit, input, &output)?.topology(exactly_stream::dsl::JOB_NAME)?,
        )),
        None => None,
    };
    let state = tempfile::tempdir().context("state dir")?;
    let config = StreamConfig {
        kafka: exactly_kafka::KafkaSettings::new(brokers),
        application_id: format!("bench-agg-{name}-{run_id}"),
        instance: "0".into(),
        input: input.to_owned(),
        output,
        group_by: GroupBy::PayloadField("product_id".into()),
        windows: TumblingWindows::new(WINDOW_MS, 86_400_000, 172_800_000)?,
        salts: 1,
        commit_interval,
        guarantee,
        state_dir: state.path().to_owned(),
        replication_factor: 1,
        min_insync_replicas: 1,
        max_event_time_skew_ms: exactly_stream::DEFAULT_MAX_EVENT_TIME_SKEW_MS,
        group_instance_id: None,
        topology,
    };
    let runtime = tokio::runtime::Handle::current();
    runtime.block_on(config.prepare_topics(3))?;
    let counters = Arc::new(StreamCounters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (c, s) = (counters.clone(), stop.clone());
    let job = std::thread::spawn(move || Processor::new(config, c)?.run(&s));
    // A topology counts every record its tasks processed; the built-in job its counted ones.
    let job_table = kind.is_some();
    let done = move |c: &StreamCounters| {
        if job_table {
            c.counted.load(Ordering::Relaxed)
        } else {
            c.counted.load(Ordering::Relaxed) + c.duplicates.load(Ordering::Relaxed)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while done(&counters) == 0 {
        if Instant::now() > deadline || job.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = Instant::now();
    while done(&counters) < sent && Instant::now() < deadline && !job.is_finished() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let seconds = started.elapsed().as_secs_f64();
    let records = done(&counters);
    stop.store(true, Ordering::Relaxed);
    job.join()
        .map_err(|_| anyhow::anyhow!("the {name} processor panicked"))?
        .with_context(|| format!("the {name} processor"))?;
    if records < sent {
        bail!("the {name} job processed {records} of {sent} records within 600 s");
    }
    Ok(Run {
        job: kind.map_or("orders-agg", |(k, _)| k).to_owned(),
        guarantee,
        seconds,
        records,
        commits: counters.commits.load(Ordering::Relaxed),
    })
}

/// What the restore bench measured: the restore itself, a plain read of the same changelog (the
/// baseline: what the broker and librdkafka deliver, with the same end-of-changelog rule), the
/// store's size, and this process's resident memory before and at its highest during the restore.
struct RestoreFigures {
    restore: exactly_stream::RestoreStats,
    raw_read: Duration,
    raw_records: u64,
    raw_bytes: u64,
    store_bytes: u64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
}

/// Reads all of `topic`'s partition 0 with the restore's reader settings and end rule (the
/// stable end proven, no quiet period) but keeps nothing: the baseline the restore's own work is
/// measured against. Returns the time, the records and their key and value bytes.
fn read_raw(kafka: &exactly_kafka::KafkaSettings, topic: &str) -> Result<(Duration, u64, u64)> {
    let started = Instant::now();
    let (mut records, mut bytes) = (0u64, 0u64);
    exactly_kafka::read_to_stable_end(kafka, topic, 0, Duration::from_secs(600), |m| {
        records += 1;
        bytes += (m.key_len() + m.payload_len()) as u64;
    })?;
    Ok((started.elapsed(), records, bytes))
}

/// Samples this process's resident set every 10 ms until `stop`: the highest seen.
fn sample_rss(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(crate::e2e_bench::rss_kib().unwrap_or(0));
            std::thread::sleep(Duration::from_millis(10));
        }
        peak
    })
}

/// Writes a changelog holding `keys` count entries in transactions of 10,000 changes with their
/// commit markers, reads it once plainly (the baseline), then rebuilds a store from it.
fn restore_figures(
    brokers: &str,
    keys: u64,
    padding: usize,
    buffer_kib: Option<u32>,
    run_id: i64,
) -> Result<RestoreFigures> {
    let state = tempfile::tempdir().context("state dir")?;
    let mut kafka = exactly_kafka::KafkaSettings::new(brokers);
    if let Some(kib) = buffer_kib {
        let bytes = (u64::from(kib) * 1024).to_string();
        kafka = kafka
            .with_property("queued.max.messages.kbytes", &kib.to_string())?
            .with_property("queued.min.messages", "1000")?
            .with_property("fetch.max.bytes", &bytes)?
            .with_property("max.partition.fetch.bytes", &bytes)?;
    }
    let config = StreamConfig {
        kafka,
        application_id: format!("bench-restore-{run_id}"),
        instance: "0".into(),
        input: format!("bench-restore-in-{run_id}"),
        output: format!("bench-restore-out-{run_id}"),
        group_by: GroupBy::AggregateId,
        windows: TumblingWindows::new(WINDOW_MS, 60_000, 86_400_000)?,
        salts: 1,
        commit_interval: Duration::from_millis(100),
        guarantee: Guarantee::ExactlyOnce,
        state_dir: state.path().to_owned(),
        replication_factor: 1,
        min_insync_replicas: 1,
        max_event_time_skew_ms: exactly_stream::DEFAULT_MAX_EVENT_TIME_SKEW_MS,
        group_instance_id: None,
        topology: None,
    };
    let runtime = tokio::runtime::Handle::current();
    runtime.block_on(exactly_kafka::ensure_topics(brokers, &[&config.input], 1))?;
    runtime.block_on(config.prepare_topics(1))?;
    let producer: ThreadedProducer<_> = exactly_kafka::producer_config(brokers, false)
        .create()
        .context("creating the changelog producer")?;
    let topic = config.changelog_topic();
    let mut previous: Option<TxnSeq> = None;
    let per_txn = 10_000u64;
    let mut written = 0u64;
    let mut seq = 0u64;
    while written < keys || previous.is_some() {
        let n = per_txn.min(keys - written);
        let batch = Batch {
            changes: (written..written + n)
                .map(|k| Change::Count {
                    window_start: UnixMillis((k as i64 % 12) * WINDOW_MS),
                    key: format!("P-{k}-{:-<padding$}", ""),
                    count: Some(k % 50 + 1),
                })
                .collect(),
        };
        let txn = TxnSeq { epoch: 1, seq };
        let records = records_for(txn, previous, &batch);
        send_all(
            &producer,
            records.iter().map(|r| {
                let headers = OwnedHeaders::new().insert(Header {
                    key: TXN_HEADER,
                    value: Some(&r.txn),
                });
                let record = BaseRecord::to(&topic)
                    .key(r.key.as_str())
                    .partition(0)
                    .headers(headers);
                match &r.value {
                    Some(v) => record.payload(v.as_bytes()),
                    None => record,
                }
            }),
        )?;
        written += n;
        seq += 1;
        // The last round only carries the marker of the one before.
        previous = (n > 0).then_some(txn);
    }
    drop(producer);
    let (raw_read, raw_records, raw_bytes) = read_raw(&config.kafka, &topic)?;
    let rss_before_kib = crate::e2e_bench::rss_kib().unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(stop.clone());
    let restored = exactly_stream::rebuild_store(&config, 0, exactly_core::changelog::RestoreMode::Markers);
    stop.store(true, Ordering::Relaxed);
    let rss_peak_kib = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the memory sampler panicked"))?;
    let (store, restore) = restored?;
    let restored_keys = store.counts()?.len() as u64;
    if restored_keys != keys {
        bail!("the restore holds {restored_keys} of {keys} keys");
    }
    drop(store);
    let store_bytes = std::fs::metadata(state.path().join("partition-0.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(RestoreFigures {
        restore,
        raw_read,
        raw_records,
        raw_bytes,
        store_bytes,
        rss_before_kib,
        rss_peak_kib,
    })
}

pub async fn stream_bench(options: StreamBench) -> Result<()> {
    let run_id = exactly_kafka::now().0;
    let (brokers, _local_broker) = given_or_local(options.brokers.as_deref()).await?;
    if !options.restore_only {
        jobs(&brokers, &options, run_id).await?;
    }
    eprintln!("bench: restore of {} store keys", options.restore_keys);
    let (b, keys, padding, buffer) = (
        brokers.clone(),
        options.restore_keys,
        options.key_padding,
        options.restore_buffer_kib,
    );
    let figures =
        tokio::task::spawn_blocking(move || restore_figures(&b, keys, padding, buffer, run_id)).await??;
    let restore = &figures.restore;
    println!();
    println!(
        "  restore bench: {} store keys ({} B of key padding), one changelog partition in transactions of 10,000, \
         broker {brokers}; the machine's 2 cores are shared by the broker and exactly",
        options.restore_keys, options.key_padding
    );
    println!(
        "  {:<34} {:>10.2} s  ({} changelog records, {} entries, {} dropped)",
        format!("restore of {} keys", options.restore_keys),
        restore.elapsed.as_secs_f64(),
        restore.records,
        restore.entries,
        restore.dropped
    );
    let rate = restore.records as f64 / restore.elapsed.as_secs_f64().max(1e-9);
    let raw_rate = figures.raw_records as f64 / figures.raw_read.as_secs_f64().max(1e-9);
    println!(
        "  {:<34} {:>10.0} records/s  (broker reads and end checks {:.2} s, store writes {:.2} s)",
        "restore rate",
        rate,
        restore.read.as_secs_f64(),
        restore.write.as_secs_f64(),
    );
    // Both reads end with the same rule: the stable end proven (LSO = high watermark, reached).
    println!(
        "  {:<34} {:>10.0} records/s  ({} records, {:.1} MiB of keys and values, in {:.2} s)",
        "plain read of the changelog",
        raw_rate,
        figures.raw_records,
        figures.raw_bytes as f64 / (1024.0 * 1024.0),
        figures.raw_read.as_secs_f64(),
    );
    println!(
        "  {:<34} {:>10.2}x  (goal >= 0.8x)",
        "restore / plain read",
        rate / raw_rate.max(1e-9),
    );
    println!(
        "  {:<34} {:>10.1} MiB  ({:.0} B per key)",
        "store size after restore",
        figures.store_bytes as f64 / (1024.0 * 1024.0),
        figures.store_bytes as f64 / options.restore_keys.max(1) as f64
    );
    println!(
        "  {:<34} {:>10.1} MiB  (before it: {:.1} MiB; growth {:.1} MiB for a {:.1} MiB changelog)",
        "peak RSS during the restore",
        figures.rss_peak_kib as f64 / 1024.0,
        figures.rss_before_kib as f64 / 1024.0,
        figures.rss_peak_kib.saturating_sub(figures.rss_before_kib) as f64 / 1024.0,
        figures.raw_bytes as f64 / (1024.0 * 1024.0),
    );
    // One line for scripts and tests.
    println!(
        "restore-figures records={} entries={} changelog_bytes={} rss_before_kib={} rss_peak_kib={} restore_s={:.3} plain_read_s={:.3}",
        restore.records,
        restore.entries,
        figures.raw_bytes,
        figures.rss_before_kib,
        figures.rss_peak_kib,
        restore.elapsed.as_secs_f64(),
        figures.raw_read.as_secs_f64()
    );
    Ok(())
}

/// The job runs: exactly-once against at-least-once on the same input.
async fn jobs(brokers: &str, options: &StreamBench, run_id: i64) -> Result<()> {
    let brokers = brokers.to_owned();
    let input = format!("bench-orders-{run_id}");
    exactly_kafka::ensure_topics(&brokers, &[&input], 3).await?;
    eprintln!("bench: producing {} orders (1% twice) to {input}", options.events);
    let (b, i, n) = (brokers.clone(), input.clone(), options.events);
    let sent = tokio::task::spawn_blocking(move || produce_orders(&b, &i, n)).await??;

    let (b, i, interval) = (
        brokers.clone(),
        input.clone(),
        Duration::from_millis(options.commit_interval_ms),
    );
    let runs = tokio::task::spawn_blocking(move || -> Result<Vec<Run>> {
        let mut runs = Vec::new();
        // Alternated, so neither job always runs on the warmer broker.
        for guarantee in [
            Guarantee::AtLeastOnce,
            Guarantee::ExactlyOnce,
            Guarantee::AtLeastOnce,
            Guarantee::ExactlyOnce,
        ] {
            eprintln!("bench: {guarantee:?} job over {sent} records");
            runs.push(run_job(
                &b,
                &i,
                sent,
                guarantee,
                interval,
                run_id + runs.len() as i64,
                None,
            )?);
        }
        Ok(runs)
    })
    .await??;
    let rate = |g: Guarantee| {
        let (records, seconds) = runs
            .iter()
            .filter(|r| r.guarantee == g)
            .fold((0u64, 0f64), |(n, s), r| (n + r.records, s + r.seconds));
        records as f64 / seconds.max(1e-9)
    };
    let (alos, eos) = (rate(Guarantee::AtLeastOnce), rate(Guarantee::ExactlyOnce));
    println!();
    println!(
        "  stream bench: orders-agg, {sent} input records, 3 partitions, commit interval {} ms, broker {brokers}",
        options.commit_interval_ms
    );
    for r in &runs {
        println!(
            "  {:<34} {:>10.0} records/s  ({} commits, {:.2} s)",
            format!("{:?}", r.guarantee),
            r.records as f64 / r.seconds.max(1e-9),
            r.commits,
            r.seconds
        );
    }
    println!("  {:<34} {:>10.0} records/s", "at-least-once (baseline)", alos);
    println!("  {:<34} {:>10.0} records/s", "exactly-once", eos);
    println!(
        "  {:<34} {:>10.2}x  (goal >= 0.9x)",
        "exactly-once / at-least-once",
        eos / alos.max(1e-9)
    );
    if !options.window_kinds.is_empty() {
        job_tables(&brokers, &input, sent, options, run_id).await?;
    }
    Ok(())
}

/// Reads every record of `input` (read_committed) and produces it to a new topic, no
/// transactions: what the broker and librdkafka move through one process, the limit of any
/// job on the same records. Records per second from the first record read to the last sent.
fn pipe(brokers: &str, input: &str, sent: u64, run_id: i64) -> Result<f64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let kafka = exactly_kafka::KafkaSettings::new(brokers);
    let output = format!("bench-pipe-{run_id}");
    let consumer: BaseConsumer =
        exactly_kafka::reader_config(&kafka, &format!("bench-pipe-{run_id}"), "read_committed")
            .create()
            .context("pipe consumer")?;
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        partitions.add_partition_offset(input, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&partitions)?;
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        exactly_kafka::producer_config(brokers, false).create()?;
    let (mut read, mut started) = (0u64, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    while read < sent && Instant::now() < deadline {
        let m = match consumer.poll(Duration::from_millis(100)) {
            None | Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => continue,
            Some(m) => m?,
        };
        started.get_or_insert_with(Instant::now);
        let mut record = BaseRecord::<[u8], [u8]>::to(&output);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        if let Some(h) = m.headers() {
            record = record.headers(h.detach());
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        read += 1;
    }
    producer.flush(Duration::from_secs(120))?;
    let seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    if read < sent {
        bail!("the pipe read {read} of {sent} records within 600 s");
    }
    Ok(read as f64 / seconds.max(1e-9))
}

/// Each window kind's job table at least once and exactly once, and the pipe, on `input`.
async fn job_tables(brokers: &str, input: &str, sent: u64, options: &StreamBench, run_id: i64) -> Result<()> {
    let (b, i, kinds, interval, emit) = (
        brokers.to_owned(),
        input.to_owned(),
        options.window_kinds.clone(),
        Duration::from_millis(options.commit_interval_ms),
        options.emit.clone(),
    );
    for kind in &kinds {
        bench_job(kind, &emit, "x", "y")?;
    }
    let (pipe_rate, runs) = tokio::task::spawn_blocking(move || -> Result<(f64, Vec<Run>)> {
        eprintln!("bench: plain read + produce of {sent} records");
        let pipe_rate = pipe(&b, &i, sent, run_id + 100)?;
        let mut runs = Vec::new();
        for kind in &kinds {
            for guarantee in [Guarantee::AtLeastOnce, Guarantee::ExactlyOnce] {
                eprintln!("bench: {kind} job table, {guarantee:?}, over {sent} records");
                runs.push(run_job(
                    &b,
                    &i,
                    sent,
                    guarantee,
                    interval,
                    run_id + 200 + runs.len() as i64,
                    Some((kind, &emit)),
                )?);
            }
        }
        Ok((pipe_rate, runs))
    })
    .await??;
    println!();
    println!(
        "  job tables: count per product (regrouped through a repartition topic, emit {}), \
         {sent} input records, 3 partitions, commit interval {} ms; the 2 cores are shared by the broker and exactly",
        options.emit, options.commit_interval_ms
    );
    println!(
        "  {:<34} {:>10.0} records/s",
        "plain read + produce (the pipe)", pipe_rate
    );
    for kind in &options.window_kinds {
        let rate = |g: Guarantee| {
            runs.iter()
                .find(|r| &r.job == kind && r.guarantee == g)
                .map_or(0.0, |r| r.records as f64 / r.seconds.max(1e-9))
        };
        let (alos, eos) = (rate(Guarantee::AtLeastOnce), rate(Guarantee::ExactlyOnce));
        println!(
            "  {:<12} at-least-once {:>8.0}/s  exactly-once {:>8.0}/s  eos/alos {:>5.2}x (goal >= 0.9x)  eos/pipe {:>5.2}x (goal >= 0.5x)",
            kind,
            alos,
            eos,
            eos / alos.max(1e-9),
            eos / pipe_rate.max(1e-9)
        );
    }
    Ok(())
}
