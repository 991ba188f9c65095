//! A body wrapper that stops at a byte limit and remembers that it did.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// Passes frames through until more than `limit_bytes` have gone by, then
/// fails with `over_limit()` and raises `hit`.
pub struct Capped<B, E> {
    inner: B,
    left_bytes: u64,
    hit: Arc<AtomicBool>,
    over_limit: fn() -> E,
}

impl<B, E> Capped<B, E> {
    pub fn new(inner: B, limit_bytes: u64, hit: Arc<AtomicBool>, over_limit: fn() -> E) -> Self {
        Capped {
            inner,
            left_bytes: limit_bytes,
            hit,
            over_limit,
        }
    }
}

impl<B, E> Body for Capped<B, E>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<E>,
{
    type Data = Bytes;
    type Error = E;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, E>>> {
        if self.hit.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err((self.over_limit)())));
        }
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > self.left_bytes {
                        self.hit.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err((self.over_limit)())));
                    }
                    self.left_bytes -= n;
                }
                Some(Ok(frame))
            }
            Some(Err(e)) => Some(Err(e.into())),
            None => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
