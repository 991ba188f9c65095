//! The dashboard: `GET /ui` (one page; its script and style are built into
//! the binary, so it needs no network beyond this server) and
//! `GET /ui/api/state`, the JSON the page polls every second
//! ([`state::UiState`]). The page is public; the state follows `/metrics`
//! (public by default, admin-only with `serve --metrics admin`), since it
//! names the same functions and models. Function details come from
//! `/v1/functions/{name}`, which needs the admin token.

mod state;

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::{ApiError, AppState};

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// Nothing but this server: no inline code, no other origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// The page and its assets, open to anyone.
pub fn pages() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| asset(PAGE, "text/html; charset=utf-8")))
        .route("/ui/", get(|| asset(PAGE, "text/html; charset=utf-8")))
        .route(
            "/ui/app.js",
            get(|| asset(SCRIPT, "text/javascript; charset=utf-8")),
        )
        .route(
            "/ui/app.css",
            get(|| asset(STYLE, "text/css; charset=utf-8")),
        )
        .route("/ui/{*rest}", get(unknown))
}

/// The state the page polls (added where `/metrics` is: public or admin).
pub fn api() -> Router<AppState> {
    Router::new().route("/ui/api/state", get(current))
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn unknown(uri: axum::http::Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no dashboard page at {}: the dashboard is at /ui",
            uri.path()
        ),
    )
    .into_response()
}

async fn current(State(state): State<AppState>) -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(state::UiState::now(&state)),
    )
        .into_response()
}

/// Notes each device's memory once a second for the dashboard's timeline,
/// for as long as the server runs.
pub fn sample_devices(
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    inference: std::sync::Arc<slinfer_inference::Inference>,
) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            metrics.sample_devices(&inference.status());
        }
    });
}
