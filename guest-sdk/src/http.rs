//! Request and response types over `wasi:http/types`.

use crate::bindings::wasi::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingRequest, Method as WitMethod, OutgoingBody,
    OutgoingResponse, ResponseOutparam,
};
use crate::bindings::wasi::io::streams::{OutputStream, StreamError};

/// `blocking-write-and-flush` accepts at most this many bytes per call.
const MAX_WRITE_BYTES: usize = 4096;
/// How much a single `blocking-read` asks for.
const READ_CHUNK_BYTES: u64 = 64 * 1024;

/// An error from the HTTP layer: a body that could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// The request method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
    Other(String),
}

impl Method {
    /// The method as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Connect => "CONNECT",
            Method::Options => "OPTIONS",
            Method::Trace => "TRACE",
            Method::Patch => "PATCH",
            Method::Other(s) => s,
        }
    }
}

impl From<WitMethod> for Method {
    fn from(m: WitMethod) -> Self {
        match m {
            WitMethod::Get => Method::Get,
            WitMethod::Head => Method::Head,
            WitMethod::Post => Method::Post,
            WitMethod::Put => Method::Put,
            WitMethod::Delete => Method::Delete,
            WitMethod::Connect => Method::Connect,
            WitMethod::Options => Method::Options,
            WitMethod::Trace => Method::Trace,
            WitMethod::Patch => Method::Patch,
            WitMethod::Other(s) => Method::Other(s),
        }
    }
}

/// Header list, in order, names lower-cased as the host delivers them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, Vec<u8>)>);

impl Headers {
    /// The first value of `name` (case-insensitive) as UTF-8, if any.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Append a header.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.0.push((name.into(), value.into()));
    }

    /// Iterate over `(name, value)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

/// An incoming request. The body is read on demand.
pub struct Request {
    method: Method,
    path_with_query: String,
    headers: Headers,
    inner: Option<IncomingRequest>,
    body: Option<Vec<u8>>,
}

impl Request {
    pub(crate) fn from_incoming(req: IncomingRequest) -> Self {
        let headers = Headers(req.headers().entries());
        Request {
            method: req.method().into(),
            path_with_query: req.path_with_query().unwrap_or_else(|| "/".into()),
            headers,
            inner: Some(req),
            body: None,
        }
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.path_with_query
            .split_once('?')
            .map_or(self.path_with_query.as_str(), |(p, _)| p)
    }

    /// The raw query string (without `?`), empty when there is none.
    pub fn query(&self) -> &str {
        self.path_with_query.split_once('?').map_or("", |(_, q)| q)
    }

    /// The value of query parameter `name`, undecoded.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query()
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The whole body. Reads it from the host on first call.
    pub fn body(&mut self) -> Result<&[u8], Error> {
        if self.body.is_none() {
            let mut out = Vec::new();
            self.read_body(|chunk| {
                out.extend_from_slice(chunk);
                Ok(())
            })?;
            self.body = Some(out);
        }
        Ok(self.body.as_deref().unwrap_or_default())
    }

    /// Stream the body chunk by chunk without holding it all in memory.
    pub fn read_body(
        &mut self,
        mut on_chunk: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let Some(req) = self.inner.take() else {
            return Ok(());
        };
        let body = req
            .consume()
            .map_err(|()| Error("request body already consumed".into()))?;
        {
            let stream = body
                .stream()
                .map_err(|()| Error("request body stream unavailable".into()))?;
            loop {
                match stream.blocking_read(READ_CHUNK_BYTES) {
                    Ok(chunk) => on_chunk(&chunk)?,
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(e)) => {
                        return Err(Error(format!(
                            "reading request body: {}",
                            e.to_debug_string()
                        )));
                    }
                }
            }
        }
        IncomingBody::finish(body);
        Ok(())
    }
}

type StreamFn = Box<dyn FnOnce(&mut BodyWriter) -> Result<(), Error>>;

enum Body {
    Bytes(Vec<u8>),
    Stream(StreamFn),
}

/// A response: status, headers and a body that is either whole or streamed.
pub struct Response {
    status: u16,
    headers: Headers,
    body: Body,
}

impl Response {
    /// A response with a whole body.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: Headers::default(),
            body: Body::Bytes(body.into()),
        }
    }

    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, body.into()).header("content-type", "text/plain; charset=utf-8")
    }

    /// An `application/json` response from already-serialised JSON.
    pub fn json(status: u16, json: impl Into<String>) -> Self {
        Self::new(status, json.into()).header("content-type", "application/json")
    }

    /// A streamed response: `write` is called after the status and headers
    /// have been sent, and each [`BodyWriter::write`] reaches the client as it
    /// is written.
    pub fn stream(
        status: u16,
        write: impl FnOnce(&mut BodyWriter) -> Result<(), Error> + 'static,
    ) -> Self {
        Response {
            status,
            headers: Headers::default(),
            body: Body::Stream(Box::new(write)),
        }
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    pub(crate) fn send(self, out: ResponseOutparam) {
        let fields = match Fields::from_list(&self.headers.0) {
            Ok(f) => f,
            Err(e) => {
                ResponseOutparam::set(
                    out,
                    Err(ErrorCode::InternalError(Some(format!(
                        "invalid response header: {e:?}"
                    )))),
                );
                return;
            }
        };
        let resp = OutgoingResponse::new(fields);
        if resp.set_status_code(self.status).is_err() {
            ResponseOutparam::set(
                out,
                Err(ErrorCode::InternalError(Some(format!(
                    "invalid status code {}",
                    self.status
                )))),
            );
            return;
        }
        let body = resp.body().expect("a new response has a body");
        ResponseOutparam::set(out, Ok(resp));
        let result = {
            let stream = body.write().expect("a new body has a stream");
            let mut writer = BodyWriter { stream };
            match self.body {
                Body::Bytes(bytes) => writer.write(&bytes),
                Body::Stream(f) => f(&mut writer),
            }
        };
        // A body that failed half-way must not look complete to the client:
        // dropping it without `finish` makes the host abort the response.
        if result.is_ok() {
            let _ = OutgoingBody::finish(body, None);
        }
    }
}

/// Writes a streamed response body.
pub struct BodyWriter {
    stream: OutputStream,
}

impl BodyWriter {
    /// Write and flush `bytes`; the client receives them before this returns.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        for chunk in bytes.chunks(MAX_WRITE_BYTES) {
            self.stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| Error(format!("writing response body: {e:?}")))?;
        }
        Ok(())
    }
}
