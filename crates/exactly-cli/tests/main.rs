//! Integration tests on real PostgreSQL, SQLite and a Kafka-protocol broker (Tansu), all
//! started by scripts/setup. One test binary; a module per topic.

// Test helpers are `pub` for sibling modules only.
#![allow(unreachable_pub, missing_docs)]

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
mod sql_functions;
mod sql_handler;
mod stream;
mod stream_jobs;
mod tls;
mod wal;
