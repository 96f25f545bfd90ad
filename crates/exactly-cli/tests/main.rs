//! Integration tests on real PostgreSQL, SQLite and a Kafka-protocol broker (Tansu), all
//! started by scripts/setup. One test binary; a module per topic.

// Test helpers are `pub` for sibling modules only.
#![allow(unreachable_pub, missing_docs)]
// `support::one_kill_test_at_a_time` is a plain mutex held for a whole test, awaits included:
// each test has a runtime of its own, so holding it blocks only that test's thread.
#![allow(clippy::await_holding_lock)]

mod support;

mod cli;
mod consumer;
mod debezium;
mod delta;
mod demo;
mod eos;
mod health;
mod operate;
mod payloads;
mod relay;
mod run;
mod sink_postgres;
mod sql_functions;
mod sql_handler;
mod stream;
mod stream_jobs;
mod tls;
mod wal;
