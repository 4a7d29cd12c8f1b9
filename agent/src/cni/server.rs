//! The agent's end of the CNI socket: reads each plugin request, checks it, and hands it to the
//! in-pod reconciler, which owns every enrollment and answers when it has decided.
//!
//! The socket is the agent's most privileged input after the API server, so: only root (or the
//! agent's own user) may connect, checked by `SO_PEERCRED`; the socket is mode 0600 (its
//! directory is created 0700 when the agent creates it); a request is at most [`MAX_REQUEST`] bytes and must arrive within
//! [`READ_TIMEOUT`]; at most [`MAX_IN_FLIGHT`] requests are served at once (more are told to
//! come back); and a malformed request gets a refusal naming what is wrong.

use std::{
    io,
    os::{fd::AsFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncWriteExt as _, Interest},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::{debug, warn};

use super::protocol::{Command, MAX_REQUEST, Reply, Request};
use crate::sys::{Netns, fdpass};

/// How long a plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests served at once.
const MAX_IN_FLIGHT: usize = 256;

/// A checked request, for the reconciler.
#[derive(Debug)]
pub struct Event {
    /// The request.
    pub request: Request,
    /// The pod's network namespace (ADD and CHECK always; DEL when it still exists).
    pub netns: Option<Netns>,
    /// Where the reconciler answers.
    pub reply: oneshot::Sender<Reply>,
}

/// Binds the socket at `path`: its directory is created 0700 if missing, a stale socket from an
/// earlier agent is replaced, anything else at the path is an error.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context as _;
    if path.as_os_str().len() >= 108 {
        anyhow::bail!(
            "CNI socket path {} is too long for a unix socket (at most 107 bytes)",
            path.display()
        );
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path)
                .with_context(|| format!("remove the stale socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("inspect {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "serving CNI requests");
    Ok(listener)
}

/// Serves plugin requests on `listener` until the task is dropped, sending each checked one to
/// `events`. `answer_within` bounds how long a plugin waits for the reconciler.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    events: mpsc::Sender<Event>,
    answer_within: Duration,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let own_uid = nix::unistd::Uid::effective().as_raw();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                warn!(socket = %path.display(), %err, "CNI socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let events = events.clone();
        let metrics = metrics.clone();
        let permit = permits.clone().try_acquire_owned();
        tokio::spawn(async move {
            let mut command = None;
            let reply = match permit {
                Ok(_permit) => handle(&stream, own_uid, events, answer_within, &mut command).await,
                Err(_) => Reply::Unavailable {
                    message: format!("the agent is serving {MAX_IN_FLIGHT} CNI requests already"),
                },
            };
            let command = command.map_or("unknown", Command::label);
            let result = reply.label();
            metrics.cni_answered(command, result);
            if let Reply::Refused { message } | Reply::Unavailable { message } = &reply {
                warn!(command, result, "CNI request not granted: {message}");
            }
            if let Err(err) = write_reply(stream, &reply).await {
                debug!(%err, "cannot answer a CNI request");
            }
        });
    }
}

async fn write_reply(mut stream: UnixStream, reply: &Reply) -> io::Result<()> {
    let mut text = serde_json::to_vec(reply)?;
    text.push(b'\n');
    stream.write_all(&text).await?;
    stream.shutdown().await
}

async fn handle(
    stream: &UnixStream,
    own_uid: u32,
    events: mpsc::Sender<Event>,
    answer_within: Duration,
    command: &mut Option<Command>,
) -> Reply {
    let refused = |message: String| Reply::Refused { message };
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 || cred.uid() == own_uid => {}
        Ok(cred) => {
            return refused(format!(
                "uid {} may not use the CNI socket (root only)",
                cred.uid()
            ));
        }
        Err(err) => return refused(format!("cannot identify the peer: {err}")),
    }
    let (body, mut fds) = match tokio::time::timeout(READ_TIMEOUT, read_request(stream)).await {
        Ok(Ok(read)) => read,
        Ok(Err(err)) => return refused(format!("bad request: {err}")),
        Err(_) => {
            return refused(format!(
                "bad request: not sent within {}s",
                READ_TIMEOUT.as_secs()
            ));
        }
    };
    let request: Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => return refused(format!("bad request: {err}")),
    };
    *command = Some(request.command);
    if let Err(err) = request.validate() {
        return refused(format!("bad request: {err}"));
    }
    let netns = match fds.pop() {
        Some(fd) => match Netns::from_fd(fd, PathBuf::from(&request.netns)) {
            Ok(netns) => Some(netns),
            Err(err) => return refused(format!("bad request: {err}")),
        },
        None if request.command == Command::Del => None,
        None => {
            return refused(format!(
                "bad request: {:?} needs the pod's network namespace attached",
                request.command
            ));
        }
    };
    let pod = request.pod.to_string();
    let (reply, answer) = oneshot::channel();
    let event = Event {
        request,
        netns,
        reply,
    };
    if events.send(event).await.is_err() {
        return Reply::Unavailable {
            message: "the agent is shutting down".into(),
        };
    }
    match tokio::time::timeout(answer_within, answer).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => Reply::Unavailable {
            message: "the agent is shutting down".into(),
        },
        Err(_) => Reply::Refused {
            message: format!(
                "pod {pod} was not enrolled within {}s",
                answer_within.as_secs()
            ),
        },
    }
}

/// Reads the request to end of stream, keeping the descriptors attached to it.
async fn read_request(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<std::os::fd::OwnedFd>)> {
    let mut body = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, received) = stream
            .async_io(Interest::READABLE, || {
                fdpass::recv(stream.as_fd(), &mut buf)
            })
            .await?;
        fds.extend(received);
        if fds.len() > 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} descriptors attached (one network namespace at most)",
                    fds.len()
                ),
            ));
        }
        if n == 0 {
            return Ok((body, fds));
        }
        if body.len() + n > MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("longer than {MAX_REQUEST} bytes"),
            ));
        }
        body.extend_from_slice(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_socket_paths_are_refused_by_name_and_stale_sockets_replaced() {
        let dir = std::env::temp_dir().join(format!("meshlet-cni-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let long = dir.join("x".repeat(120)).join("cni.sock");
        let err = format!("{:#}", bind(&long).unwrap_err());
        assert!(err.contains("too long"), "{err}");
        let file = dir.join("not-a-socket");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&file, "").unwrap();
        let err = format!("{:#}", bind(&file).unwrap_err());
        assert!(err.contains("is not a socket"), "{err}");
        let socket = dir.join("sub").join("cni.sock");
        drop(bind(&socket).unwrap());
        let _again = bind(&socket).expect("a stale socket is replaced");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&socket), 0o600);
        assert_eq!(mode(socket.parent().unwrap()), 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
