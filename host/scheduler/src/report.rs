//! `slinfer simulate --html`: one self-contained page with a run's settings,
//! its summary table and its figures (the SVGs of [`crate::svg`], inline).
//! Nothing is loaded from anywhere else: no script, no stylesheet link.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::sim::SimResult;
use crate::svg::{escape, figures};
use crate::sweep::{TABLE_HEADERS, table_row};

const STYLE: &str = "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;\
color:#1d2430;max-width:1100px;margin:24px auto;padding:0 16px}\
h1{font-size:22px}h2{font-size:16px;margin-top:28px}\
table{border-collapse:collapse}th,td{padding:4px 10px;border-bottom:1px solid #e3e6eb;white-space:nowrap}\
th{text-align:left;color:#6b7280;font-size:12px}td.num{text-align:right;font-variant-numeric:tabular-nums}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px}dt{color:#6b7280}dd{margin:0}\
figure{margin:20px 0}figcaption{font-weight:600;margin-bottom:6px}svg{max-width:100%;height:auto}";

/// The page: `settings` as (name, value) pairs, then the summary of every
/// run in `results`, `capacity` (policy, models) when it was a sweep, and
/// the figures.
pub fn html(
    settings: &[(&str, String)],
    results: &[SimResult],
    capacity: Option<(f64, &BTreeMap<String, usize>)>,
) -> String {
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>slinfer simulate report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>slinfer simulate report</h1>\n<h2>Settings</h2>\n<dl>\n"
    );
    for (name, value) in settings {
        let _ = writeln!(page, "<dt>{}</dt><dd>{}</dd>", escape(name), escape(value));
    }
    page.push_str("</dl>\n<h2>Summary</h2>\n<table id=\"summary\">\n<thead><tr>");
    for h in TABLE_HEADERS {
        let _ = write!(page, "<th>{}</th>", escape(h));
    }
    page.push_str("</tr></thead>\n<tbody>\n");
    for r in results {
        page.push_str("<tr>");
        for (i, cell) in table_row(&r.summary).iter().enumerate() {
            let class = if i == 0 { "" } else { " class=\"num\"" };
            let _ = write!(page, "<td{class}>{}</td>", escape(cell));
        }
        page.push_str("</tr>\n");
    }
    page.push_str("</tbody>\n</table>\n");
    if let Some((threshold, capacity)) = capacity {
        let _ = writeln!(
            page,
            "<h2>Capacity</h2>\n<p>Most models served with SLO attainment at least {threshold}:</p>\n<ul>"
        );
        for (policy, models) in capacity {
            let _ = writeln!(page, "<li>{}: {models}</li>", escape(policy));
        }
        page.push_str("</ul>\n");
    }
    page.push_str("<h2>Figures</h2>\n");
    for f in figures(results) {
        let _ = writeln!(
            page,
            "<figure>\n<figcaption>{}</figcaption>\n{}\n</figure>",
            escape(f.caption),
            f.svg
        );
    }
    page.push_str("</body>\n</html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Policy;
    use crate::sim::{RequestRecord, Summary};

    fn result(policy: Policy, models: usize) -> SimResult {
        SimResult {
            summary: Summary {
                policy,
                preempt_keeps_kv: false,
                model: "m".into(),
                models,
                gpus: 1,
                cpus: 1,
                requests: 10,
                completed: 9,
                slo_met: 7,
                slo_attainment: 0.7,
                dropped: 1,
                dropped_by_reason: Default::default(),
                ttft_p50_s: Some(0.2),
                ttft_p99_s: Some(0.5),
                tpot_p50_s: None,
                tpot_p99_s: None,
                decode_tokens_per_node_s: 0.0,
                avg_nodes_in_use: 1.0,
                cold_starts: 1,
                preemptions: 0,
                preempted_requests: 0,
                memory_violations: 0,
                end_violations: 0,
                held_bytes_at_end: 0,
                makespan_s: 1.0,
                nodes: Vec::new(),
                by_kind: Default::default(),
                cluster: None,
                routing_retries: 0,
            },
            per_request: [0.1, 0.2, 0.5]
                .into_iter()
                .enumerate()
                .map(|(index, ttft)| RequestRecord {
                    index,
                    function: 0,
                    arrival_s: index as f64,
                    input_tokens: 100,
                    output_tokens: 10,
                    outcome: "met",
                    reason: None,
                    ttft_s: Some(ttft),
                    tpot_s: Some(0.05),
                    load_delay_s: 0.0,
                    device: Some("gpu"),
                })
                .collect(),
        }
    }

    #[test]
    fn the_page_holds_settings_table_and_figures_and_escapes_text() {
        let results = [
            result(Policy::Sllm, 2),
            result(Policy::Slinfer, 2),
            result(Policy::Sllm, 4),
            result(Policy::Slinfer, 4),
        ];
        let capacity = BTreeMap::from([("slinfer".to_string(), 4), ("sllm".to_string(), 2)]);
        let page = html(
            &[("trace", "<a&b>\"x\".json".to_string())],
            &results,
            Some((0.9, &capacity)),
        );
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("<title>slinfer simulate report</title>"));
        assert!(page.contains("&lt;a&amp;b&gt;&quot;x&quot;.json"));
        assert!(!page.contains("<a&b>"));
        assert_eq!(page.matches("<tr><td>").count(), 4);
        assert_eq!(
            page.matches("<figure>").count(),
            3,
            "goodput, nodes, TTFT CDF"
        );
        assert_eq!(page.matches("<svg").count(), 3);
        assert!(page.contains("<li>slinfer: 4</li>"));
        for external in ["src=", "href=", "https://", "<script", "<link"] {
            assert!(!page.contains(external), "{external}");
        }
        // The one address in it is the SVG namespace, which is not fetched.
        assert_eq!(
            page.matches("http://").count(),
            page.matches("xmlns=\"http://www.w3.org/2000/svg\"").count()
        );
        // One load: the TTFT CDF only.
        let single = html(&[], &results[..1], None);
        assert_eq!(single.matches("<figure>").count(), 1);
        assert!(!single.contains("Capacity"));
    }
}
