//! The body of a watch response: newline-delimited JSON events, first the replay, then live
//! changes and periodic bookmarks, until the timeout, the client leaving, or
//! [`super::ApiServer::drop_watches`].

use std::{collections::VecDeque, future, io, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::Stream;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::{
    sync::mpsc,
    time::{self, Instant, Interval, MissedTickBehavior, Sleep},
};

use super::{
    selector::Filter,
    store::{Change, Registered},
};

/// How often a watch that asked for bookmarks gets one.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// What a watch request asked for besides its filter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: end the initial events with a bookmark saying so.
    pub initial_events_end: bool,
    /// `timeoutSeconds`.
    pub timeout: Option<Duration>,
}

/// One open watch.
struct Watch {
    filter: Filter,
    pending: VecDeque<Value>,
    changes: mpsc::UnboundedReceiver<Arc<Change>>,
    /// The resourceVersion of the last change this watch has seen, sent or not.
    revision: u64,
    bookmarks: Option<Interval>,
    deadline: Option<Pin<Box<Sleep>>>,
}

/// The event stream for a registered watch, as body frames. It fails (so the server cuts the
/// connection) when the store drops the watch.
pub(crate) fn events(
    filter: Filter,
    registered: Registered,
    options: Options,
) -> impl Stream<Item = Result<Frame<Bytes>, io::Error>> + Send + 'static {
    let mut pending = VecDeque::from(registered.initial);
    if options.initial_events_end {
        let mut bookmark = bookmark(&filter, registered.revision);
        bookmark["object"]["metadata"]["annotations"] =
            json!({"k8s.io/initial-events-end": "true"});
        pending.push_back(bookmark);
    }
    let bookmarks = options.bookmarks.then(|| {
        let mut interval = time::interval_at(Instant::now() + BOOKMARK_INTERVAL, BOOKMARK_INTERVAL);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    });
    let watch = Watch {
        filter,
        pending,
        changes: registered.changes,
        revision: registered.revision,
        bookmarks,
        deadline: options
            .timeout
            .map(|timeout| Box::pin(time::sleep(timeout))),
    };
    futures::stream::unfold(watch, |mut watch| async move {
        let event = watch.next().await?;
        Some((event.map(|event| Frame::data(line(&event))), watch))
    })
}

impl Watch {
    /// The next event to send; `None` ends the response normally.
    async fn next(&mut self) -> Option<Result<Value, io::Error>> {
        if let Some(event) = self.pending.pop_front() {
            return Some(Ok(event));
        }
        let Self {
            filter,
            changes,
            revision,
            bookmarks,
            deadline,
            ..
        } = self;
        loop {
            let timed_out = async {
                match deadline {
                    Some(deadline) => deadline.as_mut().await,
                    None => future::pending().await,
                }
            };
            let bookmark_due = async {
                match bookmarks {
                    Some(interval) => interval.tick().await,
                    None => future::pending().await,
                }
            };
            tokio::select! {
                // Changes first, so that a bookmark never claims a version whose changes are
                // still queued.
                biased;
                change = changes.recv() => {
                    let Some(change) = change else {
                        return Some(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "watch dropped by ApiServer::drop_watches",
                        )));
                    };
                    if change.revision <= *revision {
                        continue;
                    }
                    *revision = change.revision;
                    if let Some(event) = change.event(filter) {
                        return Some(Ok(event));
                    }
                }
                () = timed_out => return None,
                _ = bookmark_due => return Some(Ok(bookmark(filter, *revision))),
            }
        }
    }
}

/// A BOOKMARK event at `revision`.
fn bookmark(filter: &Filter, revision: u64) -> Value {
    json!({
        "type": "BOOKMARK",
        "object": {
            "kind": filter.resource.kind,
            "apiVersion": filter.resource.api_version,
            "metadata": {"resourceVersion": revision.to_string()},
        },
    })
}

/// One event as it goes on the wire: JSON and a newline.
pub(crate) fn line(event: &Value) -> Bytes {
    let mut line = event.to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}
