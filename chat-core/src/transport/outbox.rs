//! A connection's outbound queue: the engine's side ([`Outbox`], crate-private) and the
//! transport's side ([`Outbound`]). This module is the only code that touches the queue, so
//! its bounds are properties of these two types:
//!
//! * at most `outbound_queue` fan-out frames are queued ([`Outbox::push_live`] says `false`
//!   for one more: the connection reads too slowly and is cut as a slow consumer);
//! * at most `reply_queue` replies are queued ([`Outbox::reply`] waits for room, slowing only
//!   the connection's own command loop);
//! * at most one wake-up is queued, however often [`OutboundWaker::wake`] is called, plus the
//!   one wake-up of the first close request.
//!
//! Replies and fan-out share the one queue, so they reach the client in the order the engine
//! queued them (one wait for the writer, one channel's memory per connection). The channel
//! itself is unbounded; the counts above bound it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::CloseReason;
use super::direct::DirectPath;
use crate::protocol::Frame;

/// One item of a connection's outbound queue.
#[derive(Debug)]
enum Out {
    /// Fan-out from other connections (counted against `outbound_queue`).
    Live(Arc<Frame>),
    /// A reply to the connection's own command (holds one of `reply_queue` slots).
    Reply(Arc<Frame>),
    /// Wakes a waiting writer: a close request, or work a direct path left for it.
    Wake,
}

/// What the two sides of a queue share (one allocation: every delivery touches it).
#[derive(Debug)]
struct Shared {
    /// Fan-out frames in the queue.
    live: AtomicUsize,
    /// Most fan-out frames in the queue.
    live_max: usize,
    /// Free reply slots.
    reply_permits: Semaphore,
    /// Why the connection is to be closed (first reason wins).
    reason: OnceLock<CloseReason>,
    /// A wake-up from an [`OutboundWaker`] is queued and not yet taken (at most one is).
    woken: AtomicBool,
    /// Cancelled with the first close reason.
    token: CancellationToken,
}

impl Shared {
    fn took_live(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }

    fn reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }
}

/// The engine's side of a connection's queue.
#[derive(Debug)]
pub(crate) struct Outbox {
    /// The queue (bounded by `shared`, not by the channel).
    queue: mpsc::UnboundedSender<Out>,
    /// Bounds and the close request.
    shared: Arc<Shared>,
    /// The transport's synchronous write path, if it registered one.
    direct: OnceLock<Arc<dyn DirectPath>>,
}

impl Outbox {
    /// A queue holding at most `outbound_queue` fan-out frames and `reply_queue` replies.
    pub(crate) fn new(outbound_queue: usize, reply_queue: usize) -> (Self, Outbound) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            live: AtomicUsize::new(0),
            live_max: outbound_queue.max(1),
            reply_permits: Semaphore::new(reply_queue.max(1)),
            reason: OnceLock::new(),
            woken: AtomicBool::new(false),
            token: CancellationToken::new(),
        });
        let outbound = Outbound {
            queue: rx,
            shared: shared.clone(),
        };
        let outbox = Self {
            queue: tx,
            shared,
            direct: OnceLock::new(),
        };
        (outbox, outbound)
    }

    /// Delivers a fan-out frame (written directly when `may_write` and the transport can, else
    /// queued); false when the connection already has its most fan-out frames queued (slow
    /// consumer).
    pub(crate) fn push_live(&self, frame: &Arc<Frame>, may_write: bool) -> bool {
        match self.direct.get() {
            Some(direct) => direct.write_or_queue(frame, &mut |f| self.queue_live(f), may_write),
            None => self.queue_live(frame),
        }
    }

    /// Queues a fan-out frame; false when the connection already has its most fan-out frames
    /// queued (slow consumer).
    fn queue_live(&self, frame: &Arc<Frame>) -> bool {
        let shared = &self.shared;
        if shared.live.fetch_add(1, Ordering::AcqRel) >= shared.live_max {
            shared.took_live();
            // Already being closed: not a new slow consumer.
            return shared.token.is_cancelled();
        }
        if self.queue.send(Out::Live(frame.clone())).is_err() {
            // The receiver is gone: the transport is tearing the connection down.
            shared.took_live();
        }
        true
    }

    /// Queues a reply, waiting for a free reply slot (only this connection's own command loop
    /// waits). False when the outbound side is gone.
    pub(crate) async fn reply(&self, frame: Arc<Frame>) -> bool {
        let Ok(permit) = self.shared.reply_permits.acquire().await else {
            return false;
        };
        let Some(direct) = self.direct.get() else {
            // The reader gives the slot back when it takes the frame.
            permit.forget();
            return self.queue.send(Out::Reply(frame)).is_ok();
        };
        let mut permit = Some(permit);
        // Written directly: the slot is free again as soon as `permit` drops.
        direct.write_or_queue(
            &frame,
            &mut |f| {
                if let Some(p) = permit.take() {
                    p.forget();
                }
                self.queue.send(Out::Reply(f.clone())).is_ok()
            },
            true,
        )
    }

    /// Registers the transport's direct write path (once).
    pub(crate) fn set_direct(&self, direct: Arc<dyn DirectPath>) -> bool {
        self.direct.set(direct).is_ok()
    }

    /// A handle that wakes the connection's writer (see [`OutboundWaker`]).
    pub(crate) fn waker(&self) -> OutboundWaker {
        OutboundWaker {
            queue: self.queue.downgrade(),
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// Asks the transport to close the connection (the first reason wins).
    pub(crate) fn request_close(&self, reason: CloseReason) {
        let first = self.shared.reason.set(reason).is_ok();
        self.shared.token.cancel();
        if first {
            // Wake a writer waiting for frames (once: the first reason wins).
            let _ = self.queue.send(Out::Wake);
        }
    }

    /// Why the connection is to be closed, once it is.
    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        self.shared.reason()
    }

    /// Resolves once a close is requested (stays ready).
    pub(crate) fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.shared.token.cancelled()
    }
}

/// Frames for one connection: replies to its own commands and fan-out from others, in the
/// order the engine queued them (one queue). A transport drains it with
/// [`Outbound::recv_batch`] (or [`Outbound::recv_many`]) and writes each batch with one flush.
#[derive(Debug)]
pub struct Outbound {
    /// The queue's receiving end.
    queue: mpsc::UnboundedReceiver<Out>,
    /// The queue bounds (given back as frames are taken) and the close request.
    shared: Arc<Shared>,
}

/// What [`Outbound::recv_batch`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batch {
    /// This many frames were appended to the buffer (0: the writer was woken with nothing to
    /// take, see [`OutboundWaker`]).
    Frames(usize),
    /// The connection is to be closed, for this reason (also
    /// [`Session::close_reason`](super::Session::close_reason)).
    CloseRequested(CloseReason),
    /// The session is gone and every frame was drained.
    Ended,
}

impl Outbound {
    /// The frame of a queue item, giving back its share of the bounds; `None` for a wake-up.
    fn frame(&self, item: Out) -> Option<Arc<Frame>> {
        match item {
            Out::Live(f) => {
                self.shared.took_live();
                Some(f)
            }
            Out::Reply(f) => {
                self.shared.reply_permits.add_permits(1);
                Some(f)
            }
            Out::Wake => {
                self.shared.woken.store(false, Ordering::Release);
                None
            }
        }
    }

    /// For writers: waits for frames or a close request. A close request is reported before
    /// any further frame is taken (frames already queued stay queued, e.g. for a flush on
    /// [`CloseReason::Shutdown`]); otherwise takes every ready frame up to `limit` into `buf`.
    /// This is the writer's only wait: no separate close future is polled per batch.
    pub async fn recv_batch(&mut self, buf: &mut Vec<Arc<Frame>>, limit: usize) -> Batch {
        if let Some(reason) = self.shared.reason() {
            return Batch::CloseRequested(reason);
        }
        let Some(item) = self.queue.recv().await else {
            return Batch::Ended;
        };
        match self.frame(item) {
            Some(first) => buf.push(first),
            // A wake-up: a close request, or work the transport left for its writer.
            None => {
                return match self.shared.reason() {
                    Some(reason) => Batch::CloseRequested(reason),
                    None => Batch::Frames(0),
                };
            }
        }
        Batch::Frames(1 + self.take_ready(buf, limit.max(1) - 1))
    }

    /// Takes up to `limit` ready frames into `buf`; returns how many.
    fn take_ready(&mut self, buf: &mut Vec<Arc<Frame>>, limit: usize) -> usize {
        let mut n = 0;
        while n < limit {
            match self.try_recv() {
                Some(f) => {
                    buf.push(f);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// A token cancelled once the connection is asked to close (a child of the connection's
    /// own: cancelling it affects nothing else). For writers that wait on it while they hold
    /// `&mut self` elsewhere.
    pub fn close_signal(&self) -> CancellationToken {
        self.shared.token.child_token()
    }

    /// Resolves once the connection is asked to close (for a writer blocked on a full socket).
    pub async fn close_requested(&self) {
        self.shared.token.cancelled().await;
    }

    /// True when no frame (and no wake-up) is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Why the connection is to be closed, once it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.reason()
    }

    /// The next frame; `None` once the session is gone and every frame was drained.
    pub async fn recv(&mut self) -> Option<Arc<Frame>> {
        loop {
            let item = self.queue.recv().await?;
            if let Some(f) = self.frame(item) {
                return Some(f);
            }
        }
    }

    /// A frame if one is ready.
    pub fn try_recv(&mut self) -> Option<Arc<Frame>> {
        loop {
            let item = self.queue.try_recv().ok()?;
            if let Some(f) = self.frame(item) {
                return Some(f);
            }
        }
    }

    /// Waits for at least one frame, then takes every ready frame up to `limit` into `buf`.
    /// Returns how many were added (0 once the session is gone).
    pub async fn recv_many(&mut self, buf: &mut Vec<Arc<Frame>>, limit: usize) -> usize {
        let Some(first) = self.recv().await else {
            return 0;
        };
        buf.push(first);
        1 + self.take_ready(buf, limit.max(1) - 1)
    }
}

/// Wakes a connection's writer: [`Outbound::recv_batch`] returns (with `Batch::Frames(0)` when
/// nothing else is there). For a direct write path that left work for its writer (a partly
/// written frame). It does not keep the connection's queue open, and however often it is
/// called, at most one wake-up waits in the queue.
#[derive(Clone, Debug)]
pub struct OutboundWaker {
    /// The queue, without keeping it open.
    queue: mpsc::WeakUnboundedSender<Out>,
    /// The flag that keeps it to one queued wake-up.
    shared: std::sync::Weak<Shared>,
}

impl OutboundWaker {
    /// Wakes the writer; false when the connection is gone.
    pub fn wake(&self) -> bool {
        let (Some(queue), Some(shared)) = (self.queue.upgrade(), self.shared.upgrade()) else {
            return false;
        };
        if shared.woken.swap(true, Ordering::AcqRel) {
            // One is queued already: the writer will look.
            return true;
        }
        queue.send(Out::Wake).is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::protocol::Event;

    fn frame(n: u64) -> Arc<Frame> {
        Arc::new(Frame::new(Event::Typing {
            conversation_id: crate::ConversationId::from_raw(n),
            user_id: crate::UserId::from("u"),
        }))
    }

    #[tokio::test]
    async fn fan_out_beyond_its_share_is_refused_and_taking_a_frame_gives_the_slot_back() {
        let (outbox, mut outbound) = Outbox::new(2, 1);
        assert!(outbox.push_live(&frame(1), true));
        assert!(outbox.push_live(&frame(2), true));
        assert!(
            !outbox.push_live(&frame(3), true),
            "third frame over a share of 2"
        );
        // A reply does not use the fan-out share.
        assert!(outbox.reply(frame(9)).await);
        assert!(outbound.try_recv().is_some());
        assert!(outbox.push_live(&frame(4), true), "slot given back");
        // Once closing, a full queue is not reported as a new slow consumer.
        assert!(!outbox.push_live(&frame(5), true));
        outbox.request_close(CloseReason::SlowConsumer);
        assert!(outbox.push_live(&frame(6), true));
    }

    #[tokio::test]
    async fn wake_ups_are_at_most_one_and_a_close_request_is_seen_first() {
        let (outbox, mut outbound) = Outbox::new(8, 8);
        let waker = outbox.waker();
        for _ in 0..100 {
            assert!(waker.wake());
        }
        let mut buf = Vec::new();
        assert_eq!(outbound.recv_batch(&mut buf, 8).await, Batch::Frames(0));
        assert!(outbound.is_empty(), "more than one wake-up queued");
        assert!(outbox.push_live(&frame(1), true));
        outbox.request_close(CloseReason::Shutdown);
        assert_eq!(
            outbound.recv_batch(&mut buf, 8).await,
            Batch::CloseRequested(CloseReason::Shutdown)
        );
        // The frame queued before the close stays for a flush.
        assert!(outbound.try_recv().is_some());
        drop(outbox);
        assert!(!waker.wake(), "a waker does not keep the queue open");
    }
}
