//! The server's state: objects, the global resourceVersion counter, the history of changes
//! watches replay from, the open watches, and the patches received.

use std::{collections::BTreeMap, sync::Arc};

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::{resource::Resource, selector::Filter};

/// Where objects are kept: resource plural, namespace (empty when cluster-scoped), name.
type Key = (&'static str, String, String);

/// Everything the server knows, behind one lock.
#[derive(Debug, Default)]
pub(crate) struct Store {
    /// The resourceVersion of the last change, to any object.
    revision: u64,
    uids: u64,
    objects: BTreeMap<Key, Value>,
    /// Changes a watch may replay, oldest first.
    history: Vec<Arc<Change>>,
    /// A watch may resume from this resourceVersion or a later one; older ones get 410.
    oldest: u64,
    /// Every open watch receives every change and picks what it wants.
    watchers: Vec<mpsc::UnboundedSender<Arc<Change>>>,
    patches: Vec<(String, Value)>,
    pub(crate) tokens: super::tokens::Tokens,
}

/// One create, update or delete.
#[derive(Debug)]
pub(crate) struct Change {
    /// The resourceVersion this change made.
    pub revision: u64,
    pub resource: &'static Resource,
    /// The object before the change; `None` for a create.
    pub before: Option<Value>,
    /// The object after the change; `None` for a delete.
    pub after: Option<Value>,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// `resourceVersion` unset or `0`: every current object as ADDED, then changes.
    Now,
    /// Every change after this resourceVersion.
    After(u64),
}

/// A watch just registered: what to send first, and the channel of later changes.
#[derive(Debug)]
pub(crate) struct Registered {
    pub initial: Vec<Value>,
    pub changes: mpsc::UnboundedReceiver<Arc<Change>>,
    /// The resourceVersion `initial` brings the watcher to.
    pub revision: u64,
}

/// A failed request, sent as a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Status {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl Status {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn not_found(resource: &Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", resource.plural),
        )
    }

    /// The `Status` object.
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl Change {
    /// The watch event this change is for a watcher of `filter`, if any. An object that starts
    /// matching is ADDED, one that stops matching is DELETED, as the real server does.
    pub(crate) fn event(&self, filter: &Filter) -> Option<Value> {
        if self.resource != filter.resource {
            return None;
        }
        let before = self.before.as_ref().filter(|o| filter.matches(o));
        let after = self.after.as_ref().filter(|o| filter.matches(o));
        let (kind, object) = match (before, after) {
            (None, None) => return None,
            (None, Some(after)) => ("ADDED", after.clone()),
            (Some(_), Some(after)) => ("MODIFIED", after.clone()),
            (Some(before), None) => {
                // The last state seen, at the version of its deletion (or departure).
                let mut object = before.clone();
                object["metadata"]["resourceVersion"] = self.revision.to_string().into();
                ("DELETED", object)
            }
        };
        Some(json!({"type": kind, "object": object}))
    }
}

impl Store {
    /// The resourceVersion of the last change.
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// The object, if it exists.
    pub(crate) fn get(
        &self,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
    ) -> Option<&Value> {
        self.objects.get(&key(resource, namespace, name))
    }

    /// Answers a TokenReview request body (see [`super::tokens`]).
    pub(crate) fn review_token(&mut self, request: &Value) -> Value {
        let mut tokens = std::mem::take(&mut self.tokens);
        let reviewed = tokens.review(self, request);
        self.tokens = tokens;
        reviewed
    }

    /// The objects `filter` selects, ordered by namespace and name.
    pub(crate) fn select<'a>(&'a self, filter: &'a Filter) -> impl Iterator<Item = &'a Value> {
        self.objects
            .iter()
            .filter(|((plural, _, _), _)| *plural == filter.resource.plural)
            .map(|(_, object)| object)
            .filter(|object| filter.matches(object))
    }

    /// A `...List` of the objects `filter` selects, at the current resourceVersion.
    pub(crate) fn list(&self, filter: &Filter) -> Value {
        json!({
            "kind": filter.resource.list_kind(),
            "apiVersion": filter.resource.api_version,
            "metadata": {"resourceVersion": self.revision.to_string()},
            "items": self.select(filter).cloned().collect::<Vec<_>>(),
        })
    }

    /// Creates or replaces `object`, whose `kind`, namespace and name say which object it is.
    /// Fills in `kind`, `apiVersion`, `metadata.uid` (kept from the replaced object) and
    /// `metadata.resourceVersion`, and returns what was stored.
    pub(crate) fn put(&mut self, resource: &'static Resource, mut object: Value) -> Value {
        let (namespace, name) = identity(resource, &object);
        let key = key(resource, &namespace, &name);
        let before = self.objects.get(&key).cloned();
        object["kind"] = resource.kind.into();
        object["apiVersion"] = resource.api_version.into();
        let uid = match before.as_ref().map(|b| &b["metadata"]["uid"]) {
            Some(Value::String(uid)) => uid.clone(),
            _ => match &object["metadata"]["uid"] {
                Value::String(uid) => uid.clone(),
                _ => self.new_uid(),
            },
        };
        object["metadata"]["uid"] = uid.into();
        if resource.namespaced {
            object["metadata"]["namespace"] = namespace.into();
        }
        self.record(resource, key, before, Some(object))
            .expect("a put leaves an object")
    }

    /// Creates `object`, which must not exist yet.
    pub(crate) fn create(
        &mut self,
        resource: &'static Resource,
        object: Value,
    ) -> Result<Value, Status> {
        let (namespace, name) = identity(resource, &object);
        if self.get(resource, &namespace, &name).is_some() {
            return Err(Status::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource.plural),
            ));
        }
        Ok(self.put(resource, object))
    }

    /// Replaces an existing object; a `metadata.resourceVersion` in `object` must be current.
    pub(crate) fn replace(
        &mut self,
        resource: &'static Resource,
        object: Value,
    ) -> Result<Value, Status> {
        let (namespace, name) = identity(resource, &object);
        let current = self
            .get(resource, &namespace, &name)
            .ok_or_else(|| Status::not_found(resource, &name))?;
        check_version(
            resource,
            &name,
            current,
            &object["metadata"]["resourceVersion"],
        )?;
        Ok(self.put(resource, object))
    }

    /// Applies an RFC 7386 JSON merge patch to an existing object. The patch cannot change the
    /// object's identity; a `metadata.resourceVersion` in it must be current.
    pub(crate) fn merge_patch(
        &mut self,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value, Status> {
        let current = self
            .get(resource, namespace, name)
            .ok_or_else(|| Status::not_found(resource, name))?;
        check_version(
            resource,
            name,
            current,
            &patch["metadata"]["resourceVersion"],
        )?;
        let mut object = current.clone();
        merge(&mut object, patch);
        let Some(metadata) = object["metadata"].as_object_mut() else {
            return Err(Status::new(
                422,
                "Invalid",
                format!(
                    "the patch leaves {} \"{name}\" without metadata",
                    resource.plural
                ),
            ));
        };
        for field in ["name", "namespace", "uid"] {
            match current["metadata"].get(field) {
                Some(value) => metadata.insert(field.to_owned(), value.clone()),
                None => metadata.remove(field),
            };
        }
        Ok(self.put(resource, object))
    }

    /// Deletes an object; returns its last state, at the version of its deletion.
    pub(crate) fn remove(
        &mut self,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let key = key(resource, namespace, name);
        let before = self.objects.get(&key).cloned()?;
        self.record(resource, key, Some(before.clone()), None);
        let mut deleted = before;
        deleted["metadata"]["resourceVersion"] = self.revision.to_string().into();
        Some(deleted)
    }

    /// Registers a watch of `filter` from `start`. Fails with 410 Expired if the changes since
    /// `start` are no longer all retained.
    pub(crate) fn watch(&mut self, filter: &Filter, start: Start) -> Result<Registered, Status> {
        let initial = match start {
            Start::Now => self
                .select(filter)
                .map(|object| json!({"type": "ADDED", "object": object}))
                .collect(),
            Start::After(version) if version < self.oldest => {
                return Err(Status::new(
                    410,
                    "Expired",
                    format!("too old resource version: {version} ({})", self.oldest),
                ));
            }
            Start::After(version) => self
                .history
                .iter()
                .filter(|change| change.revision > version)
                .filter_map(|change| change.event(filter))
                .collect(),
        };
        let (sender, changes) = mpsc::unbounded_channel();
        self.watchers.push(sender);
        let revision = match start {
            Start::After(version) => version.max(self.revision),
            Start::Now => self.revision,
        };
        Ok(Registered {
            initial,
            changes,
            revision,
        })
    }

    /// Forgets the history: watches resuming from before now get 410 Expired.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.oldest = self.revision;
    }

    /// Closes every watch's channel; each watch then ends its response abruptly.
    pub(crate) fn drop_watches(&mut self) {
        self.watchers.clear();
    }

    /// Remembers a PATCH request, for [`super::ApiServer::patches`].
    pub(crate) fn record_patch(&mut self, path: String, body: Value) {
        self.patches.push((path, body));
    }

    /// Every PATCH request received, in order.
    pub(crate) fn patches(&self) -> Vec<(String, Value)> {
        self.patches.clone()
    }

    fn new_uid(&mut self) -> String {
        self.uids += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.uids)
    }

    /// Makes a change at a new resourceVersion, keeps it in the history and sends it to every
    /// watch. Returns the object as stored.
    fn record(
        &mut self,
        resource: &'static Resource,
        key: Key,
        before: Option<Value>,
        mut after: Option<Value>,
    ) -> Option<Value> {
        self.revision += 1;
        match &mut after {
            Some(object) => {
                object["metadata"]["resourceVersion"] = self.revision.to_string().into();
                self.objects.insert(key, object.clone());
            }
            None => {
                self.objects.remove(&key);
            }
        }
        let change = Arc::new(Change {
            revision: self.revision,
            resource,
            before,
            after: after.clone(),
        });
        self.history.push(change.clone());
        // A watch whose client went away has dropped its receiver: forget it here.
        self.watchers
            .retain(|watcher| watcher.send(change.clone()).is_ok());
        after
    }
}

fn key(resource: &Resource, namespace: &str, name: &str) -> Key {
    let namespace = if resource.namespaced { namespace } else { "" };
    (resource.plural, namespace.to_owned(), name.to_owned())
}

/// Namespace (`default` if unset on a namespaced kind) and name of `object`.
fn identity(resource: &Resource, object: &Value) -> (String, String) {
    let metadata = &object["metadata"];
    let namespace = match metadata["namespace"].as_str() {
        Some(namespace) if resource.namespaced => namespace,
        None if resource.namespaced => "default",
        _ => "",
    };
    let name = metadata["name"].as_str().unwrap_or_default();
    (namespace.to_owned(), name.to_owned())
}

/// A precondition on the resourceVersion: `wanted` is unset or the object's current one.
fn check_version(
    resource: &Resource,
    name: &str,
    current: &Value,
    wanted: &Value,
) -> Result<(), Status> {
    let current = &current["metadata"]["resourceVersion"];
    if wanted.is_null() || wanted == "" || wanted == current {
        return Ok(());
    }
    Err(Status::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please \
             apply your changes to the latest version and try again",
            resource.plural
        ),
    ))
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.as_str()).or_insert(Value::Null), value);
                }
            }
        }
        (target, Value::Object(_)) => {
            *target = Value::Object(Map::new());
            merge(target, patch);
        }
        (target, _) => *target = patch.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        // The examples of RFC 7386 appendix A, a few of them.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut target, patch, expected) in cases {
            merge(&mut target, &patch);
            assert_eq!(target, expected, "patch {patch}");
        }
    }

    #[test]
    fn merge_patch_keeps_identity_and_checks_versions() {
        let namespaces = Resource::by_kind("Namespace").expect("namespaces are served");
        let mut store = Store::default();
        let before = store.put(namespaces, json!({"metadata": {"name": "mesh"}}));
        let patch = json!({"metadata": {"name": "other", "uid": null, "labels": {"a": "b"}}});
        let after = store
            .merge_patch(namespaces, "", "mesh", &patch)
            .expect("patch applies");
        assert_eq!(after["metadata"]["name"], "mesh");
        assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
        assert_eq!(after["metadata"]["labels"]["a"], "b");
        assert_eq!(after["metadata"]["resourceVersion"], "2");
        assert!(after["metadata"].get("namespace").is_none());

        let stale = json!({"metadata": {"resourceVersion": "1"}});
        let conflict = store.merge_patch(namespaces, "", "mesh", &stale);
        assert_eq!(conflict.map_err(|s| s.code), Err(409));
        let broken = store.merge_patch(namespaces, "", "mesh", &json!({"metadata": 1}));
        assert_eq!(broken.map_err(|s| s.code), Err(422));
        assert_eq!(store.revision(), 2, "failed patches change nothing");
    }

    #[test]
    fn watch_replays_changes_after_its_version_and_expires_after_compaction() {
        let pods = Resource::by_kind("Pod").expect("pods are served");
        let all_pods = Filter::new(pods, None, None, None).expect("no selectors");
        let mut store = Store::default();
        store.put(pods, json!({"metadata": {"name": "a"}}));
        store.put(pods, json!({"metadata": {"name": "b"}}));
        store.remove(pods, "default", "a");

        let replay = store
            .watch(&all_pods, Start::After(1))
            .expect("history kept");
        let types: Vec<_> = replay.initial.iter().map(|e| e["type"].clone()).collect();
        assert_eq!(types, [json!("ADDED"), json!("DELETED")]);
        assert_eq!(replay.revision, 3);

        store.compact();
        let expired = store
            .watch(&all_pods, Start::After(2))
            .expect_err("compacted");
        assert_eq!(expired.code, 410);
        assert_eq!(expired.message, "too old resource version: 2 (3)");
        assert!(store.watch(&all_pods, Start::After(3)).is_ok());
    }
}
