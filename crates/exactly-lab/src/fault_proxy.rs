//! A loopback TCP proxy that injects network faults between `exactly verify`'s processes and
//! the broker or PostgreSQL: added latency, connection resets, a blackhole, and a one-way
//! partition. Bytes are never dropped or reordered inside a connection (TCP does not lose them
//! either: a partition holds them until it heals, or the connection dies); what a fault changes
//! is when they arrive and whether the connection survives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How the proxy treats traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Bytes pass as they come.
    Healthy,
    /// Every chunk arrives this much later, in both directions.
    Latency(Duration),
    /// Nothing passes either way, and new connections are accepted but never reach the target
    /// (a peer that stopped answering: requests time out, nothing is refused).
    Blackhole,
    /// Client-to-target bytes pass; target-to-client bytes are held (the client's requests
    /// arrive and take effect, it never hears the answers).
    AnswersLost,
    /// Target-to-client bytes pass; client-to-target bytes are held.
    RequestsLost,
}

/// Which way a pump moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToTarget,
    ToClient,
}

impl Condition {
    fn holds(self, direction: Direction) -> bool {
        match self {
            Condition::Blackhole => true,
            Condition::AnswersLost => direction == Direction::ToClient,
            Condition::RequestsLost => direction == Direction::ToTarget,
            Condition::Healthy | Condition::Latency(_) => false,
        }
    }

    fn latency(self) -> Duration {
        match self {
            Condition::Latency(latency) => latency,
            _ => Duration::ZERO,
        }
    }
}

/// A running proxy; stops accepting when dropped (open connections end with their peers).
pub struct FaultProxy {
    address: SocketAddr,
    condition: watch::Sender<Condition>,
    /// Bumped to reset every open connection.
    resets: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards each connection to `target`.
    pub async fn start(target: SocketAddr) -> Result<FaultProxy> {
        FaultProxy::listen(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// Listens on `address` (loopback only: the proxy is a test fixture) and forwards to `target`.
    pub async fn listen(address: SocketAddr, target: SocketAddr) -> Result<FaultProxy> {
        anyhow::ensure!(
            address.ip().is_loopback(),
            "the fault proxy listens on loopback only, not {address}"
        );
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("fault proxy: binding {address}"))?;
        let address = listener.local_addr()?;
        let (condition, _) = watch::channel(Condition::Healthy);
        let (resets, _) = watch::channel(0u64);
        let accept = tokio::spawn(accept_loop(listener, target, condition.clone(), resets.clone()));
        Ok(FaultProxy {
            address,
            condition,
            resets,
            accept,
        })
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Sets how traffic is treated from now on; held bytes flow again once it allows.
    pub fn set(&self, condition: Condition) {
        self.condition.send_replace(condition);
    }

    /// Ends every open connection with a reset (RST), as a crashed middlebox or peer would.
    pub fn reset_connections(&self) {
        self.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_connections();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    condition: watch::Sender<Condition>,
    resets: watch::Sender<u64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (condition, resets) = (condition.subscribe(), resets.subscribe());
        tokio::spawn(async move {
            if let Err(error) = connection(client, target, condition, resets).await {
                tracing::debug!("fault proxy connection ended: {error:#}");
            }
        });
    }
}

/// Waits while `condition` holds bytes going `direction`.
async fn wait_until_passing(condition: &mut watch::Receiver<Condition>, direction: Direction) {
    while condition.borrow_and_update().holds(direction) {
        if condition.changed().await.is_err() {
            return;
        }
    }
}

async fn connection(
    client: TcpStream,
    target: SocketAddr,
    mut condition: watch::Receiver<Condition>,
    mut resets: watch::Receiver<u64>,
) -> Result<()> {
    resets.borrow_and_update();
    // Linger 0: when a reset drops the sockets, both peers see RST, not an orderly end.
    socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO))?;
    // A blackholed target is never reached: the client's connect succeeded (the proxy
    // accepted it) and then nothing answers.
    tokio::select! {
        () = wait_until_passing(&mut condition, Direction::ToTarget) => {}
        _ = resets.changed() => return Ok(()),
    }
    let upstream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    socket2::SockRef::from(&upstream).set_linger(Some(Duration::ZERO))?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    // Shared, not split: tokio's write halves send FIN when dropped, and a reset must not.
    let (client, upstream) = (Arc::new(client), Arc::new(upstream));
    let to_target = pump(
        client.clone(),
        upstream.clone(),
        condition.clone(),
        Direction::ToTarget,
    );
    let to_client = pump(upstream, client, condition, Direction::ToClient);
    tokio::select! {
        ended = async { tokio::try_join!(to_target, to_client) } => ended.map(|_| ()),
        // The pumps and with them the sockets are dropped here.
        _ = resets.changed() => Ok(()),
    }
}

/// Moves bytes one way: a reader stamps each chunk with its arrival, a writer sends it once
/// the latency has passed and the condition lets it through. The channel is bounded, so a
/// held direction stops reading and TCP's own flow control pushes back on the sender.
async fn pump(
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    mut condition: watch::Receiver<Condition>,
    direction: Direction,
) -> Result<()> {
    let (chunks, mut arrived) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = read(&from, &mut buffer).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            if chunks.send((Instant::now(), buffer[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = arrived.recv().await {
            let latency = condition.borrow().latency();
            tokio::time::sleep_until(at + latency).await;
            wait_until_passing(&mut condition, direction).await;
            write_all(&to, &chunk).await?;
        }
        // The sender closed its side: pass the end of stream on.
        socket2::SockRef::from(to.as_ref()).shutdown(std::net::Shutdown::Write)?;
        anyhow::Ok(())
    };
    tokio::try_join!(reader, writer)?;
    Ok(())
}

async fn read(stream: &TcpStream, buffer: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buffer) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        address
    }

    async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(bytes).await?;
        let mut back = vec![0u8; bytes.len()];
        stream.read_exact(&mut back).await?;
        Ok(back)
    }

    #[tokio::test]
    async fn latency_holds_partitions_and_resets() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.address()).await.expect("connect");
        assert_eq!(round_trip(&mut stream, b"hello").await.expect("echo"), b"hello");

        proxy.set(Condition::Latency(Duration::from_millis(150)));
        let started = std::time::Instant::now();
        assert_eq!(round_trip(&mut stream, b"slow").await.expect("echo"), b"slow");
        // 150 ms each way.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );

        // Answers held: the request goes through, nothing comes back until it heals; then
        // everything held arrives, in order.
        proxy.set(Condition::AnswersLost);
        stream.write_all(b"one").await.expect("write");
        stream.write_all(b"two").await.expect("write");
        let mut back = vec![0u8; 6];
        let waited = tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut back)).await;
        assert!(waited.is_err(), "an answer passed a one-way partition");
        proxy.set(Condition::Healthy);
        stream
            .read_exact(&mut back)
            .await
            .expect("held bytes after healing");
        assert_eq!(back, b"onetwo");

        // Blackhole: a new connection is accepted and then nothing answers.
        proxy.set(Condition::Blackhole);
        let mut late = TcpStream::connect(proxy.address()).await.expect("connect");
        let silent = tokio::time::timeout(Duration::from_millis(300), round_trip(&mut late, b"x")).await;
        assert!(silent.is_err(), "a blackholed connection answered");
        proxy.set(Condition::Healthy);
        assert_eq!(round_trip(&mut late, b"x").await.expect("after healing"), b"x");

        // Reset: every open connection dies with an error, new ones work.
        proxy.reset_connections();
        let mut buffer = [0u8; 1];
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("the reset arrives");
        assert!(
            matches!(ended, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{ended:?}"
        );
        let mut fresh = TcpStream::connect(proxy.address()).await.expect("connect");
        assert_eq!(round_trip(&mut fresh, b"again").await.expect("echo"), b"again");
    }
}
