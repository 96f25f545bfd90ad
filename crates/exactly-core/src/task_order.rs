//! Which record a task takes next when it reads more than one partition.
//!
//! A join's task reads partition n of each co-partitioned topic (a stream and a table's
//! topic, say). The consumer hands their records over in whatever order its fetches came
//! back, and that order differs from run to run: after a restart that reads both topics from
//! a committed position, an order can reach the join before the product update written a
//! minute before it, and be enriched with nothing. Kafka Streams takes a task's records in
//! timestamp order instead: it buffers each partition's fetched records, takes the head with
//! the earliest timestamp, and while one of the partitions has nothing buffered it waits
//! for it, unless that partition is known to be read to its end (`max.task.idle.ms`, KIP-695).
//! [`TaskQueue`] is that rule, with time and the partitions' lag as arguments:
//!
//! - each partition's records leave in the order they arrived;
//! - the record taken is the earliest-stamped head of the non-empty partitions (ties: the
//!   partition listed first);
//! - a partition with nothing buffered holds the task back while its [`Lag`] is not
//!   [`Lag::CaughtUp`], for at most `max_idle_ms` from when it started to hold it back; after
//!   that the task goes on without it (Kafka Streams' enforced processing), until it has
//!   records or is caught up again.
//!
//! So as long as every partition with unfetched records says so ([`Lag::Behind`]), the order a
//! task takes its records in does not depend on the order they were fetched in.

use std::collections::VecDeque;

/// What is known of a partition's records not fetched yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    /// Its position is at the end the broker last reported: nothing to wait for.
    CaughtUp,
    /// The broker holds records past its position (or its position is not known yet).
    Behind,
}

/// What a task does now.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<R> {
    /// Process this record.
    Take {
        /// The input it came from.
        input: usize,
        /// The record.
        record: R,
    },
    /// An input has nothing buffered and is not caught up: wait for its fetch.
    Wait {
        /// The input waited for.
        input: usize,
    },
    /// Nothing is buffered.
    Empty,
}

/// One input partition's buffered records and since when it has held the task back.
#[derive(Debug, Clone)]
struct Input<R> {
    records: VecDeque<(i64, R)>,
    holding_since: Option<u64>,
}

/// The records a task has been handed and not processed, one queue per input partition.
#[derive(Debug, Clone)]
pub struct TaskQueue<R> {
    inputs: Vec<Input<R>>,
    max_idle_ms: u64,
    enforced: u64,
}

impl<R> TaskQueue<R> {
    /// A task reading `inputs` partitions, which waits up to `max_idle_ms` for one that is
    /// behind.
    pub fn new(inputs: usize, max_idle_ms: u64) -> Self {
        TaskQueue {
            inputs: (0..inputs)
                .map(|_| Input {
                    records: VecDeque::new(),
                    holding_since: None,
                })
                .collect(),
            max_idle_ms,
            enforced: 0,
        }
    }

    /// Buffers a record fetched from `input` (`timestamp`: its event time in milliseconds;
    /// a record without one sorts first). An input out of range is a caller's bug: ignored.
    pub fn push(&mut self, input: usize, timestamp: i64, record: R) {
        if let Some(i) = self.inputs.get_mut(input) {
            i.records.push_back((timestamp, record));
            i.holding_since = None;
        }
    }

    /// Drops everything buffered (the consumer was put back to where the task's state is).
    pub fn clear(&mut self) {
        for input in &mut self.inputs {
            input.records.clear();
            input.holding_since = None;
        }
    }

    /// Records buffered in all inputs.
    pub fn len(&self) -> usize {
        self.inputs.iter().map(|i| i.records.len()).sum()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.inputs.iter().all(|i| i.records.is_empty())
    }

    /// How many times the task went on without an input that was behind, its wait over.
    pub fn enforced(&self) -> u64 {
        self.enforced
    }

    /// The record to process now, if any; `lag` is asked only about empty inputs.
    pub fn next(&mut self, now_ms: u64, mut lag: impl FnMut(usize) -> Lag) -> Next<R> {
        if self.is_empty() {
            return Next::Empty;
        }
        let mut waiting_on = None;
        let mut enforced = false;
        for (index, input) in self.inputs.iter_mut().enumerate() {
            if !input.records.is_empty() {
                continue;
            }
            if lag(index) == Lag::CaughtUp {
                input.holding_since = None;
                continue;
            }
            let since = *input.holding_since.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= self.max_idle_ms {
                enforced = true;
            } else if waiting_on.is_none() {
                waiting_on = Some(index);
            }
        }
        if let Some(input) = waiting_on {
            return Next::Wait { input };
        }
        let Some(input) = self
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(index, i)| i.records.front().map(|(t, _)| (*t, index)))
            .min()
            .map(|(_, index)| index)
        else {
            return Next::Empty;
        };
        if enforced {
            self.enforced += 1;
        }
        match self.inputs[input].records.pop_front() {
            Some((_, record)) => Next::Take { input, record },
            None => Next::Empty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The one run's order: every input's records merged by (timestamp, input), each input's
    /// own order kept.
    fn merged(inputs: &[Vec<i64>]) -> Vec<(usize, usize)> {
        let mut heads = vec![0usize; inputs.len()];
        let mut out = Vec::new();
        loop {
            let next = (0..inputs.len())
                .filter(|&i| heads[i] < inputs[i].len())
                .min_by_key(|&i| (inputs[i][heads[i]], i));
            let Some(i) = next else { return out };
            out.push((i, heads[i]));
            heads[i] += 1;
        }
    }

    fn inputs() -> impl Strategy<Value = Vec<Vec<i64>>> {
        prop::collection::vec(
            prop::collection::vec(0i64..50, 0..20).prop_map(|mut v| {
                v.sort();
                v
            }),
            1..4,
        )
    }

    proptest! {
        /// Whatever order the fetches arrive in, and however often the task asks in between,
        /// it takes the records in the one order: by timestamp, each input's order kept, as
        /// long as an input with records still to fetch says it is behind.
        #[test]
        fn the_order_taken_does_not_depend_on_the_order_fetched(
            inputs in inputs(),
            arrivals in prop::collection::vec((0usize..4, 0usize..4), 0..200),
        ) {
            let mut queue = TaskQueue::new(inputs.len(), u64::MAX);
            let mut fetched = vec![0usize; inputs.len()];
            let mut taken = Vec::new();
            let take = |queue: &mut TaskQueue<(usize, usize)>, fetched: &[usize], taken: &mut Vec<(usize, usize)>| loop {
                match queue.next(0, |i| if fetched[i] < inputs[i].len() { Lag::Behind } else { Lag::CaughtUp }) {
                    Next::Take { input, record } => {
                        prop_assert_eq!(input, record.0);
                        taken.push(record);
                    }
                    Next::Wait { input } => {
                        prop_assert!(fetched[input] < inputs[input].len());
                        return Ok(());
                    }
                    Next::Empty => return Ok(()),
                }
            };
            for (input, count) in arrivals {
                let input = input % inputs.len();
                for _ in 0..count {
                    if fetched[input] < inputs[input].len() {
                        queue.push(input, inputs[input][fetched[input]], (input, fetched[input]));
                        fetched[input] += 1;
                    }
                }
                take(&mut queue, &fetched, &mut taken)?;
            }
            for (input, records) in inputs.iter().enumerate() {
                while fetched[input] < records.len() {
                    queue.push(input, records[fetched[input]], (input, fetched[input]));
                    fetched[input] += 1;
                }
            }
            take(&mut queue, &fetched, &mut taken)?;
            prop_assert_eq!(taken, merged(&inputs));
            prop_assert!(queue.is_empty());
        }

        /// An input's records always leave in the order they came, whatever the lag and idle
        /// time say.
        #[test]
        fn each_input_keeps_its_order(
            pushes in prop::collection::vec((0usize..3, 0i64..30), 0..100),
            behind in prop::collection::vec(any::<bool>(), 3),
            idle in 0u64..5,
        ) {
            let mut queue = TaskQueue::new(3, idle);
            let mut taken: Vec<Vec<usize>> = vec![Vec::new(); 3];
            let mut now = 0;
            for (n, (input, ts)) in pushes.iter().enumerate() {
                queue.push(*input, *ts, (*input, n));
                now += 1;
                if let Next::Take { input, record } = queue.next(now, |i| if behind[i] { Lag::Behind } else { Lag::CaughtUp }) {
                    taken[input].push(record.1);
                }
            }
            for t in &taken {
                prop_assert!(t.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }

    #[test]
    fn an_input_behind_holds_the_task_back_until_its_wait_is_over() {
        let mut queue = TaskQueue::new(2, 100);
        queue.push(1, 10, "order");
        let behind = |i: usize| if i == 0 { Lag::Behind } else { Lag::CaughtUp };
        assert_eq!(queue.next(1_000, behind), Next::Wait { input: 0 });
        assert_eq!(queue.next(1_099, behind), Next::Wait { input: 0 });
        assert_eq!(
            queue.next(1_100, behind),
            Next::Take {
                input: 1,
                record: "order"
            }
        );
        assert_eq!(queue.enforced(), 1);
        // Still behind: the wait that is over stays over.
        queue.push(1, 11, "order 2");
        assert!(matches!(queue.next(1_101, behind), Next::Take { .. }));
        // Caught up once, then behind again: a new wait.
        queue.push(1, 12, "order 3");
        assert!(matches!(queue.next(1_102, |_| Lag::CaughtUp), Next::Take { .. }));
        queue.push(1, 13, "order 4");
        assert_eq!(queue.next(1_103, behind), Next::Wait { input: 0 });
    }

    #[test]
    fn a_caught_up_input_is_not_waited_for_and_ties_go_to_the_first_input() {
        let mut queue = TaskQueue::new(2, 100);
        queue.push(1, 5, "order");
        assert!(matches!(
            queue.next(0, |_| Lag::CaughtUp),
            Next::Take { input: 1, .. }
        ));
        queue.push(1, 7, "order");
        queue.push(0, 7, "product");
        assert_eq!(
            queue.next(0, |_| Lag::Behind),
            Next::Take {
                input: 0,
                record: "product"
            }
        );
        queue.clear();
        assert_eq!(queue.next(0, |_| Lag::Behind), Next::Empty);
    }
}
