//! The HTTP API (axum): function management under `/v1/functions`, model
//! packages under `/v1/models` and the scheduler's state at `/v1/status`
//! (admin token required), invocation under `/fn/{name}/...`, `/healthz`,
//! `/metrics` and the dashboard under `/ui` (`crate::ui`).
//!
//! This room translates between HTTP and the `functions` room; it holds no
//! state of its own beyond the admin token.

mod error;
mod models;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

use crate::functions::{Functions, InvokeFailure, constant_time_eq};
use crate::metrics::Metrics;
pub use error::ApiError;

/// Shared state of the API handlers.
#[derive(Clone)]
pub struct AppState {
    pub functions: Arc<Functions>,
    pub models: Arc<crate::models::Models>,
    pub metrics: Arc<Metrics>,
    pub admin_token: Arc<str>,
    pub max_package_bytes: u64,
    /// Who may read `/metrics` (it names every function and model).
    pub metrics_access: MetricsAccess,
    /// The host-wide memory budget (status and metrics show it).
    pub memory: Arc<slinfer_inference::MemoryBudget>,
    /// This host as a cluster member (`serve --cluster`).
    pub member: Option<Arc<crate::cluster::Member>>,
    /// When this server started (the dashboard tells a restart by it).
    pub started_unix_s: u64,
}

/// Who may read `/metrics` (`serve --metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsAccess {
    /// Anyone who can reach the server (the default: a Prometheus scraper
    /// needs no token).
    Public,
    /// Only with the admin token.
    Admin,
}

/// The whole router.
pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/v1/functions", get(list_functions))
        .route(
            "/v1/functions/{name}",
            get(show_function)
                .put(deploy_function)
                .delete(delete_function),
        )
        .route("/v1/models", get(models::list))
        .route(
            "/v1/models/{name}",
            get(models::show).put(models::import).delete(models::remove),
        )
        .route("/v1/status", get(models::status))
        .route("/v1/cluster", get(cluster_view));
    // The dashboard's state names what `/metrics` names: the same access.
    let observed = Router::new()
        .route("/metrics", get(metrics))
        .merge(crate::ui::api());
    let (admin, public) = match state.metrics_access {
        MetricsAccess::Admin => (admin.merge(observed), Router::new()),
        MetricsAccess::Public => (admin, observed),
    };
    let admin = admin.route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .merge(admin)
        .merge(public)
        .route("/fn/{name}", any(invoke))
        .route("/fn/{name}/", any(invoke))
        .route("/fn/{name}/{*path}", any(invoke))
        .route("/healthz", get(healthz))
        .merge(crate::ui::pages())
        .with_state(state)
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive, as RFC 9110 says).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match bearer(req.headers()) {
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this route needs the admin token: send `Authorization: Bearer <token>`",
        )
        .into_response(),
        Some(t) if !constant_time_eq(t.as_bytes(), state.admin_token.as_bytes()) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin token is wrong",
        )
        .into_response(),
        Some(_) => next.run(req).await,
    }
}

/// `ok`, and in a cluster, a line when this member lost NATS (it still
/// serves what it has, so the status stays 200).
async fn healthz(State(state): State<AppState>) -> String {
    let cut_off = state.member.as_ref().and_then(|m| m.health());
    format!("ok\n{}", cut_off.unwrap_or_default())
}

/// `GET /v1/cluster`: the members, their devices and instances, the
/// controller, as this member sees them.
async fn cluster_view(State(state): State<AppState>) -> Response {
    match &state.member {
        Some(m) => axum::Json(m.view().await).into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_clustered",
            "this server runs alone: start it with --cluster nats://HOST:PORT to join a cluster",
        )
        .into_response(),
    }
}

async fn list_functions(State(state): State<AppState>) -> Response {
    let all: Vec<_> = state.functions.list().iter().map(|d| d.info()).collect();
    axum::Json(all).into_response()
}

async fn show_function(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match state.functions.get(&name) {
        Some(d) => axum::Json(d.info()).into_response(),
        None => ApiError::from(InvokeFailure::NotFound(name)).into_response(),
    }
}

async fn deploy_function(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Response {
    let limit = state.max_package_bytes as usize;
    let archive = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "package_too_large",
                format!("the package is larger than the limit of {limit} bytes"),
            )
            .into_response();
        }
    };
    if let Some(m) = &state.member
        && let Err(e) = m.cluster.ensure_connected()
    {
        return ApiError::from(e).into_response();
    }
    let info = match state.functions.deploy(&name, archive.clone(), None).await {
        Ok(info) => info,
        Err(e) => return ApiError::from(e).into_response(),
    };
    if let Some(m) = &state.member
        && let Err(e) = m.deployed(&info, &archive).await
    {
        return ApiError::from(e).into_response();
    }
    (StatusCode::OK, axum::Json(info)).into_response()
}

async fn delete_function(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    if let Some(m) = &state.member
        && let Err(e) = m.cluster.ensure_connected()
    {
        return ApiError::from(e).into_response();
    }
    let here = match state.functions.remove(&name).await {
        Ok(here) => here,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let in_cluster = match &state.member {
        Some(m) => match m.removed_function(&name).await {
            Ok(had) => had,
            Err(e) => return ApiError::from(e).into_response(),
        },
        None => false,
    };
    if here || in_cluster {
        StatusCode::NO_CONTENT.into_response()
    } else {
        ApiError::from(InvokeFailure::NotFound(name)).into_response()
    }
}

async fn invoke(
    State(state): State<AppState>,
    Path(params): Path<Vec<(String, String)>>,
    req: Request,
) -> Response {
    let name = params
        .iter()
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let Some(d) = state.functions.get(&name) else {
        return ApiError::from(InvokeFailure::NotFound(name)).into_response();
    };
    if !d.invoke_key_ok(bearer(req.headers())) {
        return ApiError::from(InvokeFailure::Unauthorized).into_response();
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > d.limits.max_request_body_bytes) {
        tracing::debug!(function = %name, bytes = n, "request body over the limit");
        let e = slinfer_sandbox::InvokeError::RequestTooLarge {
            limit_bytes: d.limits.max_request_body_bytes,
        };
        state.metrics.record(&name, 0.0, Some(e.kind()));
        return ApiError::from(InvokeFailure::from(e)).into_response();
    }
    // The guest sees the path below /fn/{name}, raw (not percent-decoded).
    let raw = req.uri().path();
    let prefix_len = "/fn/".len()
        + raw["/fn/".len()..]
            .find('/')
            .unwrap_or(raw.len() - "/fn/".len());
    let rest = &raw[prefix_len..];
    let mut guest_path = if rest.is_empty() {
        "/".to_owned()
    } else {
        rest.to_owned()
    };
    if let Some(q) = req.uri().query() {
        guest_path.push('?');
        guest_path.push_str(q);
    }
    let Ok(path_and_query) = guest_path.parse() else {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_path",
            "the request path is not valid",
        )
        .into_response();
    };
    match state.functions.invoke(d, req, path_and_query).await {
        Ok(resp) => resp,
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    if let Some(i) = state.models.inference() {
        i.refresh_metrics();
    }
    state.metrics.set_memory(state.memory.usage());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}
