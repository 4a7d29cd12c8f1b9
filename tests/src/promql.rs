//! Enough of PromQL to run a dashboard's queries against what the agents export: the series
//! each selector (`metric{label op "value", ...}`) matches, grouped by the `by (...)` labels of
//! the aggregation around it, for each branch of an `or`. Functions and arithmetic are not
//! evaluated: whether a panel shows data, and which groups it shows, is what its selectors and
//! groupings decide. Grafana variables (`$name`) are substituted first.

use std::collections::{BTreeMap, BTreeSet};

use regex::Regex;

/// One scraped series: its metric name and labels.
#[derive(Debug, Clone)]
pub struct Series {
    /// The metric name (`istio_tcp_sent_bytes_total`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// The series of `scrape`, each with the target labels `target` added (what Prometheus adds:
/// `pod`, ...).
pub fn series(scrape: &prometheus_parse::Scrape, target: &[(&str, &str)]) -> Vec<Series> {
    scrape
        .samples
        .iter()
        .map(|sample| Series {
            name: sample.metric.clone(),
            labels: sample
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain(target.iter().map(|(k, v)| (k.to_string(), v.to_string())))
                .collect(),
        })
        .collect()
}

/// A query with Grafana's `$variables` replaced by `values` (longest names first, so `$srcns`
/// is not read as `$srcn` + `s`).
pub fn substitute(query: &str, values: &[(&str, &str)]) -> String {
    let mut values = values.to_vec();
    values.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    values
        .iter()
        .fold(query.to_owned(), |query, (name, value)| {
            query.replace(&format!("${name}"), value)
        })
}

/// A label matcher.
#[derive(Debug)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

impl Matcher {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        // An absent label matches as the empty string, as in Prometheus.
        let value = labels.get(&self.label).map_or("", String::as_str);
        let anchored = || Regex::new(&format!("^(?:{})$", self.value)).expect("matcher regex");
        match self.op.as_str() {
            "=" => value == self.value,
            "!=" => value != self.value,
            "=~" => anchored().is_match(value),
            "!~" => !anchored().is_match(value),
            op => panic!("unknown matcher {op}"),
        }
    }
}

/// A selector: a metric name and its matchers.
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<Matcher>,
}

fn selectors(expression: &str) -> Vec<Selector> {
    let selector = Regex::new(r"\b(istio_[a-z_]+)\s*(?:\{([^}]*)\})?").expect("regex");
    let matcher = Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)""#)
        .expect("regex");
    selector
        .captures_iter(expression)
        .map(|c| Selector {
            metric: c[1].to_owned(),
            matchers: c.get(2).map_or_else(Vec::new, |m| {
                matcher
                    .captures_iter(m.as_str())
                    .map(|m| Matcher {
                        label: m[1].to_owned(),
                        op: m[2].to_owned(),
                        value: unescape(&m[3]),
                    })
                    .collect()
            }),
        })
        .collect()
}

/// A PromQL string literal's value: a backslash escapes the character after it.
fn unescape(literal: &str) -> String {
    let mut value = String::with_capacity(literal.len());
    let mut chars = literal.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            value.extend(chars.next());
        } else {
            value.push(c);
        }
    }
    value
}

fn groupings(expression: &str) -> Vec<String> {
    let by = Regex::new(r"\bby\s*\(([^)]*)\)").expect("regex");
    by.captures_iter(expression)
        .flat_map(|c| {
            c[1].split(',')
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every label a query's selectors and groupings name.
pub fn label_names(query: &str) -> BTreeSet<String> {
    selectors(query)
        .into_iter()
        .flat_map(|s| s.matchers.into_iter().map(|m| m.label))
        .chain(groupings(query))
        .collect()
}

/// What `query` returns from `series`: for each branch of its `or`s, the `by` labels (all of
/// them, if there is no `by`) of every series a selector of that branch matches. A branch
/// whose selectors do not all match returns nothing: its arithmetic (`a + b`) needs both sides.
pub fn groups(query: &str, series: &[Series]) -> BTreeSet<BTreeMap<String, String>> {
    let or = Regex::new(r"\bor\b").expect("regex");
    let mut groups = BTreeSet::new();
    for branch in or.split(query) {
        let by = groupings(branch);
        let matched: Vec<Vec<&Series>> = selectors(branch)
            .iter()
            .map(|selector| {
                series
                    .iter()
                    .filter(|s| s.name == selector.metric)
                    .filter(|s| selector.matchers.iter().all(|m| m.matches(&s.labels)))
                    .collect()
            })
            .collect();
        if matched.iter().any(Vec::is_empty) {
            continue;
        }
        for s in matched.into_iter().flatten() {
            groups.insert(if by.is_empty() {
                s.labels.clone()
            } else {
                by.iter()
                    .map(|l| (l.clone(), s.labels.get(l).cloned().unwrap_or_default()))
                    .collect()
            });
        }
    }
    groups
}

/// The values of `label` among `groups`.
pub fn values(groups: &BTreeSet<BTreeMap<String, String>>, label: &str) -> BTreeSet<String> {
    groups
        .iter()
        .filter_map(|g| g.get(label).cloned())
        .collect()
}
