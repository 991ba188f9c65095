//! `slinfer.toml`: what a function package declares about itself.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use slinfer_sandbox::limits::{FunctionLimits, HostLimits};

/// The name of the manifest file inside a package.
pub const MANIFEST_FILE: &str = "slinfer.toml";

/// A package manifest as written by the author.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The function's name: `[a-z0-9][a-z0-9-]*`, at most 63 characters.
    pub name: String,
    /// The component file, relative to the package directory.
    pub component: String,
    /// Limits; anything left out takes the host default.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Environment variables the guest sees (and nothing else).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A directory of the package the guest may read.
    #[serde(default)]
    pub files: Option<FilesSpec>,
    /// Outbound HTTP; off unless hosts are listed.
    #[serde(default)]
    pub outbound: OutboundSpec,
    /// Models this function may use.
    #[serde(default)]
    pub models: ModelsSpec,
    /// Latency targets for inference requests.
    #[serde(default)]
    pub slo: SloSpec,
    /// When set, invocations must carry `Authorization: Bearer <key>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke_key: Option<String>,
}

/// Optional overrides of [`FunctionLimits`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    pub memory_bytes: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub max_concurrency: Option<u32>,
    pub max_queue: Option<u32>,
    pub max_request_body_bytes: Option<u64>,
    pub max_response_body_bytes: Option<u64>,
}

/// A read-only directory grant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSpec {
    /// Directory inside the package.
    pub dir: String,
    /// Where the guest sees it (default `/` + `dir`).
    #[serde(default)]
    pub mount: Option<String>,
}

/// Outbound HTTP permissions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundSpec {
    /// `host` or `host:port` entries the guest may call.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

/// Model permissions (used by the inference interfaces).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsSpec {
    #[serde(default)]
    pub allowed: Vec<String>,
}

/// Latency targets for inference requests (used by the scheduler).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloSpec {
    /// Time to first token; with `ttft_prompt_tokens_per_s`, its floor.
    pub ttft_ms: Option<u64>,
    /// The TTFT SLO grows with the prompt: at least its tokens at this rate
    /// (the paper's SLO is `max(prompt / 512, 0.5)` s: `ttft_ms = 500`,
    /// `ttft_prompt_tokens_per_s = 512`).
    pub ttft_prompt_tokens_per_s: Option<f64>,
    pub tpot_ms: Option<u64>,
}

/// Why a manifest was refused. Each message names the field at fault.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    #[error("invalid slinfer.toml: {0}")]
    Syntax(String),
    #[error(
        "invalid function name {0:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
    )]
    Name(String),
    #[error("invalid {field} {value:?}: it must be a relative path inside the package")]
    Path { field: &'static str, value: String },
    #[error("invalid limits.{field} = {value}: {reason}")]
    Limit {
        field: &'static str,
        value: u64,
        reason: String,
    },
    #[error("invalid env variable name {0:?}")]
    EnvName(String),
    #[error("invalid outbound.allowed_hosts entry {0:?}: use host or host:port")]
    OutboundHost(String),
    #[error("invalid slo.{0}: it must be greater than zero")]
    Slo(&'static str),
    #[error("invalid invoke_key: it must not be empty")]
    InvokeKey,
}

/// Is `name` a valid function name? It becomes a directory name and a URL
/// segment, so nothing that could climb out of either is allowed.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A relative path with no `..`, root or prefix components.
/// A path inside the package, below its root (`.` is the root itself: a
/// granted directory there would show the guest its own manifest).
fn is_inner_path(p: &str) -> bool {
    let mut below = false;
    for c in Path::new(p).components() {
        match c {
            Component::Normal(_) => below = true,
            Component::CurDir => {}
            _ => return false,
        }
    }
    below
}

impl Manifest {
    /// Parse and validate a manifest.
    pub fn parse(text: &str, host: &HostLimits) -> Result<Manifest, ManifestError> {
        let m: Manifest = toml::from_str(text).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        m.validate(host)?;
        Ok(m)
    }

    fn validate(&self, host: &HostLimits) -> Result<(), ManifestError> {
        if !valid_name(&self.name) {
            return Err(ManifestError::Name(self.name.clone()));
        }
        if !is_inner_path(&self.component) {
            return Err(ManifestError::Path {
                field: "component",
                value: self.component.clone(),
            });
        }
        if let Some(files) = self.files.as_ref().filter(|f| !is_inner_path(&f.dir)) {
            return Err(ManifestError::Path {
                field: "files.dir",
                value: files.dir.clone(),
            });
        }
        self.resolved_limits(host)?;
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(ManifestError::EnvName(k.clone()));
            }
        }
        for h in &self.outbound.allowed_hosts {
            if h.parse::<http::uri::Authority>().is_err() || h.contains('@') {
                return Err(ManifestError::OutboundHost(h.clone()));
            }
        }
        if self.slo.ttft_ms == Some(0) {
            return Err(ManifestError::Slo("ttft_ms"));
        }
        if self.slo.tpot_ms == Some(0) {
            return Err(ManifestError::Slo("tpot_ms"));
        }
        if self
            .slo
            .ttft_prompt_tokens_per_s
            .is_some_and(|r| !(r.is_finite() && r > 0.0))
        {
            return Err(ManifestError::Slo("ttft_prompt_tokens_per_s"));
        }
        if self.invoke_key.as_deref() == Some("") {
            return Err(ManifestError::InvokeKey);
        }
        Ok(())
    }

    /// The manifest's limits merged with the defaults, checked against the
    /// host's ceilings.
    pub fn resolved_limits(&self, host: &HostLimits) -> Result<FunctionLimits, ManifestError> {
        let d = FunctionLimits::default();
        let l = &self.limits;
        let r = FunctionLimits {
            memory_bytes: l.memory_bytes.unwrap_or(d.memory_bytes),
            timeout_ms: l.timeout_ms.unwrap_or(d.timeout_ms),
            max_concurrency: l.max_concurrency.unwrap_or(d.max_concurrency),
            max_queue: l.max_queue.unwrap_or(d.max_queue),
            max_request_body_bytes: l.max_request_body_bytes.unwrap_or(d.max_request_body_bytes),
            max_response_body_bytes: l
                .max_response_body_bytes
                .unwrap_or(d.max_response_body_bytes),
        };
        let check = |field: &'static str, value: u64, min: u64, max: u64| {
            if value < min || value > max {
                Err(ManifestError::Limit {
                    field,
                    value,
                    reason: format!("allowed range is {min}..={max}"),
                })
            } else {
                Ok(())
            }
        };
        check(
            "memory_bytes",
            r.memory_bytes,
            1 << 16,
            host.max_function_memory_bytes,
        )?;
        check("timeout_ms", r.timeout_ms, 1, host.max_timeout_ms)?;
        check(
            "max_concurrency",
            r.max_concurrency.into(),
            1,
            host.total_instances.into(),
        )?;
        check("max_queue", r.max_queue.into(), 0, 1 << 20)?;
        check(
            "max_request_body_bytes",
            r.max_request_body_bytes,
            0,
            1 << 40,
        )?;
        check(
            "max_response_body_bytes",
            r.max_response_body_bytes,
            0,
            1 << 40,
        )?;
        Ok(r)
    }

    /// Where the guest sees the granted directory.
    pub fn files_mount(&self) -> Option<(String, String)> {
        self.files.as_ref().map(|f| {
            let mount = f
                .mount
                .clone()
                .unwrap_or_else(|| format!("/{}", f.dir.trim_start_matches("./")));
            (f.dir.clone(), mount)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(s, &HostLimits::default())
    }

    #[test]
    fn minimal_manifest_takes_defaults() {
        let m = parse("name = \"hello\"\ncomponent = \"hello.wasm\"\n").unwrap();
        assert_eq!(
            m.resolved_limits(&HostLimits::default()).unwrap(),
            FunctionLimits::default()
        );
    }

    #[test]
    fn names_cannot_escape() {
        for bad in ["", "../x", "a/b", "A", "-x", "x.y", &"a".repeat(64), "ä"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in ["a", "hello-2", "0x"] {
            assert!(valid_name(good));
        }
        let e = parse("name = \"../etc\"\ncomponent = \"a.wasm\"\n").unwrap_err();
        assert!(e.to_string().contains("invalid function name"));
    }

    #[test]
    fn paths_stay_inside_the_package() {
        for bad in ["../a.wasm", "/abs.wasm", "a/../../b.wasm", "", ".", "./"] {
            let e = parse(&format!("name = \"x\"\ncomponent = \"{bad}\"\n")).unwrap_err();
            assert!(
                matches!(
                    e,
                    ManifestError::Path {
                        field: "component",
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
        // The package root would show the guest its own manifest.
        for dir in ["../up", ".", "./"] {
            let e = parse(&format!(
                "name = \"x\"\ncomponent = \"a.wasm\"\n[files]\ndir = \"{dir}\"\n"
            ))
            .unwrap_err();
            assert!(
                matches!(
                    e,
                    ManifestError::Path {
                        field: "files.dir",
                        ..
                    }
                ),
                "{dir}: {e}"
            );
        }
        let e =
            parse("name = \"x\"\ncomponent = \"a.wasm\"\n[files]\ndir = \"../up\"\n").unwrap_err();
        assert!(matches!(
            e,
            ManifestError::Path {
                field: "files.dir",
                ..
            }
        ));
    }

    #[test]
    fn limits_are_checked_against_the_host() {
        let e =
            parse("name = \"x\"\ncomponent = \"a.wasm\"\n[limits]\nmemory_bytes = 99999999999\n")
                .unwrap_err();
        assert!(e.to_string().contains("limits.memory_bytes"), "{e}");
        let e =
            parse("name = \"x\"\ncomponent = \"a.wasm\"\n[limits]\ntimeout_ms = 0\n").unwrap_err();
        assert!(e.to_string().contains("limits.timeout_ms"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let e = parse("name = \"x\"\ncomponent = \"a.wasm\"\ncolour = 1\n").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = parse(
            "name = \"x\"\ncomponent = \"a.wasm\"\n[outbound]\nallowed_hosts = [\"user@h\"]\n",
        )
        .unwrap_err();
        assert!(matches!(e, ManifestError::OutboundHost(_)));
        let e = parse("name = \"x\"\ncomponent = \"a.wasm\"\n[slo]\ntpot_ms = 0\n").unwrap_err();
        assert_eq!(e, ManifestError::Slo("tpot_ms"));
        for rate in ["0.0", "-512.0", "nan"] {
            let e = parse(&format!(
                "name = \"x\"\ncomponent = \"a.wasm\"\n[slo]\nttft_prompt_tokens_per_s = {rate}\n"
            ))
            .unwrap_err();
            assert_eq!(e, ManifestError::Slo("ttft_prompt_tokens_per_s"), "{rate}");
        }
        let m = parse(
            "name = \"x\"\ncomponent = \"a.wasm\"\n[slo]\nttft_ms = 500\nttft_prompt_tokens_per_s = 512.0\n",
        )
        .unwrap();
        assert_eq!(m.slo.ttft_prompt_tokens_per_s, Some(512.0));
    }

    #[test]
    fn files_mount_defaults_to_the_dir_name() {
        let m = parse("name = \"x\"\ncomponent = \"a.wasm\"\n[files]\ndir = \"assets\"\n").unwrap();
        assert_eq!(m.files_mount(), Some(("assets".into(), "/assets".into())));
    }
}
