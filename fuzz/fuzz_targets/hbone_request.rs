//! The HBONE server's first look at a request on port 15008: `proxy::hbone::parse_connect`.
//!
//! Everything a peer sends passes there before admission, so beyond never panicking it must
//! accept exactly a `CONNECT` to an `ip:port` authority (port not 0) whose `Forwarded` header,
//! if any, is text, and keep at most 256 characters of that header.
//!
//! The input is a request head as text: `METHOD URI` on the first line, then `name: value`
//! lines. That framing loses nothing `http` accepts (methods, URIs, header names and values
//! never hold a newline, nor methods a space), and the seeds read as requests. The request is
//! built the way `http` hands it to the server; what the `http` builder itself rejects never
//! reaches the server and is skipped.

#![no_main]

use std::net::SocketAddr;

use http::{HeaderName, HeaderValue, Method, Request, Uri, header::FORWARDED};
use libfuzzer_sys::fuzz_target;
use meshlet::proxy::hbone::{BadRequest, parse_connect};

/// The longest `Forwarded` value, and authority in an error, `parse_connect` keeps.
const KEPT_CHARS: usize = 256;
/// The longest method it keeps in an error.
const KEPT_METHOD_CHARS: usize = 32;

fuzz_target!(|data: &[u8]| {
    let Some(request) = request(data) else {
        return;
    };
    let result = parse_connect(&request);
    match (&result, expected(&request)) {
        (Ok(connect), Some(authority)) => {
            assert_eq!(connect.authority, authority);
            match (&connect.forwarded, request.headers().get(FORWARDED)) {
                (None, None) => {}
                (Some(kept), Some(sent)) => {
                    let sent = sent.to_str().expect("accepted, so visible ASCII");
                    assert!(kept.chars().count() <= KEPT_CHARS, "{kept:?}");
                    assert!(sent.starts_with(kept.as_str()), "{kept:?} of {sent:?}");
                    assert_eq!(kept.len(), sent.len().min(KEPT_CHARS));
                }
                (kept, sent) => panic!("Forwarded {sent:?} kept as {kept:?}"),
            }
        }
        (Err(err), None) => {
            let _ = err.to_string();
            match err {
                BadRequest::Method(method) => {
                    assert!(method.chars().count() <= KEPT_METHOD_CHARS, "{method:?}")
                }
                BadRequest::Authority(authority) => {
                    assert!(authority.chars().count() <= KEPT_CHARS, "{authority:?}")
                }
                BadRequest::PortZero | BadRequest::Header(_) => {}
            }
        }
        (result, expected) => {
            panic!("{request:?}: parse_connect said {result:?}, expected {expected:?}")
        }
    }
});

/// The request a head `METHOD URI\nname: value\n...` describes, if `http` builds it.
fn request(data: &[u8]) -> Option<Request<()>> {
    let mut lines = data.split(|&b| b == b'\n');
    let first = lines.next()?;
    let space = first.iter().position(|&b| b == b' ').unwrap_or(first.len());
    let method = Method::from_bytes(&first[..space]).ok()?;
    let uri = Uri::try_from(first.get(space + 1..).unwrap_or_default()).ok()?;
    let mut builder = Request::builder().method(method).uri(uri);
    for line in lines.filter(|line| !line.is_empty()) {
        let colon = line.iter().position(|&b| b == b':')?;
        let value = &line[colon + 1..];
        let value = value.strip_prefix(b" ").unwrap_or(value);
        builder = builder.header(
            HeaderName::from_bytes(&line[..colon]).ok()?,
            HeaderValue::from_bytes(value).ok()?,
        );
    }
    builder.body(()).ok()
}

/// The authority `parse_connect` must accept for `request`, if any, written independently
/// from the rules it documents.
fn expected(request: &Request<()>) -> Option<SocketAddr> {
    if request.method() != Method::CONNECT {
        return None;
    }
    let uri = request.uri();
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return None;
    }
    let authority: SocketAddr = uri.authority()?.as_str().parse().ok()?;
    if authority.port() == 0 {
        return None;
    }
    match request.headers().get(FORWARDED) {
        Some(value) if value.to_str().is_err() => None,
        _ => Some(authority),
    }
}
