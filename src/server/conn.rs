//! The accept loop: how many connections the server holds and how long each may stay silent.
//!
//! `axum::serve` sets neither, so idle sockets, or sockets holding half a request line, used to
//! stay open until their client closed them, and about 1,000 of them exhausted a common
//! 1,024-descriptor limit. Here:
//! - a connection must send a request's head within the header timeout, counted from when it
//!   opens and again from the end of each reply (hyper restarts the same timer while a kept-alive
//!   connection waits for its next request, so this is also the idle keep-alive timeout);
//! - at most `max_connections` are open at once: one beyond them is answered with a 503 error
//!   object and closed at once, so the listen queue keeps draining and the descriptors in use
//!   stay bounded;
//! - on shutdown the loop stops accepting and lets open connections finish their reply.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::api::ApiError;

/// Limits on connections, from `serve`'s flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Time to send a request's head, from the connection's start or its previous reply.
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// How long to wait after an accept error that is not the client's doing (EMFILE, ENFILE,
/// ENOBUFS): the condition lasts until some connection closes, and retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until `stop` completes, then waits for the open connections
/// to end (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    stop: impl Future<Output = ()>,
) -> GracefulShutdown {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if !is_connection_error(&e) {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            refuse(&stream, limits.max_connections);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A connection's errors (timeouts, resets, malformed requests) end that connection
            // only: nothing to report to anyone.
            let _ = conn.await;
            drop(permit);
        });
    }
    graceful
}

/// Errors about one connection that went away while queued: accept again at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Answers a connection beyond the cap with a 503 error object and closes it, without waiting:
/// a socket that does not take the few bytes at once gets nothing.
fn refuse(stream: &TcpStream, max: usize) {
    let _ = stream.try_write(refusal(max).as_bytes());
}

fn refusal(max: usize) -> String {
    let body = ApiError::too_many_connections(max).body().to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::refusal;

    #[test]
    fn the_refusal_is_a_complete_http_response_with_an_error_object() {
        let r = refusal(7);
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
        assert!(v["error"]["message"].as_str().unwrap().contains('7'));
    }
}
