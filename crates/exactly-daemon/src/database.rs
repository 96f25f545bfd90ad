//! Where a component keeps its state: a PostgreSQL URL or a SQLite file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// A database argument: a `postgres://` URL or a SQLite file path.
#[derive(Debug, Clone)]
pub enum Database {
    /// A `postgres://` or `postgresql://` URL (libpq's parameters: see `exactly_postgres::PgTarget`).
    Postgres(String),
    /// A SQLite file (created if missing where a component may create it).
    Sqlite(PathBuf),
}

/// Shown without a password: a URL's secrets hidden (`exactly_postgres::redact_url`).
impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Postgres(url) => f.write_str(&exactly_postgres::redact_url(url)),
            Database::Sqlite(path) => write!(f, "{}", path.display()),
        }
    }
}

impl Database {
    /// A URL for PostgreSQL, anything else (`sqlite://` stripped) a SQLite file.
    pub fn parse(text: &str) -> Database {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Database::Postgres(text.to_owned())
        } else {
            Database::Sqlite(PathBuf::from(text.strip_prefix("sqlite://").unwrap_or(text)))
        }
    }
}

/// A database URL or file, with the password read from `password_env` (PostgreSQL) put into
/// the URL held in memory, never printed: errors and logs describe a target without it.
pub fn resolve_database(text: &str, password_env: Option<&str>) -> Result<Database> {
    if text.trim().is_empty() {
        bail!("database is empty: give a postgres:// URL or a SQLite file");
    }
    let database = Database::parse(text);
    let Some(variable) = password_env else {
        return Ok(database);
    };
    match database {
        Database::Sqlite(_) => bail!("password_env applies to PostgreSQL only"),
        Database::Postgres(url) => {
            let password = std::env::var(variable).map_err(|_| {
                anyhow::anyhow!("password_env names the environment variable {variable}, which is not set")
            })?;
            let mut parsed = url::Url::parse(&url).context("database is not a postgres:// URL")?;
            parsed
                .set_password(Some(&password))
                .map_err(|()| anyhow::anyhow!("database URL cannot hold a password"))?;
            Ok(Database::Postgres(parsed.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_is_shown_without_its_password() {
        let shown = Database::parse("postgres://app:hunter2@db:5432/shop?sslmode=require").to_string();
        assert!(
            !shown.contains("hunter2") && shown.contains("app:****@db"),
            "{shown}"
        );
        assert_eq!(Database::parse("sqlite://ledger.db").to_string(), "ledger.db");
    }

    #[test]
    fn password_env_reaches_the_url_only_in_memory() {
        std::env::set_var("EXACTLY_SETTINGS_TEST_PW", "s3cr:t@");
        let Database::Postgres(url) =
            resolve_database("postgres://app@h:5432/d", Some("EXACTLY_SETTINGS_TEST_PW")).expect("resolves")
        else {
            panic!("not postgres")
        };
        let parsed = url::Url::parse(&url).expect("url");
        assert_eq!(parsed.password(), Some("s3cr%3At%40"));
        let err = resolve_database("postgres://app@h/d", Some("EXACTLY_SETTINGS_TEST_UNSET"))
            .expect_err("unset variable");
        assert!(err.to_string().contains("EXACTLY_SETTINGS_TEST_UNSET"));
        assert!(resolve_database("x.db", Some("EXACTLY_SETTINGS_TEST_PW")).is_err());
    }
}
