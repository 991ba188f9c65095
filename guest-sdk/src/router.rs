//! A small router: method + path pattern (`/users/:id`, `/files/*rest`) to a
//! handler function.

use crate::{Method, Request, Response};

/// Values bound by a route's `:name` and `*name` segments.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// The value bound to `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

type RouteFn = fn(Request, Params) -> Response;

/// Routes requests by method and path. Unmatched paths get 404, a known path
/// with another method gets 405.
#[derive(Default)]
pub struct Router {
    routes: Vec<(Option<Method>, Vec<String>, RouteFn)>,
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Route `GET pattern` to `f`.
    pub fn get(self, pattern: &str, f: RouteFn) -> Self {
        self.route(Some(Method::Get), pattern, f)
    }

    /// Route `POST pattern` to `f`.
    pub fn post(self, pattern: &str, f: RouteFn) -> Self {
        self.route(Some(Method::Post), pattern, f)
    }

    /// Route any method on `pattern` to `f`.
    pub fn any(self, pattern: &str, f: RouteFn) -> Self {
        self.route(None, pattern, f)
    }

    /// Route `method` (any when `None`) on `pattern` to `f`.
    pub fn route(mut self, method: Option<Method>, pattern: &str, f: RouteFn) -> Self {
        self.routes.push((method, segments(pattern), f));
        self
    }

    /// Dispatch `req` to the first matching route.
    pub fn handle(&self, req: Request) -> Response {
        let path = segments(req.path());
        let mut path_matched = false;
        for (method, pattern, f) in &self.routes {
            if let Some(params) = match_path(pattern, &path) {
                if method.as_ref().is_none_or(|m| m == req.method()) {
                    return f(req, params);
                }
                path_matched = true;
            }
        }
        if path_matched {
            Response::text(405, "method not allowed\n")
        } else {
            Response::text(404, "not found\n")
        }
    }
}

fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn match_path(pattern: &[String], path: &[String]) -> Option<Params> {
    let mut params = Vec::new();
    for (i, seg) in pattern.iter().enumerate() {
        if let Some(name) = seg.strip_prefix('*') {
            params.push((name.to_owned(), path.get(i..)?.join("/")));
            return Some(Params(params));
        }
        let actual = path.get(i)?;
        if let Some(name) = seg.strip_prefix(':') {
            params.push((name.to_owned(), actual.clone()));
        } else if seg != actual {
            return None;
        }
    }
    (pattern.len() == path.len()).then_some(Params(params))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(s: &str) -> Vec<String> {
        segments(s)
    }

    #[test]
    fn literal_and_params() {
        let p = match_path(&seg("/users/:id"), &seg("/users/42")).unwrap();
        assert_eq!(p.get("id"), Some("42"));
        assert!(match_path(&seg("/users/:id"), &seg("/users")).is_none());
        assert!(match_path(&seg("/users/:id"), &seg("/users/1/x")).is_none());
        assert!(match_path(&seg("/users"), &seg("/groups")).is_none());
    }

    #[test]
    fn wildcard_takes_rest() {
        let p = match_path(&seg("/files/*rest"), &seg("/files/a/b/c")).unwrap();
        assert_eq!(p.get("rest"), Some("a/b/c"));
        let p = match_path(&seg("/files/*rest"), &seg("/files")).unwrap();
        assert_eq!(p.get("rest"), Some(""));
    }
}
