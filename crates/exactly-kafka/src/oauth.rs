//! SASL/OAUTHBEARER tokens from a file or a command, refreshed by librdkafka before they
//! expire. librdkafka hands the client its `sasl.oauthbearer.config` property (whose format is
//! the application's to define) every time it wants a token, so the token source is named
//! there and every client context exactly makes can serve it without state of its own:
//!
//! ```text
//! sasl.mechanism = OAUTHBEARER
//! sasl.oauthbearer.config = token_file=/var/run/secrets/kafka/token principal=exactly
//! ```
//!
//! - `token_file=PATH`: the file is read again at every refresh (Kubernetes projected service
//!   account tokens, a sidecar that rotates the file);
//! - `token_command=PATH`: the program is run (no shell, no arguments) and its standard output
//!   is the token (a signer for AWS MSK IAM, a cloud CLI). It runs with an empty environment
//!   but `PATH` and the variables named in `token_command_env=NAME,NAME` (so `PGPASSWORD`,
//!   `EXACTLY_*` secrets and the like never reach it), is killed after
//!   `token_command_timeout_ms` (default 10 000), and is run so that the async runtime's other
//!   tasks (the stop signal among them) go on while it works;
//! - `principal=NAME`: the principal (default: the token's `sub` claim);
//! - `lifetime_ms=N`: how long the token lives (default: its `exp` claim, else one hour);
//!   librdkafka asks for a new token at 80% of it.
//!
//! With `sasl.oauthbearer.method=oidc` instead, librdkafka fetches and refreshes tokens itself
//! (client credentials); nothing here is used then.

use std::error::Error;
use std::time::Duration;

use base64::Engine;
use rdkafka::client::OAuthToken;

/// Lifetime of a token that says nothing of its own.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// How long a token command may run.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a token command's output that is read (a token is a few KiB).
const MAX_COMMAND_OUTPUT: u64 = 1 << 20;

/// Why no token could be made (the message reaches librdkafka's authentication error; it
/// never contains the token).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// `sasl.oauthbearer.config` names no token source.
    #[error("sasl.oauthbearer.config names no token source: set token_file=PATH or token_command=PATH (or use sasl.oauthbearer.method=oidc)")]
    NoSource,
    /// An entry of `sasl.oauthbearer.config` is not `key=value` or not known.
    #[error("sasl.oauthbearer.config: {0}")]
    Config(String),
    /// The file or command gave nothing usable.
    #[error("OAUTHBEARER token from {source_name}: {reason}")]
    Source {
        /// The file or command.
        source_name: String,
        /// Why.
        reason: String,
    },
}

/// A token source parsed from `sasl.oauthbearer.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenSettings {
    file: Option<String>,
    command: Option<String>,
    principal: Option<String>,
    lifetime: Option<Duration>,
    command_env: Vec<String>,
    command_timeout: Duration,
}

fn parse(config: &str) -> Result<TokenSettings, TokenError> {
    let mut settings = TokenSettings {
        file: None,
        command: None,
        principal: None,
        lifetime: None,
        command_env: Vec::new(),
        command_timeout: DEFAULT_COMMAND_TIMEOUT,
    };
    for entry in config.split_whitespace() {
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| TokenError::Config(format!("{entry:?} is not key=value")))?;
        match key {
            "token_file" => settings.file = Some(value.to_owned()),
            "token_command" => settings.command = Some(value.to_owned()),
            "principal" => settings.principal = Some(value.to_owned()),
            "lifetime_ms" => {
                let ms: u64 = value
                    .parse()
                    .map_err(|_| TokenError::Config(format!("lifetime_ms {value:?} is not a number")))?;
                settings.lifetime = Some(Duration::from_millis(ms));
            }
            "token_command_env" => {
                settings.command_env = value
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "token_command_timeout_ms" => {
                let ms: u64 = value.parse().map_err(|_| {
                    TokenError::Config(format!("token_command_timeout_ms {value:?} is not a number"))
                })?;
                settings.command_timeout = Duration::from_millis(ms);
            }
            other => return Err(TokenError::Config(format!("unknown key {other:?}"))),
        }
    }
    if settings.file.is_none() && settings.command.is_none() {
        return Err(TokenError::NoSource);
    }
    Ok(settings)
}

/// A fresh token for `sasl.oauthbearer.config`, as librdkafka asks for one.
pub fn generate(config: Option<&str>, now_ms: i64) -> Result<OAuthToken, TokenError> {
    let settings = parse(config.unwrap_or_default())?;
    let (name, raw) = match (&settings.file, &settings.command) {
        (Some(path), _) => (
            path.clone(),
            std::fs::read_to_string(path).map_err(|e| TokenError::Source {
                source_name: path.clone(),
                reason: e.to_string(),
            })?,
        ),
        (None, Some(program)) => (
            program.clone(),
            run_token_command(program, &settings.command_env, settings.command_timeout).map_err(
                |reason| TokenError::Source {
                    source_name: program.clone(),
                    reason,
                },
            )?,
        ),
        (None, None) => return Err(TokenError::NoSource),
    };
    let token = raw.trim().to_owned();
    if token.is_empty() || token.contains(char::is_whitespace) || token.contains('\0') {
        return Err(TokenError::Source {
            source_name: name,
            reason: "no token (empty, or more than one word)".into(),
        });
    }
    let claims = jwt_claims(&token);
    let principal = settings
        .principal
        .or_else(|| {
            claims
                .as_ref()
                .and_then(|c| c.get("sub")?.as_str().map(str::to_owned))
        })
        .ok_or_else(|| TokenError::Source {
            source_name: name.clone(),
            reason: "the token has no sub claim: set principal=NAME".into(),
        })?;
    let expires_ms = match (
        settings.lifetime,
        claims.as_ref().and_then(|c| c.get("exp")?.as_i64()),
    ) {
        (Some(lifetime), _) => now_ms.saturating_add(lifetime.as_millis() as i64),
        (None, Some(exp_seconds)) => exp_seconds.saturating_mul(1000),
        (None, None) => now_ms.saturating_add(DEFAULT_LIFETIME.as_millis() as i64),
    };
    if expires_ms <= now_ms {
        return Err(TokenError::Source {
            source_name: name,
            reason: "the token has expired".into(),
        });
    }
    Ok(OAuthToken {
        token,
        principal_name: principal,
        lifetime_ms: expires_ms,
    })
}

/// Runs a token command: no shell, no arguments, standard input closed, an environment of
/// `PATH` and the variables named in `pass`, at most `timeout` (then killed); its standard
/// output, up to [`MAX_COMMAND_OUTPUT`]. On a worker of tokio's multi-thread runtime (librdkafka
/// calls the refresh from inside a poll) the worker is handed back to the runtime first, so the
/// wait blocks no other task.
fn run_token_command(program: &str, pass: &[String], timeout: Duration) -> Result<String, String> {
    let run = || {
        let mut command = std::process::Command::new(program);
        command
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        for name in std::iter::once("PATH").chain(pass.iter().map(String::as_str)) {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        let mut child = command.spawn().map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no standard output")?;
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(
                &mut std::io::Read::take(stdout, MAX_COMMAND_OUTPUT),
                &mut text,
            );
            text
        });
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            match child.try_wait().map_err(|e| e.to_string())? {
                Some(status) => break status,
                None if std::time::Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("did not finish within {timeout:?}; killed"));
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        if !status.success() {
            return Err(format!("exited with {status}"));
        }
        reader
            .join()
            .map_err(|_| "its output could not be read".to_owned())
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(run)
        }
        _ => run(),
    }
}

/// The claims of a JWT (`header.claims.signature`), unverified: the broker verifies; exactly
/// only reads when it expires and whose it is.
fn jwt_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let claims = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The refresh hook every client context of exactly's carries (a context of your own calls it
/// from `generate_oauth_token`), so OAUTHBEARER works on each
/// client (producers, consumers, readers) the same way.
pub fn refresh(config: Option<&str>) -> Result<OAuthToken, Box<dyn Error>> {
    generate(config, crate::now().0).map_err(|e| {
        tracing::error!("{e}");
        Box::new(e) as Box<dyn Error>
    })
}

/// Makes a client context refresh OAUTHBEARER tokens through [`refresh`].
macro_rules! oauth_token_refresh {
    () => {
        const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

        fn generate_oauth_token(
            &self,
            oauthbearer_config: Option<&str>,
        ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
            crate::oauth::refresh(oauthbearer_config)
        }
    };
}
pub(crate) use oauth_token_refresh;

/// The context of clients that need nothing else: OAUTHBEARER refresh only.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenContext;

impl rdkafka::ClientContext for TokenContext {
    oauth_token_refresh!();
}

impl rdkafka::consumer::ConsumerContext for TokenContext {}

impl rdkafka::producer::ProducerContext for TokenContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(result: Result<OAuthToken, TokenError>) -> TokenError {
        match result {
            Ok(_) => panic!("a token where an error was expected"),
            Err(e) => e,
        }
    }

    fn jwt(claims: &str) -> String {
        let part = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", part(r#"{"alg":"RS256"}"#), part(claims))
    }

    #[test]
    fn a_token_file_is_read_again_at_every_refresh() {
        let dir = std::env::temp_dir().join(format!("exactly-oauth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("token");
        let config = format!("token_file={}", path.display());
        std::fs::write(&path, format!("{}\n", jwt(r#"{"sub":"svc-a","exp":2000}"#))).expect("write");
        let first = generate(Some(&config), 1_000_000).expect("token");
        assert_eq!(first.principal_name, "svc-a");
        assert_eq!(first.lifetime_ms, 2_000_000);
        std::fs::write(&path, jwt(r#"{"sub":"svc-a","exp":3000}"#)).expect("rotate");
        let second = generate(Some(&config), 1_500_000).expect("token");
        assert_ne!(first.token, second.token);
        assert_eq!(second.lifetime_ms, 3_000_000);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_opaque_token_needs_a_principal_and_lives_an_hour_by_default() {
        let dir = std::env::temp_dir().join(format!("exactly-oauth-opaque-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("token");
        std::fs::write(&path, "opaque-token-value").expect("write");
        let err = refused(generate(Some(&format!("token_file={}", path.display())), 0));
        assert!(err.to_string().contains("principal=NAME"), "{err}");
        assert!(
            !err.to_string().contains("opaque-token-value"),
            "the token never shows: {err}"
        );
        let token =
            generate(Some(&format!("token_file={} principal=app", path.display())), 0).expect("token");
        assert_eq!(token.lifetime_ms, 3_600_000);
        let token = generate(
            Some(&format!(
                "token_file={} principal=app lifetime_ms=5000",
                path.display()
            )),
            10,
        )
        .expect("token");
        assert_eq!(token.lifetime_ms, 5_010);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_command_is_run_without_a_shell() {
        let dir = std::env::temp_dir().join(format!("exactly-oauth-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let script = dir.join("token.sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho {}\n", jwt(r#"{"sub":"cmd","exp":99}"#)),
        )
        .expect("script");
        std::process::Command::new("chmod")
            .args(["+x"])
            .arg(&script)
            .status()
            .expect("chmod");
        let token = generate(Some(&format!("token_command={}", script.display())), 0).expect("token");
        assert_eq!(token.principal_name, "cmd");
        assert_eq!(token.lifetime_ms, 99_000);
        let failing = dir.join("fail.sh");
        std::fs::write(&failing, "#!/bin/sh\nexit 3\n").expect("script");
        std::process::Command::new("chmod")
            .args(["+x"])
            .arg(&failing)
            .status()
            .expect("chmod");
        let err = refused(generate(Some(&format!("token_command={}", failing.display())), 0));
        assert!(err.to_string().contains("exited"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn script(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("script");
        std::process::Command::new("chmod")
            .args(["+x"])
            .arg(&path)
            .status()
            .expect("chmod");
        path
    }

    #[test]
    fn a_hung_token_command_is_killed_after_its_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hung = script(dir.path(), "hung.sh", "sleep 60");
        let started = std::time::Instant::now();
        let err = refused(generate(
            Some(&format!(
                "token_command={} token_command_timeout_ms=300",
                hung.display()
            )),
            0,
        ));
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    /// Token commands run from inside tasks of a one-worker runtime (as librdkafka runs the
    /// refresh from a consumer's poll) hand their thread back: another task goes on meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_token_command_blocks_no_task_of_the_runtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slow = script(dir.path(), "slow.sh", "sleep 2; echo opaque");
        // Called from inside a task, as librdkafka calls it from a consumer's poll.
        let config = format!("token_command={} principal=p", slow.display());
        let blockers: Vec<_> = (0..2)
            .map(|_| {
                let config = config.clone();
                tokio::spawn(async move { generate(Some(&config), 0).map(|t| t.token) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let other = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            7
        });
        assert_eq!(other.await.expect("task"), 7);
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_millis(1500),
            "another task waited {waited:?} for the command"
        );
        for blocker in blockers {
            assert_eq!(blocker.await.expect("task").expect("token"), "opaque");
        }
    }

    #[test]
    fn a_token_command_sees_only_path_and_the_variables_it_is_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seen = dir.path().join("env.txt");
        let printer = script(
            dir.path(),
            "printenv.sh",
            &format!("env > {}; echo opaque-token", seen.display()),
        );
        // Names of this test's own, so no other test's environment changes.
        std::env::set_var("EXACTLY_OAUTH_TEST_SECRET", "secret-9417");
        std::env::set_var("EXACTLY_OAUTH_TEST_PASSED", "passed-5521");
        let token = generate(
            Some(&format!(
                "token_command={} principal=p token_command_env=EXACTLY_OAUTH_TEST_PASSED",
                printer.display()
            )),
            0,
        )
        .expect("token");
        assert_eq!(token.token, "opaque-token");
        let env = std::fs::read_to_string(&seen).expect("env");
        assert!(!env.contains("secret-9417"), "{env}");
        assert!(env.contains("EXACTLY_OAUTH_TEST_PASSED=passed-5521"), "{env}");
        assert!(env.contains("PATH="), "{env}");
        assert!(!env.contains("HOME="), "{env}");
    }

    #[test]
    fn bad_settings_and_expired_tokens_are_refused_with_the_reason() {
        assert!(matches!(generate(None, 0), Err(TokenError::NoSource)));
        assert!(matches!(
            generate(Some("principal=x"), 0),
            Err(TokenError::NoSource)
        ));
        assert!(matches!(
            generate(Some("token_file"), 0),
            Err(TokenError::Config(_))
        ));
        assert!(matches!(
            generate(Some("tokenfile=/x"), 0),
            Err(TokenError::Config(_))
        ));
        let dir = std::env::temp_dir().join(format!("exactly-oauth-exp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("token");
        std::fs::write(&path, jwt(r#"{"sub":"s","exp":1}"#)).expect("write");
        let err = refused(generate(Some(&format!("token_file={}", path.display())), 5_000));
        assert!(err.to_string().contains("expired"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
