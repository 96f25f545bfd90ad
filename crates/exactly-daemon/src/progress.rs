//! What a long-running process says while it runs: each component logs a line when it starts
//! (what it reads, where it writes), and every few seconds one line tells how far the process
//! got, from the counters it exports: events published, applied, repeats, parked, lag. A
//! process with nothing new to say stays quiet. `--quiet` or `EXACTLY_LOG=warn` turns it off.

use std::time::Duration;

/// The counters a progress line reads.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Totals {
    published: f64,
    applied: f64,
    repeats: f64,
    parked: f64,
    lag: f64,
    stream_records: f64,
    stream_commits: f64,
    lake_rows: f64,
    lake_commits: f64,
}

/// Sums each counter of the Prometheus text over its labels.
fn totals(text: &str) -> Totals {
    let mut totals = Totals::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        let slot = match name {
            "exactly_relay_published_total" => &mut totals.published,
            "exactly_consumer_applied_total" => &mut totals.applied,
            "exactly_consumer_dedupe_hits_total" => &mut totals.repeats,
            "exactly_consumer_parked_total" => &mut totals.parked,
            "exactly_consumer_lag_records" | "exactly_stream_lag_records" | "exactly_delta_lag_records" => {
                &mut totals.lag
            }
            "exactly_stream_records_total" => &mut totals.stream_records,
            "exactly_stream_commits_total" => &mut totals.stream_commits,
            "exactly_delta_records_written_total" => &mut totals.lake_rows,
            "exactly_delta_commits_total" => &mut totals.lake_commits,
            _ => continue,
        };
        *slot += value;
    }
    totals
}

/// The line for `now`, given the last one said (`None` when nothing moved).
fn line(now: &Totals, before: &Totals, every: Duration) -> Option<String> {
    if now == before {
        return None;
    }
    let rate = |n: f64, b: f64| (n - b) / every.as_secs_f64().max(0.001);
    let rate = |n: f64, b: f64| {
        let r = rate(n, b);
        if r >= 10.0 {
            format!("{r:.0}/s")
        } else {
            format!("{r:.1}/s")
        }
    };
    let mut parts = Vec::new();
    if now.published > 0.0 {
        parts.push(format!(
            "published {} ({})",
            now.published,
            rate(now.published, before.published)
        ));
    }
    if now.applied > 0.0 || now.repeats > 0.0 || now.parked > 0.0 {
        parts.push(format!(
            "applied {} ({}), repeats {}, parked {}",
            now.applied,
            rate(now.applied, before.applied),
            now.repeats,
            now.parked
        ));
    }
    if now.stream_records > 0.0 {
        parts.push(format!(
            "stream records {} ({}), commits {}",
            now.stream_records,
            rate(now.stream_records, before.stream_records),
            now.stream_commits
        ));
    }
    if now.lake_commits > 0.0 {
        parts.push(format!(
            "delta rows {} ({}), appends {}",
            now.lake_rows,
            rate(now.lake_rows, before.lake_rows),
            now.lake_commits
        ));
    }
    parts.push(format!("lag {}", now.lag));
    Some(parts.join("; "))
}

/// Logs the totals once (a command that ends says how far it got).
pub fn say_totals() {
    let Ok(handle) = crate::telemetry::recorder() else {
        return;
    };
    let now = totals(&handle.render());
    if let Some(line) = line(&now, &Totals::default(), Duration::ZERO) {
        tracing::info!(
            "totals: {}",
            line.split("; ").map(without_rate).collect::<Vec<_>>().join("; ")
        );
    }
}

/// `published 300 (30/s)` → `published 300`.
fn without_rate(part: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for c in part.chars() {
        match c {
            '(' => skipping = true,
            ')' => skipping = false,
            c if !skipping => out.push(c),
            _ => {}
        }
    }
    out.replace("  ", " ").trim().replace(" ,", ",")
}

/// Logs a progress line every `every` while anything moves (info level).
pub fn report_progress(every: Duration) {
    let Ok(handle) = crate::telemetry::recorder() else {
        return;
    };
    tokio::spawn(async move {
        let mut before = Totals::default();
        loop {
            tokio::time::sleep(every).await;
            let now = totals(&handle.render());
            if let Some(line) = line(&now, &before, every) {
                tracing::info!("progress: {line}");
                before = now;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_line_sums_counters_over_labels_and_says_nothing_when_idle() {
        let text = "# TYPE exactly_relay_published_total counter
exactly_relay_published_total 300
exactly_consumer_applied_total 280
exactly_consumer_dedupe_hits_total 4
exactly_consumer_parked_total{reason=\"rejected\"} 1
exactly_consumer_parked_total{reason=\"bad_headers\"} 2
exactly_consumer_lag_records{topic=\"orders\",partition=\"0\"} 15
exactly_consumer_lag_records{topic=\"orders\",partition=\"1\"} 5
";
        let now = totals(text);
        assert_eq!(now.parked, 3.0);
        assert_eq!(now.lag, 20.0);
        let said = line(&now, &Totals::default(), Duration::from_secs(10)).expect("a line");
        assert_eq!(
            said,
            "published 300 (30/s); applied 280 (28/s), repeats 4, parked 3; lag 20"
        );
        assert_eq!(line(&now, &now, Duration::from_secs(10)), None);
        assert_eq!(
            without_rate("applied 280 (28/s), repeats 4"),
            "applied 280, repeats 4"
        );
    }
}
