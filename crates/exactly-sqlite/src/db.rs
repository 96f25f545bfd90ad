use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use crate::error::SqliteError;
use crate::migrations::migrate;

/// One connection shared by a store's calls, each run on tokio's blocking pool.
#[derive(Clone)]
pub(crate) struct Shared(Arc<Mutex<Connection>>);

/// Opens a database file with the settings exactly relies on (WAL journal, a busy timeout so
/// several processes can share it) and migrates it.
pub fn open(path: &Path) -> Result<Connection, SqliteError> {
    let mut conn = Connection::open(path).map_err(SqliteError::at("open database"))?;
    // WAL lets readers run beside the single writer; NORMAL sync survives a process kill
    // (a power cut can lose the last commits, which then redeliver and dedupe).
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
        .map_err(SqliteError::at("set pragmas"))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(SqliteError::at("set busy timeout"))?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Opens an existing database read-only, creating and migrating nothing (status, inspection).
/// A missing file or one without exactly's tables is an error that says so.
pub fn open_existing(path: &Path) -> Result<Connection, SqliteError> {
    open_present(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
}

/// Opens an existing database to change rows in it (the operator commands), creating and
/// migrating nothing: the same checks as [`open_existing`].
pub fn open_existing_writable(path: &Path) -> Result<Connection, SqliteError> {
    open_present(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
}

fn open_present(path: &Path, flags: rusqlite::OpenFlags) -> Result<Connection, SqliteError> {
    if !path.is_file() {
        return Err(SqliteError::Runtime(format!(
            "{} does not exist (this command creates nothing; check the path)",
            path.display()
        )));
    }
    let conn = Connection::open_with_flags(path, flags).map_err(SqliteError::at("open database"))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(SqliteError::at("set busy timeout"))?;
    let tables: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('outbox', 'exactly_parked')",
            [],
            |r| r.get(0),
        )
        .map_err(SqliteError::at("look for exactly's tables"))?;
    if tables < 2 {
        return Err(SqliteError::Runtime(format!(
            "{} has no exactly tables (a relay or consumer creates them on its first start)",
            path.display()
        )));
    }
    Ok(conn)
}

impl Shared {
    pub(crate) fn new(conn: Connection) -> Self {
        Shared(Arc::new(Mutex::new(conn)))
    }

    /// Runs `f` with the connection off the async workers: SQLite calls block, and a busy
    /// writer lock can block for seconds.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, SqliteError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, SqliteError> + Send + 'static,
    {
        let conn = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| SqliteError::Runtime("connection lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| SqliteError::Runtime(format!("blocking task failed: {e}")))?
    }
}
