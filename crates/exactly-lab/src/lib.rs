//! The lab: what proves and measures exactly, apart from the product (which never depends on
//! it; the binary's `demo`, `verify`, `soak` and `bench` subcommands dispatch here).
//!
//! - the order-service story (`story`, run on either database by `backend`) and the demo that
//!   runs it with faults and reconciles (`demo`);
//! - `verify`: writers, relay and consumers as processes, killed and restarted, the broker and
//!   PostgreSQL restarted, bad input injected, network faults through `fault_proxy`; then the
//!   checker's verdict;
//! - `soak`: a steady load with reconnect faults, sampled into a CSV, a plot and a verdict;
//! - the benchmarks (`bench`, `consumer_bench`, `e2e_bench`, `stream_bench`), each against a
//!   baseline measured in the same run;
//! - `broker`: starting, restarting and indexing the test broker (Tansu).

// The lab is not an API: its items are public for the binary's dispatch, documented where
// they are read, not item by item.
#![allow(missing_docs)]

pub mod backend;
pub mod bench;
pub mod broker;
pub mod consumer_bench;
pub mod delta_bench;
pub mod demo;
pub mod e2e_bench;
pub mod fault_proxy;
pub mod soak;
pub mod story;
pub mod stream_bench;
pub mod verify;

use std::sync::Arc;

/// Makes the story's consumers available as `exactly consume --handler story-coupons`,
/// `story-likes` and `story-products` (the demo, verify and soak start them as processes).
pub fn register_story_handlers() {
    for consumer in story::StoryConsumer::ALL {
        exactly_daemon::handlers::register_handler(
            &format!("story-{}", consumer.name()),
            Arc::new(backend::StoryHandler(consumer)),
        );
    }
}
