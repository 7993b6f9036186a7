//! Small hand-written SVG charts: a line chart (NLL against position), the same with markers
//! and a Pareto front (quality against KV memory), and accuracy heatmaps.
//! No plotting dependency: the charts are a few rectangles, lines and labels.

use std::fmt::Write;

const PALETTE: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
const DASHES: &[&str] = &["", "6,3", "2,2", "8,3,2,3"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// About `n` round tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).abs().max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.round() {
        format!("{v:.0}")
    } else if (v * 10.0).round() == v * 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One line of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart with axes, ticks, grid, a legend on the right and a title.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    chart(title, x_label, y_label, series, false, &[])
}

/// The line chart with a marker at every point, and `front` (points sorted by x) drawn over
/// the series as a thick dashed black line through hollow rings, labelled "Pareto front".
pub fn frontier_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    front: &[(f64, f64)],
) -> String {
    chart(title, x_label, y_label, series, true, front)
}

fn chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    markers: bool,
    front: &[(f64, f64)],
) -> String {
    let (w, h) = (960.0, 540.0);
    let (left, right, top, bottom) = (70.0, 250.0, 50.0, 60.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| p.0.is_finite() && p.1.is_finite())
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in finite() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    x0 = x0.min(0.0);
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    y0 -= pad;
    y1 += pad;
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if markers {
        // Room for the rightmost marker and its ring.
        x1 += (x1 - x0) * 0.03;
    }
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        // Centred on the whole image, not the plot area: long titles overflowed the left edge.
        r#"<text x="{}" y="28" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for t in ticks(y0, y1, 6) {
        let y = sy(t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    for t in ticks(x0, x1, 8) {
        let x = sx(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{}" stroke="#e4e4e4"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 18.0,
            fmt_tick(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 15.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    );
    for (i, ser) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let dash = DASHES[(i / PALETTE.len()) % DASHES.len()];
        let pts: Vec<String> = ser
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" stroke-dasharray="{dash}" points="{}"/>"#,
            pts.join(" ")
        );
        let ly = top + 10.0 + i as f64 * 20.0;
        let lx = left + pw + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2.5" stroke-dasharray="{dash}"/><text x="{}" y="{}">{}</text>"#,
            lx + 28.0,
            lx + 34.0,
            ly + 4.0,
            esc(&ser.label)
        );
        if markers {
            for &(x, y) in ser
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
            {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"#,
                    sx(x),
                    sy(y)
                );
            }
        }
    }
    let front: Vec<(f64, f64)> = front
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if !front.is_empty() {
        let pts: Vec<String> = front
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="black" stroke-width="2.5" stroke-dasharray="7,4" points="{}"/>"#,
            pts.join(" ")
        );
        for &(x, y) in &front {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="7" fill="none" stroke="black" stroke-width="1.8"/>"#,
                sx(x),
                sy(y)
            );
        }
        let ly = top + 10.0 + series.len() as f64 * 20.0;
        let lx = left + pw + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="black" stroke-width="2.5" stroke-dasharray="7,4"/><text x="{}" y="{}">Pareto front</text>"#,
            lx + 28.0,
            lx + 34.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// One heatmap panel: `values[row][col]` in [0, 1] (NaN: not measured).
pub struct Heatmap {
    pub title: String,
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    pub values: Vec<Vec<f64>>,
}

/// Panels side by side (wrapping after four), white (0) to dark green (1), each cell labelled
/// with its value in percent.
pub fn heatmaps(title: &str, row_label: &str, col_label: &str, panels: &[Heatmap]) -> String {
    let cell = 52.0;
    let per_row = panels.len().clamp(1, 4);
    let n_rows_grid = panels.len().div_ceil(per_row).max(1);
    let max_r = panels.iter().map(|p| p.rows.len()).max().unwrap_or(1) as f64;
    let max_c = panels.iter().map(|p| p.cols.len()).max().unwrap_or(1) as f64;
    let pw = 80.0 + max_c * cell + 30.0;
    let ph = 50.0 + max_r * cell + 50.0;
    let w = per_row as f64 * pw + 20.0;
    let h = 50.0 + n_rows_grid as f64 * ph + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="26" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for (k, p) in panels.iter().enumerate() {
        let ox = 10.0 + (k % per_row) as f64 * pw + 80.0;
        let oy = 50.0 + (k / per_row) as f64 * ph + 40.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-weight="bold">{}</text>"#,
            ox + p.cols.len() as f64 * cell / 2.0,
            oy - 12.0,
            esc(&p.title)
        );
        for (r, rl) in p.rows.iter().enumerate() {
            let y = oy + r as f64 * cell;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                ox - 6.0,
                y + cell / 2.0 + 4.0,
                esc(rl)
            );
            for (c, _) in p.cols.iter().enumerate() {
                let x = ox + c as f64 * cell;
                let v = p
                    .values
                    .get(r)
                    .and_then(|row| row.get(c))
                    .copied()
                    .unwrap_or(f64::NAN);
                let (fill, label, ink) = if v.is_finite() {
                    let t = v.clamp(0.0, 1.0);
                    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
                    let fill = format!(
                        "#{:02x}{:02x}{:02x}",
                        mix(255.0, 0.0),
                        mix(255.0, 104.0),
                        mix(255.0, 55.0)
                    );
                    let ink = if t > 0.55 { "white" } else { "black" };
                    (fill, format!("{:.0}", v * 100.0), ink)
                } else {
                    ("#dddddd".to_string(), "–".to_string(), "black")
                };
                let _ = writeln!(
                    s,
                    r##"<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="#999"/><text x="{}" y="{}" text-anchor="middle" fill="{ink}">{label}</text>"##,
                    x + cell / 2.0,
                    y + cell / 2.0 + 4.0
                );
            }
        }
        for (c, cl) in p.cols.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                ox + c as f64 * cell + cell / 2.0,
                oy + p.rows.len() as f64 * cell + 16.0,
                esc(cl)
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">{}</text><text x="{}" y="{}" text-anchor="middle" fill="#555" transform="rotate(-90 {} {})">{}</text>"##,
            ox + p.cols.len() as f64 * cell / 2.0,
            oy + p.rows.len() as f64 * cell + 34.0,
            esc(col_label),
            ox - 60.0,
            oy + p.rows.len() as f64 * cell / 2.0,
            ox - 60.0,
            oy + p.rows.len() as f64 * cell / 2.0,
            // A rotated label longer than its panel runs into the panels above and below.
            esc(
                if (p.rows.len() as f64 * cell) < 7.0 * row_label.len() as f64 {
                    "tokens"
                } else {
                    row_label
                }
            )
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="10" y="{}" fill="#555">cell = exact-match accuracy in %, white 0 → green 100</text>"##,
        h - 10.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let t = ticks(0.0, 4096.0, 8);
        assert_eq!(t[0], 0.0);
        assert!(t.iter().all(|v| v % 500.0 == 0.0));
        assert!(*t.last().unwrap_or(&0.0) >= 3500.0);
    }

    #[test]
    fn charts_are_well_formed_svg() {
        let svg = line_chart(
            "t <x>",
            "pos",
            "nll",
            &[Series {
                label: "a&b".into(),
                points: vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a&amp;b") && svg.contains("t &lt;x&gt;"));
        let hm = heatmaps(
            "h",
            "len",
            "depth",
            &[Heatmap {
                title: "p".into(),
                rows: vec!["1024".into()],
                cols: vec!["0.1".into(), "0.5".into()],
                values: vec![vec![1.0, f64::NAN]],
            }],
        );
        assert!(hm.contains(">100<") && hm.contains("#dddddd"));
        let fr = frontier_chart(
            "f",
            "MiB",
            "ppl",
            &[Series {
                label: "none".into(),
                points: vec![(7.0, 20.0), (14.0, 17.0)],
            }],
            &[(7.0, 20.0), (14.0, 17.0)],
        );
        assert!(fr.starts_with("<svg") && fr.trim_end().ends_with("</svg>"));
        // Two filled markers, two front rings, and the front's legend entry.
        assert_eq!(fr.matches("r=\"3.5\"").count(), 2);
        assert_eq!(fr.matches("r=\"7\"").count(), 2);
        assert!(fr.contains("Pareto front"));
    }
}
