//! Fan-out: one event to the local connections behind a topic (encoded once, shared by every
//! recipient), the same event to the other nodes through the router, slow consumers cut, and
//! the heuristic that decides whether a message's fan-out writes to idle sockets on the spot
//! or leaves the writes to the connections' writer tasks (a busy conversation).

use std::sync::Arc;

use tokio::sync::Mutex as AsyncMutex;
use tracing::warn;

use super::chat::Chat;
use super::observer::EngineEvent;
use super::registry::Delivery;
use crate::error::Result;
use crate::id::{ConnectionId, ConversationId, UserId};
use crate::protocol::{Event, Frame, MembershipChange};
use crate::router::{Envelope, Payload, Topic};
use crate::transport::CloseReason;

impl Chat {
    /// Cuts the slow consumers of a delivery and reports it.
    pub(super) fn close_slow(&self, delivery: Delivery, to_writers: bool) {
        self.inner.observe(EngineEvent::Delivered {
            frames: delivery.delivered,
            to_writers,
        });
        for conn in delivery.slow {
            warn!(user = %conn.user, connection = %conn.id, "slow consumer: disconnecting");
            self.inner.observe(EngineEvent::SlowConsumer {
                user: &conn.user,
                connection: conn.id,
            });
            conn.outbox.request_close(CloseReason::SlowConsumer);
            let chat = self.clone();
            let id = conn.id;
            tokio::spawn(async move { chat.disconnect(id).await });
        }
    }

    /// A new message's fan-out to this node's members, with its conversation's send order
    /// held (so recipients here get the conversation's messages in seq order): written to the
    /// sockets on the spot unless the conversation is busy (other sends wait for this one, or
    /// its direct fan-outs would take most of the time between its sends); then the
    /// connections' writer tasks take over (in parallel, batched). Releases the order.
    pub(super) fn fan_out_message(
        &self,
        order: SendOrder<'_>,
        except: Option<ConnectionId>,
        topic: &Topic,
        frame: &Arc<Frame>,
    ) {
        let stripe = order.stripe;
        let started = std::time::Instant::now();
        let may_write = !stripe.contended() && stripe.direct_affordable(started);
        let delivery = self
            .inner
            .registry
            .deliver(topic, frame, None, except, may_write);
        if may_write {
            stripe.direct_took(started.elapsed());
        }
        drop(order);
        self.close_slow(delivery, !may_write);
    }

    /// Delivers to local connections behind `topic` and publishes to the other nodes.
    pub(super) async fn broadcast(
        &self,
        topic: Topic,
        event: Event,
        except_user: Option<UserId>,
        except_conn: Option<ConnectionId>,
    ) {
        let inner = &self.inner;
        let envelope_event = inner.router.is_distributed().then(|| event.clone());
        let frame = Arc::new(Frame::new(event));
        let delivery =
            inner
                .registry
                .deliver(&topic, &frame, except_user.as_ref(), except_conn, true);
        self.close_slow(delivery, false);
        if let Some(event) = envelope_event {
            self.publish(topic, event, except_user, except_conn).await;
        }
    }

    /// Publishes an event to the other nodes subscribed to `topic`.
    pub(super) async fn publish(
        &self,
        topic: Topic,
        event: Event,
        except_user: Option<UserId>,
        except_conn: Option<ConnectionId>,
    ) {
        let inner = &self.inner;
        let envelope = Envelope {
            origin: inner.config.node_id,
            topic,
            payload: Payload::Event {
                event,
                except_user,
                except_connection: except_conn,
            },
        };
        if let Err(err) = inner.router.publish(envelope).await {
            // Live delivery is best effort; recipients on other nodes catch up by sync.
            inner.observe(EngineEvent::RouterError { error: &err });
            warn!(error = %err, "router publish failed");
        }
    }

    /// Publishes `payload` on `user`'s topic, so it reaches the other nodes where the user is
    /// online (nothing when the router is not distributed). A failure is counted and returned.
    pub(super) async fn publish_to_user(&self, user: &UserId, payload: Payload) -> Result<()> {
        let inner = &self.inner;
        if !inner.router.is_distributed() {
            return Ok(());
        }
        let envelope = Envelope {
            origin: inner.config.node_id,
            topic: Topic::User(user.clone()),
            payload,
        };
        inner
            .router
            .publish(envelope)
            .await
            .inspect_err(|error| inner.observe(EngineEvent::RouterError { error }))
    }

    /// A user joined or left: update this node's registry, tell the other nodes where the user
    /// is connected (`Payload::Membership` on their user topic), and send a `membership` event
    /// to the user's devices and, when `announce` is set, to the conversation's members.
    pub(super) async fn membership_changed(
        &self,
        conversation: ConversationId,
        user: &UserId,
        joined: bool,
        announce: bool,
        position: Option<u64>,
    ) {
        self.apply_membership(conversation, user, joined).await;
        let payload = Payload::Membership {
            conversation_id: conversation,
            user_id: user.clone(),
            joined,
        };
        if let Err(err) = self.publish_to_user(user, payload).await {
            warn!(error = %err, "router publish (membership) failed");
        }
        let event = Event::Membership {
            conversation_id: conversation,
            user_id: user.clone(),
            change: if joined {
                MembershipChange::Joined
            } else {
                MembershipChange::Left
            },
            position,
        };
        if announce {
            self.broadcast(
                Topic::Conversation(conversation),
                event.clone(),
                Some(user.clone()),
                None,
            )
            .await;
        }
        self.broadcast(Topic::User(user.clone()), event, None, None)
            .await;
    }

    pub(super) async fn apply_membership(
        &self,
        conversation: ConversationId,
        user: &UserId,
        joined: bool,
    ) {
        let inner = &self.inner;
        let _guard = self.user_lock(user).await;
        if inner.registry.membership(conversation, user, joined) == Some(true) {
            let topic = Topic::Conversation(conversation);
            let result = if joined {
                inner.router.subscribe(&topic).await
            } else {
                inner.router.unsubscribe(&topic).await
            };
            if let Err(err) = result {
                warn!(?topic, error = %err, "router (un)subscribe failed");
            }
        }
    }
}

/// Stripes of the per-conversation send order lock.
const CONVERSATION_LOCK_STRIPES: usize = 256;

/// The per-conversation send order locks (striped).
#[derive(Debug)]
pub(super) struct OrderLocks(Vec<OrderLock>);

impl Default for OrderLocks {
    fn default() -> Self {
        Self(
            (0..CONVERSATION_LOCK_STRIPES)
                .map(|_| OrderLock::default())
                .collect(),
        )
    }
}

impl OrderLocks {
    /// Waits for `conversation`'s turn: until the guard drops, no other send to it (or to a
    /// conversation on the same stripe) appends or fans out on this node.
    pub(super) async fn lock(&self, conversation: ConversationId) -> SendOrder<'_> {
        let stripe = &self.0[(conversation.get() % CONVERSATION_LOCK_STRIPES as u64) as usize];
        let guard = stripe.lock().await;
        SendOrder {
            stripe,
            _guard: guard,
        }
    }
}

/// A held turn of a conversation's send order.
#[derive(Debug)]
pub(super) struct SendOrder<'a> {
    /// The stripe (its load estimate).
    stripe: &'a OrderLock,
    /// Held until the local fan-out is done.
    _guard: tokio::sync::MutexGuard<'a, ()>,
}

/// A conversation stripe's send-order lock, which knows whether anyone waits for it and how
/// busy its fan-out keeps it.
#[derive(Debug, Default)]
struct OrderLock {
    lock: AsyncMutex<()>,
    waiting: std::sync::atomic::AtomicUsize,
    /// Only touched while `lock` is held.
    load: std::sync::Mutex<FanoutLoad>,
}

/// Direct fan-out stays on while it takes less than this share of the time between a
/// conversation stripe's sends.
const DIRECT_SHARE: f64 = 0.8;

/// Moving averages (1/8 weight to the newest) of a stripe's time between sends and of how long
/// its fan-outs take when the sending task writes to the sockets itself.
#[derive(Debug, Default)]
struct FanoutLoad {
    last_send: Option<std::time::Instant>,
    interval_ns: f64,
    direct_ns: f64,
}

impl FanoutLoad {
    fn average(avg: &mut f64, sample: f64) {
        *avg = if *avg == 0.0 {
            sample
        } else {
            *avg + (sample - *avg) / 8.0
        };
    }
}

impl OrderLock {
    async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        /// Counts a waiter until it holds the lock (or gives up: dropped futures count off too).
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        self.lock.lock().await
    }

    /// Another send waits for this stripe.
    fn contended(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    fn load(&self) -> std::sync::MutexGuard<'_, FanoutLoad> {
        self.load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a send at `now` (with the lock held); true while direct fan-outs take less than
    /// [`DIRECT_SHARE`] of the time between sends. The estimate of a direct fan-out's cost only changes when
    /// one runs, so a busy conversation stays on the writer tasks instead of flapping.
    fn direct_affordable(&self, now: std::time::Instant) -> bool {
        let mut load = self.load();
        if let Some(last) = load.last_send {
            // Gaps over a second count as a second: an idle spell should not hide for long
            // that the conversation is busy again.
            let gap = now
                .duration_since(last)
                .min(std::time::Duration::from_secs(1));
            FanoutLoad::average(&mut load.interval_ns, gap.as_nanos() as f64);
        }
        load.last_send = Some(now);
        load.interval_ns == 0.0 || load.direct_ns < DIRECT_SHARE * load.interval_ns
    }

    /// How long a direct fan-out took (with the lock held).
    fn direct_took(&self, took: std::time::Duration) {
        FanoutLoad::average(&mut self.load().direct_ns, took.as_nanos() as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::OrderLock;

    #[test]
    fn a_conversation_busy_with_direct_fan_out_goes_to_the_writer_tasks_and_back_when_quiet() {
        let stripe = OrderLock::default();
        let t0 = Instant::now();
        // Quiet: sends 5 ms apart, fan-outs of 1 ms: written directly.
        for i in 0..20 {
            assert!(stripe.direct_affordable(t0 + Duration::from_millis(5 * i)));
            stripe.direct_took(Duration::from_millis(1));
        }
        // Busy: sends 1 ms apart now; within some sends the average says the fan-outs would
        // take (nearly) all the time, and it stays so (no flapping) while the rate holds.
        let t1 = t0 + Duration::from_millis(100);
        let decisions: Vec<bool> = (0..60)
            .map(|i| stripe.direct_affordable(t1 + Duration::from_micros(1000 * i)))
            .collect();
        assert!(decisions[..10].contains(&true), "switched without evidence");
        assert!(decisions[30..].iter().all(|d| !d), "{decisions:?}");
        // Quiet again: back to direct writes.
        let t2 = t1 + Duration::from_millis(200);
        let back = (0..20).any(|i| stripe.direct_affordable(t2 + Duration::from_millis(50 * i)));
        assert!(back);
    }
}
