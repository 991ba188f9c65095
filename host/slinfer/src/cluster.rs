//! A member of a cluster (`serve --cluster`): maps the shared records of
//! `slinfer-cluster` onto this host's function store and models folder.
//!
//! - A deploy or removal through this member's API is made here first (so a
//!   bad package is refused with the usual error), then stored in the
//!   cluster: the archive in the object store, the record in the KV bucket.
//!   A model import likewise publishes the packed package.
//! - Every member follows both buckets: a record whose version differs from
//!   what this member serves is fetched (digest-checked) and deployed or
//!   installed; a removal is removed. Changes arrive in the stream's order,
//!   so concurrent deploys of one name end on the same version everywhere.
//!   After a lost connection the follow starts again from each name's last
//!   change, which catches up a member that was away.
//! - Functions this member has that the cluster never heard of (a data
//!   directory that served alone before) are published when it joins.
//! - A member without engines (`--devices none`) routes: it serves every
//!   function and keeps no models.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use slinfer_cluster::{
    Change, Cluster, ClusterError, FunctionRecord, Identity, ModelRecord, Record, Records,
};

use crate::functions::{FunctionInfo, Functions, package};
use crate::models::Models;

/// `serve --cluster URL [--node-name NAME] [--advertise URL]`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub url: String,
    pub node_name: Option<String>,
    pub advertise: Option<String>,
}

impl ClusterOptions {
    /// The node name: `--node-name`, else the host name.
    pub fn node(&self) -> String {
        self.node_name.clone().unwrap_or_else(hostname)
    }
}

/// This host as a cluster member.
pub struct Member {
    pub cluster: Arc<Cluster>,
    functions: Arc<Functions>,
    models: Arc<Models>,
    max_package_bytes: u64,
    /// `<data>/cluster/models/<name>`: the digest of each model package
    /// this member installed from the cluster or published.
    model_digests: PathBuf,
}

/// What `/v1/cluster` answers.
#[derive(Serialize)]
pub struct ClusterView {
    pub node: String,
    pub nats: String,
    pub connected: bool,
    pub lease: slinfer_cluster::LeaseState,
    pub members: Vec<slinfer_cluster::Member>,
    pub books: Option<slinfer_cluster::controller::Books>,
    /// Packages in the object store: `{"count", "bytes"}`.
    pub packages: Option<serde_json::Value>,
    /// The cluster's models, each with the live members serving it (a
    /// member with engines serves a model once it has fetched and loaded
    /// the package).
    pub models: Vec<ClusterModel>,
}

#[derive(Serialize)]
pub struct ClusterModel {
    #[serde(flatten)]
    pub record: ModelRecord,
    pub served_by: Vec<String>,
}

/// The member id kept in the data directory: the same member across
/// restarts, a different one for another data directory.
fn member_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("cluster-member-id");
    if let Ok(id) = std::fs::read_to_string(&path)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_owned());
    }
    let id = hex::encode(getrandom::u64()?.to_be_bytes());
    crate::functions::store::write_atomic(&path, format!("{id}\n").as_bytes())?;
    Ok(id)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .ok()
        .filter(|h| slinfer_cluster::valid_node_name(h))
        .unwrap_or_else(|| "slinfer".into())
}

/// `http://` and the listening address, or the host name in place of an
/// address that listens on every interface (`0.0.0.0`, `::`).
fn default_advertise(listening: std::net::SocketAddr) -> String {
    if listening.ip().is_unspecified() {
        format!("http://{}:{}", hostname(), listening.port())
    } else {
        format!("http://{listening}")
    }
}

impl Member {
    /// Join the cluster and start following it.
    pub async fn join(
        opts: &ClusterOptions,
        data_dir: &Path,
        listening: std::net::SocketAddr,
        admin_token: &str,
        functions: Arc<Functions>,
        models: Arc<Models>,
        max_package_bytes: u64,
    ) -> anyhow::Result<Arc<Member>> {
        let identity = Identity {
            url: opts.url.clone(),
            node: opts.node(),
            member_id: member_id(data_dir)?,
            advertise: opts
                .advertise
                .clone()
                .unwrap_or_else(|| default_advertise(listening)),
        };
        let cluster = Cluster::join(identity).await?;
        let token_digest = slinfer_cluster::blobs::digest(admin_token.as_bytes());
        cluster.check_admin_token(&token_digest).await?;
        let member = Arc::new(Member {
            cluster,
            functions,
            models,
            max_package_bytes,
            model_digests: data_dir.join("cluster").join("models"),
        });
        member
            .adopt()
            .await
            .context("publishing this member's functions and models")?;
        let report = Arc::downgrade(&member);
        member
            .cluster
            .spawn_heartbeat(move || report.upgrade().map(|m| m.report()).unwrap_or_default());
        tokio::spawn(follow_functions(member.clone()));
        tokio::spawn(follow_models(member.clone()));
        Ok(member)
    }

    fn report(&self) -> slinfer_cluster::members::Report {
        slinfer_cluster::members::Report {
            functions: self.functions.list().len(),
            models: self.models.llm_names(),
            inference: self
                .models
                .inference()
                .map(|i| serde_json::to_value(i.status()).unwrap_or_default())
                .unwrap_or_default(),
        }
    }

    pub async fn view(&self) -> ClusterView {
        let members = self.cluster.members();
        let (books, packages, models) = if self.cluster.connected() {
            let second = Duration::from_secs(1);
            let books = tokio::time::timeout(second, self.cluster.books());
            let usage = tokio::time::timeout(second, self.cluster.blob_usage());
            let models = tokio::time::timeout(second, self.cluster.models.list());
            let (books, usage, models) = tokio::join!(books, usage, models);
            let models = models.ok().and_then(Result::ok).unwrap_or_default();
            (
                books.ok().and_then(Result::ok).flatten(),
                usage
                    .ok()
                    .and_then(Result::ok)
                    .map(|(count, bytes)| serde_json::json!({"count": count, "bytes": bytes})),
                models
                    .into_iter()
                    .map(|record| ClusterModel {
                        served_by: members
                            .iter()
                            .filter(|m| m.alive && m.state.report.models.contains(&record.name))
                            .map(|m| m.state.node.clone())
                            .collect(),
                        record,
                    })
                    .collect(),
            )
        } else {
            (None, None, Vec::new())
        };
        ClusterView {
            node: self.cluster.identity().node.clone(),
            nats: self.cluster.identity().url.clone(),
            connected: self.cluster.connected(),
            lease: self.cluster.lease_state(),
            members,
            books,
            packages,
            models,
        }
    }

    /// A line for `/healthz` when the member is cut off from the cluster.
    pub fn health(&self) -> Option<String> {
        (!self.cluster.connected()).then(|| {
            format!(
                "cluster: disconnected from NATS at {}; serving the functions and models this member has, and reconnecting\n",
                self.cluster.identity().url
            )
        })
    }

    /// Store a deploy made on this member in the cluster. On failure, put
    /// back what the cluster has for the name, so that no member serves a
    /// version the others will not.
    pub async fn deployed(&self, info: &FunctionInfo, archive: &[u8]) -> Result<(), ClusterError> {
        let published = self.publish_function(info, archive).await;
        if published.is_err() {
            self.restore_function(&info.name).await;
        }
        published
    }

    async fn publish_function(
        &self,
        info: &FunctionInfo,
        archive: &[u8],
    ) -> Result<(), ClusterError> {
        let digest = slinfer_cluster::blobs::digest(archive);
        let previous = self.cluster.functions.get(&info.name).await?;
        self.cluster.put_blob(&digest, &mut &archive[..]).await?;
        let record = FunctionRecord {
            name: info.name.clone(),
            version: info.version.clone(),
            digest,
            component_digest: info.digest.clone(),
            deployed_at_unix_s: info.deployed_at_unix_s,
            manifest: serde_json::to_value(&info.manifest).unwrap_or_default(),
            origin: self.cluster.identity().node.clone(),
        };
        self.store(&self.cluster.functions, &record, previous).await
    }

    /// Store `record` (its package is stored already) and drop the package
    /// of the record it replaced, if no other names it.
    async fn store<T: Record>(
        &self,
        records: &Records<T>,
        record: &T,
        previous: Option<Change<T>>,
    ) -> Result<(), ClusterError> {
        records.put(record).await?;
        self.cluster.state_changed();
        if let Some(Change::Put { record: old, .. }) = previous
            && old.digest() != record.digest()
        {
            self.release(old.digest()).await;
        }
        Ok(())
    }

    /// Remove the record `name` and drop its package; whether there was one.
    async fn unstore<T: Record>(
        &self,
        records: &Records<T>,
        name: &str,
    ) -> Result<bool, ClusterError> {
        let removed = records.delete(name).await?;
        self.cluster.state_changed();
        if let Some(old) = &removed {
            self.release(old.digest()).await;
        }
        Ok(removed.is_some())
    }

    /// Drop a package no record needs any more; a failure only leaves it
    /// stored.
    async fn release(&self, digest: &str) {
        if let Err(e) = self.cluster.release_blob(digest).await {
            tracing::warn!(digest, "cluster: cannot delete an unused package: {e}");
        }
    }

    /// Make this member serve what the cluster says for `name`.
    async fn restore_function(&self, name: &str) {
        match self.cluster.functions.get(name).await {
            Ok(Some(change)) => self.apply_function(change).await,
            Ok(None) => {
                let _ = self.functions.remove(name).await;
            }
            Err(e) => tracing::warn!(function = %name, "cluster: cannot read the record back: {e}"),
        }
    }

    /// Remove `name` cluster-wide (it is already gone here); whether the
    /// cluster had it.
    pub async fn removed_function(&self, name: &str) -> Result<bool, ClusterError> {
        self.unstore(&self.cluster.functions, name).await
    }

    /// Publish the model `name` imported on this member.
    pub async fn imported_model(&self, name: &str) -> Result<(), ClusterError> {
        let models = self.models.clone();
        let owned = name.to_owned();
        let (tar, digest, bytes) = tokio::task::spawn_blocking(move || models.pack(&owned))
            .await
            .map_err(ClusterError::store)?
            .map_err(ClusterError::store)?;
        let published = async {
            write_marker(&self.model_digest_path(name), &digest).map_err(ClusterError::store)?;
            let mut file = tokio::fs::File::open(&tar)
                .await
                .map_err(ClusterError::store)?;
            let previous = self.cluster.models.get(name).await?;
            self.cluster.put_blob(&digest, &mut file).await?;
            let record = ModelRecord {
                name: name.to_owned(),
                digest,
                bytes,
                imported_at_unix_s: unix_now(),
                origin: self.cluster.identity().node.clone(),
            };
            self.store(&self.cluster.models, &record, previous).await
        }
        .await;
        let _ = tokio::fs::remove_file(&tar).await;
        published
    }

    /// Remove the model `name` cluster-wide (it is already gone here).
    pub async fn removed_model(&self, name: &str) -> Result<bool, ClusterError> {
        self.unstore(&self.cluster.models, name).await
    }

    /// Publish the functions and models the cluster never heard of.
    async fn adopt(&self) -> Result<(), ClusterError> {
        for name in self.models.llm_names() {
            if self.cluster.models.get(&name).await?.is_none() {
                self.imported_model(&name).await?;
                tracing::info!(model = %name, "cluster: published a model this member had");
            }
        }
        for d in self.functions.list() {
            let name = &d.manifest.name;
            if self.cluster.functions.get(name).await?.is_some() {
                continue;
            }
            let dir = self.functions.package_dir(&d);
            let host = self.functions.host_limits();
            let packed = tokio::task::spawn_blocking(move || package::pack(&dir, &host))
                .await
                .map_err(ClusterError::store)?;
            match packed {
                Ok((_, archive)) => {
                    self.publish_function(&d.info(), &archive).await?;
                    tracing::info!(function = %name, "cluster: published a function this member had");
                }
                Err(e) => tracing::warn!(function = %name, "cluster: cannot pack: {e}"),
            }
        }
        Ok(())
    }

    /// Make this member serve `change`. A package that cannot be fetched
    /// is usually one a newer record replaced (its package is dropped once
    /// no record names it): the record there is now is applied in its place,
    /// without waiting for the watch to deliver it.
    async fn apply_function(&self, mut change: Change<FunctionRecord>) {
        while let Some(failed) = self.try_apply_function(change).await {
            match self.superseding(&self.cluster.functions, &failed).await {
                Some(newer) => change = newer,
                None => break,
            }
        }
        self.cluster.state_changed();
    }

    /// What the cluster has now for `failed`'s name when it replaced or
    /// removed `failed`; `None` when `failed` still stands (or the record
    /// cannot be read).
    async fn superseding<T: Record>(&self, records: &Records<T>, failed: &T) -> Option<Change<T>> {
        match records.get(failed.name()).await {
            Ok(Some(Change::Put { record, .. })) if record.digest() == failed.digest() => None,
            Ok(current) => {
                let current = current?;
                tracing::info!(name = %failed.name(), "cluster: the record was replaced meanwhile; applying the current one");
                Some(current)
            }
            Err(e) => {
                tracing::warn!(name = %failed.name(), "cluster: cannot read the record back: {e}");
                None
            }
        }
    }

    /// Apply one function change; the record whose package could not be
    /// fetched, if that is why it was not applied.
    async fn try_apply_function(&self, change: Change<FunctionRecord>) -> Option<FunctionRecord> {
        match change {
            Change::Put { record, .. } => {
                let serving = self.functions.get(&record.name).map(|d| d.version.clone());
                if serving.as_deref() == Some(record.version.as_str()) {
                    return None;
                }
                let archive = match self
                    .cluster
                    .blob_bytes(&record.digest, self.max_package_bytes)
                    .await
                {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::error!(function = %record.name, "cluster: cannot fetch the package: {e}");
                        return Some(record);
                    }
                };
                match self
                    .functions
                    .deploy(
                        &record.name,
                        archive.into(),
                        Some(record.deployed_at_unix_s),
                    )
                    .await
                {
                    Ok(_) => tracing::info!(
                        function = %record.name,
                        version = %record.version,
                        from = %record.origin,
                        "cluster: deployed"
                    ),
                    Err(e) => {
                        tracing::error!(function = %record.name, "cluster: this member cannot serve the deploy: {e}")
                    }
                }
            }
            Change::Removed { name, .. } => {
                if self.functions.get(&name).is_some() {
                    match self.functions.remove(&name).await {
                        Ok(_) => tracing::info!(function = %name, "cluster: removed"),
                        Err(e) => tracing::error!(function = %name, "cluster: cannot remove: {e}"),
                    }
                }
            }
        }
        None
    }

    /// Where this member keeps the digest of each model it installed from
    /// the cluster (or published), to tell a new version from the same.
    fn model_digest_path(&self, name: &str) -> PathBuf {
        self.model_digests.join(name)
    }

    /// Install or remove a model as `change` says; like functions, a
    /// package that cannot be installed gives way to the record that
    /// replaced it, if one did.
    async fn apply_model(&self, mut change: Change<ModelRecord>) {
        if self.models.inference().is_none() {
            return;
        }
        while let Some(failed) = self.try_apply_model(change).await {
            match self.superseding(&self.cluster.models, &failed).await {
                Some(newer) => change = newer,
                None => break,
            }
        }
        self.cluster.state_changed();
    }

    /// Apply one model change; the record that could not be installed, if
    /// any.
    async fn try_apply_model(&self, change: Change<ModelRecord>) -> Option<ModelRecord> {
        match change {
            Change::Put { record, .. } => {
                let marker = self.model_digest_path(&record.name);
                let have = std::fs::read_to_string(&marker).ok();
                if have.as_deref() == Some(record.digest.as_str())
                    && self.models.get(&record.name).is_ok()
                {
                    return None;
                }
                tracing::info!(model = %record.name, bytes = record.bytes, from = %record.origin, "cluster: fetching the model package");
                match self.install_model(&record).await {
                    Ok(()) => {
                        let _ = write_marker(&marker, &record.digest);
                        tracing::info!(model = %record.name, from = %record.origin, "cluster: model installed");
                    }
                    Err(e) => {
                        tracing::error!(model = %record.name, "cluster: cannot install the model: {e}");
                        return Some(record);
                    }
                }
            }
            Change::Removed { name, .. } => {
                let _ = std::fs::remove_file(self.model_digest_path(&name));
                if self.models.get(&name).is_ok() {
                    match self.models.remove(&name) {
                        Ok(()) => tracing::info!(model = %name, "cluster: model removed"),
                        Err(e) => {
                            tracing::error!(model = %name, "cluster: cannot remove the model: {e}")
                        }
                    }
                }
            }
        }
        None
    }

    async fn install_model(&self, record: &ModelRecord) -> anyhow::Result<()> {
        let tar = self.models.receive_path(&record.name)?;
        let fetched = self.cluster.blob_to_file(&record.digest, &tar).await;
        let installed = match fetched {
            Ok(()) => {
                let models = self.models.clone();
                let (name, path) = (record.name.clone(), tar.clone());
                tokio::task::spawn_blocking(move || models.install(&name, &path))
                    .await?
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            }
            Err(e) => Err(e.into()),
        };
        let _ = tokio::fs::remove_file(&tar).await;
        installed
    }
}

fn write_marker(path: &Path, digest: &str) -> std::io::Result<()> {
    crate::functions::store::write_atomic(path, digest.as_bytes())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Follow the function records for the life of the process.
async fn follow_functions(member: Arc<Member>) {
    let records = &member.cluster.functions;
    records.follow(|change| member.apply_function(change)).await
}

/// Follow the model records for the life of the process.
async fn follow_models(member: Arc<Member>) {
    let records = &member.cluster.models;
    records.follow(|change| member.apply_model(change)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_on_every_interface_advertises_its_host_name() {
        let one: std::net::SocketAddr = "10.0.0.7:8080".parse().unwrap();
        assert_eq!(default_advertise(one), "http://10.0.0.7:8080");
        let all: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(
            default_advertise(all),
            format!("http://{}:8080", hostname())
        );
    }
}
