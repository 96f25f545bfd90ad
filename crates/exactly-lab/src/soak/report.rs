//! The soak's files: the samples as CSV and the four-panel plot.

use std::path::Path;

use anyhow::{Context, Result};

use super::*;

pub(super) fn write_csv(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out = String::from(
        "seconds,committed,applied_wal,applied_poll,key_set_rows,watermark_rows,retained_wal_bytes",
    );
    for name in PROCESSES {
        out.push_str(&format!(
            ",{name}_rss_kib,{name}_fds,{name}_sockets,{name}_threads"
        ));
    }
    out.push('\n');
    for s in samples {
        out.push_str(&format!(
            "{:.1},{},{},{},{},{},{}",
            s.seconds,
            s.committed,
            s.applied[0],
            s.applied[1],
            s.key_set_rows,
            s.watermark_rows,
            s.retained_wal
        ));
        for p in &s.processes {
            out.push_str(&format!(",{},{},{},{}", p.rss_kib, p.fds, p.sockets, p.threads));
        }
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Four panels over time: RSS per process, descriptors per process, the key set against its
/// bound, retained WAL.
pub(super) fn plot(path: &Path, samples: &[Sample], options: &SoakOptions) -> Result<()> {
    use plotters::prelude::*;
    crate::e2e_bench::register_plot_font()?;
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let minutes = |s: &Sample| s.seconds / 60.0;
    let x_max = samples.iter().map(minutes).fold(1.0f64, f64::max);
    let colours = [RED, BLUE, GREEN, MAGENTA];

    let per_process = |area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
                       title: &str,
                       unit: &str,
                       figure: fn(&ProcessSample) -> f64|
     -> Result<()> {
        let y_max = samples
            .iter()
            .flat_map(|s| s.processes.iter().map(figure))
            .fold(1.0f64, f64::max)
            * 1.2;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(unit)
            .label_style(("sans-serif", 12))
            .draw()?;
        for (i, name) in PROCESSES.iter().enumerate() {
            let colour = colours[i % colours.len()];
            chart
                .draw_series(LineSeries::new(
                    samples
                        .iter()
                        .filter_map(|s| s.processes.get(i).map(|p| (minutes(s), figure(p)))),
                    colour.stroke_width(2),
                ))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
        Ok(())
    };
    per_process(&panels[0], "resident memory per process", "MiB", |p| {
        p.rss_kib as f64 / 1024.0
    })?;
    per_process(&panels[1], "open descriptors per process", "descriptors", |p| {
        p.fds as f64
    })?;

    let single = |area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
                  title: &str,
                  unit: &str,
                  values: Vec<(f64, f64)>,
                  limit: Vec<(f64, f64)>|
     -> Result<()> {
        let y_max = values.iter().chain(&limit).map(|v| v.1).fold(0.0, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(unit)
            .label_style(("sans-serif", 12))
            .draw()?;
        chart.draw_series(LineSeries::new(values, BLUE.stroke_width(2)))?;
        chart.draw_series(LineSeries::new(limit, RED.stroke_width(1)))?;
        Ok(())
    };
    single(
        &panels[2],
        "key-set rows (red: keys applied within the retention, +10%)",
        "rows",
        samples
            .iter()
            .map(|s| (minutes(s), s.key_set_rows as f64))
            .collect(),
        key_set_bounds(options, samples)
            .iter()
            .map(|c| (c.seconds / 60.0, c.bound as f64))
            .collect(),
    )?;
    single(
        &panels[3],
        "retained WAL (red: limit)",
        "MiB",
        samples
            .iter()
            .map(|s| (minutes(s), s.retained_wal as f64 / 1048576.0))
            .collect(),
        {
            let limit = options.max_retained_wal.as_u64() as f64 / 1048576.0;
            vec![(0.0, limit), (x_max, limit)]
        },
    )?;
    root.present()?;
    Ok(())
}
