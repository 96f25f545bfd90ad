use exactly_core::StoreError;

/// A PostgreSQL call failed; `context` says which.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The driver failed.
    #[error("postgres: {context}: {source}")]
    Sql {
        /// What was being done.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Could not connect.
    #[error("postgres: cannot connect to {target}: {source} (is PostgreSQL running and reachable? are sslmode, sslrootcert and the password right?)")]
    Connect {
        /// Who, where and how (no password).
        target: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The replication protocol failed.
    #[error("postgres replication: {context}: {source}")]
    Replication {
        /// What was being done.
        context: &'static str,
        /// The library's error.
        #[source]
        source: pg_walstream::ReplicationError,
    },
    /// The connection settings are not usable (a bad URL, sslmode or certificate file).
    #[error("postgres: {0}")]
    Config(String),
    /// An operator's selection cannot be run (an id that is not a number, for one).
    #[error("{0}")]
    Selection(String),
    /// Stored data is not what this version wrote.
    #[error("postgres: {0}")]
    Corrupt(String),
    /// The replication slot can no longer stream: PostgreSQL invalidated it (`wal_status =
    /// 'lost'`, WAL past `max_slot_wal_keep_size` was removed) or it was dropped. Events
    /// committed meanwhile were never streamed; recreating the slot silently would skip them.
    #[error(
        "postgres: replication slot {slot:?} {state}: the WAL it needed is gone, and events committed since its \
         confirmed position cannot be streamed. Recover: drain the outbox with `exactly relay --mode poll` \
         (rows still NEW), then SELECT pg_drop_replication_slot('{slot}') if it still exists and start the WAL \
         relay again (it creates a new slot). Raise max_slot_wal_keep_size or alert on retained WAL to avoid this."
    )]
    SlotUnusable {
        /// The slot.
        slot: String,
        /// `is lost (wal_status = 'lost')` or `does not exist`.
        state: &'static str,
    },
    /// Another transaction changed what this one judged by (a watermark row written by a
    /// concurrent applier): the transaction is rolled back and judged again.
    #[error("postgres: {0}")]
    Concurrent(&'static str),
    /// The session that held the sequence-key leader lock ended (a server restart): another
    /// relay may lead now, so this one must not publish another sequence.
    #[error("postgres: the sequence-key leader lock was lost with its connection; restart the relay to contend again")]
    LeaderLost,
}

impl PgError {
    /// A conflict with a concurrent transaction (a watermark written first, a deadlock, a
    /// serialization failure): the transaction rolled back and running it again decides.
    pub fn is_conflict(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            PgError::Concurrent(_) => true,
            PgError::Sql { source, .. } => matches!(
                source.code(),
                Some(code) if *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE
            ),
            _ => false,
        }
    }

    /// For `map_err`: wraps a driver error with what was being done.
    pub fn at(context: &'static str) -> impl Fn(tokio_postgres::Error) -> PgError {
        move |source| PgError::Sql { context, source }
    }
}

/// For `map_err`: wraps a replication error with what was being done.
pub(crate) fn replication(context: &'static str) -> impl Fn(pg_walstream::ReplicationError) -> PgError {
    move |source| PgError::Replication { context, source }
}

/// The error as it is: it names the store and what was being done (`postgres: …`) once.
impl From<PgError> for StoreError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Corrupt(_) | PgError::LeaderLost | PgError::SlotUnusable { .. } => {
                StoreError::stop("", e)
            }
            _ => StoreError::new("", e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_names_postgres_once() {
        let error = StoreError::from(PgError::Corrupt("watermark \"zz\" is not hex".into()));
        assert_eq!(error.to_string(), "postgres: watermark \"zz\" is not hex");
        let error = StoreError::from(PgError::Concurrent("another transaction wrote it first"));
        assert_eq!(error.to_string(), "postgres: another transaction wrote it first");
        assert!(error.is_retryable());
    }
}
