//! The HTTP side: accepts connections, maps the real API server's URL layout onto the store and
//! answers in its wire format (JSON objects, `...List`s, `Status` errors, watch streams).

use std::{convert::Infallible, io, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinSet,
};

use super::{
    Shared, lock,
    resource::Resource,
    selector::Filter,
    store::{Start, Status},
    watch,
};

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Serves `listener` until `stop` fires (or its sender goes), then closes the listener and
/// every connection, open watches included, before returning.
pub(crate) async fn serve(listener: TcpListener, store: Shared, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, store.clone()));
                }
                Err(err) => {
                    let addr = listener.local_addr();
                    eprintln!("stand-in API server: accept on {addr:?} failed: {err}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn connection(stream: TcpStream, store: Shared) {
    // Watch events are small writes that must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| {
        let store = store.clone();
        async move { Ok::<_, Infallible>(handle(&store, request).await) }
    });
    // An error here is a client going away or a watch cut on purpose: nothing to report.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// What a request's path names: a collection (no `name`) or one object.
#[derive(Debug)]
struct Target {
    resource: &'static Resource,
    /// `None` for cluster-scoped kinds and cluster-wide collections.
    namespace: Option<String>,
    name: Option<String>,
}

/// Maps `/api/v1/...` and `/apis/{group}/{version}/...` paths to what they name.
fn route(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", namespace, plural] => (Some(*namespace), *plural, None),
        ["namespaces", namespace, plural, name] => (Some(*namespace), *plural, Some(*name)),
        _ => return None,
    };
    let resource = Resource::by_path(&api_version, plural)?;
    let scoped_right = if resource.namespaced {
        namespace.is_some() || name.is_none()
    } else {
        namespace.is_none()
    };
    scoped_right.then(|| Target {
        resource,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

async fn handle(store: &Shared, request: Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let query = Query::parse(parts.uri.query());
    let Some(target) = route(path) else {
        return status(&Status::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({} {path})",
                parts.method
            ),
        ));
    };
    if target.resource.kind == "TokenReview" {
        // Create-only and never stored, as on a real server.
        return match (&parts.method, read_json(body).await) {
            (&Method::POST, Ok(request)) => {
                let reviewed = lock(store).review_token(&request);
                json_response(StatusCode::CREATED, &reviewed)
            }
            (&Method::POST, Err(err)) => status(&err),
            (method, _) => status(&Status::new(
                405,
                "MethodNotAllowed",
                format!("tokenreviews support only POST, not {method}"),
            )),
        };
    }
    let namespace = target.namespace.as_deref().unwrap_or_default();
    let ok = |object| (StatusCode::OK, object);
    let result = match (&parts.method, target.name.as_deref()) {
        (&Method::GET, None) if query.flag("watch") => return watch(store, &target, &query),
        (&Method::GET, None) => filter(&target, &query).map(|filter| ok(lock(store).list(&filter))),
        (&Method::GET, Some(name)) => lock(store)
            .get(target.resource, namespace, name)
            .cloned()
            .map(ok)
            .ok_or_else(|| Status::not_found(target.resource, name)),
        (&Method::POST, None) if target.namespace.is_some() || !target.resource.namespaced => {
            read_object(body, &target)
                .await
                .and_then(|object| lock(store).create(target.resource, object))
                .map(|created| (StatusCode::CREATED, created))
        }
        (&Method::PUT, Some(_)) => read_object(body, &target)
            .await
            .and_then(|object| lock(store).replace(target.resource, object))
            .map(ok),
        (&Method::PATCH, Some(name)) => {
            let content_type = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default();
            patch(store, &target, name, path, content_type, body)
                .await
                .map(ok)
        }
        (&Method::DELETE, Some(name)) => lock(store)
            .remove(target.resource, namespace, name)
            .map(ok)
            .ok_or_else(|| Status::not_found(target.resource, name)),
        (method, _) => Err(Status::new(
            405,
            "MethodNotAllowed",
            format!("the stand-in API server does not support {method} on {path}"),
        )),
    };
    match result {
        Ok((code, object)) => json_response(code, &object),
        Err(err) => status(&err),
    }
}

/// A LIST or WATCH request's filter; a bad selector is a 400.
fn filter(target: &Target, query: &Query) -> Result<Filter, Status> {
    Filter::new(
        target.resource,
        target.namespace.clone(),
        query.get("labelSelector"),
        query.get("fieldSelector"),
    )
    .map_err(|message| Status::new(400, "BadRequest", message))
}

/// GET with `watch=true`: 200 and a stream of events, or 200 and a single ERROR event when the
/// requested resourceVersion is too old (which is what the real server does).
fn watch(store: &Shared, target: &Target, query: &Query) -> Response<Body> {
    let filter = match filter(target, query) {
        Ok(filter) => filter,
        Err(err) => return status(&err),
    };
    let start = match query.get("resourceVersion").unwrap_or_default() {
        "" | "0" => Start::Now,
        version => match version.parse() {
            Ok(version) => Start::After(version),
            Err(_) => {
                return status(&Status::new(
                    400,
                    "BadRequest",
                    format!("invalid resource version: {version:?}"),
                ));
            }
        },
    };
    let timeout = match query.get("timeoutSeconds").map(str::parse::<u64>) {
        None | Some(Ok(0)) => None,
        Some(Ok(seconds)) => Some(Duration::from_secs(seconds)),
        Some(Err(err)) => {
            return status(&Status::new(
                400,
                "BadRequest",
                format!("invalid timeoutSeconds: {err}"),
            ));
        }
    };
    let options = watch::Options {
        bookmarks: query.flag("allowWatchBookmarks"),
        initial_events_end: query.flag("sendInitialEvents"),
        timeout,
    };
    let registered = lock(store).watch(&filter, start);
    let body = match registered {
        Ok(registered) => {
            StreamBody::new(watch::events(filter, registered, options)).boxed_unsync()
        }
        Err(expired) => full(watch::line(
            &json!({"type": "ERROR", "object": expired.to_json()}),
        )),
    };
    response(StatusCode::OK, body)
}

/// PATCH: recorded (if its body is JSON), then applied as a JSON merge patch. Strategic merge
/// patches are applied the same way, which is exact for maps and replaces lists whole.
async fn patch(
    store: &Shared,
    target: &Target,
    name: &str,
    path: &str,
    content_type: &str,
    body: Incoming,
) -> Result<Value, Status> {
    let patch = read_json(body).await?;
    lock(store).record_patch(path.to_owned(), patch.clone());
    let content_type = content_type.split(';').next().unwrap_or_default().trim();
    match content_type {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {}
        other => {
            return Err(Status::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the stand-in API server applies merge and strategic merge patches, not {other:?}"
                ),
            ));
        }
    }
    if !patch.is_object() {
        return Err(Status::new(
            400,
            "BadRequest",
            "a merge patch must be a JSON object",
        ));
    }
    let namespace = target.namespace.as_deref().unwrap_or_default();
    lock(store).merge_patch(target.resource, namespace, name, &patch)
}

/// The object in a POST or PUT body, checked against the URL it was sent to.
async fn read_object(body: Incoming, target: &Target) -> Result<Value, Status> {
    let mut object = read_json(body).await?;
    let bad = |message: String| Err(Status::new(400, "BadRequest", message));
    if !object["metadata"].is_object() {
        return bad("the object has no metadata".to_owned());
    }
    let metadata = &mut object["metadata"];
    match (metadata["name"].as_str(), target.name.as_deref()) {
        (None, _) => {
            return bad("metadata.name is required (generateName is not supported)".to_owned());
        }
        (Some(body), Some(url)) if body != url => {
            return bad(format!(
                "the name of the object ({body}) does not match the name on the URL ({url})"
            ));
        }
        _ => {}
    }
    if let Some(url) = &target.namespace {
        match metadata["namespace"].as_str() {
            None => metadata["namespace"] = url.as_str().into(),
            Some(body) if body != url => {
                return bad(format!(
                    "the namespace of the provided object ({body}) does not match the namespace \
                     sent on the request ({url})"
                ));
            }
            Some(_) => {}
        }
    }
    Ok(object)
}

async fn read_json(body: Incoming) -> Result<Value, Status> {
    let bytes = body
        .collect()
        .await
        .map_err(|err| Status::new(400, "BadRequest", format!("reading the body: {err}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|err| Status::new(400, "BadRequest", format!("the body is not JSON: {err}")))
}

fn status(status: &Status) -> Response<Body> {
    let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &status.to_json())
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    response(code, full(Bytes::from(body.to_string())))
}

fn response(code: StatusCode, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A decoded query string.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let pairs = query
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(key), decode(value))
            })
            .collect();
        Self(pairs)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, value)| value.as_str())
    }

    /// A boolean parameter: `true` or `1`.
    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn decode(text: &str) -> String {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        let hex = tail
            .get(..2)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (first, hex) {
            (b'%', Some(byte)) => {
                bytes.push(byte);
                rest = &tail[2..];
            }
            (b'+', _) => {
                bytes.push(b' ');
                rest = tail;
            }
            (other, _) => {
                bytes.push(other);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_like_the_real_server() {
        let named = |path| route(path).map(|t| (t.resource.kind, t.namespace, t.name));
        let some = |kind, ns: Option<&str>, name: Option<&str>| {
            Some((kind, ns.map(str::to_owned), name.map(str::to_owned)))
        };
        assert_eq!(named("/api/v1/pods"), some("Pod", None, None));
        assert_eq!(named("/api/v1/namespaces"), some("Namespace", None, None));
        assert_eq!(
            named("/api/v1/namespaces/a"),
            some("Namespace", None, Some("a"))
        );
        assert_eq!(
            named("/api/v1/namespaces/a/pods"),
            some("Pod", Some("a"), None)
        );
        assert_eq!(
            named("/apis/security.istio.io/v1/namespaces/a/peerauthentications/p"),
            some("PeerAuthentication", Some("a"), Some("p"))
        );
        assert_eq!(
            named("/apis/discovery.k8s.io/v1/endpointslices"),
            some("EndpointSlice", None, None)
        );
        assert_eq!(named("/api/v1/pods/a"), None, "a pod needs its namespace");
        assert_eq!(named("/apis/discovery.k8s.io/v1beta1/endpointslices"), None);
        assert_eq!(named("/api/v1/namespaces/a/pods/p/status"), None);
        assert_eq!(named("/version"), None);
    }

    #[test]
    fn decodes_query_values() {
        let query = Query::parse(Some("labelSelector=app%3Dweb%2Ctier+in+(a)&watch=1&x"));
        assert_eq!(query.get("labelSelector"), Some("app=web,tier in (a)"));
        assert!(query.flag("watch"));
        assert_eq!(query.get("x"), Some(""));
        assert_eq!(decode("100%"), "100%");
    }
}
