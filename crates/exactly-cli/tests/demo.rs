use std::process::{Command, Stdio};

use exactly_testkit::{brokers, pg_url};

use crate::support::EXACTLY;

fn figure(output: &str, label: &str) -> u64 {
    output
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{output}"))
}

fn run_demo(extra: &[&str]) {
    let brokers = brokers();
    let output = Command::new(EXACTLY)
        .args(["demo", "--events", "1500", "--quiet", "--brokers", &brokers])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run demo");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(figure(&text, "events committed"), 1500);
    assert_eq!(figure(&text, "applied once"), 1500);
    assert_eq!(figure(&text, "lost"), 0);
    assert_eq!(figure(&text, "applied twice"), 0);
    assert_eq!(figure(&text, "rolled-back events visible"), 0);
    assert_eq!(figure(&text, "state mismatches"), 0);
    assert!(
        figure(&text, "relay crashes injected") >= 1,
        "faults were on:\n{text}"
    );
    assert!(
        figure(&text, "consumer crashes injected") >= 1,
        "faults were on:\n{text}"
    );
}

#[test]
fn demo_with_faults_is_exactly_once_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_demo(&["--dir", dir.path().to_str().expect("path"), "--seed", "7"]);
}

#[test]
fn demo_with_faults_is_exactly_once_on_postgres() {
    run_demo(&["--database", &pg_url(), "--seed", "11"]);
}

#[test]
fn demo_on_the_wal_relay_with_faults_is_exactly_once() {
    run_demo(&["--database", &pg_url(), "--relay", "wal", "--seed", "13"]);
}
