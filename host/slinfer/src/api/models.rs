//! `/v1/models` (list, show, import, remove model packages) and
//! `/v1/status` (the live scheduler's state).
//!
//! An import answers `200` with a stream of JSON lines as it goes:
//! `{"progress": "..."}` for each importer line, then one final
//! `{"model": {...}}` or `{"error": {"kind", "message"}}` (the status line
//! is sent before the conversion finishes). What can be checked first (name,
//! conflicts, missing source, no engine) gets a plain error status instead.

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{ApiError, AppState};
use crate::models::{ImportSource, ModelsError};

/// Largest GGUF an import may upload.
const MAX_UPLOAD_BYTES: u64 = 64 << 30;

pub(super) async fn list(State(state): State<AppState>) -> Response {
    axum::Json(state.models.list()).into_response()
}

pub(super) async fn show(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match state.models.get(&name) {
        Ok(m) => axum::Json(m).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub(super) async fn remove(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(member) = &state.member else {
        return match state.models.remove(&name) {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => ApiError::from(e).into_response(),
        };
    };
    // In a cluster: here, then the record, which every other member
    // follows by removing its copy.
    if let Err(e) = member.cluster.ensure_connected() {
        return ApiError::from(e).into_response();
    }
    let here = match state.models.remove(&name) {
        Ok(()) => true,
        Err(ModelsError::NotFound(_) | ModelsError::InferenceOff) => false,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match member.removed_model(&name).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) if here => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => ApiError::from(ModelsError::NotFound(name)).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub(super) async fn status(State(state): State<AppState>) -> Response {
    let inference = state.models.inference().map(|i| i.status());
    let cluster = state.member.as_ref().map(|m| {
        let lease = m.cluster.lease_state();
        serde_json::json!({
            "node": m.cluster.identity().node,
            "connected": m.cluster.connected(),
            "leader": lease.leader.map(|l| l.node),
            "members_alive": m.cluster.members().iter().filter(|x| x.alive).count(),
        })
    });
    axum::Json(serde_json::json!({
        "functions": state.functions.list().len(),
        "memory": state.memory.usage(),
        "inference": inference,
        "cluster": cluster,
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportBody {
    /// `default`, or a `.gguf` file / OpenVINO IR folder on the server.
    source: String,
}

/// `PUT /v1/models/{name}`: a JSON body `{"source": ...}`, or the GGUF
/// file itself (`application/octet-stream`).
pub(super) async fn import(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let claim = match state.models.claim(&name) {
        Ok(c) => c,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let (source, upload) = if json {
        let bytes = match axum::body::to_bytes(body, 64 << 10).await {
            Ok(b) => b,
            Err(e) => return bad_body(format!("reading the body: {e}")),
        };
        let parsed: ImportBody = match serde_json::from_slice(&bytes) {
            Ok(b) => b,
            Err(e) => return bad_body(format!("expected {{\"source\": ...}}: {e}")),
        };
        let source = match parsed.source.as_str() {
            "default" => ImportSource::Default,
            p => {
                let p = PathBuf::from(p);
                if !p.is_absolute() {
                    return bad_body("a source path must be absolute (a path on the server)");
                }
                ImportSource::Path(p)
            }
        };
        (source, None)
    } else {
        match receive(&state, &name, body).await {
            Ok(path) => (ImportSource::Path(path.clone()), Some(path)),
            Err(e) => return e.into_response(),
        }
    };
    if let Err(e) = source.check() {
        if let Some(p) = upload {
            let _ = tokio::fs::remove_file(p).await;
        }
        return ApiError::from(e).into_response();
    }
    // Progress lines flow while the import runs; its result is the last line.
    let (tx, mut rx) = mpsc::channel::<String>(64);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let models = state.models.clone();
    let member = state.member.clone();
    tokio::spawn(async move {
        let mut result = models.import(&claim, &source, &tx).await;
        if let (Ok(_), Some(m)) = (&result, &member) {
            let _ = tx.send("storing the package in the cluster".into()).await;
            if let Err(e) = m.imported_model(claim.name()).await {
                result = Err(ModelsError::Io(format!(
                    "imported on this member, but not stored in the cluster: {e}"
                )));
            }
        }
        drop((tx, claim));
        if let Some(p) = upload {
            let _ = tokio::fs::remove_file(p).await;
        }
        let _ = done_tx.send(result);
    });
    let progress = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(|line| serde_json::json!({ "progress": line }));
    let last = futures::stream::once(async move {
        match done_rx.await {
            Ok(Ok(m)) => serde_json::json!({ "model": m }),
            Ok(Err(e)) => ApiError::from(e).body(),
            Err(_) => ApiError::from(ModelsError::Io("the import task stopped".into())).body(),
        }
    });
    let lines = progress
        .chain(last)
        .map(|v| Ok::<_, std::convert::Infallible>(format!("{v}\n")));
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

fn bad_body(message: impl Into<String>) -> Response {
    bad_request(message).into_response()
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// Streams an uploaded GGUF to a fresh file (deleted if anything fails).
async fn receive(state: &AppState, name: &str, body: Body) -> Result<PathBuf, ApiError> {
    let path = state.models.upload_path(name).map_err(ApiError::from)?;
    let result = async {
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| ApiError::from(ModelsError::Io(format!("upload: {e}"))))?;
        let mut stream = body.into_data_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| bad_request(format!("reading the upload: {e}")))?;
            total += chunk.len() as u64;
            if total > MAX_UPLOAD_BYTES {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "upload_too_large",
                    format!("the upload is larger than {MAX_UPLOAD_BYTES} bytes"),
                ));
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| ApiError::from(ModelsError::Io(format!("upload: {e}"))))?;
        }
        if total == 0 {
            return Err(bad_request(
                "empty body: send the GGUF file, or JSON {\"source\": ...}",
            ));
        }
        file.flush()
            .await
            .map_err(|e| ApiError::from(ModelsError::Io(format!("upload: {e}"))))?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = tokio::fs::remove_file(&path).await;
            Err(e)
        }
    }
}
