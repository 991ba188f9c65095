//! Streamed requests between members, on core NATS (not JetStream): one
//! member asks another, by node name, and reads the frames the other
//! answers with, in order, until the answer ends.
//!
//! - The asker subscribes to a fresh inbox and publishes the request to
//!   `slinfer.streams.<node>` with the inbox as its reply subject; the
//!   answerer publishes every frame there. One publisher on one connection:
//!   NATS keeps the frames in order.
//! - The answerer marks its last frame ([`Incoming::finish`]); an
//!   [`Outgoing`] that is dropped before that publishes a
//!   cancel to `slinfer.streams-cancel.<node>`; the answerer's
//!   [`Incoming::cancelled`] fires.
//! - Each side watches the other through membership: an answerer that
//!   stops heartbeating for [`DEAD_AFTER`] (killed, stopped, cut off) or
//!   comes back as another member ends the asker's stream with
//!   [`StreamError::Lost`]; an asker that goes the same way cancels the
//!   answerer's request.
//!
//! Frames are bytes: what they mean is the caller's business.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, StatusCode, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use crate::{Cluster, ClusterError};

const REQUESTS: &str = "slinfer.streams";
const CANCELS: &str = "slinfer.streams-cancel";
/// The asking member's node name.
const FROM: &str = "Slinfer-From";
/// The asking member's id (the answerer watches that member).
const FROM_MEMBER: &str = "Slinfer-From-Member";
/// The answering member's id, when the asker chose it: a request for a
/// member that has since restarted is not taken by the new one.
const TO_MEMBER: &str = "Slinfer-To-Member";
/// How often each side looks at the other's membership.
const WATCH_EVERY: Duration = Duration::from_millis(100);
/// How long a cancel for a request not (yet) seen here is remembered.
const EARLY_CANCEL_TTL: Duration = Duration::from_secs(30);

/// Why an [`Outgoing`] ended without its answer's end.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// The answering member went silent for the membership timeout, left,
    /// or restarted: what it was doing for this stream is gone.
    #[error("member {node:?} was lost ({why})")]
    Lost { node: String, why: String },
}

/// A request this member sent, and the frames answering it.
pub struct Outgoing {
    cluster: Weak<Cluster>,
    node: String,
    member_id: String,
    inbox: String,
    frames: Subscriber,
    /// When to look at the answerer's membership next.
    watch: tokio::time::Interval,
    ended: bool,
}

impl Outgoing {
    /// The next frame; `Ok(None)` after the last (see
    /// [`Incoming::finish`]).
    pub async fn next(&mut self) -> Result<Option<Bytes>, StreamError> {
        if self.ended {
            return Ok(None);
        }
        loop {
            tokio::select! {
                m = self.frames.next() => {
                    let Some(m) = m else {
                        return Err(self.lost("this member's NATS subscription closed"));
                    };
                    if m.status.is_some_and(|s| s == StatusCode::NO_RESPONDERS) {
                        return Err(self.lost("nothing there takes requests"));
                    }
                    if m.headers.as_ref().and_then(|h| h.get(END)).is_some() {
                        self.ended = true;
                    }
                    return Ok(Some(m.payload));
                }
                _ = self.watch.tick() => {
                    if let Some(why) = self.peer_gone() {
                        return Err(self.lost(&why));
                    }
                }
            }
        }
    }

    /// (Not `ended`: a member that was only stopped may come back and
    /// should hear the cancel.)
    fn lost(&self, why: &str) -> StreamError {
        StreamError::Lost {
            node: self.node.clone(),
            why: why.into(),
        }
    }

    fn peer_gone(&self) -> Option<String> {
        let cluster = self.cluster.upgrade()?;
        peer_gone(&cluster, &self.node, &self.member_id)
    }
}

/// Why `node` (as member `member_id`) no longer answers, if it does not.
fn peer_gone(cluster: &Cluster, node: &str, member_id: &str) -> Option<String> {
    match cluster.member(node) {
        None => Some("it left the cluster".into()),
        Some(m) if m.state.member_id != member_id => Some("it restarted".into()),
        Some(m) if !m.alive => Some(format!("silent for {} ms", m.heartbeat_age_ms)),
        Some(_) => None,
    }
}

impl Drop for Outgoing {
    /// Tell the answerer to stop, unless the answer ended.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let Some(c) = self.cluster.upgrade() {
            let (subject, inbox) = (format!("{CANCELS}.{}", self.node), self.inbox.clone());
            tokio::spawn(async move {
                let _ = c.client.publish(subject, inbox.into()).await;
            });
        }
    }
}

/// A header on the last frame of an answer.
const END: &str = "Slinfer-End";

/// A request another member sent to this one.
pub struct Incoming {
    /// The asking member's node name.
    pub from: String,
    pub body: Bytes,
    reply: String,
    cluster: Weak<Cluster>,
    cancel: watch::Receiver<bool>,
    book: Arc<CancelBook>,
}

impl Incoming {
    /// Send one frame to the asker.
    pub async fn send(&self, frame: Vec<u8>) -> Result<(), ClusterError> {
        let c = self.cluster.upgrade().ok_or_else(gone)?;
        c.client
            .publish(self.reply.clone(), frame.into())
            .await
            .map_err(ClusterError::store)
    }

    /// Send the last frame: the asker's [`Outgoing`] ends after it.
    pub async fn finish(self, last: Vec<u8>) -> Result<(), ClusterError> {
        let c = self.cluster.upgrade().ok_or_else(gone)?;
        let mut headers = HeaderMap::new();
        headers.insert(END, "1");
        c.client
            .publish_with_headers(self.reply.clone(), headers, last.into())
            .await
            .map_err(ClusterError::store)
    }

    /// Resolves when the asker cancelled (dropped its [`Outgoing`]) or was
    /// lost (silent for the membership timeout, left, or restarted).
    pub async fn cancelled(&self) {
        let mut cancel = self.cancel.clone();
        if *cancel.borrow_and_update() {
            return;
        }
        while cancel.changed().await.is_ok() {
            if *cancel.borrow() {
                return;
            }
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.book.forget(&self.reply);
    }
}

/// Ticks every [`WATCH_EVERY`], the first one [`WATCH_EVERY`] from now.
fn watch_interval() -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + WATCH_EVERY, WATCH_EVERY);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// Cancel the request answering `inbox` once its asker (`node`, as member
/// `member_id`) is lost; return once the request is over.
async fn watch_asker(
    cluster: Weak<Cluster>,
    book: Arc<CancelBook>,
    inbox: String,
    node: String,
    member_id: String,
) {
    let mut tick = watch_interval();
    loop {
        tick.tick().await;
        if !book.is_live(&inbox) {
            return;
        }
        let Some(c) = cluster.upgrade() else { return };
        if let Some(why) = peer_gone(&c, &node, &member_id) {
            tracing::debug!(%node, "cancelling a request of a lost member: {why}");
            book.cancel(&inbox);
            return;
        }
    }
}

fn gone() -> ClusterError {
    ClusterError::Disconnected("the cluster handle is gone".into())
}

/// Cancels by inbox: of requests being answered, and of requests not seen
/// yet (a cancel may overtake its request: they travel on two subjects).
#[derive(Default)]
struct CancelBook {
    live: Mutex<HashMap<String, watch::Sender<bool>>>,
    early: Mutex<HashMap<String, Instant>>,
}

impl CancelBook {
    fn register(&self, inbox: &str) -> watch::Receiver<bool> {
        let cancelled = {
            let mut early = self.early.lock().unwrap_or_else(|e| e.into_inner());
            early.retain(|_, at| at.elapsed() < EARLY_CANCEL_TTL);
            early.remove(inbox).is_some()
        };
        let (tx, rx) = watch::channel(cancelled);
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(inbox.to_owned(), tx);
        rx
    }

    fn cancel(&self, inbox: &str) {
        match self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(inbox)
        {
            Some(tx) => {
                let _ = tx.send(true);
            }
            None => {
                self.early
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(inbox.to_owned(), Instant::now());
            }
        }
    }

    fn is_live(&self, inbox: &str) -> bool {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(inbox)
    }

    fn forget(&self, inbox: &str) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(inbox);
    }
}

impl Cluster {
    /// Send `body` to member `node` and read its answer. Fails at once when
    /// `node` is not a live member or the NATS connection is down.
    pub async fn open_stream(
        self: &Arc<Self>,
        node: &str,
        body: Vec<u8>,
    ) -> Result<Outgoing, ClusterError> {
        self.ensure_connected()?;
        let member = self
            .member(node)
            .filter(|m| m.alive)
            .ok_or_else(|| ClusterError::Store(format!("{node:?} is not a live member")))?;
        let inbox = self.client.new_inbox();
        let frames = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(ClusterError::store)?;
        let mut headers = HeaderMap::new();
        headers.insert(FROM, self.identity.node.as_str());
        headers.insert(FROM_MEMBER, self.identity.member_id.as_str());
        headers.insert(TO_MEMBER, member.state.member_id.as_str());
        self.client
            .publish_with_reply_and_headers(
                format!("{REQUESTS}.{node}"),
                inbox.clone(),
                headers,
                body.into(),
            )
            .await
            .map_err(ClusterError::store)?;
        Ok(Outgoing {
            cluster: Arc::downgrade(self),
            node: node.to_owned(),
            member_id: member.state.member_id,
            inbox,
            frames,
            watch: watch_interval(),
            ended: false,
        })
    }

    /// Take the requests other members send to this one, calling `answer`
    /// on a task of its own for each, for the life of the cluster handle.
    pub async fn answer_streams<F, Fut>(self: &Arc<Self>, answer: F) -> Result<(), ClusterError>
    where
        F: Fn(Incoming) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let node = &self.identity.node;
        let mut requests = self
            .client
            .subscribe(format!("{REQUESTS}.{node}"))
            .await
            .map_err(ClusterError::store)?;
        let mut cancels = self
            .client
            .subscribe(format!("{CANCELS}.{node}"))
            .await
            .map_err(ClusterError::store)?;
        let book = Arc::new(CancelBook::default());
        let cancel_book = book.clone();
        tokio::spawn(async move {
            while let Some(m) = cancels.next().await {
                if let Ok(inbox) = std::str::from_utf8(&m.payload) {
                    cancel_book.cancel(inbox);
                }
            }
        });
        let (cluster, me) = (Arc::downgrade(self), self.identity.member_id.clone());
        tokio::spawn(async move {
            while let Some(m) = requests.next().await {
                let header = |name: &str| {
                    m.headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.as_str().to_owned())
                };
                let (Some(reply), Some(from), Some(from_member)) =
                    (m.reply.clone(), header(FROM), header(FROM_MEMBER))
                else {
                    tracing::debug!("a stream request without a reply subject or sender");
                    continue;
                };
                if header(TO_MEMBER).is_some_and(|id| id != me) {
                    // Meant for the member this node name had before.
                    continue;
                }
                let incoming = Incoming {
                    from: from.clone(),
                    body: m.payload,
                    cancel: book.register(&reply),
                    reply: reply.to_string(),
                    cluster: cluster.clone(),
                    book: book.clone(),
                };
                tokio::spawn(watch_asker(
                    cluster.clone(),
                    book.clone(),
                    reply.to_string(),
                    from,
                    from_member,
                ));
                tokio::spawn(answer(incoming));
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_that_overtakes_its_request_still_cancels_it() {
        let book = CancelBook::default();
        book.cancel("_INBOX.a");
        assert!(*book.register("_INBOX.a").borrow());
        // Remembered once only.
        book.forget("_INBOX.a");
        assert!(!*book.register("_INBOX.a").borrow());
    }

    #[test]
    fn a_cancel_reaches_the_live_request_and_forgetting_drops_it() {
        let book = CancelBook::default();
        let rx = book.register("_INBOX.b");
        assert!(!*rx.borrow());
        book.cancel("_INBOX.b");
        assert!(*rx.borrow());
        book.forget("_INBOX.b");
        assert!(book.live.lock().unwrap().is_empty());
    }
}
