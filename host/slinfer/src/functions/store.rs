//! The on-disk store of deployed packages.
//!
//! ```text
//! <data>/functions/<name>/versions/<version>/  the unpacked package (version: hash of the upload)
//! <data>/functions/<name>/current              "<version> <deployed_at_unix_s>"
//! <data>/functions/.incoming/<random>/         packages being received
//! ```
//!
//! A deploy is unpacked into `.incoming`, fsync'd, renamed into `versions/`,
//! and only then made current by atomically replacing the `current` file. A
//! crash at any point before that rename leaves the previous version serving;
//! leftovers are swept at start-up.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::manifest::valid_name;

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    let mut f = atomic_write_file::AtomicWriteFile::open(path)?;
    f.write_all(bytes)?;
    f.commit()
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS has randomness");
    hex::encode(b)
}

/// A deployed version as recorded in `current`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub version: String,
    pub deployed_at_unix_s: u64,
}

/// The function store rooted at `<data>/functions`.
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Open (creating) the store and sweep what an interrupted deploy left.
    pub fn open(root: PathBuf) -> std::io::Result<Store> {
        fs::create_dir_all(&root)?;
        let incoming = root.join(".incoming");
        if incoming.exists() {
            fs::remove_dir_all(&incoming)?;
        }
        fs::create_dir_all(&incoming)?;
        let store = Store { root };
        // Every function folder, with a current version or not: a crash
        // during a function's first deploy leaves a version and no current.
        for entry in fs::read_dir(&store.root)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if valid_name(&name) {
                store.prune(&name)?;
            }
        }
        Ok(store)
    }

    /// A fresh empty directory to receive a package into.
    pub fn incoming_dir(&self) -> std::io::Result<PathBuf> {
        let dir = self.root.join(".incoming").join(random_suffix());
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Names of the functions that have a current version.
    pub fn names(&self) -> std::io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if valid_name(&name) && self.current(&name)?.is_some() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The version of `name` that is serving, if any.
    pub fn current(&self, name: &str) -> std::io::Result<Option<Current>> {
        let text = match fs::read_to_string(self.root.join(name).join("current")) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut parts = text.split_whitespace();
        let (Some(version), Some(at)) = (parts.next(), parts.next()) else {
            return Ok(None);
        };
        Ok(Some(Current {
            version: version.to_owned(),
            deployed_at_unix_s: at.parse().unwrap_or(0),
        }))
    }

    /// Where `version` of `name` lives.
    pub fn version_dir(&self, name: &str, version: &str) -> PathBuf {
        self.root.join(name).join("versions").join(version)
    }

    /// Move a received package into place as `version` of `name` (not yet
    /// current).
    pub fn install(&self, name: &str, version: &str, incoming: &Path) -> std::io::Result<PathBuf> {
        let dest = self.version_dir(name, version);
        if dest.exists() {
            fs::remove_dir_all(incoming)?;
        } else {
            fs::create_dir_all(dest.parent().expect("versions dir"))?;
            sync_tree(incoming)?;
            fs::rename(incoming, &dest)?;
            fs::File::open(dest.parent().expect("versions dir"))?.sync_all()?;
        }
        Ok(dest)
    }

    /// Make `version` current — the commit point of a deploy — and
    /// drop older versions.
    pub fn commit(
        &self,
        name: &str,
        version: &str,
        deployed_at_unix_s: u64,
    ) -> std::io::Result<()> {
        write_atomic(
            &self.root.join(name).join("current"),
            format!("{version} {deployed_at_unix_s}\n").as_bytes(),
        )?;
        self.prune(name)
    }

    /// Remove `name` entirely.
    pub fn remove(&self, name: &str) -> std::io::Result<bool> {
        let dir = self.root.join(name);
        if !dir.exists() {
            return Ok(false);
        }
        // Remove the commit point first so a crash half-way leaves nothing
        // that looks deployed.
        let current = dir.join("current");
        if current.exists() {
            fs::remove_file(&current)?;
        }
        fs::remove_dir_all(&dir)?;
        Ok(true)
    }

    /// Removes every version of `name` but the current one; a function
    /// with no current version goes entirely.
    fn prune(&self, name: &str) -> std::io::Result<()> {
        let Some(keep) = self.current(name)?.map(|c| c.version) else {
            let dir = self.root.join(name);
            if dir.exists() {
                fs::remove_dir_all(dir)?;
            }
            return Ok(());
        };
        let versions = self.root.join(name).join("versions");
        if !versions.exists() {
            return Ok(());
        }
        for entry in fs::read_dir(&versions)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy() != keep.as_str() {
                fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(())
    }
}

fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(store: &Store, content: &[u8]) -> PathBuf {
        let dir = store.incoming_dir().unwrap();
        fs::write(dir.join("a.wasm"), content).unwrap();
        dir
    }

    #[test]
    fn install_then_commit_makes_current_and_prunes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("functions")).unwrap();
        store.install("f", "d1", &stage(&store, b"1")).unwrap();
        assert_eq!(store.current("f").unwrap(), None);
        assert!(store.names().unwrap().is_empty());
        store.commit("f", "d1", 10).unwrap();
        store.install("f", "d2", &stage(&store, b"2")).unwrap();
        // Not committed: d1 still serves.
        assert_eq!(store.current("f").unwrap().unwrap().version, "d1");
        store.commit("f", "d2", 11).unwrap();
        assert_eq!(store.current("f").unwrap().unwrap().version, "d2");
        assert!(!store.version_dir("f", "d1").exists());
        assert_eq!(store.names().unwrap(), vec!["f".to_string()]);
    }

    #[test]
    fn reopening_sweeps_an_interrupted_deploy() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("functions");
        let store = Store::open(root.clone()).unwrap();
        store.install("f", "d1", &stage(&store, b"1")).unwrap();
        store.commit("f", "d1", 10).unwrap();
        // A deploy that crashed after installing but before committing.
        store.install("f", "d2", &stage(&store, b"2")).unwrap();
        let half = stage(&store, b"partial");
        drop(store);
        let store = Store::open(root).unwrap();
        assert_eq!(store.current("f").unwrap().unwrap().version, "d1");
        assert!(!store.version_dir("f", "d2").exists());
        assert!(!half.exists());
    }

    #[test]
    fn remove_forgets_the_function() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("functions")).unwrap();
        store.install("f", "d1", &stage(&store, b"1")).unwrap();
        store.commit("f", "d1", 10).unwrap();
        assert!(store.remove("f").unwrap());
        assert!(!store.remove("f").unwrap());
        assert!(store.names().unwrap().is_empty());
    }
}
