//! Connecting the way libpq does, on tokio-postgres: `sslmode` from `disable` to `verify-full`,
//! `sslrootcert`, client certificates (`sslcert`/`sslkey`), and the password from the URL,
//! `PGPASSWORD` or a passfile. tokio-postgres itself knows only `disable`, `prefer` and
//! `require` and reads no environment, so these are taken out of the URL here, and the TLS
//! connector (OpenSSL) is built to match.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::Client;

use crate::error::PgError;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// libpq's `allow`: tried as `prefer` here (TLS when the server offers it).
    Allow,
    /// TLS when the server offers it, unverified; plain otherwise.
    Prefer,
    /// TLS, the certificate unverified (verified like `verify-ca` when `sslrootcert` is given,
    /// as libpq does).
    Require,
    /// TLS, the certificate chain verified against `sslrootcert`.
    VerifyCa,
    /// TLS, the chain verified and the host name matched against the certificate.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// libpq's TLS rules, from the `sslmode` and `sslrootcert` given (URL or `PGSSLMODE` /
/// `PGSSLROOTCERT`) and `~/.postgresql/root.crt` when that file exists:
/// - `sslrootcert=system` (the system's trusted roots, which trust every public CA) means
///   `verify-full`, the default mode then; a weaker mode is refused (libpq 16), since only the
///   host name check ties a publicly issued certificate to this server;
/// - `verify-ca` and `verify-full` need a root certificate: with none given and no
///   `~/.postgresql/root.crt` they are refused, not quietly verified against the system store;
/// - `require` with a root certificate (given or the default file) verifies the chain, as
///   `verify-ca` does.
fn tls_policy(
    mode: Option<&str>,
    root: Option<PathBuf>,
    default_root: Option<PathBuf>,
) -> Result<(SslMode, Option<PathBuf>), PgError> {
    let mode: Option<SslMode> = mode.map(str::parse).transpose()?;
    if root.as_deref() == Some(Path::new("system")) {
        return match mode {
            None | Some(SslMode::VerifyFull) => Ok((SslMode::VerifyFull, root)),
            Some(weak) => Err(PgError::Config(format!(
                "sslmode {} may not be used with sslrootcert=system: the system store trusts every public CA, \
                 so only verify-full (the host name check) ties the certificate to this server; use sslmode=verify-full",
                weak.as_str()
            ))),
        };
    }
    let mode = mode.unwrap_or(SslMode::Prefer);
    let root = root.or(default_root);
    if root.is_none() && matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) {
        return Err(PgError::Config(format!(
            "sslmode {} needs a root certificate to verify the server against: give sslrootcert=/path/to/ca.pem \
             (or PGSSLROOTCERT, or ~/.postgresql/root.crt), or sslrootcert=system for the system's trusted roots",
            mode.as_str()
        )));
    }
    Ok((mode, root))
}

impl FromStr for SslMode {
    type Err = PgError;
    fn from_str(s: &str) -> Result<Self, PgError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(PgError::Config(format!(
                    "sslmode {other:?}: use disable, allow, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }
}

/// A parsed connection target: the driver's settings, the TLS policy, and the URL the WAL
/// stream reads (pg_walstream parses `sslmode`/`sslrootcert` itself), with the password found.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_cert: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
    replication_url: String,
}

/// Parameters tokio-postgres does not read; exactly handles them.
const LIBPQ_ONLY: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey", "passfile"];

impl PgTarget {
    /// Parses a `postgres://` URL.
    pub fn parse(text: &str) -> Result<PgTarget, PgError> {
        let url =
            url::Url::parse(text).map_err(|e| PgError::Config(format!("not a postgres:// URL: {e}")))?;
        let value = |key: &str| {
            url.query_pairs()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.into_owned())
        };
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let default_root = std::env::var_os("HOME")
            .map(|home| Path::new(&home).join(".postgresql/root.crt"))
            .filter(|path| path.is_file());
        let (ssl_mode, root_cert) = tls_policy(
            value("sslmode").or_else(|| env("PGSSLMODE")).as_deref(),
            value("sslrootcert")
                .or_else(|| env("PGSSLROOTCERT"))
                .map(PathBuf::from),
            default_root,
        )?;
        let client_cert = match (value("sslcert"), value("sslkey")) {
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (None, None) => None,
            _ => return Err(PgError::Config("sslcert and sslkey go together".into())),
        };
        let mut driver_url = url.clone();
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| !LIBPQ_ONLY.contains(&k.as_ref()))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        driver_url.set_query(None);
        if !kept.is_empty() {
            driver_url.query_pairs_mut().extend_pairs(kept);
        }
        let mut config = tokio_postgres::Config::from_str(driver_url.as_str())
            .map_err(|e| PgError::Config(format!("{e}")))?;
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        let mut replication_url = url.clone();
        if config.get_password().is_none() {
            if let Some(password) = find_password(&config, value("passfile").map(PathBuf::from))? {
                config.password(password.as_bytes());
                // The WAL stream gets the same password (it reads no passfile).
                let _ = replication_url.set_password(Some(&password));
            }
        }
        // pg_walstream refuses keys it does not know; passfile is resolved above. It gets the
        // mode and root certificate decided here (from the environment or ~/.postgresql too).
        let mut replication_pairs: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| !matches!(k.as_ref(), "passfile" | "sslmode" | "sslrootcert"))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if ssl_mode != SslMode::Prefer {
            replication_pairs.push(("sslmode".into(), ssl_mode.as_str().into()));
        }
        if let Some(root) = &root_cert {
            replication_pairs.push(("sslrootcert".into(), root.display().to_string()));
        }
        replication_url.set_query(None);
        if !replication_pairs.is_empty() {
            replication_url.query_pairs_mut().extend_pairs(replication_pairs);
        }
        Ok(PgTarget {
            config,
            ssl_mode,
            root_cert,
            client_cert,
            replication_url: replication_url.to_string(),
        })
    }

    /// The URL for the replication connection (`replication=database` appended); holds the
    /// password: never print it.
    pub fn replication_url(&self) -> String {
        let separator = if self.replication_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!("{}{separator}replication=database", self.replication_url)
    }

    /// Opens a connection and drives it on a background task; returns the connection's handle
    /// too, for callers that read its notifications.
    pub async fn connect_raw(
        &self,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<
                tokio_postgres::Socket,
                postgres_openssl::TlsStream<tokio_postgres::Socket>,
            >,
        ),
        PgError,
    > {
        let tls = self.tls()?;
        self.config.connect(tls).await.map_err(|source| PgError::Connect {
            target: self.describe(),
            source,
        })
    }

    /// `user@host:port/database (sslmode …)`, for errors and logs: no password.
    pub fn describe(&self) -> String {
        let host = self
            .config
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .unwrap_or_default();
        format!(
            "{}@{host}:{}/{} (sslmode {:?})",
            self.config.get_user().unwrap_or("?"),
            self.config.get_ports().first().copied().unwrap_or(5432),
            self.config.get_dbname().unwrap_or("?"),
            self.ssl_mode
        )
    }

    fn tls(&self) -> Result<MakeTlsConnector, PgError> {
        let tls_error = |e: openssl::error::ErrorStack| PgError::Config(format!("TLS set-up: {e}"));
        let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(tls_error)?;
        match &self.root_cert {
            Some(path) if path.as_os_str() == "system" => {
                builder.set_default_verify_paths().map_err(tls_error)?
            }
            Some(path) => builder
                .set_ca_file(path)
                .map_err(|e| PgError::Config(format!("sslrootcert {}: {e}", path.display())))?,
            // No verification without a root certificate (`tls_policy` refused the modes that
            // need one): nothing to load.
            None => {}
        }
        if let Some((cert, key)) = &self.client_cert {
            builder
                .set_certificate_chain_file(cert)
                .map_err(|e| PgError::Config(format!("sslcert {}: {e}", cert.display())))?;
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(|e| PgError::Config(format!("sslkey {}: {e}", key.display())))?;
        }
        let verify_chain = match self.ssl_mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require => self.root_cert.is_some(),
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => false,
        };
        builder.set_verify(if verify_chain {
            SslVerifyMode::PEER
        } else {
            SslVerifyMode::NONE
        });
        let mut connector = MakeTlsConnector::new(builder.build());
        if self.ssl_mode != SslMode::VerifyFull {
            connector.set_callback(|config, _| {
                config.set_verify_hostname(false);
                Ok(())
            });
        }
        Ok(connector)
    }
}

/// libpq's order after the URL: `PGPASSWORD`, then the passfile (`passfile=`, `PGPASSFILE`, or
/// `~/.pgpass`).
fn find_password(
    config: &tokio_postgres::Config,
    passfile: Option<PathBuf>,
) -> Result<Option<String>, PgError> {
    if let Ok(password) = std::env::var("PGPASSWORD") {
        return Ok(Some(password));
    }
    let file = passfile
        .or_else(|| std::env::var_os("PGPASSFILE").map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".pgpass")));
    let Some(file) = file else { return Ok(None) };
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok(None);
    };
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(name)) => name.clone(),
        _ => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432).to_string();
    let database = config.get_dbname().unwrap_or_default();
    let user = config.get_user().unwrap_or_default();
    Ok(pgpass_lookup(&text, &[&host, &port, database, user]))
}

/// The password of the first passfile line whose first four fields (`*` matches anything)
/// match `wanted` (host, port, database, user). `\:` and `\\` escape inside fields.
fn pgpass_lookup(text: &str, wanted: &[&str; 4]) -> Option<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let fields = split_pgpass_line(line);
            if fields.len() != 5 {
                return None;
            }
            let matches = fields[..4]
                .iter()
                .zip(wanted)
                .all(|(field, want)| field == "*" || field == want);
            matches.then(|| fields[4].clone())
        })
}

/// Four `:`-separated fields, then the rest of the line as the fifth (the password, where libpq
/// takes even an unescaped `:` literally); `\` escapes the next character everywhere.
fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        let last = fields.len() - 1;
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields[last].push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields[last].push(c),
        }
    }
    fields
}

/// Connects and drives the connection on a background task.
pub async fn connect(url: &str) -> Result<Client, PgError> {
    let (client, connection) = PgTarget::parse(url)?.connect_raw().await?;
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

/// A URL as it may be shown: no password in the user part, and no value of `password`,
/// `sslpassword` or any other secret-looking parameter.
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("****"));
            }
            let is_secret = |k: &str| k.contains("password") || k.contains("secret") || k.contains("token");
            // Rewritten only when something is hidden, so the URL otherwise reads as given.
            if url.query_pairs().any(|(k, _)| is_secret(&k)) {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| {
                        let shown = if is_secret(&k) {
                            "****".to_owned()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), shown)
                    })
                    .collect();
                url.set_query(None);
                url.query_pairs_mut().extend_pairs(pairs);
            }
            url.to_string()
        }
        // Not a URL: show only what precedes a possible user part.
        Err(_) => text.split('@').next_back().unwrap_or_default().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_only_parameters_are_taken_out_and_understood() {
        let target = PgTarget::parse(
            "postgres://app@db.example:5433/shop?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        )
        .expect("parses");
        assert_eq!(target.ssl_mode, SslMode::VerifyFull);
        assert_eq!(target.root_cert.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(target.config.get_application_name(), Some("x"));
        assert_eq!(target.describe(), "app@db.example:5433/shop (sslmode VerifyFull)");
        assert!(PgTarget::parse("postgres://a@h/d?sslmode=sometimes").is_err());
        assert!(PgTarget::parse("postgres://a@h/d?sslcert=/c.pem").is_err());
    }

    #[test]
    fn tls_modes_follow_libpq() {
        let policy = |mode: Option<&str>, root: Option<&str>, default: Option<&str>| {
            tls_policy(mode, root.map(PathBuf::from), default.map(PathBuf::from))
                .map(|(mode, root)| (mode, root.map(|r| r.display().to_string())))
                .map_err(|e| e.to_string())
        };
        // verify-ca and verify-full with no root certificate are refused, with the way out.
        for mode in ["verify-ca", "verify-full"] {
            let refused = policy(Some(mode), None, None).expect_err(mode);
            assert!(
                refused.contains("needs a root certificate") && refused.contains("sslrootcert"),
                "{refused}"
            );
        }
        // ~/.postgresql/root.crt counts as given, as in libpq.
        assert_eq!(
            policy(Some("verify-ca"), None, Some("/home/u/.postgresql/root.crt")),
            Ok((SslMode::VerifyCa, Some("/home/u/.postgresql/root.crt".into())))
        );
        // sslrootcert=system: verify-full by default, and nothing weaker.
        assert_eq!(
            policy(None, Some("system"), None),
            Ok((SslMode::VerifyFull, Some("system".into())))
        );
        assert_eq!(
            policy(Some("verify-full"), Some("system"), None),
            Ok((SslMode::VerifyFull, Some("system".into())))
        );
        for weak in ["disable", "allow", "prefer", "require", "verify-ca"] {
            let refused = policy(Some(weak), Some("system"), None).expect_err(weak);
            assert!(
                refused.contains("sslrootcert=system") && refused.contains("verify-full"),
                "{refused}"
            );
        }
        // What stays as it was: require and prefer with no root certificate, require with one.
        assert_eq!(policy(Some("require"), None, None), Ok((SslMode::Require, None)));
        assert_eq!(policy(None, None, None), Ok((SslMode::Prefer, None)));
        assert_eq!(
            policy(Some("require"), Some("/ca.pem"), None),
            Ok((SslMode::Require, Some("/ca.pem".into())))
        );
        // The replication stream gets the decided mode.
        let target = PgTarget::parse("postgres://a@h/d?sslrootcert=system").expect("parses");
        assert_eq!(target.ssl_mode, SslMode::VerifyFull);
        assert!(
            target.replication_url().contains("sslmode=verify-full"),
            "{}",
            target.replication_url()
        );
    }

    #[test]
    fn passfile_lines_match_by_field_with_wildcards_and_escapes() {
        let text = "# comment\nother:5432:*:app:nope\ndb\\:x:5433:shop:app:s3:cr\\:et\n*:*:*:app:fallback\n";
        assert_eq!(
            pgpass_lookup(text, &["db:x", "5433", "shop", "app"]).as_deref(),
            Some("s3:cr:et")
        );
        assert_eq!(
            pgpass_lookup(text, &["elsewhere", "1", "d", "app"]).as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup(text, &["elsewhere", "1", "d", "bob"]), None);
    }

    #[test]
    fn urls_are_shown_without_secrets() {
        let shown =
            redact_url("postgres://app:hunter2@h:5432/d?sslmode=require&password=hunter2&sslpassword=k3y");
        assert!(!shown.contains("hunter2") && !shown.contains("k3y"), "{shown}");
        assert!(
            shown.contains("sslmode=require") && shown.contains("app:****@"),
            "{shown}"
        );
    }
}
