//! The shared records: what is deployed and imported, cluster-wide.
//!
//! One KV bucket per kind, keyed by name; a record names its package in the
//! object store by digest. A write is one KV put, so a reader sees the old
//! record or the new, never half of one; two concurrent writes of one name
//! are ordered by the stream, and every member applies them in that order,
//! so all end on the same one. A removal leaves a delete marker, which tells
//! "removed while you were away" from "never heard of".

use std::marker::PhantomData;

use async_nats::jetstream::kv::{self, Operation};
use futures::{Stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::ClusterError;

/// A record kept under its name.
pub trait Record: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    fn name(&self) -> &str;
    /// The package the record names in the object store.
    fn digest(&self) -> &str;
}

/// A deployed function, as every member serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub name: String,
    /// The version (the first 32 hex digits of the archive's digest).
    pub version: String,
    /// SHA-256 of the package archive: its object in the blob store.
    pub digest: String,
    /// SHA-256 of the component inside.
    pub component_digest: String,
    pub deployed_at_unix_s: u64,
    /// The manifest as the API shows it (invoke key redacted).
    pub manifest: serde_json::Value,
    /// The member the deploy came through.
    pub origin: String,
}

impl Record for FunctionRecord {
    fn name(&self) -> &str {
        &self.name
    }
    fn digest(&self) -> &str {
        &self.digest
    }
}

/// An imported model package, as every member with engines serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    /// SHA-256 of the package tar: its object in the blob store.
    pub digest: String,
    pub bytes: u64,
    pub imported_at_unix_s: u64,
    /// The member the import ran on.
    pub origin: String,
}

impl Record for ModelRecord {
    fn name(&self) -> &str {
        &self.name
    }
    fn digest(&self) -> &str {
        &self.digest
    }
}

/// One change to a bucket, in the stream's order.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<T> {
    Put { record: T, revision: u64 },
    Removed { name: String, revision: u64 },
}

/// The records of one kind.
pub struct Records<T> {
    kv: kv::Store,
    kind: PhantomData<fn() -> T>,
}

impl<T: Record> Records<T> {
    pub(crate) fn new(kv: kv::Store) -> Records<T> {
        Records {
            kv,
            kind: PhantomData,
        }
    }

    /// Store `record` (replacing any); returns its revision.
    pub async fn put(&self, record: &T) -> Result<u64, ClusterError> {
        let value = serde_json::to_vec(record).map_err(ClusterError::store)?;
        self.kv
            .put(record.name(), value.into())
            .await
            .map_err(ClusterError::store)
    }

    /// Remove `name`; returns the record it had, if any.
    pub async fn delete(&self, name: &str) -> Result<Option<T>, ClusterError> {
        let Some(Change::Put { record, .. }) = self.get(name).await? else {
            return Ok(None);
        };
        self.kv.delete(name).await.map_err(ClusterError::store)?;
        Ok(Some(record))
    }

    /// The last word on `name`: a record, a removal, or `None` when the
    /// cluster never had it.
    pub async fn get(&self, name: &str) -> Result<Option<Change<T>>, ClusterError> {
        let entry = self.kv.entry(name).await.map_err(ClusterError::store)?;
        entry.map(decode).transpose()
    }

    /// Every record there is now, by name.
    pub async fn list(&self) -> Result<Vec<T>, ClusterError> {
        let names: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(ClusterError::store)?
            .try_collect()
            .await
            .map_err(ClusterError::store)?;
        let mut out = Vec::new();
        for name in names {
            if let Some(Change::Put { record, .. }) = self.get(&name).await? {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(out)
    }

    /// The last change of every name there is, then every change as it
    /// happens. The stream ends or errs when the connection is lost: watch
    /// again (the replay is idempotent for a caller that compares versions).
    pub async fn watch(
        &self,
    ) -> Result<impl Stream<Item = Result<Change<T>, ClusterError>> + use<T>, ClusterError> {
        let watch = self
            .kv
            .watch_with_history(">")
            .await
            .map_err(ClusterError::store)?;
        Ok(watch.map(|e| e.map_err(ClusterError::store).and_then(decode)))
    }
}

impl<T: Record> Records<T> {
    /// Hand every change to `apply`, one at a time in the stream's order,
    /// for ever: after a lost connection, watch again from each name's last
    /// change.
    pub async fn follow<F, Fut>(&self, mut apply: F)
    where
        F: FnMut(Change<T>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        loop {
            match self.watch().await {
                Ok(changes) => {
                    let mut changes = std::pin::pin!(changes);
                    while let Some(change) = changes.next().await {
                        match change {
                            Ok(c) => apply(c).await,
                            Err(e) => {
                                tracing::debug!("records watch: {e}");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!("records watch: {e}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
}

fn decode<T: Record>(entry: kv::Entry) -> Result<Change<T>, ClusterError> {
    match entry.operation {
        Operation::Put => {
            let record = serde_json::from_slice(&entry.value).map_err(|e| {
                ClusterError::Store(format!("record {:?} does not parse: {e}", entry.key))
            })?;
            Ok(Change::Put {
                record,
                revision: entry.revision,
            })
        }
        Operation::Delete | Operation::Purge => Ok(Change::Removed {
            name: entry.key,
            revision: entry.revision,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &[u8], operation: Operation) -> kv::Entry {
        kv::Entry {
            bucket: "b".into(),
            key: key.into(),
            value: value.to_vec().into(),
            revision: 42,
            delta: 0,
            created: time::OffsetDateTime::now_utc(),
            operation,
            seen_current: true,
        }
    }

    #[test]
    fn entries_decode_to_records_and_removals() {
        let record = ModelRecord {
            name: "m".into(),
            digest: "d".into(),
            bytes: 3,
            imported_at_unix_s: 1,
            origin: "a".into(),
        };
        let put = entry("m", &serde_json::to_vec(&record).unwrap(), Operation::Put);
        assert_eq!(
            decode::<ModelRecord>(put).unwrap(),
            Change::Put {
                record,
                revision: 42
            }
        );
        for op in [Operation::Delete, Operation::Purge] {
            assert_eq!(
                decode::<ModelRecord>(entry("m", b"", op)).unwrap(),
                Change::Removed {
                    name: "m".into(),
                    revision: 42
                }
            );
        }
        let err = decode::<ModelRecord>(entry("m", b"{not json", Operation::Put)).unwrap_err();
        assert!(
            err.to_string().contains("record \"m\" does not parse"),
            "{err}"
        );
    }
}
