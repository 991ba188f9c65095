//! `wasi:http` beyond what wasmtime-wasi-http provides: the outbound policy
//! (a function reaches only the hosts its manifest lists).

use std::sync::Arc;

use wasmtime_wasi_http::WasiHttpHooks;

/// Outbound `wasi:http` requests are refused unless the manifest lists the
/// destination: `host` (any port), `host:port`, `*.domain` (its subdomains,
/// any port, or `*.domain:port`), or `*` (anywhere).
pub struct OutboundPolicy {
    pub allowed_hosts: Arc<[String]>,
}

impl OutboundPolicy {
    fn allows(&self, uri: &http::Uri) -> bool {
        let Some(authority) = uri.authority() else {
            return false;
        };
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(match uri.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        let host_matches = |pattern: &str| {
            if pattern == "*" {
                return true;
            }
            match pattern.strip_prefix("*.") {
                Some(domain) => {
                    let (h, d) = (host.to_ascii_lowercase(), domain.to_ascii_lowercase());
                    h.len() > d.len() + 1
                        && h.ends_with(&d)
                        && h[..h.len() - d.len()].ends_with('.')
                }
                None => pattern.eq_ignore_ascii_case(host),
            }
        };
        self.allowed_hosts
            .iter()
            .any(|entry| match entry.rsplit_once(':') {
                Some((h, p)) => host_matches(h) && p.parse() == Ok(port),
                None => host_matches(entry),
            })
    }
}

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        if !self.allows(request.uri()) {
            tracing::warn!(uri = %request.uri(), "outbound request refused: host not in outbound.allowed_hosts");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let _ = fut;
        Box::new(async move {
            use http_body_util::BodyExt;
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: &[&str]) -> OutboundPolicy {
        OutboundPolicy {
            allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn outbound_is_off_by_default() {
        assert!(!policy(&[]).allows(&"http://example.com/".parse().unwrap()));
    }

    #[test]
    fn wildcards_match_subdomains_or_everything() {
        let p = policy(&["*.example.com", "*.svc:8080"]);
        assert!(p.allows(&"https://api.example.com/".parse().unwrap()));
        assert!(p.allows(&"http://a.b.EXAMPLE.com:81/".parse().unwrap()));
        assert!(!p.allows(&"http://example.com/".parse().unwrap()));
        assert!(!p.allows(&"http://evilexample.com/".parse().unwrap()));
        assert!(p.allows(&"http://db.svc:8080/".parse().unwrap()));
        assert!(!p.allows(&"http://db.svc:8081/".parse().unwrap()));
        assert!(policy(&["*"]).allows(&"http://10.0.0.1:9/".parse().unwrap()));
    }

    #[test]
    fn host_entries_match_any_port_and_host_port_entries_one() {
        let p = policy(&["api.example.com", "127.0.0.1:8081"]);
        assert!(p.allows(&"https://API.example.com/x".parse().unwrap()));
        assert!(p.allows(&"http://api.example.com:9000/".parse().unwrap()));
        assert!(p.allows(&"http://127.0.0.1:8081/".parse().unwrap()));
        assert!(!p.allows(&"http://127.0.0.1:8082/".parse().unwrap()));
        assert!(!p.allows(&"http://127.0.0.1/".parse().unwrap()));
        assert!(!p.allows(&"http://evil.example.com/".parse().unwrap()));
    }
}
