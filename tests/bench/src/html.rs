//! `target/bench/report.html`: the report's charts (plotters, SVG backend, inline) and its
//! tables. Per row: our median and QEMU's as bars, every round as a dot, the spread of the
//! rounds as a whisker; the ratio chart shows ours/QEMU per round.

use plotters::prelude::*;

use crate::report::{median, GuestRow, Report};

const OURS: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const QEMU: RGBColor = RGBColor(0xd6, 0x27, 0x28);

/// One group of a bar chart: a label, our values (one per round), QEMU's.
pub struct Group<'a> {
    /// X-axis label.
    pub label: &'a str,
    /// Our values, one per round.
    pub ours: &'a [f64],
    /// QEMU's values, one per round.
    pub qemu: &'a [f64],
}

fn min_max(v: &[f64]) -> Option<(f64, f64)> {
    let mut it = v.iter().copied().filter(|x| x.is_finite());
    let first = it.next()?;
    Some(it.fold((first, first), |(a, b), x| (a.min(x), b.max(x))))
}

/// A grouped bar chart (ours and QEMU per group) as an SVG document.
pub fn bar_chart(title: &str, unit: &str, groups: &[Group]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let width = (140 + groups.len() * 120).max(520) as u32;
        let root = SVGBackend::with_string(&mut svg, (width, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let top = groups
            .iter()
            .flat_map(|g| g.ours.iter().chain(g.qemu))
            .copied()
            .filter(|x| x.is_finite())
            .fold(0.0f64, f64::max);
        let top = if top > 0.0 { top * 1.15 } else { 1.0 };
        let n = groups.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
            .map_err(|e| e.to_string())?;
        let label = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                groups
                    .get(i as usize)
                    .map(|g| g.label.to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&label)
            .y_desc(unit)
            .draw()
            .map_err(|e| e.to_string())?;
        for (side, color, name) in [(-1.0, OURS, "ours"), (1.0, QEMU, "QEMU")] {
            fn values<'a>(g: &Group<'a>, side: f64) -> &'a [f64] {
                if side < 0.0 {
                    g.ours
                } else {
                    g.qemu
                }
            }
            let bars: Vec<_> = groups
                .iter()
                .enumerate()
                .filter_map(|(i, g)| {
                    let m = median(values(g, side))?;
                    let x = i as f64 + side * 0.2;
                    Some(Rectangle::new(
                        [(x - 0.17, 0.0), (x + 0.17, m)],
                        color.mix(0.55).filled(),
                    ))
                })
                .collect();
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            let whiskers: Vec<_> = groups
                .iter()
                .enumerate()
                .filter_map(|(i, g)| {
                    let (lo, hi) = min_max(values(g, side))?;
                    let x = i as f64 + side * 0.2;
                    Some(PathElement::new(
                        vec![(x, lo), (x, hi)],
                        BLACK.stroke_width(1),
                    ))
                })
                .collect();
            chart.draw_series(whiskers).map_err(|e| e.to_string())?;
            let dots: Vec<_> = groups
                .iter()
                .enumerate()
                .flat_map(|(i, g)| {
                    let x = i as f64 + side * 0.2;
                    values(g, side)
                        .iter()
                        .filter(|v| v.is_finite())
                        .map(move |&v| Circle::new((x, v), 3, BLACK.filled()))
                        .collect::<Vec<_>>()
                })
                .collect();
            chart.draw_series(dots).map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// ours/QEMU per row: the median ratio as a bar, each round's ratio as a dot, 1.0 as a line.
pub fn ratio_chart(title: &str, rows: &[&GuestRow]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let width = (140 + rows.len() * 60).max(520) as u32;
        let root = SVGBackend::with_string(&mut svg, (width, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let top = rows
            .iter()
            .flat_map(|r| r.paired.iter().copied().chain(r.ratio()))
            .filter(|x| x.is_finite())
            .fold(1.0f64, f64::max)
            * 1.15;
        let n = rows.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.5f64..(n as f64 + 0.5), 0f64..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 {
                    format!("{i}")
                } else {
                    String::new()
                }
            })
            .y_desc("ours / QEMU (better side > 1 for rates)")
            .draw()
            .map_err(|e| e.to_string())?;
        let bars: Vec<_> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let m = r.ratio()?;
                let x = i as f64 + 1.0;
                Some(Rectangle::new(
                    [(x - 0.3, 0.0), (x + 0.3, m)],
                    OURS.mix(0.55).filled(),
                ))
            })
            .collect();
        chart.draw_series(bars).map_err(|e| e.to_string())?;
        let dots: Vec<_> = rows
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                r.paired
                    .iter()
                    .filter(|v| v.is_finite())
                    .map(move |&v| Circle::new((i as f64 + 1.0, v), 3, BLACK.filled()))
                    .collect::<Vec<_>>()
            })
            .collect();
        chart.draw_series(dots).map_err(|e| e.to_string())?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.5, 1.0), (n as f64 + 0.5, 1.0)],
                QEMU.stroke_width(1),
            )))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn figure(out: &mut String, chart: Result<String, String>) {
    match chart {
        Ok(svg) => {
            // Drop the XML prolog: the SVG is inline.
            let body = svg.find("<svg").map_or(svg.as_str(), |i| &svg[i..]);
            out.push_str("<div class=\"chart\">");
            out.push_str(body);
            out.push_str("</div>\n");
        }
        Err(e) => out.push_str(&format!("<p>chart failed: {}</p>\n", esc(&e))),
    }
}

/// The whole page.
pub fn page(r: &Report) -> String {
    let mut s = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>make bench</title>\
         <style>body{font-family:sans-serif;margin:1em 2em}.chart{margin:1em 0}\
         pre{font-size:12px;background:#f6f6f6;padding:1em;overflow-x:auto}</style>\
         </head><body>\n<h1>make bench: our vmm and QEMU on the same L2 guest</h1>\n",
    );
    s.push_str(&format!(
        "<p>{} (source {}). Where: {}. Bars: medians of {} round(s); dots: every round; \
         whiskers: the spread of the rounds. Under nesting absolute figures swing 2x or more \
         with the host's load: compare within a chart.</p>\n",
        esc(&r.date),
        esc(&r.revision),
        esc(&r.guest_where),
        r.runs
    ));
    let rows: Vec<&GuestRow> = r.guest.iter().collect();
    if !rows.is_empty() {
        s.push_str("<h2>ours / QEMU per headline figure</h2>\n<ol>");
        for g in &rows {
            s.push_str(&format!(
                "<li>{} ({}, {} is better)</li>",
                esc(&g.metric),
                g.unit,
                match g.better {
                    crate::report::Better::Higher => "higher",
                    crate::report::Better::Lower => "lower",
                }
            ));
        }
        s.push_str("</ol>\n");
        figure(
            &mut s,
            ratio_chart("ours / QEMU, per round (dots) and median (bar)", &rows),
        );
    }
    for mode in ["no vIOMMU", "vIOMMU lazy", "vIOMMU strict", "VT-d strict"] {
        for unit in ["IOPS", "MB/s"] {
            let suffix = format!(", {mode}");
            let sel: Vec<(&GuestRow, &str)> = r
                .workloads
                .iter()
                .filter(|w| w.unit == unit)
                .filter_map(|w| Some((w, w.metric.strip_suffix(&suffix)?)))
                .collect();
            if sel.is_empty() {
                continue;
            }
            let groups: Vec<Group> = sel
                .iter()
                .map(|(w, label)| Group {
                    label,
                    ours: &w.ours,
                    qemu: &w.qemu,
                })
                .collect();
            figure(
                &mut s,
                bar_chart(&format!("read workloads, {mode} ({unit})"), unit, &groups),
            );
        }
    }
    // MAPs and kicks (VT-d: invalidation submissions) per I/O, strict, ours against QEMU.
    let col = |name: &str| crate::PER_IO_COLUMNS.iter().position(|c| *c == name);
    for (name, mode) in [
        ("MAPs", "vIOMMU strict"),
        ("blk kicks", "vIOMMU strict"),
        ("MAPs", "VT-d strict"),
        ("VT-d QI submits", "VT-d strict"),
    ] {
        let Some(c) = col(name) else { continue };
        let mut labels: Vec<&str> = Vec::new();
        let mut ours: Vec<Vec<f64>> = Vec::new();
        let mut qemu: Vec<Vec<f64>> = Vec::new();
        for p in r.per_io.iter().filter(|p| p.mode == mode) {
            if !labels.contains(&p.workload.as_str()) {
                labels.push(&p.workload);
                ours.push(Vec::new());
                qemu.push(Vec::new());
            }
            let i = labels.len() - 1;
            if let Some(v) = p.values.get(c).copied().flatten() {
                if p.vmm == "ours" {
                    ours[i].push(v);
                } else {
                    qemu[i].push(v);
                }
            }
        }
        if labels.is_empty() {
            continue;
        }
        let groups: Vec<Group> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| Group {
                label: l,
                ours: &ours[i],
                qemu: &qemu[i],
            })
            .collect();
        figure(
            &mut s,
            bar_chart(
                &format!("{name} per I/O, {mode} (medians)"),
                &format!("{name} per read"),
                &groups,
            ),
        );
    }
    s.push_str("<h2>Tables</h2>\n<pre>");
    s.push_str(&esc(&r.markdown()));
    s.push_str("</pre>\n</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Better;

    #[test]
    fn charts_are_svg_with_one_bar_and_dot_per_value() {
        let ours = [10.0, 12.0, 11.0];
        let qemu = [5.0, 6.0];
        let g = [
            Group {
                label: "4k-rand-anon-qd1",
                ours: &ours,
                qemu: &qemu,
            },
            Group {
                label: "1m-seq-anon-qd1",
                ours: &[],
                qemu: &qemu,
            },
        ];
        let svg = bar_chart("t", "IOPS", &g).unwrap();
        assert!(svg.starts_with("<svg") || svg.contains("<svg"));
        assert!(svg.contains("4k-rand-anon-qd1") && svg.contains("IOPS"));
        // 3 + 2 + 2 dots of the rounds (legend markers are rectangles).
        assert_eq!(svg.matches("<circle").count(), 7);
        let row = GuestRow {
            metric: "m".into(),
            unit: "IOPS",
            better: Better::Higher,
            ours: ours.to_vec(),
            qemu: qemu.to_vec(),
            paired: vec![2.0, 2.0],
        };
        let svg = ratio_chart("r", &[&row]).unwrap();
        assert_eq!(svg.matches("<circle").count(), 2);
    }

    #[test]
    fn the_page_has_the_tables_and_escapes_text() {
        let r = Report {
            date: "<now>".into(),
            ..Default::default()
        };
        let p = page(&r);
        assert!(p.contains("&lt;now&gt;") && !p.contains("<now>"));
        assert!(p.contains("<pre>") && p.ends_with("</html>\n"));
    }
}
