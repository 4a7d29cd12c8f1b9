//! Compiled matchers and how a connection is matched against them.
//!
//! Everything here runs per connection: no allocation, no string formatting. A principal is
//! matched against the parts of the source [`Identity`] as if they were joined into
//! `<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::identity::Identity;

/// What a connection offers to the matchers: the source (an identity when it came over mTLS)
/// and both addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Connection<'a> {
    /// The authenticated source; `None` for plaintext.
    pub source: Option<&'a Identity>,
    /// The source IP (IPv4-mapped IPv6 addresses already unmapped).
    pub source_ip: IpAddr,
    /// The destination IP (likewise).
    pub destination_ip: IpAddr,
    /// The destination port.
    pub destination_port: u16,
}

impl<'a> Connection<'a> {
    /// What `request` offers.
    pub fn of(request: &super::Request<'a>) -> Self {
        Self {
            source: request.source,
            source_ip: request.source_ip.to_canonical(),
            destination_ip: request.destination.ip().to_canonical(),
            destination_port: request.destination.port(),
        }
    }
}

/// One value of `principals`, `namespaces` or a `source.principal`/`source.namespace`
/// condition, with Istio's wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StringMatch {
    /// `*`: any non-empty value (for principals: any authenticated source).
    Any,
    /// No wildcard.
    Exact(Box<str>),
    /// `prefix*`.
    Prefix(Box<str>),
    /// `*suffix`.
    Suffix(Box<str>),
}

impl StringMatch {
    /// Istio's reading of a pattern: `*` alone, a leading `*`, a trailing `*`, else exact (a
    /// `*` in the middle is literal).
    pub fn new(pattern: &str) -> Self {
        if pattern == "*" {
            StringMatch::Any
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.into())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.into())
        } else {
            StringMatch::Exact(pattern.into())
        }
    }

    /// Whether the concatenation of `parts` matches.
    pub fn matches_parts(&self, parts: &[&str]) -> bool {
        match self {
            StringMatch::Any => parts.iter().any(|part| !part.is_empty()),
            StringMatch::Exact(exact) => {
                parts.iter().map(|part| part.len()).sum::<usize>() == exact.len()
                    && starts_with(parts, exact.as_bytes())
            }
            StringMatch::Prefix(prefix) => starts_with(parts, prefix.as_bytes()),
            StringMatch::Suffix(suffix) => ends_with(parts, suffix.as_bytes()),
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        self.matches_parts(&[value])
    }
}

/// Whether the concatenation of `parts` starts with `prefix`.
fn starts_with(parts: &[&str], mut prefix: &[u8]) -> bool {
    for part in parts {
        let part = part.as_bytes();
        let n = part.len().min(prefix.len());
        if part[..n] != prefix[..n] {
            return false;
        }
        prefix = &prefix[n..];
        if prefix.is_empty() {
            return true;
        }
    }
    prefix.is_empty()
}

/// Whether the concatenation of `parts` ends with `suffix`.
fn ends_with(parts: &[&str], mut suffix: &[u8]) -> bool {
    for part in parts.iter().rev() {
        let part = part.as_bytes();
        let n = part.len().min(suffix.len());
        if part[part.len() - n..] != suffix[suffix.len() - n..] {
            return false;
        }
        suffix = &suffix[..suffix.len() - n];
        if suffix.is_empty() {
            return true;
        }
    }
    suffix.is_empty()
}

/// Whether `pattern` matches the principal of `source`; a plaintext source has none, so it
/// never matches.
fn principal_matches(pattern: &StringMatch, source: Option<&Identity>) -> bool {
    source.is_some_and(|id| {
        pattern.matches_parts(&[
            id.trust_domain(),
            "/ns/",
            id.namespace(),
            "/sa/",
            id.service_account(),
        ])
    })
}

/// Whether `pattern` matches the namespace of `source`; a plaintext source has none.
fn namespace_matches(pattern: &StringMatch, source: Option<&Identity>) -> bool {
    source.is_some_and(|id| pattern.matches(id.namespace()))
}

/// A list and its negation: empty lists are unset; a set `values` must match one entry, a set
/// `not_values` must match none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Set<T> {
    /// Must match one (when not empty).
    pub values: Vec<T>,
    /// Must match none.
    pub not_values: Vec<T>,
}

impl<T> Default for Set<T> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            not_values: Vec::new(),
        }
    }
}

impl<T> Set<T> {
    fn matches(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&matches))
            && !self.not_values.iter().any(&matches)
    }
}

/// A compiled `source`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Source {
    /// `principals` / `notPrincipals`.
    pub principals: Set<StringMatch>,
    /// `namespaces` / `notNamespaces`.
    pub namespaces: Set<StringMatch>,
    /// `ipBlocks` / `notIpBlocks`.
    pub ip_blocks: Set<IpNet>,
}

impl Source {
    fn matches(&self, conn: &Connection<'_>) -> bool {
        self.principals
            .matches(|p| principal_matches(p, conn.source))
            && self
                .namespaces
                .matches(|n| namespace_matches(n, conn.source))
            && self.ip_blocks.matches(|b| b.contains(&conn.source_ip))
    }
}

/// A compiled `operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Operation {
    /// `ports` / `notPorts`.
    pub ports: Set<u16>,
}

impl Operation {
    fn matches(&self, conn: &Connection<'_>) -> bool {
        self.ports.matches(|&p| p == conn.destination_port)
    }
}

/// A compiled `when` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Condition {
    /// `source.ip`.
    SourceIp(Set<IpNet>),
    /// `source.namespace`.
    SourceNamespace(Set<StringMatch>),
    /// `source.principal`.
    SourcePrincipal(Set<StringMatch>),
    /// `destination.ip`.
    DestinationIp(Set<IpNet>),
    /// `destination.port`.
    DestinationPort(Set<u16>),
}

impl Condition {
    fn matches(&self, conn: &Connection<'_>) -> bool {
        match self {
            Condition::SourceIp(set) => set.matches(|b| b.contains(&conn.source_ip)),
            Condition::SourceNamespace(set) => set.matches(|n| namespace_matches(n, conn.source)),
            Condition::SourcePrincipal(set) => set.matches(|p| principal_matches(p, conn.source)),
            Condition::DestinationIp(set) => set.matches(|b| b.contains(&conn.destination_ip)),
            Condition::DestinationPort(set) => set.matches(|&p| p == conn.destination_port),
        }
    }
}

/// A compiled rule: every non-empty part must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Rule {
    /// Any must match (empty: any source).
    pub from: Vec<Source>,
    /// Any must match (empty: any operation).
    pub to: Vec<Operation>,
    /// All must match.
    pub when: Vec<Condition>,
}

impl Rule {
    /// Whether the connection matches the rule.
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(conn)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(conn)))
            && self.when.iter().all(|c| c.matches(conn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_match_over_parts() {
        let parts = ["cluster.local", "/ns/", "default", "/sa/", "web"];
        for (pattern, want) in [
            ("*", true),
            ("cluster.local/ns/default/sa/web", true),
            ("cluster.local/ns/default/sa/we", false),
            ("cluster.local/ns/default/sa/webx", false),
            ("cluster.local/ns/default/*", true),
            ("cluster.local/ns/def*", true),
            ("cluster.local/ns/other/*", false),
            ("*/sa/web", true),
            ("*lt/sa/web", true),
            ("*/sa/api", false),
            ("*cluster.local/ns/default/sa/web", true),
            ("*xcluster.local/ns/default/sa/web", false),
            ("cluster.local/ns/default/sa/web*", true),
            ("cluster.local/ns/default/sa/web/*", false),
            ("cluster.local/*/sa/web", false),
        ] {
            assert_eq!(
                StringMatch::new(pattern).matches_parts(&parts),
                want,
                "{pattern}"
            );
        }
        assert!(!StringMatch::Any.matches(""));
        assert!(StringMatch::new("a*b").matches("a*b"));
        assert!(!StringMatch::new("a*b").matches("axb"));
    }
}
