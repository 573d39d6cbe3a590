//! The store benchmark's results: a table on stdout, every figure in JSON and an SVG plot.

use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use serde::Serialize;

use crate::machine::MachineInfo;

/// One system at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// `keelson` or `etcd`.
    pub system: &'static str,
    /// Concurrent clients.
    pub clients: usize,
    /// Connections the clients shared.
    pub connections: usize,
    /// Acknowledged writes in the window.
    pub ops: u64,
    /// Failed writes.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Acknowledged writes per second.
    pub writes_per_s: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// 99.9th percentile latency, ms.
    pub p999_ms: f64,
    /// Mean latency, ms.
    pub mean_ms: f64,
    /// Slowest write, ms.
    pub max_ms: f64,
}

/// Keelson divided by etcd at one concurrency (throughput: higher is better for Keelson;
/// latencies: lower is better).
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// Concurrent clients.
    pub clients: usize,
    /// Keelson writes/s ÷ etcd writes/s.
    pub writes_per_s: f64,
    /// Keelson p50 ÷ etcd p50.
    pub p50: f64,
    /// Keelson p99 ÷ etcd p99.
    pub p99: f64,
}

/// The whole run, as written to `store.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always `store`.
    pub suite: &'static str,
    /// Seconds since the Unix epoch at the start.
    pub started_unix_s: u64,
    /// Where it ran.
    pub machine: MachineInfo,
    /// What was run.
    pub workload: WorkloadInfo,
    /// etcd's version line.
    pub etcd_version: String,
    /// Every point measured.
    pub points: Vec<Point>,
    /// Keelson ÷ etcd per concurrency.
    pub ratios: Vec<Ratio>,
    /// The goals, checked.
    pub goals: Goals,
}

/// The workload, for the record.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadInfo {
    /// Members per cluster.
    pub members: usize,
    /// Key size.
    pub key_bytes: usize,
    /// Value size.
    pub value_bytes: usize,
    /// Concurrencies measured.
    pub clients: Vec<usize>,
    /// Unmeasured seconds before each window.
    pub warmup_s: f64,
    /// Measured seconds per point.
    pub measure_s: f64,
    /// How clients share connections.
    pub connections: String,
}

/// Whether Keelson meets the goals in this run.
#[derive(Debug, Clone, Serialize)]
pub struct Goals {
    /// Keelson writes/s ≥ etcd's at 256 clients.
    pub throughput_at_256_clients: Option<bool>,
    /// Keelson p99 ≤ etcd's at 1 client.
    pub p99_at_1_client: Option<bool>,
}

/// Keelson ÷ etcd for every concurrency measured for both.
pub fn ratios(points: &[Point]) -> Vec<Ratio> {
    let find = |system, clients| {
        points
            .iter()
            .find(|p| p.system == system && p.clients == clients)
    };
    let mut out = Vec::new();
    for k in points.iter().filter(|p| p.system == "keelson") {
        if let Some(e) = find("etcd", k.clients) {
            out.push(Ratio {
                clients: k.clients,
                writes_per_s: k.writes_per_s / e.writes_per_s,
                p50: k.p50_ms / e.p50_ms,
                p99: k.p99_ms / e.p99_ms,
            });
        }
    }
    out
}

/// The goals, from the ratios.
pub fn goals(ratios: &[Ratio]) -> Goals {
    let at = |clients| ratios.iter().find(|r| r.clients == clients);
    Goals {
        throughput_at_256_clients: at(256).map(|r| r.writes_per_s >= 1.0),
        p99_at_1_client: at(1).map(|r| r.p99 <= 1.0),
    }
}

/// Print the table.
pub fn print_table(report: &Report) {
    println!(
        "\n{:<8} {:>7} {:>5} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "system", "clients", "conns", "writes/s", "p50 ms", "p99 ms", "p99.9 ms", "errors"
    );
    for p in &report.points {
        println!(
            "{:<8} {:>7} {:>5} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            p.system,
            p.clients,
            p.connections,
            p.writes_per_s,
            p.p50_ms,
            p.p99_ms,
            p.p999_ms,
            p.errors
        );
    }
    println!(
        "\n{:<8} {:>7} {:>10} {:>9} {:>9}",
        "keelson÷etcd", "clients", "writes/s", "p50", "p99"
    );
    for r in &report.ratios {
        println!(
            "{:<12} {:>3} {:>10.2} {:>9.2} {:>9.2}",
            "", r.clients, r.writes_per_s, r.p50, r.p99
        );
    }
    let show = |g: Option<bool>| match g {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    };
    println!(
        "\ngoal: writes/s at 256 clients >= etcd: {}; p99 at 1 client <= etcd: {}",
        show(report.goals.throughput_at_256_clients),
        show(report.goals.p99_at_1_client)
    );
    let m = &report.machine;
    println!(
        "machine: {} ({} cores), kernel {}, disk {}, 4 KiB write+fdatasync {:.2} ms",
        m.cpu_model, m.cores, m.kernel, m.disk, m.fdatasync_ms
    );
}

/// Write the report as pretty JSON.
///
/// # Errors
/// The file cannot be written.
pub fn write_json(report: &Report, path: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(report).context("encoding the report")?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

/// Plot writes/s and p99 latency against clients, one line per system.
///
/// # Errors
/// The SVG cannot be drawn or written.
pub fn write_svg(report: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (left, right) = root.split_horizontally(550);
    let systems: [(&str, RGBColor); 2] = [("keelson", RGBColor(31, 119, 180)), ("etcd", RED)];
    type Metric = fn(&Point) -> f64;
    let panels: [(_, &str, &str, Metric); 2] = [
        (left, "Writes per second", "writes/s", |p| p.writes_per_s),
        (right, "p99 write latency", "p99 (ms)", |p| p.p99_ms),
    ];
    let max_clients = report.workload.clients.iter().copied().max().unwrap_or(1) as f64;
    for (area, title, label, metric) in panels {
        let top = report
            .points
            .iter()
            .map(metric)
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (0.8_f64..max_clients * 1.25).log_scale(),
                0.0_f64..top.max(1.0),
            )
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("concurrent clients")
            .y_desc(label)
            .draw()
            .map_err(plot_err)?;
        for (system, color) in systems {
            let series: Vec<(f64, f64)> = report
                .points
                .iter()
                .filter(|p| p.system == system)
                .map(|p| (p.clients as f64, metric(p)))
                .collect();
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(system)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    series
                        .into_iter()
                        .map(|xy| Circle::new(xy, 4, color.filled())),
                )
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}
