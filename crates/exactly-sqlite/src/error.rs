use exactly_core::StoreError;

/// A SQLite call failed; `context` says which.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteError {
    /// The driver failed.
    #[error("sqlite: {context}: {source}")]
    Sql {
        /// What was being done.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A blocking task died or a lock was poisoned by a panic in another task.
    #[error("sqlite: {0}")]
    Runtime(String),
}

impl SqliteError {
    /// For `map_err`: wraps a driver error with what was being done.
    pub fn at(context: &'static str) -> impl Fn(rusqlite::Error) -> SqliteError {
        move |source| SqliteError::Sql { context, source }
    }
}

/// The error as it is: it names the store and what was being done (`sqlite: …`) once.
impl From<SqliteError> for StoreError {
    fn from(e: SqliteError) -> Self {
        StoreError::new("", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_names_sqlite_once() {
        let error = StoreError::from(SqliteError::Runtime("a blocking task died".into()));
        assert_eq!(error.to_string(), "sqlite: a blocking task died");
    }
}
