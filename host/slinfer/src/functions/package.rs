//! Package archives: the gzip'd tar the CLI uploads, and its safe unpacking.
//!
//! An archive holds `slinfer.toml`, the component file it names, and the
//! granted files directory if any. Unpacking refuses anything that could land
//! outside the target directory (absolute paths, `..`, links, devices) and
//! stops at a size ceiling, so a hostile archive cannot fill the disk.

use std::fs;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use super::manifest::{MANIFEST_FILE, Manifest};
use slinfer_sandbox::limits::HostLimits;

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("the package is not a gzip'd tar archive: {0}")]
    NotAnArchive(String),
    #[error(
        "the package entry {0:?} is not allowed: only regular files and directories inside the package"
    )]
    BadEntry(String),
    #[error("the package is larger than the limit of {limit_bytes} bytes unpacked")]
    TooLarge { limit_bytes: u64 },
    #[error("the package has more than {limit} entries")]
    TooManyEntries { limit: u32 },
    #[error("the package entry {path:?} cannot be unpacked: {why}")]
    Conflict { path: String, why: String },
    #[error("slinfer.toml is not UTF-8 text")]
    ManifestNotText,
    #[error("the package has no slinfer.toml")]
    NoManifest,
    #[error("the package's manifest names component {0:?}, which is not in the package")]
    NoComponent(String),
    #[error(transparent)]
    Manifest(#[from] super::manifest::ManifestError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Pack the package directory `dir` into a gzip'd tar archive in memory.
/// Only the manifest, the component and the files directory go in.
pub fn pack(dir: &Path, host: &HostLimits) -> Result<(Manifest, Vec<u8>), PackageError> {
    let text = fs::read_to_string(dir.join(MANIFEST_FILE)).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            PackageError::NoManifest
        } else {
            e.into()
        }
    })?;
    let manifest = Manifest::parse(&text, host)?;
    if !dir.join(&manifest.component).is_file() {
        return Err(PackageError::NoComponent(manifest.component.clone()));
    }
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.append_path_with_name(dir.join(MANIFEST_FILE), MANIFEST_FILE)?;
    tar.append_path_with_name(dir.join(&manifest.component), &manifest.component)?;
    if let Some(files) = &manifest.files {
        let src = dir.join(&files.dir);
        if src.is_dir() {
            tar.append_dir_all(&files.dir, &src)?;
        }
    }
    let bytes = tar.into_inner()?.finish()?;
    Ok((manifest, bytes))
}

/// Unpack `archive` into the empty directory `into`, returning the manifest.
pub fn unpack(archive: &[u8], into: &Path, host: &HostLimits) -> Result<Manifest, PackageError> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    let mut total: u64 = 0;
    let mut count: u32 = 0;
    let entries = tar
        .entries()
        .map_err(|e| PackageError::NotAnArchive(e.to_string()))?;
    for entry in entries {
        count += 1;
        if count > host.max_package_entries {
            return Err(PackageError::TooManyEntries {
                limit: host.max_package_entries,
            });
        }
        let mut entry = entry.map_err(|e| PackageError::NotAnArchive(e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| PackageError::NotAnArchive(e.to_string()))?
            .into_owned();
        let rel =
            inner_path(&raw).ok_or_else(|| PackageError::BadEntry(raw.display().to_string()))?;
        let kind = entry.header().entry_type();
        let target = into.join(&rel);
        // Entries that clash (a file below a file, a file over a folder) or
        // a name the file system refuses are the package's fault.
        let clash = |e: std::io::Error| conflict(&raw, e);
        if kind.is_dir() {
            fs::create_dir_all(&target).map_err(clash)?;
            continue;
        }
        if !kind.is_file() {
            return Err(PackageError::BadEntry(raw.display().to_string()));
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(clash)?;
        }
        let mut out = fs::File::create(&target).map_err(clash)?;
        let mut buf = [0u8; 64 * 1024];
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| PackageError::NotAnArchive(e.to_string()))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > host.max_package_bytes {
                return Err(PackageError::TooLarge {
                    limit_bytes: host.max_package_bytes,
                });
            }
            out.write_all(&buf[..n])?;
        }
        out.sync_all()?;
    }
    let text = match fs::read_to_string(into.join(MANIFEST_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(PackageError::NoManifest),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Err(PackageError::ManifestNotText);
        }
        Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
            return Err(PackageError::BadEntry(MANIFEST_FILE.into()));
        }
        Err(e) => return Err(e.into()),
    };
    let manifest = Manifest::parse(&text, host)?;
    if !into.join(&manifest.component).is_file() {
        return Err(PackageError::NoComponent(manifest.component.clone()));
    }
    Ok(manifest)
}

/// An error creating an entry's path: the package's fault when the path
/// clashes with another entry or is not a valid name, the server's (storage)
/// otherwise.
fn conflict(raw: &Path, e: std::io::Error) -> PackageError {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::AlreadyExists
        | K::NotADirectory
        | K::IsADirectory
        | K::InvalidFilename
        | K::InvalidInput => PackageError::Conflict {
            path: raw.display().to_string(),
            why: e.to_string(),
        },
        _ => PackageError::Io(e),
    }
}

fn inner_path(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, *data).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    const MANIFEST: &[u8] = b"name = \"x\"\ncomponent = \"x.wasm\"\n";

    #[test]
    fn round_trip() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("slinfer.toml"), MANIFEST).unwrap();
        fs::write(src.path().join("x.wasm"), b"\0asm").unwrap();
        fs::write(src.path().join("not-packed.txt"), b"left behind").unwrap();
        let (m, bytes) = pack(src.path(), &HostLimits::default()).unwrap();
        assert_eq!(m.name, "x");
        let dst = tempfile::tempdir().unwrap();
        unpack(&bytes, dst.path(), &HostLimits::default()).unwrap();
        assert_eq!(fs::read(dst.path().join("x.wasm")).unwrap(), b"\0asm");
        assert!(!dst.path().join("not-packed.txt").exists());
    }

    #[test]
    fn refuses_escaping_entries() {
        // tar::Builder refuses `..` itself, so write the name into the header raw.
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append(&h, &b"x"[..]).unwrap();
        let bytes = tar.into_inner().unwrap().finish().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let e = unpack(&bytes, &dst.path().join("pkg"), &HostLimits::default()).unwrap_err();
        assert!(matches!(e, PackageError::BadEntry(_)), "{e}");
        assert!(!dst.path().join("escape").exists());
    }

    #[test]
    fn refuses_oversized_and_garbage() {
        let big = vec![0u8; 2048];
        let bytes = archive(&[("slinfer.toml", MANIFEST), ("x.wasm", &big)]);
        let host = HostLimits {
            max_package_bytes: 1024,
            ..HostLimits::default()
        };
        let dst = tempfile::tempdir().unwrap();
        assert!(matches!(
            unpack(&bytes, dst.path(), &host),
            Err(PackageError::TooLarge { limit_bytes: 1024 })
        ));
        let e = unpack(b"definitely not gzip", dst.path(), &HostLimits::default()).unwrap_err();
        assert!(matches!(e, PackageError::NotAnArchive(_)), "{e}");
    }

    #[test]
    fn refuses_missing_pieces() {
        let dst = tempfile::tempdir().unwrap();
        let e = unpack(
            &archive(&[("x.wasm", b"\0asm")]),
            dst.path(),
            &HostLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(e, PackageError::NoManifest));
        let dst = tempfile::tempdir().unwrap();
        let e = unpack(
            &archive(&[("slinfer.toml", MANIFEST)]),
            dst.path(),
            &HostLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(e, PackageError::NoComponent(_)), "{e}");
    }
}
