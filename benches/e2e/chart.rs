//! `chart.svg` (plotters): throughput ÷ direct, rr1 latency, proxy CPU per GiB, idle memory
//! per connection, pingup ping delay and throughput ÷ the floor relay, one bar per target.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::report::{target_label, Agg, Context};
use crate::scenarios::Scenario;
use crate::{Kind, Target};

const COLORS: [RGBColor; 7] = [
    RGBColor(90, 90, 90),
    RGBColor(148, 103, 189),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(140, 86, 75),
];

fn color_of(t: &Target, ctx: &Context) -> RGBColor {
    let i = ctx.targets.iter().position(|x| x == t).unwrap_or(0);
    COLORS[i % COLORS.len()]
}

type Panel<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// A grouped bar panel: one group per label, one bar per series; `hline` draws a reference.
fn bars(
    area: &Panel<'_>,
    title: &str,
    y_desc: &str,
    groups: &[String],
    series: &[(String, RGBColor, Vec<Option<f64>>)],
    hline: Option<f64>,
) -> Result<(), Box<dyn std::error::Error>> {
    let max = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().flatten().copied())
        .chain(hline)
        .fold(0.0f64, f64::max);
    // Headroom above the bars for the legend.
    let ymax = if max > 0.0 { max * 1.45 } else { 1.0 };
    let n = groups.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(62)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)?;
    let labels = groups.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&move |x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| short(*y))
        .y_desc(y_desc)
        .label_style(("sans-serif", 13))
        .draw()?;
    let k = series.len().max(1) as f64;
    let width = 0.84 / k;
    for (si, (name, color, values)) in series.iter().enumerate() {
        let color = *color;
        let rects: Vec<_> = values
            .iter()
            .enumerate()
            .filter_map(|(g, v)| {
                let v = (*v)?;
                let x0 = g as f64 - 0.42 + si as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, v)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(rects)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        let texts: Vec<_> = values
            .iter()
            .enumerate()
            .filter_map(|(g, v)| {
                let v = (*v)?;
                let x = g as f64 - 0.42 + (si as f64 + 0.45) * width;
                Some(Text::new(
                    short(v),
                    (x, v + ymax * 0.012),
                    ("sans-serif", 10).into_font().color(&BLACK).pos(
                        plotters::style::text_anchor::Pos::new(
                            plotters::style::text_anchor::HPos::Center,
                            plotters::style::text_anchor::VPos::Bottom,
                        ),
                    ),
                ))
            })
            .collect();
        chart.draw_series(texts)?;
    }
    if let Some(h) = hline {
        chart.draw_series(LineSeries::new(
            vec![(-0.5, h), (n as f64 - 0.5, h)],
            BLACK.stroke_width(1),
        ))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn chart(
    path: &Path,
    ctx: &Context,
    aggs: &BTreeMap<(Scenario, Target), Agg>,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1400, 1450)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "shardproxy vs HAProxy vs floor relay vs direct — {} ({} rounds, medians)",
            ctx.date, ctx.rounds
        ),
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((3, 2));
    let proxies: Vec<Target> = ctx
        .targets
        .iter()
        .copied()
        .filter(|t| t.kind != Kind::Direct)
        .collect();
    let label = |t: &Target| target_label(t, aggs);
    let get =
        |sc: Scenario, t: &Target, f: &dyn Fn(&Agg) -> Option<f64>| aggs.get(&(sc, *t)).and_then(f);

    // (a) throughput ratios.
    let tput: Vec<Scenario> = [
        Scenario::Bulk1,
        Scenario::Echo1,
        Scenario::Pingup,
        Scenario::Rr32,
        Scenario::Rr1,
        Scenario::Cps32,
    ]
    .into_iter()
    .filter(|s| ctx.scenarios.contains(s))
    .collect();
    let series: Vec<_> = proxies
        .iter()
        .map(|t| {
            (
                label(t),
                color_of(t, ctx),
                tput.iter().map(|s| get(*s, t, &|a| a.ratio)).collect(),
            )
        })
        .collect();
    bars(
        &panels[0],
        "throughput ÷ direct (higher is better; line = direct)",
        "× direct",
        &tput
            .iter()
            .map(|s| s.name().to_string())
            .collect::<Vec<_>>(),
        &series,
        Some(1.0),
    )?;

    // (b) rr1 latency percentiles.
    let mut groups = Vec::new();
    let mut cols: Vec<usize> = Vec::new();
    if ctx.scenarios.contains(&Scenario::Rr1) {
        // p99.9 is in results.md: on a shared machine it is scheduler noise and would
        // flatten the p50 bars.
        for (i, p) in ["p50", "p99"].iter().enumerate() {
            groups.push(format!("rr1 {p}"));
            cols.push(i);
        }
    }
    let series: Vec<_> = ctx
        .targets
        .iter()
        .map(|t| {
            (
                label(t),
                color_of(t, ctx),
                cols.iter()
                    .map(|i| get(Scenario::Rr1, t, &|a| a.lat[*i]))
                    .collect(),
            )
        })
        .collect();
    bars(
        &panels[1],
        "rr1 request latency, one connection (lower is better)",
        "µs",
        &groups,
        &series,
        None,
    )?;

    // (c) CPU per GiB.
    let cpu_sc: Vec<Scenario> = [Scenario::Bulk1, Scenario::Echo1, Scenario::Pingup]
        .into_iter()
        .filter(|s| ctx.scenarios.contains(s))
        .collect();
    let series: Vec<_> = proxies
        .iter()
        .map(|t| {
            (
                label(t),
                color_of(t, ctx),
                cpu_sc
                    .iter()
                    .map(|s| get(*s, t, &|a| a.cpu_per_gib))
                    .collect(),
            )
        })
        .collect();
    bars(
        &panels[2],
        "proxy CPU seconds per GiB forwarded (lower is better)",
        "CPU s / GiB",
        &cpu_sc
            .iter()
            .map(|s| s.name().to_string())
            .collect::<Vec<_>>(),
        &series,
        None,
    )?;

    // (d) idle memory per connection (the floor relay does not run idle).
    let series: Vec<_> = proxies
        .iter()
        .filter(|t| crate::runs_for(Scenario::Idle, t))
        .map(|t| {
            (
                label(t),
                color_of(t, ctx),
                vec![get(Scenario::Idle, t, &|a| {
                    a.rss_per_conn.map(|b| b / 1024.0)
                })],
            )
        })
        .collect();
    bars(
        &panels[3],
        &format!(
            "idle: proxy RSS per connection, {} conns (lower is better; line = 2 KiB goal)",
            ctx.settings.idle_conns
        ),
        "KiB / connection",
        &["idle".to_string()],
        &series,
        Some(2.0),
    )?;

    // (e) pingup ping delay.
    let mut groups = Vec::new();
    let mut cols: Vec<usize> = Vec::new();
    if ctx.scenarios.contains(&Scenario::Pingup) {
        for (i, p) in ["p50", "p99", "max"].iter().enumerate() {
            groups.push(format!("ping {p}"));
            cols.push(i);
        }
    }
    let series: Vec<_> = ctx
        .targets
        .iter()
        .map(|t| {
            (
                label(t),
                color_of(t, ctx),
                cols.iter()
                    .map(|i| get(Scenario::Pingup, t, &|a| a.ping[*i].map(|us| us / 1000.0)))
                    .collect(),
            )
        })
        .collect();
    bars(
        &panels[4],
        "pingup: 20 ms pings backend → client during a flat-out upload, delay (lower is better)",
        "ms",
        &groups,
        &series,
        None,
    )?;

    // (f) throughput ÷ the floor relay.
    let vs_floor: Vec<Scenario> = if ctx.targets.iter().any(|t| t.kind == Kind::Floor) {
        tput.clone()
    } else {
        Vec::new()
    };
    let series: Vec<_> = proxies
        .iter()
        .filter(|t| t.kind != Kind::Floor)
        .map(|t| {
            (
                label(t),
                color_of(t, ctx),
                vs_floor
                    .iter()
                    .map(|s| get(*s, t, &|a| a.floor_ratio))
                    .collect(),
            )
        })
        .collect();
    bars(
        &panels[5],
        "throughput ÷ floor relay (higher is better; line = floor)",
        "× floor",
        &vs_floor
            .iter()
            .map(|s| s.name().to_string())
            .collect::<Vec<_>>(),
        &series,
        Some(1.0),
    )?;
    root.present()?;
    Ok(())
}
