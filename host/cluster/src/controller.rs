//! The controller: one member at a time, elected through a lease in the
//! control bucket.
//!
//! The lease is the key `leader`. A member takes it by creating the key
//! (which succeeds only when it is absent or deleted), renews it every
//! [`HEARTBEAT`] × 2 by an update that names the revision it last wrote
//! (compare-and-set), and hands it back on a clean shutdown by deleting it.
//! Every other member watches the revision: when it has not moved for
//! [`DEAD_AFTER`], the holder is presumed dead and a member takes over with
//! an update naming that stale revision; JetStream lets exactly one such
//! update through. So the controller changes within `DEAD_AFTER` plus one
//! poll of its holder's death, and never without a compare-and-set. Clocks
//! are never compared across machines.
//!
//! The controller keeps the cluster's books under the key `books`: the
//! members it counts alive and dead, what each serves, and its latest
//! placement decisions. Members ask it questions on core NATS
//! ([`Cluster::ask_controller`]); only the lease holder answers
//! ([`Cluster::answer_as_controller`]). What the questions mean is the
//! binary's business.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::Operation;
use serde::{Deserialize, Serialize};

use bytes::Bytes;
use futures::StreamExt;

use crate::members::now_ms;
use crate::{Cluster, ClusterError, DEAD_AFTER, HEARTBEAT};

const LEADER_KEY: &str = "leader";
const BOOKS_KEY: &str = "books";
/// The SHA-256 of the cluster's admin token.
const TOKEN_KEY: &str = "admin-token-sha256";
/// Where members ask the controller.
const QUESTIONS: &str = "slinfer.control";
/// How many of its latest placement decisions the books keep.
const PLACEMENTS_KEPT: usize = 32;

/// The holder of the controller lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leader {
    pub node: String,
    pub member_id: String,
    /// Counts changes of holder since the cluster began.
    pub term: u64,
    pub since_unix_ms: u64,
}

/// What this member knows of the lease.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LeaseState {
    pub leader: Option<Leader>,
    /// Whether this member holds it.
    pub held: bool,
    #[serde(skip)]
    revision: u64,
    #[serde(skip)]
    observed_at: Option<Instant>,
}

/// The controller's books: its count of the members and what runs where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Books {
    pub leader: String,
    pub term: u64,
    pub written_at_unix_ms: u64,
    pub alive: Vec<String>,
    pub dead: Vec<String>,
    /// Per live member: the models it serves.
    pub serving: Vec<(String, Vec<String>)>,
    /// The controller's latest placement decisions, oldest first.
    #[serde(default)]
    pub placements: Vec<Placed>,
}

/// One placement decision of the controller: a new instance of `model`
/// sent to `node`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placed {
    pub model: String,
    pub node: String,
    /// What asked for it (a request no instance could take, a lost member).
    pub reason: String,
    pub at_unix_ms: u64,
}

#[derive(Default)]
pub(crate) struct Lease {
    state: Mutex<LeaseState>,
    /// This member's latest placement decisions as the controller.
    placements: Mutex<VecDeque<Placed>>,
}

impl Cluster {
    /// The lease as last seen.
    pub fn lease_state(&self) -> LeaseState {
        self.lease
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The controller's last books, if any.
    pub async fn books(&self) -> Result<Option<Books>, ClusterError> {
        let entry = self
            .control_kv
            .entry(BOOKS_KEY)
            .await
            .map_err(ClusterError::store)?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .and_then(|e| serde_json::from_slice(&e.value).ok()))
    }

    /// Check that this member's admin token is the cluster's: the first
    /// member stores the token's digest, every later one must match it.
    pub async fn check_admin_token(&self, digest: &str) -> Result<(), ClusterError> {
        match self
            .control_kv
            .create(TOKEN_KEY, digest.to_owned().into())
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(ClusterError::store(e)),
        }
        let stored = self
            .control_kv
            .get(TOKEN_KEY)
            .await
            .map_err(ClusterError::store)?;
        if stored.as_deref() == Some(digest.as_bytes()) {
            Ok(())
        } else {
            Err(ClusterError::TokenMismatch)
        }
    }

    /// Note a placement decision this member made as the controller; the
    /// books show the latest [`PLACEMENTS_KEPT`].
    pub fn record_placement(&self, model: &str, node: &str, reason: &str) {
        let mut p = self
            .lease
            .placements
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if p.len() == PLACEMENTS_KEPT {
            p.pop_front();
        }
        p.push_back(Placed {
            model: model.to_owned(),
            node: node.to_owned(),
            reason: reason.to_owned(),
            at_unix_ms: now_ms(),
        });
    }

    /// Ask the controller `question` and wait `within` for its answer. No
    /// answer (no lease holder, one just lost, NATS down) is an error: the
    /// caller decides without it.
    pub async fn ask_controller(
        &self,
        question: Vec<u8>,
        within: Duration,
    ) -> Result<Bytes, ClusterError> {
        self.ensure_connected()?;
        match tokio::time::timeout(within, self.client.request(QUESTIONS, question.into())).await {
            Ok(Ok(m)) => Ok(m.payload),
            Ok(Err(e)) => Err(ClusterError::store(e)),
            Err(_) => Err(ClusterError::Store(format!(
                "the controller did not answer within {} ms",
                within.as_millis()
            ))),
        }
    }

    /// Answer the questions members ask the controller with `answer`,
    /// while this member holds the lease (the others stay silent), for the
    /// life of the cluster handle.
    pub async fn answer_as_controller<F>(self: &Arc<Self>, answer: F) -> Result<(), ClusterError>
    where
        F: Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static,
    {
        let mut questions = self
            .client
            .subscribe(QUESTIONS)
            .await
            .map_err(ClusterError::store)?;
        let cluster = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(m) = questions.next().await {
                let Some(c) = cluster.upgrade() else { return };
                let Some(reply) = m.reply else { continue };
                if !c.lease_state().held {
                    continue;
                }
                if let Err(e) = c.client.publish(reply, answer(&m.payload).into()).await {
                    tracing::debug!("controller: cannot answer: {e}");
                }
            }
        });
        Ok(())
    }

    fn set_lease(&self, f: impl FnOnce(&mut LeaseState)) {
        f(&mut self.lease.state.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Run the election for the life of the cluster handle.
pub(crate) async fn run(cluster: Weak<Cluster>) {
    let mut tick = tokio::time::interval(HEARTBEAT * 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_renewed = Instant::now();
    let mut dead_before: Vec<String> = Vec::new();
    loop {
        tick.tick().await;
        let Some(c) = cluster.upgrade() else { return };
        let step = tokio::time::timeout(HEARTBEAT * 4, step(&c)).await;
        match step {
            Ok(Ok(())) if c.lease_state().held => {
                last_renewed = Instant::now();
                keep_books(&c, &mut dead_before).await;
            }
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("controller lease: {e}"),
            Err(_) => tracing::debug!("controller lease: timed out"),
        }
        // A holder that cannot renew steps down before anyone may take over.
        if c.lease_state().held && last_renewed.elapsed() > DEAD_AFTER - HEARTBEAT * 4 {
            c.set_lease(|s| s.held = false);
            tracing::warn!("controller: could not renew the lease; stepped down");
        }
    }
}

fn me(c: &Cluster, term: u64) -> Leader {
    Leader {
        node: c.identity.node.clone(),
        member_id: c.identity.member_id.clone(),
        term,
        since_unix_ms: now_ms(),
    }
}

async fn step(c: &Cluster) -> Result<(), ClusterError> {
    let kv = &c.control_kv;
    let entry = kv.entry(LEADER_KEY).await.map_err(ClusterError::store)?;
    let current = entry.filter(|e| e.operation == Operation::Put).map(|e| {
        let leader: Option<Leader> = serde_json::from_slice(&e.value).ok();
        (e.revision, leader)
    });
    let prev_term = c.lease_state().leader.map_or(0, |l| l.term);
    match current {
        None => {
            let mine = me(c, prev_term + 1);
            let value = serde_json::to_vec(&mine).expect("a leader serializes");
            if let Ok(rev) = kv.create(LEADER_KEY, value.into()).await {
                took(c, mine, rev);
            }
        }
        Some((rev, Some(l))) if l.member_id == c.identity.member_id => {
            let value = serde_json::to_vec(&l).expect("a leader serializes");
            match kv.update(LEADER_KEY, value.into(), rev).await {
                Ok(rev) => c.set_lease(|s| {
                    s.held = true;
                    s.leader = Some(l);
                    s.revision = rev;
                    s.observed_at = Some(Instant::now());
                }),
                Err(e) => {
                    c.set_lease(|s| s.held = false);
                    tracing::warn!("controller: lost the lease: {e}");
                }
            }
        }
        Some((rev, leader)) => {
            let state = c.lease_state();
            if state.held {
                tracing::warn!(by = ?leader.as_ref().map(|l| &l.node), "controller: the lease was taken over");
            }
            if state.revision != rev || state.observed_at.is_none() {
                c.set_lease(|s| {
                    s.held = false;
                    s.leader = leader;
                    s.revision = rev;
                    s.observed_at = Some(Instant::now());
                });
            } else if state
                .observed_at
                .is_some_and(|at| at.elapsed() >= DEAD_AFTER)
            {
                let term = leader.as_ref().map_or(prev_term, |l| l.term) + 1;
                let mine = me(c, term);
                let value = serde_json::to_vec(&mine).expect("a leader serializes");
                if let Ok(rev) = kv.update(LEADER_KEY, value.into(), rev).await {
                    tracing::info!(
                        from = ?leader.map(|l| l.node),
                        "controller: the holder stopped renewing; took over"
                    );
                    took(c, mine, rev);
                }
            }
        }
    }
    Ok(())
}

fn took(c: &Cluster, mine: Leader, rev: u64) {
    tracing::info!(
        term = mine.term,
        "controller: this member is now the controller"
    );
    c.set_lease(|s| {
        s.held = true;
        s.leader = Some(mine);
        s.revision = rev;
        s.observed_at = Some(Instant::now());
    });
}

async fn keep_books(c: &Cluster, dead_before: &mut Vec<String>) {
    let members = c.members();
    let (alive, dead): (Vec<_>, Vec<_>) = members.iter().partition(|m| m.alive);
    let dead: Vec<String> = dead.iter().map(|m| m.state.node.clone()).collect();
    for node in dead.iter().filter(|n| !dead_before.contains(n)) {
        tracing::warn!(node = %node, "controller: member counted dead (silent for {} s)", DEAD_AFTER.as_secs());
    }
    *dead_before = dead.clone();
    let Some(leader) = c.lease_state().leader else {
        return;
    };
    let books = Books {
        leader: leader.node,
        term: leader.term,
        written_at_unix_ms: now_ms(),
        alive: alive.iter().map(|m| m.state.node.clone()).collect(),
        dead,
        serving: alive
            .iter()
            .map(|m| (m.state.node.clone(), m.state.report.models.clone()))
            .collect(),
        placements: c
            .lease
            .placements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect(),
    };
    let value = serde_json::to_vec(&books).expect("books serialize");
    if let Err(e) = c.control_kv.put(BOOKS_KEY, value.into()).await {
        tracing::debug!("controller books: {e}");
    }
}

/// Hand the lease back if held (a clean shutdown), so another member takes
/// over at once.
pub(crate) async fn release(c: &Cluster) {
    let state = c.lease_state();
    if !state.held {
        return;
    }
    c.set_lease(|s| s.held = false);
    let gone = c
        .control_kv
        .delete_expect_revision(LEADER_KEY, Some(state.revision));
    if tokio::time::timeout(Duration::from_secs(1), gone)
        .await
        .is_ok_and(|r| r.is_ok())
    {
        tracing::info!("controller: lease handed back");
    }
}
