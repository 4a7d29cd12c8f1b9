//! The resource types the stand-in API server serves, and where each lives in the URL space.

/// One resource type: its kind, the API group/version it is served under and its URL plural.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Resource {
    /// `apiVersion` of its objects: `v1` for the core group, `group/version` otherwise.
    pub api_version: &'static str,
    /// `kind` of its objects.
    pub kind: &'static str,
    /// The collection's name in URLs.
    pub plural: &'static str,
    /// Whether objects live in a namespace (every kind here but `Namespace`).
    pub namespaced: bool,
    /// Field selector fields supported besides `metadata.name` and `metadata.namespace`, as the
    /// real server registers them for the kind.
    pub extra_fields: &'static [&'static str],
}

/// Every resource type served.
pub(crate) const RESOURCES: &[Resource] = &[
    Resource {
        api_version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
        extra_fields: &["status.phase"],
    },
    Resource {
        api_version: "v1",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
        extra_fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    },
    Resource {
        api_version: "v1",
        kind: "Secret",
        plural: "secrets",
        namespaced: true,
        extra_fields: &["type"],
    },
    Resource {
        api_version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        namespaced: true,
        extra_fields: &[],
    },
    Resource {
        api_version: "authentication.k8s.io/v1",
        kind: "TokenReview",
        plural: "tokenreviews",
        namespaced: false,
        extra_fields: &[],
    },
    Resource {
        api_version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
        extra_fields: &[],
    },
    Resource {
        api_version: "apps/v1",
        kind: "DaemonSet",
        plural: "daemonsets",
        namespaced: true,
        extra_fields: &[],
    },
    Resource {
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
        extra_fields: &[],
    },
    Resource {
        api_version: "security.istio.io/v1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        namespaced: true,
        extra_fields: &[],
    },
    Resource {
        api_version: "security.istio.io/v1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        namespaced: true,
        extra_fields: &[],
    },
];

impl Resource {
    /// The resource whose objects have this `kind`.
    pub(crate) fn by_kind(kind: &str) -> Option<&'static Resource> {
        RESOURCES.iter().find(|r| r.kind == kind)
    }

    /// The resource served as `plural` under `api_version`.
    pub(crate) fn by_path(api_version: &str, plural: &str) -> Option<&'static Resource> {
        RESOURCES
            .iter()
            .find(|r| r.api_version == api_version && r.plural == plural)
    }

    /// `kind` of this resource's lists.
    pub(crate) fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Whether `field` may be used in a field selector on this resource.
    pub(crate) fn supports_field(&self, field: &str) -> bool {
        matches!(field, "metadata.name" | "metadata.namespace")
            || self.extra_fields.contains(&field)
    }

    /// The kinds served, for error messages.
    pub(crate) fn known_kinds() -> String {
        RESOURCES
            .iter()
            .map(|r| r.kind)
            .collect::<Vec<_>>()
            .join(", ")
    }
}
