//! slinfer's cluster control plane, on NATS JetStream.
//!
//! A member joins with [`Cluster::join`]: it connects to the NATS server,
//! makes sure the cluster's buckets exist, and from then on:
//!
//! - reads and writes the shared records ([`records`]): one KV bucket of
//!   function records and one of model records, each pointing at a package
//!   in the object store by its SHA-256 digest ([`blobs`]);
//! - publishes its own state every 250 ms and on change, and keeps a view of
//!   every member's ([`members`]): a member silent for 3 s counts as dead;
//! - takes part in electing the controller ([`controller`]): one member at
//!   a time holds a lease in a KV bucket, renewed by compare-and-set;
//! - sends and answers streamed requests to and from other members by node
//!   name ([`streams`], core NATS), each side watching the other's
//!   heartbeat.
//!
//! Agreement and replication are JetStream's (Raft-replicated streams);
//! nothing here is a consensus, membership or replication protocol of its
//! own. This crate knows nothing of functions, engines or HTTP: the binary
//! maps records onto its function store and model folder.
//!
//! This crate never imports wasmtime, an engine, the inference service or
//! the scheduler.

pub mod blobs;
pub mod controller;
pub mod members;
pub mod records;
pub mod streams;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::Notify;

pub use controller::{Leader, LeaseState};
pub use members::{Member, MemberState};
pub use records::{Change, FunctionRecord, ModelRecord, Record, Records};

/// KV bucket of function records, keyed by function name.
pub const FUNCTIONS_BUCKET: &str = "slinfer_functions";
/// KV bucket of model records, keyed by model name.
pub const MODELS_BUCKET: &str = "slinfer_models";
/// KV bucket of member states, keyed by node name.
pub const MEMBERS_BUCKET: &str = "slinfer_members";
/// KV bucket of the controller lease (`leader`) and its books (`books`).
pub const CONTROL_BUCKET: &str = "slinfer_control";
/// Object store of packages (function archives, model tars) by digest.
pub const BLOBS_BUCKET: &str = "slinfer_blobs";

/// How often a member publishes its state (and renews a held lease).
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// A member silent this long is counted dead; a lease not renewed this long
/// may be taken over.
pub const DEAD_AFTER: Duration = Duration::from_secs(3);

/// Why joining or talking to the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// (The URL itself is not repeated: it may hold a password.)
    #[error("invalid cluster URL: {0} (expected nats://[USER:PASSWORD@]HOST:PORT)")]
    BadUrl(String),
    #[error("cannot reach the NATS server at {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error(
        "the NATS server at {url} has no usable JetStream ({why}): start it with `nats-server -js` and a store directory (-sd)"
    )]
    NoJetStream { url: String, why: String },
    #[error(
        "invalid node name {0:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
    )]
    BadNodeName(String),
    #[error(
        "node name {node:?} is in use by a live member (advertising {advertise}, heard from {age_ms} ms ago): give this member another --node-name, or stop that one"
    )]
    NameClash {
        node: String,
        advertise: String,
        age_ms: u64,
    },
    #[error(
        "this member's admin token is not the cluster's: every member needs the same token (`--admin-token-file`)"
    )]
    TokenMismatch,
    #[error("the cluster store is unreachable (lost the NATS connection): {0}")]
    Disconnected(String),
    #[error("package {digest} failed its digest check: got {got}")]
    Corrupt { digest: String, got: String },
    #[error("cluster store: {0}")]
    Store(String),
}

impl ClusterError {
    /// Any other failure of a cluster operation, by its message.
    pub fn store(e: impl std::fmt::Display) -> ClusterError {
        ClusterError::Store(e.to_string())
    }
}

/// Who this member is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The NATS server, `nats://HOST:PORT`, with credentials if it needs
    /// them (`nats://USER:PASSWORD@HOST:PORT` or `nats://TOKEN@HOST:PORT`);
    /// after joining, without them.
    pub url: String,
    /// The node name, unique among live members.
    pub node: String,
    /// Stable across restarts of one member (kept in its data directory),
    /// different between two members: tells a restart from a name clash.
    pub member_id: String,
    /// The base URL other members and clients reach this member's HTTP at.
    pub advertise: String,
}

/// A joined member's handle on the cluster.
pub struct Cluster {
    identity: Identity,
    client: async_nats::Client,
    pub functions: Records<FunctionRecord>,
    pub models: Records<ModelRecord>,
    blobs: jetstream::object_store::ObjectStore,
    members_kv: jetstream::kv::Store,
    control_kv: jetstream::kv::Store,
    members: members::View,
    lease: controller::Lease,
    /// Wakes the heartbeat at once when the member's state changed.
    changed: Notify,
}

/// Whether `name` is a valid node name (the rules of function names).
pub fn valid_node_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

impl Cluster {
    /// Connect to `identity.url`, create the buckets where missing, check
    /// the node name is free, and start following the members and the
    /// controller lease. The member's own heartbeat starts with
    /// [`Cluster::spawn_heartbeat`].
    pub async fn join(identity: Identity) -> Result<Arc<Cluster>, ClusterError> {
        if !valid_node_name(&identity.node) {
            return Err(ClusterError::BadNodeName(identity.node));
        }
        // Credentials may come in the URL (`nats://user:password@host:port`,
        // or `nats://token@host:port`); they never appear in logs or views.
        let addr: async_nats::ServerAddr = identity
            .url
            .parse()
            .map_err(|e: std::io::Error| ClusterError::BadUrl(e.to_string()))?;
        let mut options = async_nats::ConnectOptions::new();
        match (addr.username(), addr.password()) {
            (Some(user), Some(pass)) => {
                options = options.user_and_password(user.into(), pass.into());
            }
            (Some(token), None) => options = options.token(token.into()),
            _ => {}
        }
        let mut identity = identity;
        identity.url = format!("{}://{}:{}", addr.scheme(), addr.host(), addr.port());
        let url = identity.url.clone();
        let unreachable = |why: String| ClusterError::Unreachable {
            url: url.clone(),
            why,
        };
        let connect = options
            .name(format!("slinfer {}", identity.node))
            .connection_timeout(Duration::from_secs(3))
            // Reconnect quickly after a NATS restart; never give up.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(1000))
            })
            .max_reconnects(None)
            .connect(addr);
        let client = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| unreachable("no answer within 5 s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let no_js = |e: &dyn std::fmt::Display| ClusterError::NoJetStream {
            url: url.clone(),
            why: e.to_string(),
        };
        let kv = |bucket: &'static str, history: i64, max_age: Duration| {
            let js = js.clone();
            async move {
                match js.get_key_value(bucket).await {
                    Ok(s) => Ok(s),
                    Err(_) => {
                        js.create_key_value(jetstream::kv::Config {
                            bucket: bucket.into(),
                            history,
                            max_age,
                            storage: jetstream::stream::StorageType::File,
                            ..Default::default()
                        })
                        .await
                    }
                }
            }
        };
        let functions = kv(FUNCTIONS_BUCKET, 5, Duration::ZERO)
            .await
            .map_err(|e| no_js(&e))?;
        let models = kv(MODELS_BUCKET, 5, Duration::ZERO)
            .await
            .map_err(|e| no_js(&e))?;
        // A dead member's last state ages out of the bucket after a minute.
        let members_kv = kv(MEMBERS_BUCKET, 1, Duration::from_secs(60))
            .await
            .map_err(|e| no_js(&e))?;
        let control_kv = kv(CONTROL_BUCKET, 1, Duration::ZERO)
            .await
            .map_err(|e| no_js(&e))?;
        let blobs = match js.get_object_store(BLOBS_BUCKET).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(jetstream::object_store::Config {
                    bucket: BLOBS_BUCKET.into(),
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| no_js(&e))?,
        };
        members::check_name_free(&members_kv, &identity).await?;
        let cluster = Arc::new(Cluster {
            functions: Records::new(functions),
            models: Records::new(models),
            blobs,
            members: members::View::default(),
            lease: controller::Lease::default(),
            members_kv,
            control_kv,
            identity,
            client,
            changed: Notify::new(),
        });
        tokio::spawn(members::follow(Arc::downgrade(&cluster)));
        tokio::spawn(controller::run(Arc::downgrade(&cluster)));
        tracing::info!(
            nats = %cluster.identity.url,
            node = %cluster.identity.node,
            advertise = %cluster.identity.advertise,
            "joined the cluster"
        );
        Ok(cluster)
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether the NATS connection is up now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Fails fast with [`ClusterError::Disconnected`] when the connection is
    /// down, so that a write is refused rather than left hanging.
    pub fn ensure_connected(&self) -> Result<(), ClusterError> {
        if self.connected() {
            Ok(())
        } else {
            Err(ClusterError::Disconnected(format!(
                "no connection to {}",
                self.identity.url
            )))
        }
    }

    /// Tell the heartbeat the member's state changed (publish now).
    pub fn state_changed(&self) {
        self.changed.notify_one();
    }

    /// Leave the cluster: hand back the controller lease if held, so that
    /// another member takes over at once, and drop this member's state.
    pub async fn leave(&self) {
        controller::release(self).await;
        let _ = self.members_kv.delete(&self.identity.node).await;
        let _ = self.client.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["a", "node-1", "slinfer-0", &"x".repeat(63)] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", "a b", &"x".repeat(64)] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }
}
