//! The DSL's results against a straightforward reference computation, in memory (no broker):
//! for random inputs with repeats (same event id), out-of-order records within grace and late
//! records beyond it, per window kind (tumbling, hopping, session) and aggregation (count,
//! sum, min, max, count_distinct), in both emit modes, through a repartition topic.

use std::collections::{BTreeMap, BTreeSet};

use exactly_core::aggregate::{AggState, Aggregation};
use exactly_core::windowing::{sessions_of, SessionWindows, TimeWindows};
use exactly_stream::dsl::{
    partition_for, Consumed, Emit, Grouped, JoinWindows, Json, KTable, Produced, StreamsBuilder, TestDriver,
    Utf8, Windowed,
};
use proptest::prelude::*;
use serde_json::{json, Value};

const PARTITIONS: i32 = 3;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Event {
    id: String,
    key: String,
    t: i64,
    amount: i64,
}

/// Events with repeats: a pool of distinct events, and an order of picks from it in which an
/// event can come again (a redelivery: same id, key, time and amount).
fn events() -> impl Strategy<Value = Vec<Event>> {
    (
        proptest::collection::vec((0u8..4, 0i64..3000, -50i64..50), 1..40),
        proptest::collection::vec(any::<prop::sample::Index>(), 1..80),
    )
        .prop_map(|(pool, picks)| {
            picks
                .into_iter()
                .map(|i| {
                    let n = i.index(pool.len());
                    let (key, t, amount) = pool[n];
                    Event {
                        id: format!("e{n}"),
                        key: format!("k{key}"),
                        t,
                        amount,
                    }
                })
                .collect()
        })
}

fn aggregation() -> impl Strategy<Value = Aggregation> {
    prop_oneof![
        Just(Aggregation::Count),
        Just(Aggregation::Sum("/amount".into())),
        Just(Aggregation::Min("/amount".into())),
        Just(Aggregation::Max("/amount".into())),
        Just(Aggregation::CountDistinct("/amount".into())),
    ]
}

fn payload(e: &Event) -> Value {
    serde_json::to_value(e).expect("an event is JSON")
}

/// The reference fold: the values aggregated by plain arithmetic.
fn reference_result(agg: &Aggregation, amounts: &[i64]) -> Value {
    match agg {
        Aggregation::Count => json!(amounts.len()),
        Aggregation::Sum(_) => json!(amounts.iter().sum::<i64>()),
        Aggregation::Min(_) => amounts.iter().min().map_or(Value::Null, |m| json!(m)),
        Aggregation::Max(_) => amounts.iter().max().map_or(Value::Null, |m| json!(m)),
        Aggregation::CountDistinct(_) => json!(amounts.iter().collect::<BTreeSet<_>>().len()),
    }
}

/// Which repartition partition (and so which task and stream time) a grouping key lands in.
fn task_of(key: &str) -> i32 {
    partition_for(Some(&serde_json::to_vec(key).expect("json")), PARTITIONS)
}

/// Pipes the events, keyed by their id (so one grouping key's events arrive on several input
/// partitions and must be regrouped).
fn run(builder: StreamsBuilder, events: &[Event]) -> TestDriver {
    let mut driver = TestDriver::new(builder.build().expect("topology"), PARTITIONS);
    for e in events {
        let value = serde_json::to_vec(e).expect("json");
        driver
            .pipe("events", Some(e.id.as_bytes()), Some(&value), &[], e.t)
            .expect("processed");
    }
    driver
}

fn source(builder: &StreamsBuilder) -> exactly_stream::dsl::KStream<String, Event> {
    builder.stream(
        "events",
        Consumed::with(Utf8, Json)
            .with_timestamp(|_, e: &Event| e.t)
            .with_event_id(|_, e: &Event| Some(e.id.clone())),
    )
}

/// The DSL's output as (key, window start, window end) → result.
fn windowed_results(driver: &TestDriver) -> BTreeMap<(String, i64, i64), Value> {
    driver
        .latest("out")
        .into_iter()
        .map(|(k, v)| {
            let w: Windowed<String> = serde_json::from_slice(&k).expect("windowed key");
            let v: Value = serde_json::from_slice(&v).expect("json result");
            ((w.key, w.start, w.end), v)
        })
        .collect()
}

fn aggregated(agg: Aggregation, table: impl FnOnce(Aggregation) -> KTable<Windowed<String>, AggState>) {
    // Deletions (a session merged into a larger one) reach the topic as tombstones.
    table(agg)
        .map_values(|s: AggState| s.result())
        .to("out", Produced::json());
}

fn add(agg: &Aggregation, e: &Event, s: AggState) -> Result<AggState, String> {
    let c = agg.read(&payload(e)).map_err(|e| e.to_string())?;
    agg.add(s, &c).map_err(|e| e.to_string())
}

/// One reference run of time windows: (results per window, late, duplicates, final stream
/// time per task).
type TimeReference = (BTreeMap<(String, i64, i64), Vec<i64>>, u64, BTreeMap<i32, i64>);

fn time_reference(events: &[Event], size: i64, advance: i64, grace: i64) -> TimeReference {
    let mut stream_time: BTreeMap<i32, i64> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut windows: BTreeMap<(String, i64, i64), Vec<i64>> = BTreeMap::new();
    let mut late = 0;
    for e in events {
        let st = stream_time.entry(task_of(&e.key)).or_insert(i64::MIN);
        *st = (*st).max(e.t);
        // Every window [s, s + size) with s a multiple of advance that holds t.
        let open: Vec<i64> = ((e.t - size).div_euclid(advance) - 1..=e.t.div_euclid(advance) + 1)
            .map(|k| k * advance)
            .filter(|s| *s <= e.t && e.t < s + size && *st < s + size + grace)
            .collect();
        if open.is_empty() {
            late += 1;
            continue;
        }
        if !seen.insert(e.id.clone()) {
            continue;
        }
        for s in open {
            windows
                .entry((e.key.clone(), s, s + size))
                .or_default()
                .push(e.amount);
        }
    }
    (windows, late, stream_time)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Tumbling and hopping windows, both emit modes: on update the last result per window is
    /// the reference's; on close exactly the closed windows are sent, once each, with the
    /// reference's result.
    #[test]
    fn time_windows_equal_the_reference(
        events in events(),
        agg in aggregation(),
        size in 100i64..1000,
        hops in 1i64..4,
        grace in 0i64..500,
        final_only in any::<bool>(),
    ) {
        let advance = (size / hops).max(1);
        let windows = TimeWindows::hopping(size, advance, grace).expect("valid");
        let emit = if final_only { Emit::OnWindowClose } else { Emit::OnUpdate };
        let builder = StreamsBuilder::new();
        let a = agg.clone();
        aggregated(agg.clone(), |agg| {
            source(&builder)
                .group_by(|_, e| e.key.clone(), Grouped::json().named("agg"))
                .windowed_by(windows)
                .emit(emit)
                .try_aggregate(move || agg.init(), move |_, e, s| add(&a, e, s))
        });
        let driver = run(builder, &events);
        let (reference, late, stream_time) = time_reference(&events, size, advance, grace);
        let expected: BTreeMap<(String, i64, i64), Value> = reference
            .into_iter()
            .filter(|((key, start, _), _)| {
                !final_only || stream_time[&task_of(key)] >= start + size + grace
            })
            .map(|(w, amounts)| (w, reference_result(&agg, &amounts)))
            .collect();
        prop_assert_eq!(windowed_results(&driver), expected.clone());
        prop_assert_eq!(driver.late(), late);
        prop_assert!(driver.parked().is_empty(), "{:?}", driver.parked());
        if final_only {
            prop_assert_eq!(driver.outputs("out").len(), expected.len(), "one final result per window");
        }
    }

    /// Session windows, both emit modes, against sessions recomputed from scratch (sort and
    /// split) after every record.
    #[test]
    fn session_windows_equal_the_reference(
        events in events(),
        agg in aggregation(),
        gap in 1i64..300,
        grace in 0i64..300,
        final_only in any::<bool>(),
    ) {
        let windows = SessionWindows::new(gap, grace).expect("valid");
        let emit = if final_only { Emit::OnWindowClose } else { Emit::OnUpdate };
        let builder = StreamsBuilder::new();
        let (a, m) = (agg.clone(), agg.clone());
        aggregated(agg.clone(), |agg| {
            source(&builder)
                .group_by(|_, e| e.key.clone(), Grouped::json().named("sessions"))
                .session_windowed_by(windows)
                .emit(emit)
                .try_aggregate(
                    move || agg.init(),
                    move |_, e, s| add(&a, e, s),
                    move |_, x, y| m.merge(x, y).map_err(|e| e.to_string()),
                )
        });
        let driver = run(builder, &events);

        let mut stream_time: BTreeMap<i32, i64> = BTreeMap::new();
        let mut accepted: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        let mut late = 0;
        for e in &events {
            let st = stream_time.entry(task_of(&e.key)).or_insert(i64::MIN);
            *st = (*st).max(e.t);
            let times: Vec<i64> = accepted.get(&e.key).map(|a| a.iter().map(|(t, _)| *t).collect()).unwrap_or_default();
            let closed = |end: i64| end + gap + grace <= *st;
            let touches_closed = sessions_of(times, gap)
                .into_iter()
                .any(|s| s.end.0 >= e.t - gap && s.start.0 <= e.t + gap && closed(s.end.0));
            if touches_closed || closed(e.t) {
                late += 1;
                continue;
            }
            if seen.insert(e.id.clone()) {
                accepted.entry(e.key.clone()).or_default().push((e.t, e.amount));
            }
        }
        let mut expected = BTreeMap::new();
        for (key, records) in &accepted {
            for s in sessions_of(records.iter().map(|(t, _)| *t).collect(), gap) {
                if final_only && s.end.0 + gap + grace > stream_time[&task_of(key)] {
                    continue;
                }
                let amounts: Vec<i64> = records
                    .iter()
                    .filter(|(t, _)| *t >= s.start.0 && *t <= s.end.0)
                    .map(|(_, a)| *a)
                    .collect();
                expected.insert((key.clone(), s.start.0, s.end.0), reference_result(&agg, &amounts));
            }
        }
        prop_assert_eq!(windowed_results(&driver), expected.clone());
        prop_assert_eq!(driver.late(), late);
        if final_only {
            prop_assert_eq!(driver.outputs("out").len(), expected.len(), "one final result per session");
        }
    }

    /// A table (no windows): the latest result per key is the reference's over every distinct
    /// event.
    #[test]
    fn a_table_aggregation_equals_the_reference(events in events(), agg in aggregation()) {
        let builder = StreamsBuilder::new();
        let (a, i) = (agg.clone(), agg.clone());
        source(&builder)
            .group_by(|_, e| e.key.clone(), Grouped::json().named("totals"))
            .try_aggregate(move || i.init(), move |_, e, s| add(&a, e, s))
            .to_stream()
            .map_values(|s: AggState| s.result())
            .to("out", Produced::json());
        let driver = run(builder, &events);
        let mut per_key: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        for e in &events {
            per_key.entry(e.key.clone()).or_default().insert(e.id.clone(), e.amount);
        }
        let expected: BTreeMap<String, Value> = per_key
            .into_iter()
            .map(|(k, ids)| (k, reference_result(&agg, &ids.into_values().collect::<Vec<_>>())))
            .collect();
        let actual: BTreeMap<String, Value> = driver
            .latest("out")
            .into_iter()
            .map(|(k, v)| (serde_json::from_slice(&k).expect("key"), serde_json::from_slice(&v).expect("value")))
            .collect();
        prop_assert_eq!(actual, expected);
    }

    /// The windowed stream–stream join: every pair of accepted records of one key at most
    /// `window` apart, once.
    #[test]
    fn a_windowed_join_emits_every_pair_once(
        left in proptest::collection::vec((0u8..3, 0i64..2000), 0..30),
        right in proptest::collection::vec((0u8..3, 0i64..2000), 0..30),
        window in 0i64..300,
        grace in 0i64..300,
    ) {
        let builder = StreamsBuilder::new();
        let l = builder.stream("left", Consumed::with(Utf8, Json).with_timestamp(|_, v: &i64| *v));
        let r = builder.stream("right", Consumed::with(Utf8, Json).with_timestamp(|_, v: &i64| *v));
        l.join_windowed(&r, JoinWindows::of(window).grace(grace), Some("pairs"), |_, a: &i64, b: &i64| (*a, *b))
            .to("out", Produced::json());
        let mut driver = TestDriver::new(builder.build().expect("topology"), 1);
        // Interleave the two sides in a fixed order.
        let mut inputs: Vec<(&str, u8, i64)> = Vec::new();
        for i in 0..left.len().max(right.len()) {
            if let Some((k, t)) = left.get(i) { inputs.push(("left", *k, *t)); }
            if let Some((k, t)) = right.get(i) { inputs.push(("right", *k, *t)); }
        }
        let mut st = i64::MIN;
        let mut accepted: Vec<(&str, u8, i64)> = Vec::new();
        for (side, k, t) in &inputs {
            let key = format!("k{k}");
            let value = serde_json::to_vec(t).expect("json");
            driver.pipe(side, Some(key.as_bytes()), Some(&value), &[], *t).expect("processed");
            st = st.max(*t);
            if t + window + grace > st {
                accepted.push((side, *k, *t));
            }
        }
        let mut expected = Vec::new();
        for (s1, k1, t1) in &accepted {
            for (s2, k2, t2) in &accepted {
                if *s1 == "left" && *s2 == "right" && k1 == k2 && (t1 - t2).abs() <= window {
                    expected.push((format!("k{k1}"), *t1, *t2));
                }
            }
        }
        expected.sort();
        let mut actual: Vec<(String, i64, i64)> = driver
            .outputs("out")
            .iter()
            .map(|o| {
                let k: String = serde_json::from_slice(o.key.as_deref().expect("key")).expect("key");
                let (a, b): (i64, i64) = serde_json::from_slice(o.value.as_deref().expect("value")).expect("value");
                (k, a, b)
            })
            .collect();
        actual.sort();
        prop_assert_eq!(actual, expected);
    }
}

#[test]
fn a_stream_table_join_enriches_with_the_latest_value() {
    let builder = StreamsBuilder::new();
    let products = builder.table("products", Consumed::<String, String>::with(Utf8, Json));
    builder
        .stream("orders", Consumed::with(Utf8, Json))
        .left_join(&products, |_, qty: &u32, name: Option<&String>| {
            format!("{qty} x {}", name.map_or("?", String::as_str))
        })
        .to("enriched", Produced::with(Utf8, Json));
    let topology = builder.build().expect("topology");
    assert_eq!(topology.subtopologies().len(), 1, "stream and table in one task");
    let mut driver = TestDriver::new(topology, 2);
    let pipe = |d: &mut TestDriver, topic: &str, key: &str, value: Option<&str>| {
        d.pipe(topic, Some(key.as_bytes()), value.map(str::as_bytes), &[], 0)
            .expect("processed");
    };
    pipe(&mut driver, "orders", "P1", Some("1"));
    pipe(&mut driver, "products", "P1", Some("\"lamp\""));
    pipe(&mut driver, "orders", "P1", Some("2"));
    pipe(&mut driver, "products", "P1", Some("\"desk lamp\""));
    pipe(&mut driver, "orders", "P1", Some("3"));
    pipe(&mut driver, "products", "P1", None);
    pipe(&mut driver, "orders", "P1", Some("4"));
    pipe(&mut driver, "orders", "P1", Some("not json"));
    let values: Vec<String> = driver
        .outputs("enriched")
        .iter()
        .map(|o| serde_json::from_slice(o.value.as_deref().expect("value")).expect("json"))
        .collect();
    assert_eq!(values, ["1 x ?", "2 x lamp", "3 x desk lamp", "4 x ?"]);
    assert_eq!(driver.parked().len(), 1);
    assert!(driver.parked()[0].reason.contains("value: not the expected JSON"));
}

#[test]
fn a_record_the_aggregation_refuses_is_parked_whole_and_the_partition_goes_on() {
    let builder = StreamsBuilder::new();
    let sum = Aggregation::Sum("/amount".into());
    let (i, a) = (sum.clone(), sum.clone());
    builder
        .stream("events", Consumed::<String, Value>::with(Utf8, Json))
        .group_by_key(Grouped::json().named("sums"))
        .windowed_by(TimeWindows::hopping(10, 5, 0).expect("valid"))
        .try_aggregate(
            move || i.init(),
            move |_, v, s| {
                let c = a.read(v).map_err(|e| e.to_string())?;
                a.add(s, &c).map_err(|e| e.to_string())
            },
        )
        .to_stream()
        .map_values(|s: AggState| s.result())
        .to("out", Produced::json());
    let mut driver = TestDriver::new(builder.build().expect("topology"), 1);
    for (t, v) in [
        (1, r#"{"amount": 2}"#),
        (2, r#"{"amount": "x"}"#),
        (3, r#"{"amount": 5}"#),
    ] {
        driver
            .pipe_to("events", 0, Some(b"k"), Some(v.as_bytes()), &[], t)
            .expect("processed");
    }
    assert_eq!(driver.parked().len(), 1);
    assert_eq!(driver.parked()[0].offset, 1);
    assert!(
        driver.parked()[0].reason.contains("is \"x\", not a number"),
        "{:?}",
        driver.parked()
    );
    let results = windowed_results(&driver);
    assert_eq!(results.get(&("k".into(), 0, 10)), Some(&json!(7)), "{results:?}");
    assert_eq!(results.get(&("k".into(), -5, 5)), Some(&json!(7)));
}

#[test]
fn a_late_record_is_counted_and_copied_to_the_late_topic() {
    let builder = StreamsBuilder::new();
    builder.late_records_to("late");
    builder
        .stream("events", Consumed::<String, Value>::with(Utf8, Json))
        .group_by_key(Grouped::json())
        .windowed_by(TimeWindows::tumbling(10, 0).expect("valid"))
        .count()
        .to_stream()
        .to("out", Produced::json());
    let mut driver = TestDriver::new(builder.build().expect("topology"), 1);
    for t in [5, 25, 3] {
        driver
            .pipe_to("events", 0, Some(b"k"), Some(b"{}"), &[], t)
            .expect("processed");
    }
    assert_eq!(driver.late(), 1);
    let late = driver.outputs("late");
    assert_eq!(late.len(), 1);
    assert!(late[0]
        .headers
        .iter()
        .any(|(k, v)| k == exactly_stream::DEAD_ORIGIN_HEADER && v == b"events/0@2"));
}

#[test]
fn state_is_removed_once_windows_close() {
    let builder = StreamsBuilder::new();
    source(&builder)
        .group_by(|_, e| e.key.clone(), Grouped::json())
        .windowed_by(TimeWindows::tumbling(100, 10).expect("valid"))
        .emit(Emit::OnWindowClose)
        .count()
        .to_stream()
        .to("out", Produced::json());
    let mut events = Vec::new();
    for i in 0..1000 {
        events.push(Event {
            id: format!("e{i}"),
            key: format!("k{}", i % 7),
            t: i * 10,
            amount: 1,
        });
    }
    let driver = run(builder, &events);
    // Open windows, their seen entries and the operators' numbers only: not 1000 records' worth.
    assert!(driver.state_entries() < 120, "{} entries", driver.state_entries());
    assert_eq!(driver.outputs("out").len(), 7 * 99, "every closed window once");
}

#[test]
fn a_far_future_event_time_is_parked_and_does_not_make_later_records_late() {
    let builder = StreamsBuilder::new();
    builder
        .stream(
            "events",
            Consumed::<String, i64>::with(Utf8, Json).with_timestamp(|_, t| *t),
        )
        .group_by_key(Grouped::json())
        .windowed_by(TimeWindows::tumbling(10, 0).expect("valid"))
        .count()
        .to_stream()
        .to("out", Produced::json());
    let mut driver = TestDriver::new(builder.build().expect("topology"), 1).with_latest_event_time(1_000);
    for t in [5, 1_000_000, 6] {
        driver
            .pipe_to("events", 0, Some(b"k"), Some(t.to_string().as_bytes()), &[], 0)
            .expect("processed");
    }
    assert_eq!(driver.parked().len(), 1);
    assert_eq!(driver.parked()[0].offset, 1);
    assert!(driver.parked()[0]
        .reason
        .contains("later than the wall clock allows"));
    assert_eq!(driver.late(), 0, "the far-future record did not move stream time");
    assert_eq!(
        windowed_results(&driver).get(&("k".into(), 0, 10)),
        Some(&json!(2))
    );
}
