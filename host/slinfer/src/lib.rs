//! # slinfer (host)
//!
//! The platform binary's library: the HTTP API (`api`), function packages and
//! their on-disk store and registry (`functions`), the WebAssembly sandbox
//! (`sandbox`), the live inference path (`inference`), model packages
//! (`models`), cluster membership (`cluster`, on `slinfer-cluster`),
//! generations across the cluster (`routing`) and the controller's
//! placement of new instances (`placement`), metrics,
//! and the command-line clients (`cli`). It turns an
//! HTTP request for `/fn/{name}/...` into a fresh, limited instance of that
//! function's component.
//!
//! The host must never let one function affect another or itself: every guest
//! runs in its own store with explicit limits, and every failure becomes a
//! clear HTTP error. Policy about models and devices lives in
//! `slinfer-scheduler`, never here.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod connections;
pub mod devices;
pub mod functions;
pub mod metrics;
pub mod models;
pub mod placement;
pub mod routing;
pub mod server;
pub mod timing;
pub mod ui;
