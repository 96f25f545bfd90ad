use tokio_postgres::{Client, NoTls};

use crate::error::PgError;

/// Connects and drives the connection on a background task.
pub async fn connect(url: &str) -> Result<Client, PgError> {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|source| PgError::Connect {
                url: redact(url),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("postgres connection ended: {e}");
        }
    });
    Ok(client)
}

/// Replaces `client` by a new connection to `url` when the old one closed (a server restart or
/// a dropped connection), so a store heals on its next call instead of failing forever. The
/// caller holds the store's lock, so nothing else uses the old client meanwhile.
pub(crate) async fn reconnect_if_closed(url: &str, client: &mut Client) -> Result<(), PgError> {
    if client.is_closed() {
        tracing::info!("postgres connection closed; reconnecting");
        *client = connect(url).await?;
    }
    Ok(())
}

/// A connection opened again on first use after it closed (a server restart), so long-lived
/// background work (heartbeat, sweeper, dead events) heals instead of failing forever.
pub struct ReconnectingClient {
    url: String,
    current: tokio::sync::Mutex<std::sync::Arc<Client>>,
}

impl ReconnectingClient {
    /// Connects now, so a wrong URL fails at start.
    pub async fn connect(url: &str) -> Result<Self, PgError> {
        Ok(ReconnectingClient {
            url: url.to_owned(),
            current: tokio::sync::Mutex::new(std::sync::Arc::new(connect(url).await?)),
        })
    }

    /// The open connection, reconnecting when the last one closed.
    pub async fn get(&self) -> Result<std::sync::Arc<Client>, PgError> {
        let mut current = self.current.lock().await;
        if current.is_closed() {
            *current = std::sync::Arc::new(connect(&self.url).await?);
        }
        Ok(current.clone())
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
        _ => url.to_owned(),
    }
}
