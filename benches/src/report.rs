//! A benchmark report: rows of p50/p99 figures per runtime, the ratio of
//! each to a baseline runtime measured in the same run, written as a
//! Markdown table and as an SVG plot (p50 bars with p99 whiskers; no
//! system fonts needed).

use std::fmt::Write as _;
use std::time::Duration;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{fmt_duration, percentile_of};

/// What a row's numbers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Durations, kept in microseconds.
    Time,
    /// Memory, kept in KiB.
    Memory,
}

/// p50, p99, min and max of one figure, in the row's unit (µs or KiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub runs: usize,
    pub p50: u64,
    pub p99: u64,
    pub min: u64,
    pub max: u64,
}

impl Stats {
    /// Nearest-rank p50/p99 of `samples`; None when there are none.
    pub fn of(samples: &[u64]) -> Option<Stats> {
        Some(Stats {
            runs: samples.len(),
            p50: percentile_of(samples, 50.0)?,
            p99: percentile_of(samples, 99.0)?,
            min: samples.iter().min().copied()?,
            max: samples.iter().max().copied()?,
        })
    }

    pub fn of_durations(samples: &[Duration]) -> Option<Stats> {
        let us: Vec<u64> = samples.iter().map(|d| d.as_micros() as u64).collect();
        Stats::of(&us)
    }
}

/// One figure for one runtime.
#[derive(Debug, Clone)]
pub struct Row {
    /// The figure, e.g. "ctr run --rm busybox true"; rows of one figure
    /// are compared with each other.
    pub figure: String,
    pub runtime: String,
    pub unit: Unit,
    /// None: no run succeeded.
    pub stats: Option<Stats>,
    pub planned: usize,
    /// Failures, timeouts, or why the figure could not be measured.
    pub note: String,
}

impl Row {
    pub fn new(figure: &str, runtime: &str, unit: Unit, samples: &[u64], planned: usize) -> Row {
        Row {
            figure: figure.into(),
            runtime: runtime.into(),
            unit,
            stats: Stats::of(samples),
            planned,
            note: String::new(),
        }
    }

    pub fn times(figure: &str, runtime: &str, samples: &[Duration], planned: usize) -> Row {
        Row {
            stats: Stats::of_durations(samples),
            ..Row::new(figure, runtime, Unit::Time, &[], planned)
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    fn value(&self, v: u64) -> String {
        match self.unit {
            Unit::Time => fmt_duration(Duration::from_micros(v)),
            Unit::Memory => fmt_kib(v),
        }
    }
}

/// KiB for a table: MiB with one decimal from 1 MiB up.
pub fn fmt_kib(kib: u64) -> String {
    if kib >= 1024 {
        format!("{:.1} MiB", kib as f64 / 1024.0)
    } else {
        format!("{kib} KiB")
    }
}

/// `a / b` as "3.2x"; "n/a" when b is zero.
pub fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        return "n/a".into();
    }
    let r = a as f64 / b as f64;
    if r >= 10.0 {
        format!("{r:.0}x")
    } else {
        format!("{r:.2}x")
    }
}

pub struct Report {
    pub title: String,
    /// Lines under the title: platform, load, counts.
    pub header: Vec<String>,
    pub rows: Vec<Row>,
    /// The runtime every figure's ratios are taken against ("runc").
    pub baseline: String,
    /// Paragraphs after the table.
    pub notes: Vec<String>,
}

impl Report {
    /// The baseline's stats for `figure`, if it has a row with samples.
    fn baseline_of(&self, figure: &str) -> Option<Stats> {
        self.rows
            .iter()
            .find(|r| r.figure == figure && r.runtime == self.baseline)
            .and_then(|r| r.stats)
    }

    pub fn markdown(&self) -> String {
        let mut s = format!("# {}\n\n", self.title);
        for h in &self.header {
            let _ = writeln!(s, "- {h}");
        }
        let _ = writeln!(
            s,
            "\n| figure | runtime | runs | p50 | p99 | min | max | p50 / {b} | p99 / {b} | notes |",
            b = self.baseline
        );
        s.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
        for r in &self.rows {
            let runs = if r.stats.map(|s| s.runs) == Some(r.planned) {
                r.planned.to_string()
            } else {
                format!("{} of {}", r.stats.map(|s| s.runs).unwrap_or(0), r.planned)
            };
            let note = r.note.replace('|', "\\|").replace('\n', " ");
            match r.stats {
                Some(st) => {
                    let (r50, r99) = match self.baseline_of(&r.figure) {
                        Some(b) => (ratio(st.p50, b.p50), ratio(st.p99, b.p99)),
                        None => ("n/a".into(), "n/a".into()),
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {runs} | {} | {} | {} | {} | {r50} | {r99} | {note} |",
                        r.figure,
                        r.runtime,
                        r.value(st.p50),
                        r.value(st.p99),
                        r.value(st.min),
                        r.value(st.max),
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {runs} | - | - | - | - | - | - | {} |",
                        r.figure,
                        r.runtime,
                        if note.is_empty() {
                            "no successful run".to_string()
                        } else {
                            note
                        }
                    );
                }
            }
        }
        for n in &self.notes {
            let _ = write!(s, "\n{n}\n");
        }
        s
    }

    /// The plot: one panel of time figures (log scale) and, if there are
    /// memory rows, one of memory figures; a bar to p50 and a whisker to
    /// p99 for every row with samples.
    pub fn svg(&self) -> Result<String, String> {
        let times: Vec<&Row> = self.rows.iter().filter(|r| r.unit == Unit::Time).collect();
        let mem: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.unit == Unit::Memory)
            .collect();
        let row_px = 26u32;
        let top = 60u32;
        let h_times = top + row_px * times.len().max(1) as u32 + 50;
        let h_mem = if mem.is_empty() {
            0
        } else {
            top + row_px * mem.len() as u32 + 50
        };
        let width = 1100u32;
        let mut out = String::new();
        {
            let root =
                SVGBackend::with_string(&mut out, (width, h_times + h_mem)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let (a, b) = root.split_vertically(h_times);
            panel(
                &a,
                &format!(
                    "{}: time, bar to p50, whisker to p99 (log scale)",
                    self.title
                ),
                &times,
                true,
            )?;
            if !mem.is_empty() {
                panel(
                    &b,
                    "memory per idle sandbox: bar to p50, whisker to p99",
                    &mem,
                    false,
                )?;
            }
            root.present().map_err(|e| e.to_string())?;
        }
        Ok(out)
    }
}

fn color_of(runtime: &str) -> RGBColor {
    if runtime.starts_with("thaw") && runtime.contains("cold") {
        RGBColor(150, 110, 200)
    } else if runtime.starts_with("thaw") {
        RGBColor(40, 110, 200)
    } else if runtime.starts_with("runsc") || runtime.contains("gVisor") {
        RGBColor(60, 160, 90)
    } else {
        RGBColor(220, 120, 40)
    }
}

/// Converts a row's unit to what the panel plots: ms or MiB.
fn scaled(r: &Row, v: u64) -> f64 {
    match r.unit {
        Unit::Time => v as f64 / 1000.0,
        Unit::Memory => v as f64 / 1024.0,
    }
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    rows: &[&Row],
    log: bool,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    let values: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.stats.map(|s| (r, s)))
        .flat_map(|(r, s)| [scaled(r, s.p50), scaled(r, s.p99)])
        .collect();
    let hi = values.iter().cloned().fold(1.0, f64::max);
    let lo = values.iter().cloned().fold(hi, f64::min);
    let n = rows.len().max(1);
    // Bottom to top: the y axis counts upwards.
    let labels: Vec<String> = rows
        .iter()
        .rev()
        .map(|r| format!("{}: {}", r.figure, r.runtime))
        .collect();
    let unit = if log { "ms" } else { "MiB" };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(440);
    // Bars start at the axis: for a log axis, a decade under the smallest.
    if log {
        let x0 = 10f64.powf((lo.max(0.01)).log10().floor());
        // Room right of the largest whisker for its label.
        let x1 = 10f64.powf((hi * 8.0).log10().ceil()).max(x0 * 10.0);
        let mut chart = builder
            .build_cartesian_2d((x0..x1).log_scale(), (0..n).into_segmented())
            .map_err(err)?;
        mesh(&mut chart, &labels, unit)?;
        bars(&mut chart, rows, x0)?;
    } else {
        let x1 = hi * 1.4;
        let mut chart = builder
            .build_cartesian_2d(0f64..x1, (0..n).into_segmented())
            .map_err(err)?;
        mesh(&mut chart, &labels, unit)?;
        bars(&mut chart, rows, 0.0)?;
    }
    Ok(())
}

type Chart<'a, 'b, X> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<
        X,
        plotters::coord::ranged1d::SegmentedCoord<plotters::coord::types::RangedCoordusize>,
    >,
>;

fn mesh<X>(chart: &mut Chart<'_, '_, X>, labels: &[String], unit: &str) -> Result<(), String>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let fmt = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(labels.len())
        .y_label_formatter(&fmt)
        .x_desc(unit)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())
}

fn bars<X>(chart: &mut Chart<'_, '_, X>, rows: &[&Row], x0: f64) -> Result<(), String>
where
    X: Ranged<ValueType = f64>,
{
    // The first row on top, as in the table.
    let n = rows.len();
    for (k, r) in rows.iter().enumerate() {
        let i = n - 1 - k;
        let Some(s) = r.stats else {
            chart
                .draw_series(std::iter::once(Text::new(
                    "no successful run (see the table)",
                    (x0, SegmentValue::CenterOf(i)),
                    ("sans-serif", 12),
                )))
                .map_err(|e| e.to_string())?;
            continue;
        };
        let c = color_of(&r.runtime);
        let (p50, p99) = (scaled(r, s.p50), scaled(r, s.p99));
        let mut bar = Rectangle::new(
            [
                (x0, SegmentValue::Exact(i)),
                (p50, SegmentValue::Exact(i + 1)),
            ],
            c.filled(),
        );
        bar.set_margin(4, 4, 0, 0);
        chart
            .draw_series(std::iter::once(bar))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![
                    (p50, SegmentValue::CenterOf(i)),
                    (p99, SegmentValue::CenterOf(i)),
                ],
                BLACK.stroke_width(2),
            )))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(std::iter::once(Text::new(
                if s.p99 == s.p50 {
                    r.value(s.p50)
                } else {
                    format!("{} / {}", r.value(s.p50), r.value(s.p99))
                },
                (p99, SegmentValue::CenterOf(i)),
                ("sans-serif", 12),
            )))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        Report {
            title: "startup (test)".into(),
            header: vec!["platform: test".into()],
            rows: vec![
                Row::times("ctr run", "runc", &ms(&[100, 200, 300]), 3),
                Row::times("ctr run", "thaw restore", &ms(&[400, 600]), 3).with_note("1 failed"),
                Row::times("ctr run", "runsc", &[], 3).with_note("exit 1 | create failed"),
                Row::new("idle memory", "thaw", Unit::Memory, &[2048, 4096], 2),
            ],
            baseline: "runc".into(),
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn the_table_has_ratios_to_the_baseline_and_counts_failures() {
        let md = report().markdown();
        assert!(
            md.starts_with("# startup (test)\n\n- platform: test\n"),
            "{md}"
        );
        assert!(
            md.contains("| ctr run | thaw restore | 2 of 3 | 400.0 ms | 600.0 ms | 400.0 ms | 600.0 ms | 2.00x | 2.00x | 1 failed |"),
            "{md}"
        );
        assert!(md.contains("| ctr run | runc | 3 | 200.0 ms |"), "{md}");
        assert!(
            md.contains(
                "| ctr run | runsc | 0 of 3 | - | - | - | - | - | - | exit 1 \\| create failed |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| idle memory | thaw | 2 | 2.0 MiB | 4.0 MiB |"),
            "{md}"
        );
        assert!(md.contains("| n/a | n/a |"), "{md}");
        assert!(md.ends_with("\na note\n"), "{md}");
    }

    #[test]
    fn the_plot_is_an_svg_with_every_row_labelled() {
        let svg = report().svg().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("ctr run: thaw restore"));
        assert!(svg.contains("idle memory: thaw"));
        assert!(svg.contains("</svg>"));
    }

    #[test]
    fn ratios_and_sizes_read_well() {
        assert_eq!(ratio(300, 100), "3.00x");
        assert_eq!(ratio(1500, 100), "15x");
        assert_eq!(ratio(1, 0), "n/a");
        assert_eq!(fmt_kib(512), "512 KiB");
        assert_eq!(fmt_kib(1536), "1.5 MiB");
    }
}
