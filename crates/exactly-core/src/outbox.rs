//! The outbox row state machine and retry policy.
//!
//! ```text
//! NEW ──claim──▶ SENDING ──ack──▶ SENT
//!  ▲               │ fail (retries left): retry_count+1, next_retry_at = now + backoff
//!  └───────────────┘
//!  └─── release (lease given back unsent, no retry used)
//!                  │ fail (no retries left) or malformed row
//!                  ▼
//!                 DEAD ──requeue (operator)──▶ NEW
//! ```
//! A SENDING row whose lease (`next_retry_at`) has passed may be claimed again: its relay is
//! presumed dead. SENT and DEAD are final except for an explicit requeue of DEAD.

use std::fmt;
use std::str::FromStr;

use crate::time::UnixMillis;

/// Where a row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutboxStatus {
    /// Committed by the application, not yet claimed (or waiting out a backoff).
    New,
    /// Claimed by a relay, which holds a lease until `next_retry_at`.
    Sending,
    /// Acknowledged by every in-sync replica (acks=all).
    Sent,
    /// Given up on; `last_error` says why. Only an operator's requeue brings it back.
    Dead,
}

impl OutboxStatus {
    /// The persisted text; pinned because both databases store it.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::New => "NEW",
            OutboxStatus::Sending => "SENDING",
            OutboxStatus::Sent => "SENT",
            OutboxStatus::Dead => "DEAD",
        }
    }

    /// All four, in life order.
    pub const ALL: [OutboxStatus; 4] = [
        OutboxStatus::New,
        OutboxStatus::Sending,
        OutboxStatus::Sent,
        OutboxStatus::Dead,
    ];
}

impl fmt::Display for OutboxStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OutboxStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OutboxStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown outbox status {s:?}"))
    }
}

/// Exponential backoff with a cap, and a retry budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First delay.
    pub base_ms: i64,
    /// Largest delay.
    pub max_backoff_ms: i64,
    /// Failures after which a row is DEAD.
    pub max_retries: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base_ms: 100,
            max_backoff_ms: 30_000,
            max_retries: 10,
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `retry_count + 1`: base · 2^retry_count, capped.
    pub fn backoff_ms(&self, retry_count: u32) -> i64 {
        let factor = 1i64.checked_shl(retry_count.min(40)).unwrap_or(i64::MAX);
        self.base_ms.saturating_mul(factor).min(self.max_backoff_ms)
    }
}

/// What the relay reports about a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxEvent {
    /// A relay takes the row until `lease_until`.
    Claim {
        /// The claim time.
        now: UnixMillis,
        /// The lease end.
        lease_until: UnixMillis,
    },
    /// The broker acknowledged the record.
    Ack,
    /// Publishing failed.
    Fail {
        /// When.
        now: UnixMillis,
    },
    /// The row cannot ever be published (malformed); no retry helps.
    Reject,
    /// The relay gives its lease back without trying (an earlier record of the batch failed and
    /// the rest must wait behind it); costs no retry.
    Release {
        /// When.
        now: UnixMillis,
    },
    /// An operator sends a DEAD row again.
    Requeue {
        /// When.
        now: UnixMillis,
    },
}

/// The persisted columns the state machine owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowState {
    /// Status column.
    pub status: OutboxStatus,
    /// Failures so far.
    pub retry_count: u32,
    /// NEW: not before; SENDING: lease end.
    pub next_retry_at: UnixMillis,
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("outbox row in {from} cannot take {event:?}")]
pub struct TransitionError {
    /// Where the row was.
    pub from: OutboxStatus,
    /// What was asked.
    pub event: OutboxEvent,
}

impl RowState {
    /// A freshly inserted row.
    pub fn new(now: UnixMillis) -> Self {
        RowState {
            status: OutboxStatus::New,
            retry_count: 0,
            next_retry_at: now,
        }
    }

    /// True if a relay may claim the row at `now`.
    pub fn claimable(&self, now: UnixMillis) -> bool {
        matches!(self.status, OutboxStatus::New | OutboxStatus::Sending) && self.next_retry_at <= now
    }

    /// The state after `event`, or why it is not allowed.
    pub fn apply(self, event: OutboxEvent, policy: &RetryPolicy) -> Result<RowState, TransitionError> {
        use OutboxStatus::*;
        let refuse = Err(TransitionError {
            from: self.status,
            event,
        });
        match (self.status, event) {
            (New | Sending, OutboxEvent::Claim { now, lease_until }) if self.claimable(now) => Ok(RowState {
                status: Sending,
                next_retry_at: lease_until,
                ..self
            }),
            // A late ack from a relay whose lease lapsed is still true: the record is on the topic.
            (New | Sending, OutboxEvent::Ack) => Ok(RowState { status: Sent, ..self }),
            (Sending, OutboxEvent::Fail { now }) => {
                let retry_count = self.retry_count.saturating_add(1);
                if retry_count >= policy.max_retries {
                    Ok(RowState {
                        status: Dead,
                        retry_count,
                        next_retry_at: now,
                    })
                } else {
                    Ok(RowState {
                        status: New,
                        retry_count,
                        next_retry_at: now.plus_ms(policy.backoff_ms(self.retry_count)),
                    })
                }
            }
            (New | Sending, OutboxEvent::Reject) => Ok(RowState { status: Dead, ..self }),
            (Sending, OutboxEvent::Release { now }) => Ok(RowState {
                status: New,
                next_retry_at: now,
                ..self
            }),
            (Dead, OutboxEvent::Requeue { now }) => Ok(RowState::new(now)),
            _ => refuse,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event() -> impl Strategy<Value = OutboxEvent> {
        prop_oneof![
            (0i64..1000, 0i64..1000).prop_map(|(n, l)| OutboxEvent::Claim {
                now: UnixMillis(n),
                lease_until: UnixMillis(n + l)
            }),
            Just(OutboxEvent::Ack),
            (0i64..1000).prop_map(|n| OutboxEvent::Fail { now: UnixMillis(n) }),
            Just(OutboxEvent::Reject),
            (0i64..1000).prop_map(|n| OutboxEvent::Release { now: UnixMillis(n) }),
            (0i64..1000).prop_map(|n| OutboxEvent::Requeue { now: UnixMillis(n) }),
        ]
    }

    proptest! {
        #[test]
        fn no_path_out_of_sent_or_dead_but_requeue_of_dead(events in proptest::collection::vec(event(), 0..60)) {
            let policy = RetryPolicy { base_ms: 10, max_backoff_ms: 100, max_retries: 3 };
            let mut state = RowState::new(UnixMillis(0));
            for ev in events {
                let before = state;
                match state.apply(ev, &policy) {
                    Ok(after) => {
                        if before.status == OutboxStatus::Sent {
                            prop_assert!(false, "left SENT via {:?}", ev);
                        }
                        if before.status == OutboxStatus::Dead {
                            prop_assert!(matches!(ev, OutboxEvent::Requeue { .. }), "left DEAD via {:?}", ev);
                            prop_assert_eq!(after.status, OutboxStatus::New);
                        }
                        if after.status == OutboxStatus::Sent {
                            prop_assert_eq!(ev, OutboxEvent::Ack);
                        }
                        prop_assert!(after.retry_count <= policy.max_retries);
                        state = after;
                    }
                    Err(e) => prop_assert_eq!(e.from, before.status),
                }
            }
        }
    }

    #[test]
    fn failures_back_off_then_die() {
        let policy = RetryPolicy {
            base_ms: 100,
            max_backoff_ms: 250,
            max_retries: 3,
        };
        let mut state = RowState::new(UnixMillis(0));
        let mut delays = Vec::new();
        for attempt in 0..3 {
            let now = state.next_retry_at;
            state = state
                .apply(
                    OutboxEvent::Claim {
                        now,
                        lease_until: now.plus_ms(1000),
                    },
                    &policy,
                )
                .expect("claimable");
            state = state.apply(OutboxEvent::Fail { now }, &policy).expect("fail");
            delays.push(state.next_retry_at.0 - now.0);
            assert_eq!(state.retry_count, attempt + 1);
        }
        assert_eq!(state.status, OutboxStatus::Dead);
        assert_eq!(&delays[..2], &[100, 200]);
    }

    #[test]
    fn leases_expire_and_status_text_is_pinned() {
        let policy = RetryPolicy::default();
        let claimed = RowState::new(UnixMillis(0))
            .apply(
                OutboxEvent::Claim {
                    now: UnixMillis(0),
                    lease_until: UnixMillis(500),
                },
                &policy,
            )
            .expect("claim");
        assert!(!claimed.claimable(UnixMillis(499)));
        assert!(claimed.claimable(UnixMillis(500)));
        let names: Vec<_> = OutboxStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["NEW", "SENDING", "SENT", "DEAD"]);
        assert_eq!("DEAD".parse::<OutboxStatus>(), Ok(OutboxStatus::Dead));
    }
}
