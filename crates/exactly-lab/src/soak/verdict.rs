//! The soak's verdict: growth of each process from the warm-up to the end, the key set
//! against its bound, retained WAL, and the table printed at the end.

use std::path::Path;

use super::*;

/// A process's growth from the warm-up to the end.
#[derive(Debug, serde::Serialize)]
pub(super) struct Growth {
    pub(super) process: String,
    pub(super) rss_kib_at_warmup: u64,
    pub(super) rss_kib_at_end: u64,
    pub(super) fds_at_warmup: u64,
    pub(super) fds_at_end: u64,
    pub(super) sockets_at_end: u64,
    pub(super) threads_at_warmup: u64,
    pub(super) threads_at_end: u64,
    pub(super) rss_growth: f64,
    pub(super) fds_growth: f64,
}

#[derive(Debug, serde::Serialize)]
pub(super) struct Verdict {
    pub(super) minutes: f64,
    pub(super) rate_per_pipeline: u64,
    pub(super) committed: u64,
    pub(super) applied: [u64; 2],
    pub(super) duplicates: [u64; 2],
    pub(super) parked: [u64; 2],
    pub(super) faults: Vec<(f64, String)>,
    pub(super) restarts: u64,
    pub(super) growth: Vec<Growth>,
    pub(super) key_set_rows_max: u64,
    /// The sample where the key set came closest to its bound: seconds, rows, bound.
    pub(super) key_set_worst: KeySetCheck,
    pub(super) retained_wal_max_after_warmup: u64,
    pub(super) failures: Vec<String>,
}

/// The key set against its retention at one sample.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(super) struct KeySetCheck {
    pub(super) seconds: f64,
    pub(super) rows: u64,
    pub(super) bound: u64,
}

/// What the key set may hold at each sample: every key the consumer applied within the
/// retention, one prune interval and one sampling period before it, plus 10%. The bound counts
/// keys by when they were applied, as pruning does: a consumer catching up after an outage
/// applies minutes of events at once, and those keys rightly stay a full retention from then.
pub(super) fn key_set_bounds(options: &SoakOptions, samples: &[Sample]) -> Vec<KeySetCheck> {
    let window_s =
        (options.key_retention_ms + PRUNE_INTERVAL_MS) as f64 / 1000.0 + options.sample_every_secs as f64;
    let applied = |s: &Sample| s.applied[1];
    samples
        .iter()
        .map(|s| {
            let before = samples
                .iter()
                .rev()
                .find(|earlier| earlier.seconds <= s.seconds - window_s)
                .map_or(0, applied);
            KeySetCheck {
                seconds: s.seconds,
                rows: s.key_set_rows,
                bound: (applied(s).saturating_sub(before) as f64 * 1.1).ceil() as u64,
            }
        })
        .collect()
}

/// The mean of a process's figure over the samples within a minute after `from_s`.
pub(super) fn window_mean(
    samples: &[Sample],
    from_s: f64,
    process: usize,
    figure: fn(&ProcessSample) -> u64,
) -> u64 {
    let window: Vec<u64> = samples
        .iter()
        .filter(|s| s.seconds >= from_s && s.seconds < from_s + 60.0)
        .filter_map(|s| s.processes.get(process).map(figure))
        .collect();
    if window.is_empty() {
        0
    } else {
        window.iter().sum::<u64>() / window.len() as u64
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn judge(
    options: &SoakOptions,
    samples: &[Sample],
    faults: Vec<(f64, String)>,
    restarts: u64,
    in_outbox: [u64; 2],
    applied: [u64; 2],
    duplicates: [u64; 2],
    parked: [u64; 2],
) -> Verdict {
    let mut failures = Vec::new();
    let warmup_s = options.warmup_minutes * 60.0;
    let end_s = (options.minutes * 60.0 - 60.0).max(warmup_s);
    let mut growth = Vec::new();
    for (i, name) in PROCESSES.iter().enumerate() {
        let rss = (
            window_mean(samples, warmup_s, i, |p| p.rss_kib),
            window_mean(samples, end_s, i, |p| p.rss_kib),
        );
        let fds = (
            window_mean(samples, warmup_s, i, |p| p.fds),
            window_mean(samples, end_s, i, |p| p.fds),
        );
        let ratio = |(a, b): (u64, u64)| if a == 0 { 0.0 } else { b as f64 / a as f64 - 1.0 };
        let g = Growth {
            process: (*name).to_owned(),
            rss_kib_at_warmup: rss.0,
            rss_kib_at_end: rss.1,
            fds_at_warmup: fds.0,
            fds_at_end: fds.1,
            sockets_at_end: window_mean(samples, end_s, i, |p| p.sockets),
            threads_at_warmup: window_mean(samples, warmup_s, i, |p| p.threads),
            threads_at_end: window_mean(samples, end_s, i, |p| p.threads),
            rss_growth: ratio(rss),
            fds_growth: ratio(fds),
        };
        if g.rss_growth >= options.max_growth {
            failures.push(format!("{name}: RSS grew {:.1}%", g.rss_growth * 100.0));
        }
        if g.fds_growth >= options.max_growth {
            failures.push(format!("{name}: descriptors grew {:.1}%", g.fds_growth * 100.0));
        }
        growth.push(g);
    }
    let key_set_rows_max = samples.iter().map(|s| s.key_set_rows).max().unwrap_or(0);
    let key_set_worst = key_set_bounds(options, samples)
        .into_iter()
        .max_by(|a, b| {
            let share = |c: &KeySetCheck| c.rows as f64 / c.bound.max(1) as f64;
            share(a).total_cmp(&share(b))
        })
        .unwrap_or_default();
    if key_set_worst.rows > key_set_worst.bound {
        failures.push(format!(
            "key set held {} rows at {:.0} s, above the {} keys applied within its retention",
            key_set_worst.rows, key_set_worst.seconds, key_set_worst.bound
        ));
    }
    let retained_wal_max_after_warmup = samples
        .iter()
        .filter(|s| s.seconds >= warmup_s)
        .map(|s| s.retained_wal)
        .max()
        .unwrap_or(0);
    if retained_wal_max_after_warmup > options.max_retained_wal.as_u64() {
        failures.push(format!(
            "retained WAL reached {}, above {}",
            bytesize::ByteSize(retained_wal_max_after_warmup),
            options.max_retained_wal
        ));
    }
    for i in 0..2 {
        if applied[i] != in_outbox[i] {
            failures.push(format!(
                "{}: {} events committed, {} applied",
                PIPELINES[i], in_outbox[i], applied[i]
            ));
        }
        if duplicates[i] > 0 {
            failures.push(format!("{}: {} applied twice", PIPELINES[i], duplicates[i]));
        }
        if parked[i] > 0 {
            failures.push(format!("{}: {} parked", PIPELINES[i], parked[i]));
        }
    }
    if restarts > 0 {
        failures.push(format!("{restarts} process restarts (a process died)"));
    }
    Verdict {
        minutes: options.minutes,
        rate_per_pipeline: options.rate,
        committed: in_outbox.iter().sum(),
        applied,
        duplicates,
        parked,
        faults,
        restarts,
        growth,
        key_set_rows_max,
        key_set_worst,
        retained_wal_max_after_warmup,
        failures,
    }
}

pub(super) fn print(verdict: &Verdict, out: &Path) {
    println!();
    println!(
        "  soak {:.1} min · {} events/s per pipeline · {} committed · applied wal {} poll {} · duplicates {:?} · parked {:?}",
        verdict.minutes,
        verdict.rate_per_pipeline,
        verdict.committed,
        verdict.applied[0],
        verdict.applied[1],
        verdict.duplicates,
        verdict.parked
    );
    println!(
        "  faults: {}",
        verdict
            .faults
            .iter()
            .map(|(at, what)| format!("{what} at {:.0} s", at))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  {:<14} {:>12} {:>12} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "process", "RSS warm-up", "RSS end", "growth", "fds w-u", "fds end", "sockets", "thr w-u", "thr end"
    );
    for g in &verdict.growth {
        println!(
            "  {:<14} {:>9} KiB {:>8} KiB {:>7.1}% {:>8} {:>8} {:>8} {:>8} {:>8}",
            g.process,
            g.rss_kib_at_warmup,
            g.rss_kib_at_end,
            g.rss_growth * 100.0,
            g.fds_at_warmup,
            g.fds_at_end,
            g.sockets_at_end,
            g.threads_at_warmup,
            g.threads_at_end
        );
    }
    println!(
        "  key set: at most {} rows; closest to its bound at {:.0} s ({} of {}); retained WAL after warm-up: at most {}",
        verdict.key_set_rows_max,
        verdict.key_set_worst.seconds,
        verdict.key_set_worst.rows,
        verdict.key_set_worst.bound,
        bytesize::ByteSize(verdict.retained_wal_max_after_warmup)
    );
    if verdict.failures.is_empty() {
        println!("  verdict: flat");
    } else {
        println!("  verdict: FAILED: {}", verdict.failures.join("; "));
    }
    println!(
        "  {} · {} · {}",
        out.join("soak.csv").display(),
        out.join("soak.png").display(),
        out.join("soak.json").display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        options: SoakOptions,
    }

    /// Samples every 10 s: `applied` keys so far and `rows` in the key set.
    fn samples(points: &[(u64, u64)]) -> Vec<Sample> {
        points
            .iter()
            .enumerate()
            .map(|(i, &(applied, rows))| Sample {
                seconds: i as f64 * 10.0,
                processes: Vec::new(),
                committed: applied,
                applied: [0, applied],
                key_set_rows: rows,
                watermark_rows: 0,
                retained_wal: 0,
            })
            .collect()
    }

    #[test]
    fn the_key_set_bound_follows_what_was_applied_not_the_rate() {
        let options = Command::parse_from(["soak", "--key-retention-ms", "30000"]).options;
        // Window: 30 s retention + 60 s prune interval + 10 s sampling = 100 s, ten samples.
        // 100 keys a sample, then nothing for 5 samples, then a catch-up of 500 at once.
        let mut points: Vec<(u64, u64)> = (0..=20).map(|i| (i * 100, 0)).collect();
        points.extend((0..5).map(|_| (2000, 0)));
        points.push((2500, 0));
        let checks = key_set_bounds(&options, &samples(&points));
        // Before a whole window has passed, everything applied may still be there.
        assert_eq!(checks[5].bound, 550);
        // At sample 20 the window holds samples 11..=20: 1000 keys, +10%.
        assert_eq!(checks[20].bound, 1100);
        // Right after the catch-up, the 500 applied at once count in full.
        assert_eq!(checks[26].bound, ((2500 - 1600) as f64 * 1.1).ceil() as u64);
        // A key set that never prunes outgrows the bound once the first window has passed.
        let never_pruned: Vec<(u64, u64)> = (0..=20).map(|i| (i * 100, i * 100)).collect();
        let checks = key_set_bounds(&options, &samples(&never_pruned));
        assert!(checks[20].rows > checks[20].bound);
        assert!(checks[5].rows <= checks[5].bound);
    }
}
