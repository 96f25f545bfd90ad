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

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
        _ => url.to_owned(),
    }
}
