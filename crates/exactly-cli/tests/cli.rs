//! Command-line checks that need no service: flags a mode would ignore are refused.

use std::process::{Command, Stdio};

use crate::support::EXACTLY;

/// Runs `exactly relay` with `args` against addresses nothing listens on: a refused flag must
/// stop it before it connects anywhere.
fn relay_refuses(args: &[&str], flag: &str) {
    let out = Command::new(EXACTLY)
        .args([
            "relay",
            "--database",
            "postgres://nobody@127.0.0.1:1/none",
            "--brokers",
            "127.0.0.1:1",
            "--no-metrics",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run exactly relay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?} must exit 2; stderr: {stderr}"
    );
    assert!(
        stderr.contains(flag),
        "{args:?}: the error must name {flag}: {stderr}"
    );
    assert!(stderr.contains("is not used with --mode"), "{args:?}: {stderr}");
}

#[test]
fn relay_flags_of_the_other_mode_are_refused() {
    relay_refuses(&["--mode", "poll", "--exactly-once"], "--exactly-once");
    relay_refuses(&["--mode", "poll", "--slot", "s"], "--slot");
    relay_refuses(
        &["--mode", "poll", "--commit-interval-ms", "5"],
        "--commit-interval-ms",
    );
    relay_refuses(&["--mode", "wal", "--batch-size", "10"], "--batch-size");
    relay_refuses(&["--mode", "wal", "--keys", "sequence"], "--keys");
    relay_refuses(
        &["--mode", "wal", "--exactly-once", "--lease-ms", "10"],
        "--lease-ms",
    );
    relay_refuses(&["--mode", "wal", "--progress-topic", "p"], "--progress-topic");
    relay_refuses(&["--batch-events", "3"], "--batch-events");
}
