//! `exactly dead` and `exactly parked`: see, send again or drop what a relay or a consumer set
//! aside. The SQL is in the adapters; this module parses, confirms and prints.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Result};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use exactly_core::operate::{DeadEvent, ParkedRow, ReplayOutcome, Selection};
use exactly_core::UnixMillis;

use exactly_daemon::database::resolve_database;
use exactly_daemon::handlers::{ConsumerStore, HandlerChoice, Opening};
use exactly_daemon::Database;

/// The database every operator command reads.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The database (postgres://… or a SQLite file); never created or migrated here.
    #[arg(long, env = "EXACTLY_DATABASE")]
    pub database: String,
    /// The environment variable that holds the PostgreSQL password.
    #[arg(long, value_name = "VARIABLE")]
    pub password_env: Option<String>,
}

/// Which rows: every filter given must match.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filters {
    /// This row only, as `list` prints its id (repeatable).
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Rows of this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Words the reason contains.
    #[arg(long)]
    pub reason: Option<String>,
    /// Rows set aside longer ago than this (`90s`, `15m`, `2h`, `7d`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,
}

impl Filters {
    fn selection(&self, aggregate: Option<String>, key: Option<String>) -> Selection {
        Selection {
            ids: self.ids.clone(),
            topic: self.topic.clone(),
            aggregate,
            key,
            reason: self.reason.clone(),
            before: self
                .older_than
                .map(|age| UnixMillis(exactly_kafka::now().0 - age.as_millis() as i64)),
        }
    }
}

/// Output and confirmation.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct Output {
    /// JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Do it without asking (a change to more than one row asks first).
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, clap::Args)]
pub struct DeadArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    action: DeadAction,
}

#[derive(Debug, clap::Subcommand)]
enum DeadAction {
    /// Dead events, oldest first: outbox rows the polling relay marked DEAD, and events the WAL
    /// relay could not publish.
    List {
        #[command(flatten)]
        filters: Filters,
        /// Rows of this aggregate id.
        #[arg(long)]
        aggregate: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// One dead event in full.
    Show {
        id: String,
        #[command(flatten)]
        output: Output,
    },
    /// Send the selected events again. Fix the cause first (the row's content, the topic, the
    /// broker's limits); a requeued event gets a new position, after everything sent so far.
    Requeue {
        #[command(flatten)]
        filters: Filters,
        #[arg(long)]
        aggregate: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Delete the selected events for good.
    Discard {
        #[command(flatten)]
        filters: Filters,
        #[arg(long)]
        aggregate: Option<String>,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, clap::Args)]
pub struct ParkedArgs {
    #[command(flatten)]
    target: Target,
    /// The consumer group whose parked messages these are.
    #[arg(long)]
    consumer: String,
    #[command(subcommand)]
    action: ParkedAction,
}

#[derive(Debug, clap::Subcommand)]
enum ParkedAction {
    /// Parked messages, oldest first.
    List {
        #[command(flatten)]
        filters: Filters,
        /// Messages with this idempotency key.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// One parked message in full.
    Show {
        id: i64,
        #[command(flatten)]
        output: Output,
    },
    /// Apply the selected messages through the consumer's handler (after fixing it), each in
    /// one transaction with its dedupe record; one applied already is only unparked.
    Replay {
        #[command(flatten)]
        filters: Filters,
        #[arg(long)]
        key: Option<String>,
        /// The handler, as `exactly consume --handler`.
        #[arg(long, default_value = "record")]
        handler: String,
        /// record: the event types it accepts, as `exactly consume --event-types`.
        #[arg(long, value_delimiter = ',')]
        event_types: Vec<String>,
        /// sql: the statements, as `exactly consume --sql-file`.
        #[arg(long, value_name = "FILE")]
        sql_file: Option<std::path::PathBuf>,
        #[command(flatten)]
        output: Output,
    },
    /// Delete the selected messages for good.
    Discard {
        #[command(flatten)]
        filters: Filters,
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        output: Output,
    },
}

fn database(target: &Target) -> Result<Database> {
    resolve_database(&target.database, target.password_env.as_deref())
}

pub async fn dead(args: DeadArgs) -> Result<()> {
    let database = database(&args.target)?;
    match args.action {
        DeadAction::List {
            filters,
            aggregate,
            output,
        } => {
            let events = dead_events(&database, &filters.selection(aggregate, None)).await?;
            print_dead(&events, output.json);
        }
        DeadAction::Show { id, output } => {
            let selection = Selection {
                ids: vec![id.clone()],
                ..Selection::default()
            };
            let events = dead_events(&database, &selection).await?;
            let Some(event) = events.first() else {
                bail!("no dead event has id {id:?} (see `exactly dead list`)");
            };
            show_dead(event, output.json);
        }
        DeadAction::Requeue {
            filters,
            aggregate,
            output,
        } => {
            let selection = filters.selection(aggregate, None);
            let events = dead_events(&database, &selection).await?;
            if !confirm("requeue", events.len(), output)? {
                return Ok(());
            }
            let (requeued, left) = match &database {
                Database::Sqlite(path) => {
                    let conn = exactly_sqlite::open_existing_writable(path)?;
                    (
                        exactly_sqlite::operate::requeue_dead(&conn, &selection)?,
                        Vec::new(),
                    )
                }
                Database::Postgres(url) => {
                    let mut client = exactly_postgres::connect(url).await?;
                    let done = exactly_postgres::operate::requeue_dead(&mut client, &selection).await?;
                    (done.requeued, done.left)
                }
            };
            for (id, why) in &left {
                eprintln!("exactly: left {id}: {why}");
            }
            report(output.json, "requeued", requeued, left.len());
        }
        DeadAction::Discard {
            filters,
            aggregate,
            output,
        } => {
            let selection = filters.selection(aggregate, None);
            let events = dead_events(&database, &selection).await?;
            if !confirm("discard", events.len(), output)? {
                return Ok(());
            }
            let discarded = match &database {
                Database::Sqlite(path) => exactly_sqlite::operate::discard_dead(
                    &exactly_sqlite::open_existing_writable(path)?,
                    &selection,
                )?,
                Database::Postgres(url) => {
                    let mut client = exactly_postgres::connect(url).await?;
                    exactly_postgres::operate::discard_dead(&mut client, &selection).await?
                }
            };
            report(output.json, "discarded", discarded, 0);
        }
    }
    Ok(())
}

async fn dead_events(database: &Database, selection: &Selection) -> Result<Vec<DeadEvent>> {
    Ok(match database {
        Database::Sqlite(path) => {
            exactly_sqlite::operate::dead_events(&exactly_sqlite::open_existing(path)?, selection)?
        }
        Database::Postgres(url) => {
            let client = exactly_postgres::connect(url).await?;
            exactly_postgres::operate::dead_events(&client, selection).await?
        }
    })
}

async fn parked_rows(database: &Database, consumer: &str, selection: &Selection) -> Result<Vec<ParkedRow>> {
    Ok(match database {
        Database::Sqlite(path) => {
            exactly_sqlite::operate::parked(&exactly_sqlite::open_existing(path)?, consumer, selection)?
        }
        Database::Postgres(url) => {
            let client = exactly_postgres::connect(url).await?;
            exactly_postgres::operate::parked(&client, consumer, selection).await?
        }
    })
}

pub async fn parked(args: ParkedArgs) -> Result<()> {
    let database = database(&args.target)?;
    let consumer = args.consumer.as_str();
    match args.action {
        ParkedAction::List { filters, key, output } => {
            let rows = parked_rows(&database, consumer, &filters.selection(None, key)).await?;
            print_parked(&rows, output.json);
        }
        ParkedAction::Show { id, output } => {
            let selection = Selection {
                ids: vec![id.to_string()],
                ..Selection::default()
            };
            let rows = parked_rows(&database, consumer, &selection).await?;
            let Some(row) = rows.first() else {
                bail!("consumer {consumer:?} has no parked message {id} (see `exactly parked list`)");
            };
            show_parked(row, output.json);
        }
        ParkedAction::Replay {
            filters,
            key,
            handler,
            event_types,
            sql_file,
            output,
        } => {
            let rows = parked_rows(&database, consumer, &filters.selection(None, key)).await?;
            if !confirm("replay", rows.len(), output)? {
                return Ok(());
            }
            let choice = HandlerChoice::new(&handler, &event_types, sql_file.as_deref())?;
            let effects = ConsumerStore::open(&database, consumer, &choice, Opening::Operator).await?;
            let mut outcomes = Vec::with_capacity(rows.len());
            for row in &rows {
                let outcome = effects.replay(row.id).await?;
                outcomes.push((row.id, outcome));
            }
            print_replays(&outcomes, output.json);
        }
        ParkedAction::Discard { filters, key, output } => {
            let selection = filters.selection(None, key);
            let rows = parked_rows(&database, consumer, &selection).await?;
            if !confirm("discard", rows.len(), output)? {
                return Ok(());
            }
            let discarded = match &database {
                Database::Sqlite(path) => exactly_sqlite::operate::discard_parked(
                    &exactly_sqlite::open_existing_writable(path)?,
                    consumer,
                    &selection,
                )?,
                Database::Postgres(url) => {
                    let client = exactly_postgres::connect(url).await?;
                    exactly_postgres::operate::discard_parked(&client, consumer, &selection).await?
                }
            };
            report(output.json, "discarded", discarded, 0);
        }
    }
    Ok(())
}

/// Says how many rows an action will touch; more than one needs `--yes` or a "y" typed at a
/// terminal. False: nothing to do or not confirmed.
fn confirm(action: &str, rows: usize, output: Output) -> Result<bool> {
    if rows == 0 {
        eprintln!("exactly: no row matches; nothing to {action}");
        return Ok(false);
    }
    eprintln!("exactly: {action} will touch {rows} row(s)");
    if rows == 1 || output.yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!("{action} of {rows} rows needs --yes when not run at a terminal");
    }
    eprint!("{action} {rows} rows? [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    let yes = matches!(answer.trim(), "y" | "Y" | "yes");
    if !yes {
        eprintln!("exactly: nothing done");
    }
    Ok(yes)
}

fn report(json: bool, what: &str, count: u64, left: usize) {
    if json {
        println!("{}", serde_json::json!({ what: count, "left": left }));
    } else {
        println!(
            "{what} {count} row(s){}",
            if left > 0 {
                format!(", left {left}")
            } else {
                String::new()
            }
        );
    }
}

fn age(at: UnixMillis) -> String {
    let seconds = (exactly_kafka::now().0 - at.0).max(0) / 1000;
    humantime::format_duration(Duration::from_secs(seconds as u64)).to_string()
}

fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let mut clipped: String = text.chars().take(width.saturating_sub(1)).collect();
        clipped.push('…');
        clipped
    }
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    table
}

fn dead_json(e: &DeadEvent) -> serde_json::Value {
    serde_json::json!({
        "id": e.id, "kind": e.kind.as_str(), "outbox_id": e.outbox_id, "topic": e.topic,
        "aggregate": e.aggregate, "reason": e.reason, "at_ms": e.at.0, "body": e.body,
    })
}

fn print_dead(events: &[DeadEvent], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::Value::Array(events.iter().map(dead_json).collect())
        );
        return;
    }
    let mut t = table(&["id", "kind", "topic", "aggregate", "age", "reason"]);
    for e in events {
        t.add_row(vec![
            clip(&e.id, 48),
            e.kind.as_str().to_owned(),
            e.topic.clone().unwrap_or_default(),
            e.aggregate.clone().unwrap_or_default(),
            age(e.at),
            clip(&e.reason, 60),
        ]);
    }
    println!("{t}\n{} dead event(s)", events.len());
}

fn show_dead(e: &DeadEvent, json: bool) {
    if json {
        println!("{}", dead_json(e));
        return;
    }
    println!(
        "id:        {}\nkind:      {}\noutbox id: {}\ntopic:     {}\naggregate: {}\nage:       {}\nreason:    {}\nbody:\n{}",
        e.id,
        e.kind.as_str(),
        e.outbox_id,
        e.topic.as_deref().unwrap_or("(none)"),
        e.aggregate.as_deref().unwrap_or("(none)"),
        age(e.at),
        e.reason,
        e.body
    );
}

fn parked_json(p: &ParkedRow) -> serde_json::Value {
    let headers = exactly_core::record::raw_headers_from_json(&p.headers_json)
        .map(|hs| {
            hs.into_iter()
                .map(|(n, v)| (n, v.map(|b| String::from_utf8_lossy(&b).into_owned())))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    serde_json::json!({
        "id": p.id, "consumer": p.consumer, "topic": p.topic, "partition": p.partition,
        "offset": p.offset, "reason": p.reason, "detail": p.detail, "key": p.key_text,
        "parked_at_ms": p.parked_at.0, "headers": headers,
        "payload": p.payload.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
    })
}

fn print_parked(rows: &[ParkedRow], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::Value::Array(rows.iter().map(parked_json).collect())
        );
        return;
    }
    let mut t = table(&["id", "topic", "partition", "offset", "age", "reason", "detail"]);
    for p in rows {
        t.add_row(vec![
            p.id.to_string(),
            p.topic.clone(),
            p.partition.to_string(),
            p.offset.to_string(),
            age(p.parked_at),
            p.reason.clone(),
            clip(&p.detail, 60),
        ]);
    }
    println!("{t}\n{} parked message(s)", rows.len());
}

fn show_parked(p: &ParkedRow, json: bool) {
    let value = parked_json(p);
    if json {
        println!("{value}");
        return;
    }
    println!(
        "id:        {}\nconsumer:  {}\nwhere:     {} [{}] @ {}\nage:       {}\nreason:    {}\ndetail:    {}\nkey:       {}\nheaders:   {}\npayload:\n{}",
        p.id,
        p.consumer,
        p.topic,
        p.partition,
        p.offset,
        age(p.parked_at),
        p.reason,
        p.detail,
        p.key_text.as_deref().unwrap_or("(unreadable)"),
        value["headers"],
        value["payload"].as_str().unwrap_or("(none)")
    );
}

fn replay_words(outcome: &ReplayOutcome) -> (&'static str, String) {
    match outcome {
        ReplayOutcome::Applied => ("applied", String::new()),
        ReplayOutcome::AlreadyApplied => ("already applied", "unparked".into()),
        ReplayOutcome::HandlerFailed(why) => ("failed", format!("still parked: {why}")),
        ReplayOutcome::Unreplayable(why) => ("not replayable", why.clone()),
        ReplayOutcome::NotFound => ("gone", "replayed or discarded meanwhile".into()),
    }
}

fn print_replays(outcomes: &[(i64, ReplayOutcome)], json: bool) {
    if json {
        let list: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|(id, o)| {
                let (outcome, detail) = replay_words(o);
                serde_json::json!({ "id": id, "outcome": outcome, "detail": detail })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return;
    }
    let mut t = table(&["id", "outcome", "detail"]);
    for (id, o) in outcomes {
        let (outcome, detail) = replay_words(o);
        t.add_row(vec![id.to_string(), outcome.to_owned(), clip(&detail, 80)]);
    }
    let applied = outcomes
        .iter()
        .filter(|(_, o)| *o == ReplayOutcome::Applied)
        .count();
    println!("{t}\napplied {applied} of {}", outcomes.len());
}
