//! Which objects a list or watch request asks for: its resource, namespace, `labelSelector`
//! and `fieldSelector`, parsed with the real server's syntax.

use serde_json::Value;

use super::resource::Resource;

/// The objects one request is about.
#[derive(Debug)]
pub(crate) struct Filter {
    pub resource: &'static Resource,
    /// `None` for a cluster-wide request.
    pub namespace: Option<String>,
    labels: Vec<Label>,
    fields: Vec<Field>,
}

/// One comma-separated term of a label selector.
#[derive(Debug, PartialEq)]
enum Label {
    /// `k=v`, `k==v`, `k in (v1, v2)`.
    In(String, Vec<String>),
    /// `k!=v`, `k notin (v1, v2)`: also matches objects without the label.
    NotIn(String, Vec<String>),
    /// `k`.
    Exists(String),
    /// `!k`.
    DoesNotExist(String),
}

/// One comma-separated term of a field selector: `path=value`, `path==value` or `path!=value`.
#[derive(Debug, PartialEq)]
struct Field {
    path: String,
    value: String,
    equal: bool,
}

impl Filter {
    /// A filter for `resource` in `namespace` (all namespaces if `None`), with the selectors as
    /// given in the query string. The error is the message for a 400 Bad Request.
    pub(crate) fn new(
        resource: &'static Resource,
        namespace: Option<String>,
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Self, String> {
        let labels = terms(label_selector.unwrap_or(""))
            .map(parse_label)
            .collect::<Result<_, _>>()?;
        let fields = terms(field_selector.unwrap_or(""))
            .map(|term| parse_field(resource, term))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            resource,
            namespace,
            labels,
            fields,
        })
    }

    /// Whether `object` (of this filter's resource) is selected.
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        if let Some(namespace) = &self.namespace
            && metadata["namespace"].as_str() != Some(namespace)
        {
            return false;
        }
        let labels = &metadata["labels"];
        let label_matches = |label: &Label| match label {
            Label::In(key, values) => labels[key]
                .as_str()
                .is_some_and(|v| values.iter().any(|w| w == v)),
            Label::NotIn(key, values) => labels[key]
                .as_str()
                .is_none_or(|v| values.iter().all(|w| w != v)),
            Label::Exists(key) => labels.get(key).is_some(),
            Label::DoesNotExist(key) => labels.get(key).is_none(),
        };
        self.labels.iter().all(label_matches)
            && self
                .fields
                .iter()
                .all(|field| (field_value(object, &field.path) == field.value) == field.equal)
    }
}

/// The comma-separated terms of a selector, keeping the commas inside `in (...)` sets.
fn terms(selector: &str) -> impl Iterator<Item = &str> {
    let mut depth = 0;
    selector
        .split(move |c| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map(str::trim)
        .filter(|term| !term.is_empty())
}

fn parse_label(term: &str) -> Result<Label, String> {
    let invalid = || format!("unable to parse requirement: {term:?} in labelSelector");
    let key = |key: &str| {
        let key = key.trim();
        let valid = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        valid.then(|| key.to_owned()).ok_or_else(invalid)
    };
    let set = |values: &str| {
        let values = values.trim();
        let inner = values
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(invalid)?;
        Ok::<_, String>(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    if let Some(k) = term.strip_prefix('!') {
        return Ok(Label::DoesNotExist(key(k)?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Label::NotIn(key(k)?, vec![v.trim().to_owned()]));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Label::In(key(k)?, vec![v.trim().to_owned()]));
    }
    if let Some((k, values)) = term.split_once(" notin ") {
        return Ok(Label::NotIn(key(k)?, set(values)?));
    }
    if let Some((k, values)) = term.split_once(" in ") {
        return Ok(Label::In(key(k)?, set(values)?));
    }
    Ok(Label::Exists(key(term)?))
}

fn parse_field(resource: &Resource, term: &str) -> Result<Field, String> {
    let (path, value, equal) = if let Some((path, value)) = term.split_once("!=") {
        (path, value, false)
    } else if let Some((path, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        (path, value, true)
    } else {
        return Err(format!(
            "invalid selector: {term:?}; a field selector term is `field=value` or `field!=value`"
        ));
    };
    let path = path.trim();
    if !resource.supports_field(path) {
        // The real server's wording.
        return Err(format!(
            "field label not supported: {path} (on {})",
            resource.kind
        ));
    }
    Ok(Field {
        path: path.to_owned(),
        value: value.trim().to_owned(),
        equal,
    })
}

/// The value a field selector compares against: strings as they are, numbers and booleans as
/// text, a missing field as the empty string.
fn field_value(object: &Value, path: &str) -> String {
    match path.split('.').fold(object, |value, key| &value[key]) {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pods(labels: &str, fields: &str) -> Filter {
        let pods = Resource::by_kind("Pod").expect("pods are served");
        Filter::new(pods, None, Some(labels), Some(fields)).expect("valid selectors")
    }

    #[test]
    fn label_terms() {
        let pod = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        assert!(pods("app=web", "").matches(&pod));
        assert!(pods("app==web,tier", "").matches(&pod));
        assert!(pods("app in (db, web),!canary", "").matches(&pod));
        assert!(pods("app notin (db),other!=x", "").matches(&pod));
        assert!(!pods("app!=web", "").matches(&pod));
        assert!(!pods("!tier", "").matches(&pod));
        assert!(!pods("app in (db,cache)", "").matches(&pod));
        assert!(!pods("other", "").matches(&pod));
    }

    #[test]
    fn field_terms() {
        let pod = json!({"metadata": {"name": "a", "namespace": "default"},
                         "spec": {"nodeName": "node-0", "hostNetwork": true}});
        assert!(pods("", "metadata.name=a,spec.nodeName==node-0").matches(&pod));
        assert!(pods("", "spec.hostNetwork=true,status.podIP=").matches(&pod));
        assert!(!pods("", "metadata.namespace!=default").matches(&pod));
    }

    #[test]
    fn rejects_what_the_real_server_rejects() {
        let pods = Resource::by_kind("Pod").expect("pods are served");
        let services = Resource::by_kind("Service").expect("services are served");
        assert!(Filter::new(pods, None, None, Some("spec.bogus=x")).is_err());
        assert!(Filter::new(services, None, None, Some("spec.nodeName=x")).is_err());
        assert!(Filter::new(pods, None, None, Some("metadata.name")).is_err());
        assert!(Filter::new(pods, None, Some("app in web"), None).is_err());
        assert!(Filter::new(pods, None, Some("a b"), None).is_err());
    }
}
