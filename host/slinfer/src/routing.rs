//! Generations across a cluster: a member's [`Remote`] for the inference
//! service, and the answering side on members with engines.
//!
//! A function's Wasm runs on the member that took its HTTP request; only
//! its `slinfer:llm` generations travel. The service tries this member's
//! own devices first when it serves the model; a model it does not serve,
//! or a local refusal for want of room, comes here:
//!
//! - candidates are the live members that serve the model, ordered on
//!   their last published state (every 250 ms): by where each member's own
//!   scheduler, probing a typical request, said a new one would go (onto
//!   an instance it has, onto a new one in free room, onto a new one once
//!   idle instances unload, nowhere now), then within each group in the
//!   scheduler's bin-packing order over each member's first device (CPU
//!   first, busiest first, idle last): `slinfer_scheduler::routing_order`,
//!   which the simulator's `--cluster` orders members with too;
//! - members with an instance that would take it are tried first; when
//!   none does, the controller says where a new instance goes
//!   ([`crate::placement`]), and with no answer from it within 500 ms this
//!   member's own order of the rest stands;
//! - each candidate makes the final admission with its own scheduler; a
//!   refusal (`Overloaded`, `Unavailable`, a model it no longer serves)
//!   tries the next, and with none left the answer is their
//!   `InferenceError::first_refusal` (an overload with the shortest retry
//!   hint, else the first refusal);
//! - tokens come back as frames on core NATS as they are made; a caller
//!   that hangs up cancels the sequence on the other member; a member lost
//!   mid-stream (silent for 3 s, gone, restarted) ends the stream with
//!   `Unavailable`, which is retryable;
//! - the TTFT deadline counts from the request's arrival at the cluster:
//!   the request carries its age.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use slinfer_cluster::Cluster;
use slinfer_cluster::streams::{Incoming, Outgoing};

use crate::metrics::Metrics;
use crate::placement;
use slinfer_inference::{
    Chunk, GenerateRequest, GenerationStream, Inference, InferenceError, RETRY_AFTER_S, Relay,
    Remote, Usage,
};
use slinfer_scheduler::{DeviceKind, Probe, routing_order};

/// How long a candidate has to say it got the request before the next one
/// is tried (a lost message or a member that just stopped).
const ACCEPT_WITHIN: Duration = Duration::from_secs(1);

/// A generation sent to another member.
#[derive(Serialize, Deserialize)]
struct Routed {
    request: GenerateRequest,
    /// Time since the request reached the cluster (the clocks of two
    /// machines are not compared).
    age_ms: f64,
}

/// What the answering member sends back, in order: `Accepted` at once,
/// then `Started` (or `Error`) once admission and the first token are
/// done, then `Chunk`s, and last `Done` or `Error`.
#[derive(Serialize, Deserialize)]
enum Frame {
    Accepted,
    Started,
    Chunk(Chunk),
    Done(Usage),
    Error(InferenceError),
}

fn encode(frame: &Frame) -> Vec<u8> {
    serde_json::to_vec(frame).expect("a frame serializes")
}

/// The next frame of `out`; a lost member or a frame that does not parse
/// is `Unavailable`, an answer that ended without its last frame too.
async fn next_frame(out: &mut Outgoing, node: &str) -> Result<Frame, InferenceError> {
    match out.next().await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).map_err(|e| {
            unavailable(format!(
                "member {node:?} sent a frame that does not parse: {e}"
            ))
        }),
        Ok(None) => Err(unavailable(format!(
            "member {node:?} ended the generation without its end"
        ))),
        Err(e) => Err(unavailable(format!("{e} while generating"))),
    }
}

fn unavailable(message: String) -> InferenceError {
    InferenceError::Unavailable {
        message,
        retry_after_s: RETRY_AFTER_S,
    }
}

/// This member's way to the others' engines.
pub struct Router {
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
}

impl Router {
    pub fn new(cluster: Arc<Cluster>, metrics: Arc<Metrics>) -> Router {
        Router { cluster, metrics }
    }

    fn count(&self, node: &str, outcome: &'static str) {
        Metrics::route(&self.metrics.routed, node, outcome);
    }

    /// Live members other than this one that serve `model`, best first,
    /// with where each one's scheduler last said a new request of it would
    /// go.
    fn candidates(&self, model: &str) -> Vec<(String, Probe)> {
        let me = self.cluster.identity().node.clone();
        ranked_members(&self.cluster, model, &[me])
            .into_iter()
            .map(|(node, s)| (node, s.admission))
            .collect()
    }

    /// Send `req` to each of `nodes` in turn until one starts it. `None`
    /// when all refused (the refusal to answer with is in `refusal`); an
    /// error other than a refusal ends the search.
    async fn try_in_turn(
        &self,
        req: &GenerateRequest,
        nodes: impl IntoIterator<Item = String>,
        refusal: &mut Option<InferenceError>,
    ) -> Option<Result<GenerationStream, InferenceError>> {
        let arrived = req.arrived.unwrap_or_else(Instant::now);
        for node in nodes {
            let body = serde_json::to_vec(&Routed {
                request: req.clone(),
                age_ms: arrived.elapsed().as_secs_f64() * 1e3,
            })
            .expect("a request serializes");
            match self.try_node(&node, body).await {
                Ok(out) => {
                    tracing::debug!(model = %req.model, %node, "generation routed");
                    self.count(&node, "started");
                    let (relay, stream) = GenerationStream::relayed();
                    let lost = (self.metrics.clone(), node.clone());
                    tokio::spawn(forward(out, node, relay, lost));
                    return Some(Ok(stream));
                }
                Err(e) => {
                    self.count(&node, outcome(&e));
                    match e {
                        InferenceError::Overloaded { .. }
                        | InferenceError::Unavailable { .. }
                        | InferenceError::ModelNotFound(_) => {
                            tracing::debug!(model = %req.model, %node, "candidate refused: {e}");
                            *refusal = Some(match refusal.take() {
                                None => e,
                                Some(first) => first.first_refusal(e),
                            });
                        }
                        e => return Some(Err(e)),
                    }
                }
            }
        }
        None
    }

    /// `req` on the first of `nodes` that admits it (the controller's own
    /// placements).
    pub(crate) async fn generate_on(
        &self,
        mut req: GenerateRequest,
        nodes: Vec<String>,
    ) -> Result<GenerationStream, InferenceError> {
        req.arrived.get_or_insert_with(Instant::now);
        let mut refusal = None;
        match self.try_in_turn(&req, nodes, &mut refusal).await {
            Some(r) => r,
            None => Err(refusal.unwrap_or(InferenceError::ModelNotFound(req.model))),
        }
    }

    /// One candidate: its stream once the first token exists, or why not.
    async fn try_node(&self, node: &str, body: Vec<u8>) -> Result<Outgoing, InferenceError> {
        let mut out = self
            .cluster
            .open_stream(node, body)
            .await
            .map_err(|e| unavailable(format!("cannot reach member {node:?}: {e}")))?;
        match tokio::time::timeout(ACCEPT_WITHIN, next_frame(&mut out, node)).await {
            Ok(Ok(Frame::Accepted)) => {}
            Ok(Ok(_)) => {
                return Err(unavailable(format!(
                    "member {node:?} answered out of order"
                )));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(unavailable(format!(
                    "member {node:?} did not take the request within {} ms",
                    ACCEPT_WITHIN.as_millis()
                )));
            }
        }
        match next_frame(&mut out, node).await? {
            Frame::Started => Ok(out),
            Frame::Error(e) => Err(e),
            _ => Err(unavailable(format!(
                "member {node:?} answered out of order"
            ))),
        }
    }
}

/// The live members serving `model`, except `skip`, best first: by where
/// their own scheduler last said a new request of it would go, then their
/// published devices ([`rank`]).
pub(crate) fn ranked_members(
    cluster: &Cluster,
    model: &str,
    skip: &[String],
) -> Vec<(String, Standing)> {
    rank(
        cluster
            .members()
            .into_iter()
            .filter(|m| m.alive && !skip.contains(&m.state.node))
            .filter(|m| m.state.report.models.iter().any(|n| n == model))
            .map(|m| (m.state.node, Standing::of(&m.state.report.inference, model)))
            .collect(),
    )
}

/// `members` in [`slinfer_scheduler::routing_order`], the order the
/// simulator's `--cluster` ranks members in too.
pub(crate) fn rank(members: Vec<(String, Standing)>) -> Vec<(String, Standing)> {
    routing_order(
        members
            .iter()
            .enumerate()
            .map(|(i, (_, s))| (i, s.admission, s.kind, s.load)),
    )
    .into_iter()
    .map(|i| members[i].clone())
    .collect()
}

/// Where a member stands for one model, from its published status.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Standing {
    /// Where its scheduler said a new request of the model would go.
    pub admission: Probe,
    /// Its first working device in placement order (a CPU if it has one).
    pub kind: DeviceKind,
    /// That device's bin-packing load; none when idle.
    pub load: Option<f64>,
}

/// The parts of a member's published inference status that rank it.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Published {
    devices: Vec<PublishedDevice>,
    models: Vec<PublishedModel>,
}

#[derive(Deserialize)]
struct PublishedDevice {
    kind: DeviceKind,
    #[serde(default)]
    load: Option<f64>,
    #[serde(default)]
    failed: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PublishedModel {
    name: String,
    instances: Vec<serde_json::Value>,
    admission: Option<Probe>,
}

impl Standing {
    pub(crate) fn of(inference: &serde_json::Value, model: &str) -> Standing {
        let p = Published::deserialize(inference).unwrap_or_default();
        let device = p
            .devices
            .iter()
            .filter(|d| d.failed.is_none())
            .min_by_key(|d| d.kind != DeviceKind::Cpu);
        let admission = match p.models.iter().find(|m| m.name == model) {
            None => Probe::No,
            Some(m) => m.admission.unwrap_or(match m.instances.is_empty() {
                true => Probe::New,
                false => Probe::Existing,
            }),
        };
        Standing {
            admission,
            kind: device.map_or(DeviceKind::Gpu, |d| d.kind),
            load: device.and_then(|d| d.load),
        }
    }
}

impl Remote for Router {
    fn generate(
        &self,
        mut req: GenerateRequest,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<GenerationStream, InferenceError>> + Send + '_>,
    > {
        Box::pin(async move {
            req.arrived.get_or_insert_with(Instant::now);
            let (existing, others): (Vec<_>, Vec<_>) = self
                .candidates(&req.model)
                .into_iter()
                .partition(|(_, probe)| *probe == Probe::Existing);
            let existing: Vec<String> = existing.into_iter().map(|(node, _)| node).collect();
            let mut refusal = None;
            // Instances that would take it first, without asking anyone.
            if let Some(r) = self.try_in_turn(&req, existing.clone(), &mut refusal).await {
                return r;
            }
            let mut tried = existing;
            tried.push(self.cluster.identity().node.clone());
            // A new instance: where the controller places it, or (no
            // answer) where this member's view of the same state says. No
            // other member serving the model: nothing to ask.
            let nodes = match others.is_empty() {
                true => Vec::new(),
                false => match placement::ask(&self.cluster, &req.model, tried.clone()).await {
                    Some(nodes) => nodes,
                    None => others.into_iter().map(|(node, _)| node).collect(),
                },
            };
            let nodes = nodes.into_iter().filter(|n| !tried.contains(n));
            match self.try_in_turn(&req, nodes, &mut refusal).await {
                Some(r) => r,
                None => Err(refusal.unwrap_or(InferenceError::ModelNotFound(req.model))),
            }
        })
    }

    fn models(&self) -> Vec<String> {
        let me = &self.cluster.identity().node;
        let mut names: Vec<String> = self
            .cluster
            .members()
            .into_iter()
            .filter(|m| m.alive && &m.state.node != me)
            .flat_map(|m| m.state.report.models)
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// How a refusal is counted.
fn outcome(e: &InferenceError) -> &'static str {
    match e {
        InferenceError::Overloaded { .. } => "overloaded",
        InferenceError::Unavailable { .. } => "unavailable",
        InferenceError::ModelNotFound(_) => "model_not_found",
        _ => "failed",
    }
}

/// Copy a remote generation's frames into the caller's stream until it
/// ends; a caller that hangs up drops `out`, which cancels it there. A
/// member lost midway is counted against `peer`.
async fn forward(
    mut out: Outgoing,
    node: String,
    relay: Relay,
    (metrics, peer): (Arc<Metrics>, String),
) {
    loop {
        let frame = tokio::select! {
            _ = relay.closed() => return,
            f = next_frame(&mut out, &node) => f,
        };
        match frame {
            Ok(Frame::Chunk(c)) => {
                if !relay.chunk(c) {
                    return;
                }
            }
            Ok(Frame::Done(usage)) => return relay.done(usage),
            Ok(Frame::Error(e)) => return relay.error(e),
            Err(e) => {
                Metrics::route(&metrics.routed, &peer, "lost");
                return relay.error(e);
            }
            Ok(_) => {
                return relay.error(unavailable(format!(
                    "member {node:?} answered out of order"
                )));
            }
        }
    }
}

/// The models with an instance loaded, in a member's published status.
pub(crate) fn loaded_models(inference: &serde_json::Value) -> Vec<String> {
    Published::deserialize(inference)
        .unwrap_or_default()
        .models
        .into_iter()
        .filter(|m| !m.instances.is_empty())
        .map(|m| m.name)
        .collect()
}

/// Answer the generations other members send here, on this member's own
/// devices (never routed on).
pub async fn answer(
    cluster: &Arc<Cluster>,
    inference: Arc<Inference>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    cluster
        .answer_streams(move |incoming| {
            Metrics::route(&metrics.answered, &incoming.from, "answered");
            answer_one(incoming, inference.clone())
        })
        .await?;
    Ok(())
}

async fn answer_one(incoming: Incoming, inference: Arc<Inference>) {
    let routed: Routed = match serde_json::from_slice(&incoming.body) {
        Ok(r) => r,
        Err(e) => {
            let e = InferenceError::InvalidParams(format!("a routed request does not parse: {e}"));
            let _ = incoming.finish(encode(&Frame::Error(e))).await;
            return;
        }
    };
    if incoming.send(encode(&Frame::Accepted)).await.is_err() {
        return;
    }
    let mut request = routed.request;
    request.arrived = Some(
        Instant::now()
            .checked_sub(Duration::from_secs_f64(routed.age_ms.max(0.0) / 1e3))
            .unwrap_or_else(Instant::now),
    );
    let started = tokio::select! {
        r = inference.generate_here(request) => r,
        _ = incoming.cancelled() => return,
    };
    let mut stream = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = incoming.finish(encode(&Frame::Error(e))).await;
            return;
        }
    };
    if incoming.send(encode(&Frame::Started)).await.is_err() {
        return;
    }
    loop {
        // Dropping `stream` (cancelled, or the asker unreachable) ends the
        // request here and frees its sequence.
        let next = tokio::select! {
            n = stream.next_chunk() => n,
            _ = incoming.cancelled() => return,
        };
        match next {
            Some(Ok(chunk)) => {
                if incoming.send(encode(&Frame::Chunk(chunk))).await.is_err() {
                    return;
                }
            }
            Some(Err(e)) => {
                let _ = incoming.finish(encode(&Frame::Error(e))).await;
                return;
            }
            None => {
                let _ = incoming.finish(encode(&Frame::Done(stream.usage()))).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(kind: &str, load: Option<f64>, admission: &str) -> serde_json::Value {
        serde_json::json!({
            "devices": [{"name": "d", "kind": kind, "load": load, "failed": null}],
            "models": [{"name": "m", "instances": [], "admission": admission}],
        })
    }

    #[test]
    fn a_member_stands_by_its_admission_and_first_working_device() {
        let s = Standing::of(&status("cpu", Some(0.4), "existing"), "m");
        assert_eq!(
            s,
            Standing {
                admission: Probe::Existing,
                kind: DeviceKind::Cpu,
                load: Some(0.4)
            }
        );
        assert_eq!(
            Standing::of(&status("gpu", None, "no"), "m").admission,
            Probe::No
        );
        // A model it does not list: nowhere.
        assert_eq!(
            Standing::of(&status("gpu", None, "new"), "other").admission,
            Probe::No
        );
        // Without a probe, its instances say it.
        let old = serde_json::json!({"models": [{"name": "m", "instances": [{}]}]});
        assert_eq!(Standing::of(&old, "m").admission, Probe::Existing);
        // A CPU is chosen over a GPU; a failed device not at all.
        let both = serde_json::json!({"devices": [
            {"kind": "gpu", "load": 5.0, "failed": null},
            {"kind": "cpu", "load": null, "failed": "driver error"},
        ]});
        let s = Standing::of(&both, "m");
        assert_eq!((s.kind, s.load), (DeviceKind::Gpu, Some(5.0)));
        // A status that does not parse stands as an idle GPU, nowhere.
        let s = Standing::of(&serde_json::json!("?"), "m");
        assert!(s.admission == Probe::No && s.kind == DeviceKind::Gpu && s.load.is_none());
    }

    #[test]
    fn frames_and_requests_cross_as_json() {
        let req = GenerateRequest {
            function: "chat".into(),
            model: "m".into(),
            prompt: slinfer_inference::Prompt::Text("hi".into()),
            params: Default::default(),
            ttft_slo_s: 0.0,
            ttft_prompt_tokens_per_s: 0.0,
            tpot_slo_s: 0.0,
            arrived: Some(Instant::now()),
        };
        let body = serde_json::to_vec(&Routed {
            request: req,
            age_ms: 12.5,
        })
        .unwrap();
        let back: Routed = serde_json::from_slice(&body).unwrap();
        assert_eq!(back.age_ms, 12.5);
        assert!(
            back.request.arrived.is_none(),
            "the age travels, not an Instant"
        );
        let f: Frame = serde_json::from_slice(&encode(&Frame::Error(InferenceError::Overloaded {
            retry_after_s: 1.5,
        })))
        .unwrap();
        assert!(
            matches!(f, Frame::Error(InferenceError::Overloaded { retry_after_s }) if retry_after_s == 1.5)
        );
    }
}
