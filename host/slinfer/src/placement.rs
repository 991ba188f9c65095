//! The controller's placement: which member starts a new instance of a
//! model. The member holding the controller lease decides, from every
//! member's published state, with the scheduler's own ordering
//! (`slinfer_scheduler::routing_order`: members whose scheduler would put
//! a request on an instance first, then those with room for a new one,
//! then those with room once idle instances unload; each group CPU first,
//! busiest first, idle last). The chosen member reconciles by making the
//! final admission with its own scheduler, which loads the instance; its
//! keep-alive unloads it when idle. Token-level grants never leave a member.
//!
//! It is asked in two cases:
//!
//! - a router found no member with an instance that would take a request
//!   ([`Router`](crate::routing::Router) tries those itself, without a
//!   question): the controller names the members to try for a new one, and
//!   remembers what it sent where until the member publishes the instance,
//!   so a burst arriving at several routers starts one instance, not one
//!   per router;
//! - a member is lost with instances no live member has: the controller
//!   starts each on the member it would name for a request
//!   ([`replace_lost`]).
//!
//! A router that gets no answer within [`ASK_WITHIN`] (the lease changing
//! hands) orders the members itself, on the same published state.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use slinfer_cluster::Cluster;
use slinfer_inference::{GenerateRequest, Inference};
use slinfer_scheduler::Probe;

use crate::routing::{Router, Standing, loaded_models, ranked_members};

/// How long a router waits for the controller's answer.
pub const ASK_WITHIN: Duration = Duration::from_millis(500);
/// How long a new instance the controller placed counts as loading on its
/// member (until that member publishes it): loading a model on a busy
/// 2-core machine takes up to tens of seconds.
const LOADING_FOR: Duration = Duration::from_secs(30);
/// How often the controller looks for models a lost member was serving.
const REPLACE_EVERY: Duration = Duration::from_millis(500);
/// How long before the controller tries a lost model again.
const REPLACE_RETRY: Duration = Duration::from_secs(10);

/// A router's question: where should a new instance of `model` go?
#[derive(Serialize, Deserialize)]
struct Question {
    model: String,
    /// Members not to name: the asker and those it already tried.
    skip: Vec<String>,
}

/// The controller's answer: the members to try, in order.
#[derive(Serialize, Deserialize)]
struct Answer {
    nodes: Vec<String>,
}

/// The members to try for a new instance of a model, from `ranked` (the
/// routing order): the member the controller last sent a new instance of
/// it (still loading there) first, the rest in order.
fn order_for_new(ranked: &[(String, Standing)], loading: Option<&str>) -> Vec<String> {
    let mut order: Vec<String> = ranked.iter().map(|(node, _)| node.clone()).collect();
    if let Some(at) = loading.and_then(|n| order.iter().position(|m| m == n)) {
        let node = order.remove(at);
        order.insert(0, node);
    }
    order
}

/// The controller's side: its decisions and what it remembers of them.
pub struct Placer {
    cluster: Arc<Cluster>,
    /// Per model: the member last sent a new instance of it, and when.
    loading: Mutex<HashMap<String, (String, Instant)>>,
}

impl Placer {
    pub fn new(cluster: Arc<Cluster>) -> Arc<Placer> {
        Arc::new(Placer {
            cluster,
            loading: Mutex::default(),
        })
    }

    /// Where a new instance of `model` should go (members to try, in
    /// order), leaving out `skip`; the first, when its scheduler said it
    /// would start one, is recorded in the books with `reason`.
    pub fn place(&self, model: &str, skip: &[String], reason: &str) -> Vec<String> {
        let members = ranked_members(&self.cluster, model, skip);
        let mut loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        // An instance its member publishes, or one that never came, is no
        // longer loading.
        if let Some((node, at)) = loading.get(model) {
            let published = members
                .iter()
                .any(|(n, s)| n == node && s.admission == Probe::Existing);
            if published || at.elapsed() > LOADING_FOR {
                loading.remove(model);
            }
        }
        let pending = loading.get(model).map(|(n, _)| n.clone());
        let order = order_for_new(&members, pending.as_deref());
        let first = order
            .first()
            .and_then(|n| members.iter().find(|(m, _)| m == n));
        if let Some((node, standing)) = first
            && pending.as_ref() != Some(node)
            && matches!(standing.admission, Probe::New | Probe::NewAfterUnload)
        {
            tracing::info!(%model, %node, reason, "controller: a new instance placed");
            self.cluster.record_placement(model, node, reason);
            loading.insert(model.to_owned(), (node.clone(), Instant::now()));
        }
        order
    }

    /// Answer routers' questions while this member holds the lease.
    pub async fn answer(self: &Arc<Self>) -> anyhow::Result<()> {
        let placer = self.clone();
        self.cluster
            .answer_as_controller(move |question| {
                let nodes = match serde_json::from_slice::<Question>(question) {
                    Ok(q) => placer.place(&q.model, &q.skip, "request"),
                    Err(e) => {
                        tracing::debug!("controller: a question that does not parse: {e}");
                        Vec::new()
                    }
                };
                serde_json::to_vec(&Answer { nodes }).expect("an answer serializes")
            })
            .await?;
        Ok(())
    }
}

/// Ask the controller where a new instance of `model` should go; `None`
/// when it does not answer in time.
pub(crate) async fn ask(cluster: &Cluster, model: &str, skip: Vec<String>) -> Option<Vec<String>> {
    let question = serde_json::to_vec(&Question {
        model: model.to_owned(),
        skip,
    })
    .expect("a question serializes");
    match cluster.ask_controller(question, ASK_WITHIN).await {
        Ok(bytes) => match serde_json::from_slice::<Answer>(&bytes) {
            Ok(a) => Some(a.nodes),
            Err(e) => {
                tracing::debug!("controller: an answer that does not parse: {e}");
                None
            }
        },
        Err(e) => {
            tracing::debug!("controller: no placement answer: {e}");
            None
        }
    }
}

/// While this member holds the controller lease: when a member is lost
/// with instances of models that no live member has loaded, start one of
/// each where the controller places it, before a request has to wait for
/// it. A one-token generation there loads the instance, which then stays
/// for its keep-alive.
pub async fn replace_lost(placer: Arc<Placer>, router: Arc<Router>, inference: Arc<Inference>) {
    let cluster = placer.cluster.clone();
    let me = cluster.identity().node.clone();
    let mut tried: HashMap<String, Instant> = Default::default();
    loop {
        tokio::time::sleep(REPLACE_EVERY).await;
        if !cluster.lease_state().held {
            continue;
        }
        let members = cluster.members();
        let (alive, lost): (Vec<_>, Vec<_>) = members.iter().partition(|m| m.alive);
        let loaded: HashSet<String> = alive
            .iter()
            .flat_map(|m| loaded_models(&m.state.report.inference))
            .collect();
        for m in lost {
            for model in loaded_models(&m.state.report.inference) {
                let recent = tried
                    .get(&model)
                    .is_some_and(|t| t.elapsed() < REPLACE_RETRY);
                if loaded.contains(&model) || recent {
                    continue;
                }
                let nodes =
                    placer.place(&model, std::slice::from_ref(&m.state.node), "lost member");
                if nodes.is_empty() {
                    continue;
                }
                tried.insert(model.clone(), Instant::now());
                tracing::info!(%model, lost = %m.state.node, to = %nodes[0], "controller: re-placing a lost member's model");
                let warm = warm(inference.clone(), router.clone(), me.clone(), model, nodes);
                tokio::spawn(warm);
            }
        }
    }
}

/// Load an instance of `model` on the first of `nodes` that takes a
/// one-token generation (this member's own devices when it is one).
async fn warm(
    inference: Arc<Inference>,
    router: Arc<Router>,
    me: String,
    model: String,
    nodes: Vec<String>,
) {
    let request = GenerateRequest {
        function: "slinfer-controller".into(),
        model: model.clone(),
        prompt: slinfer_inference::Prompt::Text("warm-up".into()),
        params: slinfer_inference::GenerationParams {
            max_tokens: Some(1),
            ..Default::default()
        },
        ttft_slo_s: 0.0,
        ttft_prompt_tokens_per_s: 0.0,
        tpot_slo_s: 0.0,
        arrived: None,
    };
    let started = if nodes[0] == me {
        inference.generate_here(request).await
    } else {
        let others = nodes.into_iter().filter(|n| *n != me).collect();
        router.generate_on(request, others).await
    };
    match started {
        Ok(mut stream) => {
            while let Some(Ok(_)) = stream.next().await {}
            tracing::info!(%model, "controller: model re-placed");
        }
        Err(e) => tracing::warn!(%model, "controller: cannot re-place the model: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slinfer_scheduler::DeviceKind;

    fn standing(admission: Probe, kind: DeviceKind, load: Option<f64>) -> Standing {
        Standing {
            admission,
            kind,
            load,
        }
    }

    #[test]
    fn a_new_instance_goes_by_the_schedulers_order_and_after_one_still_loading() {
        let members = vec![
            (
                "gpu".to_owned(),
                standing(Probe::New, DeviceKind::Gpu, None),
            ),
            (
                "full".to_owned(),
                standing(Probe::No, DeviceKind::Cpu, Some(9.0)),
            ),
            (
                "idle-cpu".to_owned(),
                standing(Probe::New, DeviceKind::Cpu, None),
            ),
            (
                "busy-cpu".to_owned(),
                standing(Probe::New, DeviceKind::Cpu, Some(0.5)),
            ),
            (
                "unload".to_owned(),
                standing(Probe::NewAfterUnload, DeviceKind::Cpu, Some(0.2)),
            ),
        ];
        let members = crate::routing::rank(members);
        // CPU first, busiest first, idle last; after unloading; nowhere now last.
        assert_eq!(
            order_for_new(&members, None),
            ["busy-cpu", "idle-cpu", "gpu", "unload", "full"]
        );
        // The member still loading the last new instance comes first.
        assert_eq!(
            order_for_new(&members, Some("gpu")),
            ["gpu", "busy-cpu", "idle-cpu", "unload", "full"]
        );
        // One that is no longer a candidate changes nothing.
        assert_eq!(order_for_new(&members, Some("gone"))[0], "busy-cpu");
        assert!(order_for_new(&[], Some("gpu")).is_empty());
    }

    #[test]
    fn questions_and_answers_cross_as_json() {
        let q: Question = serde_json::from_slice(
            &serde_json::to_vec(&Question {
                model: "m".into(),
                skip: vec!["a".into()],
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!((q.model.as_str(), q.skip), ("m", vec!["a".to_owned()]));
        let a: Answer = serde_json::from_str(r#"{"nodes": ["b", "c"]}"#).unwrap();
        assert_eq!(a.nodes, ["b", "c"]);
    }
}
