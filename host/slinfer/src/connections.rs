//! Accepting connections: HTTP/1 on hyper with a cap on open connections
//! and a header-read timeout, so that slow or idle clients cannot hold the
//! server.
//!
//! - A client must send a request's whole header within the header timeout
//!   (default [`HEADER_READ_TIMEOUT`]) of starting it — and a keep-alive
//!   connection must start its next request within it — or the connection
//!   is closed.
//! - At most `max_connections` are open at once (default: the process's
//!   file-descriptor limit, raised to its hard limit at start, less
//!   [`FD_RESERVE`]). Beyond that a new connection is answered `503` with
//!   `Retry-After` and closed at once, rather than left waiting in the
//!   listen backlog.
//! - On shutdown, open connections get [`SHUTDOWN_GRACE`] to finish.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use axum::http::StatusCode;
use slinfer_sandbox::limits::RETRY_AFTER_S;

use crate::api::ApiError;
use crate::metrics::Metrics;

/// Time a client has to send a request's header (and an idle keep-alive
/// connection to start its next request).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// File descriptors kept for everything but connections (model files,
/// compile cache, outbound requests, logs).
pub const FD_RESERVE: u64 = 512;
/// How long open connections may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The cap on open connections and the header timeout.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Raises the soft limit on open files to the hard limit; returns the
/// default connection cap that leaves [`FD_RESERVE`] of it.
pub fn default_max_connections() -> usize {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    limit.saturating_sub(FD_RESERVE).max(64) as usize
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors or the like: the connection waits
                // in the backlog; try again shortly.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            tokio::spawn(refuse(stream));
            continue;
        };
        metrics.connections_open.inc();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let conn = graceful.watch(conn);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
            metrics.connections_open.dec();
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
    }
}

/// Answers a connection over the cap with 503 and closes it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let body = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        "the server has as many connections open as it may; retry later",
    )
    .body()
    .to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {RETRY_AFTER_S}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}
