//! Packages in the JetStream object store, named by their SHA-256 digest.
//!
//! A package is stored once however many records point at it; a reader
//! checks the digest of what it received before using it.

use std::path::Path;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::{Cluster, ClusterError};

/// The lowercase hex SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Cluster {
    /// Store `data` as the package `digest` unless it is there already.
    pub async fn put_blob(
        &self,
        digest: &str,
        data: &mut (impl AsyncRead + Unpin),
    ) -> Result<(), ClusterError> {
        self.ensure_connected()?;
        if self.blobs.info(digest).await.is_ok() {
            return Ok(());
        }
        self.blobs
            .put(digest, data)
            .await
            .map_err(ClusterError::store)?;
        Ok(())
    }

    /// Delete package `digest` if no function or model record names it any
    /// more (after a record was replaced or removed). A member still
    /// applying the superseded record then fails to fetch it and moves on
    /// to the record that replaced it.
    pub async fn release_blob(&self, digest: &str) -> Result<(), ClusterError> {
        let functions = self.functions.list().await?;
        let models = self.models.list().await?;
        let named = functions.iter().any(|r| r.digest == digest)
            || models.iter().any(|r| r.digest == digest);
        if !named {
            self.blobs
                .delete(digest)
                .await
                .map_err(ClusterError::store)?;
        }
        Ok(())
    }

    /// How many packages are stored, and their bytes.
    pub async fn blob_usage(&self) -> Result<(usize, u64), ClusterError> {
        use futures::TryStreamExt;
        let infos: Vec<_> = self
            .blobs
            .list()
            .await
            .map_err(ClusterError::store)?
            .try_collect()
            .await
            .map_err(ClusterError::store)?;
        Ok((infos.len(), infos.iter().map(|i| i.size as u64).sum()))
    }

    /// Package `digest` into memory, at most `limit` bytes, checked.
    pub async fn blob_bytes(&self, digest: &str, limit: u64) -> Result<Vec<u8>, ClusterError> {
        let mut object = self.blobs.get(digest).await.map_err(ClusterError::store)?;
        let mut out = Vec::new();
        (&mut object)
            .take(limit + 1)
            .read_to_end(&mut out)
            .await
            .map_err(ClusterError::store)?;
        if out.len() as u64 > limit {
            return Err(ClusterError::Store(format!(
                "package {digest} is larger than {limit} bytes"
            )));
        }
        check(digest, &Sha256::digest(&out))?;
        Ok(out)
    }

    /// Package `digest` into the file `dest` (created), checked.
    pub async fn blob_to_file(&self, digest: &str, dest: &Path) -> Result<(), ClusterError> {
        let mut object = self.blobs.get(digest).await.map_err(ClusterError::store)?;
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(ClusterError::store)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = object.read(&mut buf).await.map_err(ClusterError::store)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .await
                .map_err(ClusterError::store)?;
        }
        file.sync_all().await.map_err(ClusterError::store)?;
        check(digest, &hasher.finalize())
    }
}

fn check(digest: &str, got: &[u8]) -> Result<(), ClusterError> {
    let got = hex::encode(got);
    if got == digest {
        Ok(())
    } else {
        Err(ClusterError::Corrupt {
            digest: digest.to_owned(),
            got,
        })
    }
}
