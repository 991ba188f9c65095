//! Membership: every member publishes its state under its node name every
//! [`HEARTBEAT`] and on change, and follows everyone's. A member not heard
//! from for [`DEAD_AFTER`] counts as dead; one that leaves deletes its key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, Operation};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{Cluster, ClusterError, DEAD_AFTER, HEARTBEAT, Identity};

/// What a member says about itself beyond who it is: filled in by the
/// binary from its function registry and inference service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Functions this member serves.
    pub functions: usize,
    /// Models this member serves.
    pub models: Vec<String>,
    /// The member's inference state as its `/v1/status` shows it (devices
    /// with capacity, committed and planned bytes; instances with model,
    /// state, batch and KV; queues); null on a member without engines.
    pub inference: serde_json::Value,
}

/// One member's published state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberState {
    pub node: String,
    pub member_id: String,
    pub advertise: String,
    pub started_at_unix_s: u64,
    /// When the member sent this, by its own clock.
    pub sent_at_unix_ms: u64,
    /// Counts this member's heartbeats since it started.
    pub seq: u64,
    /// Whether the member holds the controller lease.
    pub controller: bool,
    #[serde(flatten)]
    pub report: Report,
}

/// A member as this member sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    #[serde(flatten)]
    pub state: MemberState,
    pub alive: bool,
    pub heartbeat_age_ms: u64,
}

/// The members heard from, with when.
#[derive(Default)]
pub(crate) struct View {
    seen: Mutex<HashMap<String, (MemberState, Instant)>>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn parse(entry: &kv::Entry) -> Option<MemberState> {
    serde_json::from_slice(&entry.value).ok()
}

/// Refuse to join under a name a live member with another id publishes.
pub(crate) async fn check_name_free(
    kv: &kv::Store,
    identity: &Identity,
) -> Result<(), ClusterError> {
    let Some(entry) = kv
        .entry(&identity.node)
        .await
        .map_err(ClusterError::store)?
    else {
        return Ok(());
    };
    let Some(other) = (entry.operation == Operation::Put)
        .then(|| parse(&entry))
        .flatten()
    else {
        return Ok(());
    };
    let age_ms = now_ms().saturating_sub(other.sent_at_unix_ms);
    if other.member_id != identity.member_id && age_ms < DEAD_AFTER.as_millis() as u64 {
        return Err(ClusterError::NameClash {
            node: identity.node.clone(),
            advertise: other.advertise,
            age_ms,
        });
    }
    Ok(())
}

/// Follow the members bucket for the life of the cluster handle; watch
/// again after a lost connection.
pub(crate) async fn follow(cluster: Weak<Cluster>) {
    loop {
        let Some(kv) = cluster.upgrade().map(|c| c.members_kv.clone()) else {
            return;
        };
        match kv.watch_with_history(">").await {
            Ok(mut watch) => {
                while let Some(entry) = watch.next().await {
                    let Some(c) = cluster.upgrade() else { return };
                    match entry {
                        Ok(e) => c.members.apply(&e),
                        Err(e) => {
                            tracing::debug!("members watch: {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!("members watch: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl View {
    fn apply(&self, entry: &kv::Entry) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if entry.operation != Operation::Put {
            seen.remove(&entry.key);
            return;
        }
        let Some(state) = parse(entry) else {
            tracing::warn!(node = %entry.key, "a member's state does not parse");
            return;
        };
        // A live update was sent just now; a replayed one is as old as its
        // sender says (by its clock: only a replay trusts another clock).
        let age = if entry.delta == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(now_ms().saturating_sub(state.sent_at_unix_ms))
        };
        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        if let Some((old, _)) = seen.get(&entry.key)
            && old.member_id == state.member_id
            && old.seq > state.seq
        {
            return;
        }
        seen.insert(entry.key.clone(), (state, at));
    }

    fn list(&self) -> Vec<Member> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Member> = seen.values().map(as_member).collect();
        out.sort_by(|a, b| a.state.node.cmp(&b.state.node));
        out
    }

    fn get(&self, node: &str) -> Option<Member> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(node).map(as_member)
    }
}

fn as_member((state, at): &(MemberState, Instant)) -> Member {
    let age = at.elapsed();
    Member {
        state: state.clone(),
        alive: age < DEAD_AFTER,
        heartbeat_age_ms: age.as_millis() as u64,
    }
}

impl Cluster {
    /// Every member heard from (alive or not), by node name.
    pub fn members(&self) -> Vec<Member> {
        self.members.list()
    }

    /// A member by node name, as this member sees it.
    pub fn member(&self, node: &str) -> Option<Member> {
        self.members.get(node)
    }

    /// Publish this member's state every [`HEARTBEAT`] and whenever
    /// [`Cluster::state_changed`] is called, with `report` filled in by the
    /// caller, for as long as the cluster handle lives. Logs when the NATS
    /// connection is lost and when it is back.
    pub fn spawn_heartbeat(self: &Arc<Self>, report: impl Fn() -> Report + Send + Sync + 'static) {
        let cluster = Arc::downgrade(self);
        let started_at_unix_s = now_ms() / 1000;
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut was_connected = true;
            loop {
                let Some(c) = cluster.upgrade() else { return };
                seq += 1;
                let state = MemberState {
                    node: c.identity.node.clone(),
                    member_id: c.identity.member_id.clone(),
                    advertise: c.identity.advertise.clone(),
                    started_at_unix_s,
                    sent_at_unix_ms: now_ms(),
                    seq,
                    controller: c.lease_state().held,
                    report: report(),
                };
                let connected = c.connected();
                if connected != was_connected {
                    if connected {
                        tracing::info!(nats = %c.identity.url, "cluster: reconnected to NATS");
                    } else {
                        tracing::warn!(
                            nats = %c.identity.url,
                            "cluster: lost the NATS connection; serving the functions and models this member has, and retrying"
                        );
                    }
                    was_connected = connected;
                }
                if connected {
                    let value = serde_json::to_vec(&state).expect("a member state serializes");
                    let put = c.members_kv.put(&c.identity.node, value.into());
                    match tokio::time::timeout(HEARTBEAT * 4, put).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::debug!("heartbeat: {e}"),
                        Err(_) => tracing::debug!("heartbeat: timed out"),
                    }
                }
                let _ = tokio::time::timeout(HEARTBEAT, c.changed.notified()).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(node: &str, id: &str, seq: u64, sent_at_unix_ms: u64) -> MemberState {
        MemberState {
            node: node.into(),
            member_id: id.into(),
            advertise: format!("http://{node}"),
            started_at_unix_s: 0,
            sent_at_unix_ms,
            seq,
            controller: false,
            report: Report::default(),
        }
    }

    fn entry(s: &MemberState, delta: u64, operation: Operation) -> kv::Entry {
        kv::Entry {
            bucket: "members".into(),
            key: s.node.clone(),
            value: serde_json::to_vec(s).unwrap().into(),
            revision: 1,
            delta,
            created: time::OffsetDateTime::now_utc(),
            operation,
            seen_current: delta == 0,
        }
    }

    #[test]
    fn live_members_are_alive_and_a_replayed_old_state_is_dead() {
        let view = View::default();
        view.apply(&entry(&state("a", "1", 5, now_ms()), 0, Operation::Put));
        // Replayed from history, sent 10 s ago: that member is gone.
        let old = now_ms() - 10_000;
        view.apply(&entry(&state("b", "2", 9, old), 3, Operation::Put));
        let members = view.list();
        assert_eq!(members.len(), 2);
        assert!(members[0].alive && members[0].heartbeat_age_ms < 1000);
        assert!(!members[1].alive && members[1].heartbeat_age_ms >= 10_000);
    }

    #[test]
    fn an_older_heartbeat_of_the_same_member_is_ignored_and_a_delete_forgets() {
        let view = View::default();
        view.apply(&entry(&state("a", "1", 7, now_ms()), 0, Operation::Put));
        view.apply(&entry(&state("a", "1", 6, now_ms()), 0, Operation::Put));
        assert_eq!(view.list()[0].state.seq, 7);
        // The same name from a restarted member (new id) replaces it.
        view.apply(&entry(&state("a", "9", 1, now_ms()), 0, Operation::Put));
        assert_eq!(view.list()[0].state.member_id, "9");
        view.apply(&entry(&state("a", "9", 2, now_ms()), 0, Operation::Delete));
        assert!(view.list().is_empty());
    }
}
