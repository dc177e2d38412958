//! The direct write path: frames written by the task that produced them, when the socket has
//! room, instead of waking a writer task per frame.
//!
//! A transport implements [`DirectSocket`] (a non-blocking write and a frame's wire bytes)
//! and registers it with [`Session::set_direct`](super::Session::set_direct), which wraps it
//! in a [`DirectWriter`]. From then on the engine offers every frame for the connection to the
//! writer first. **The ordering rule lives here and only here:** a frame is written on the
//! spot only while nothing is pending; once anything is (a queued frame, the rest of a partly
//! written frame, a control frame), every later frame is queued until the transport's writer
//! task has drained both and [`DirectWriter::try_idle`] found the queue empty *under the same
//! lock* the direct path takes. So a frame never overtakes an earlier one, whatever the
//! transport does: it can only write through this type.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use super::outbox::{Outbound, OutboundWaker};
use crate::protocol::Frame;

/// Most bytes of control frames (pongs, close replies) the read side may leave waiting behind
/// queued data; beyond it [`DirectWriter::write_control`] fails (a client flooding pings while
/// not reading).
pub const MAX_PENDING_CONTROL: usize = 64 * 1024;

/// A socket the engine may write to synchronously.
pub trait DirectSocket: Send + Sync + Debug + 'static {
    /// The bytes that carry `frame` on this connection (its codec's encoding, framed), or
    /// `None` when the frame cannot be sent in this codec (it is dropped, as a writer task
    /// would). Borrowed from the frame's per-codec cache ([`Frame::prepared_ref`]): a fan-out
    /// writes the same bytes to every recipient without touching their reference count.
    fn wire<'f>(&self, frame: &'f Frame) -> Option<&'f Bytes>;

    /// One non-blocking write; `WouldBlock` when the socket is full.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;

    /// Called after `frame` was written whole by the direct path (metrics).
    fn written(&self, frame: &Frame) {
        let _ = frame;
    }
}

/// The engine's view of a registered direct path (object-safe, crate-private: transports reach
/// it only through [`DirectWriter`], which keeps the ordering rule).
pub(crate) trait DirectPath: Send + Sync + Debug + 'static {
    /// Writes `frame` now, or calls `queue(frame)` (with the lock held) and returns its result.
    /// `true`: taken (written, owned by the transport to finish, queued, or dropped because the
    /// connection is closing); `false`: `queue` refused it (slow consumer). `may_write: false`
    /// asks for the queue even when the socket is idle (the engine is under load and the
    /// writer tasks spread the writes over the runtime's threads).
    fn write_or_queue(
        &self,
        frame: &Arc<Frame>,
        queue: &mut dyn FnMut(&Arc<Frame>) -> bool,
        may_write: bool,
    ) -> bool;
}

/// The direct path of one connection: the socket and who owns it at the moment.
#[derive(Debug)]
pub struct DirectWriter<S> {
    /// The transport's socket.
    sock: S,
    /// Who owns the socket, what is pending.
    state: Mutex<WriteState>,
    /// Wakes the writer task when the direct path leaves it work.
    waker: OutboundWaker,
}

#[derive(Debug)]
struct WriteState {
    /// The writer task owns the socket: something is queued, pending or being written, so
    /// every frame goes to the queue.
    busy: bool,
    /// Bytes to write before anything queued: the rest of a partly written frame, then control
    /// frames from the read side, in order.
    pending: VecDeque<Bytes>,
    /// Their total length (bounded by [`MAX_PENDING_CONTROL`] for control frames).
    pending_bytes: usize,
    /// The connection is closing: frames are dropped, control writes fail.
    closed: bool,
}

impl<S: DirectSocket> DirectWriter<S> {
    /// A writer that starts busy: whatever the engine queued before it was registered is
    /// written first, by the writer task.
    pub(crate) fn new(sock: S, waker: OutboundWaker) -> Self {
        Self {
            sock,
            state: Mutex::new(WriteState {
                busy: true,
                pending: VecDeque::new(),
                pending_bytes: 0,
                closed: false,
            }),
            waker,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriteState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The socket (for the writer task's own, awaiting writes while it owns the socket).
    pub fn socket(&self) -> &S {
        &self.sock
    }

    /// For the writer: the next pending chunk (the rest of a partly written frame, control
    /// frames), which goes out before anything queued.
    pub fn take_pending(&self) -> Option<Bytes> {
        let mut st = self.lock();
        let chunk = st.pending.pop_front()?;
        st.pending_bytes -= chunk.len();
        Some(chunk)
    }

    /// For the writer: gives the socket back to the direct path if nothing is pending and the
    /// queue is empty (both checked under the lock the direct path takes). True when given
    /// back: the writer then waits for the next batch or wake-up.
    pub fn try_idle(&self, outbound: &Outbound) -> bool {
        let mut st = self.lock();
        if st.pending.is_empty() && !st.closed && outbound.is_empty() {
            st.busy = false;
            true
        } else {
            false
        }
    }

    /// For the writer: takes the socket (before writing something of its own, or when woken
    /// with frames to write).
    pub fn take(&self) {
        self.lock().busy = true;
    }

    /// For the writer: the connection is closing; the direct path is shut for good (later
    /// frames are dropped). Returns what is pending (the rest of a partly written frame must
    /// go out before a close frame).
    pub fn close(&self) -> Vec<Bytes> {
        let mut st = self.lock();
        st.closed = true;
        st.busy = true;
        st.pending_bytes = 0;
        st.pending.drain(..).collect()
    }

    /// Adds `bytes` to write after what is pending; wakes the writer if it was idle.
    fn defer(&self, st: &mut WriteState, bytes: Bytes) {
        st.pending_bytes += bytes.len();
        st.pending.push_back(bytes);
        if !st.busy {
            st.busy = true;
            self.waker.wake();
        }
    }

    /// A control frame from the read side (e.g. a WebSocket library's pong or close reply):
    /// written now when the socket is idle, else kept in order behind what is pending, at
    /// most [`MAX_PENDING_CONTROL`] bytes of it.
    pub fn write_control(&self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.lock();
        if st.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if st.busy {
            if st.pending_bytes + buf.len() > MAX_PENDING_CONTROL {
                return Err(io::Error::other("too many control frames waiting"));
            }
            self.defer(&mut st, Bytes::copy_from_slice(buf));
            return Ok(buf.len());
        }
        match self.sock.try_write(buf) {
            Ok(n) if n == buf.len() => {}
            Ok(n) => self.defer(&mut st, Bytes::copy_from_slice(&buf[n..])),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.defer(&mut st, Bytes::copy_from_slice(buf));
            }
            Err(e) => return Err(e),
        }
        Ok(buf.len())
    }
}

impl<S: DirectSocket> DirectPath for DirectWriter<S> {
    fn write_or_queue(
        &self,
        frame: &Arc<Frame>,
        queue: &mut dyn FnMut(&Arc<Frame>) -> bool,
        may_write: bool,
    ) -> bool {
        let mut st = self.lock();
        if st.closed {
            return true;
        }
        if st.busy {
            return queue(frame);
        }
        if !may_write {
            // The queue's push wakes the writer, which takes it from here.
            st.busy = true;
            return queue(frame);
        }
        let Some(wire) = self.sock.wire(frame) else {
            // Not encodable in this codec: dropped, as on the queued path.
            return true;
        };
        match self.sock.try_write(wire) {
            Ok(n) if n == wire.len() => {}
            // The rest goes first, by the writer task; the frame counts as written.
            Ok(n) => self.defer(&mut st, wire.slice(n..)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                st.busy = true;
                return queue(frame);
            }
            Err(_) => {
                // The socket failed; the read side sees it too and ends the connection.
                st.closed = true;
                return true;
            }
        }
        drop(st);
        self.sock.written(frame);
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::protocol::Event;
    use crate::transport::outbox::Outbox;

    /// An in-memory socket with room for `room` bytes (then `WouldBlock`).
    #[derive(Debug)]
    struct Room {
        room: Mutex<usize>,
        out: Mutex<Vec<u8>>,
    }

    impl Room {
        fn new(room: usize) -> Self {
            Self {
                room: Mutex::new(room),
                out: Mutex::new(Vec::new()),
            }
        }
    }

    impl DirectSocket for Room {
        fn wire<'f>(&self, frame: &'f Frame) -> Option<&'f Bytes> {
            frame
                .prepared_ref(0, |event| match event {
                    Event::Typing {
                        conversation_id, ..
                    } => Some(Bytes::from(format!("[{}]", conversation_id.get()))),
                    _ => None,
                })
                .and_then(Option::as_ref)
        }
        fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
            let mut room = self.room.lock().unwrap();
            if *room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(*room);
            *room -= n;
            self.out.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    fn frame(n: u64) -> Arc<Frame> {
        Arc::new(Frame::new(Event::Typing {
            conversation_id: crate::ConversationId::from_raw(n),
            user_id: crate::UserId::from("u"),
        }))
    }

    fn ids(frames: &[Arc<Frame>]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| match f.event() {
                Event::Typing {
                    conversation_id, ..
                } => conversation_id.get(),
                _ => 0,
            })
            .collect()
    }

    #[tokio::test]
    async fn once_anything_is_queued_every_later_frame_is_queued_until_the_writer_hands_back() {
        let (outbox, mut outbound) = Outbox::new(64, 8);
        let w = DirectWriter::new(Room::new(1024), outbox.waker());
        let queued = Mutex::new(Vec::new());
        let mut queue = |f: &Arc<Frame>| {
            queued.lock().unwrap().push(f.clone());
            true
        };
        // Busy from the start: whatever the engine queued before registration goes first.
        assert!(w.write_or_queue(&frame(1), &mut queue, true));
        // The writer cannot hand back while the queue is not empty.
        let (probe, mut probe_out) = Outbox::new(8, 8);
        assert!(probe.push_live(&frame(0), true));
        assert!(!w.try_idle(&probe_out));
        assert!(probe_out.try_recv().is_some());
        // The queue drained: the socket is given back.
        assert!(w.try_idle(&outbound));
        // Idle and allowed: written directly, not queued.
        assert!(w.write_or_queue(&frame(2), &mut queue, true));
        // The engine asks for the queue (under load): queued, and the connection turns busy,
        assert!(w.write_or_queue(&frame(3), &mut queue, false));
        // so a later frame that may be written directly still queues behind it.
        assert!(w.write_or_queue(&frame(4), &mut queue, true));
        assert_eq!(ids(&queued.lock().unwrap()), vec![1, 3, 4]);
        assert_eq!(&*w.socket().out.lock().unwrap(), b"[2]");
        // Closed: frames are dropped, not queued, and control writes fail.
        let _ = w.close();
        assert!(w.write_or_queue(&frame(5), &mut queue, true));
        assert_eq!(queued.lock().unwrap().len(), 3);
        assert!(w.write_control(b"x").is_err());
        assert!(outbound.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_partly_written_frame_makes_the_path_busy_and_its_rest_goes_first() {
        let (outbox, mut outbound) = Outbox::new(64, 8);
        let w = DirectWriter::new(Room::new(2), outbox.waker());
        assert!(w.try_idle(&outbound));
        let queued = Mutex::new(Vec::new());
        let mut queue = |f: &Arc<Frame>| {
            queued.lock().unwrap().push(f.clone());
            true
        };
        // "[7]" is 3 bytes; 2 fit: the rest is pending, the writer is woken.
        assert!(w.write_or_queue(&frame(7), &mut queue, true));
        assert!(w.write_or_queue(&frame(8), &mut queue, true));
        assert_eq!(
            ids(&queued.lock().unwrap()),
            vec![8],
            "a frame overtook the rest of another"
        );
        assert_eq!(w.take_pending().as_deref(), Some(&b"]"[..]));
        let mut buf = Vec::new();
        assert_eq!(outbound.recv_batch(&mut buf, 8).await, Batch::Frames(0));
    }

    #[tokio::test]
    async fn control_frames_wait_behind_pending_bytes_and_are_bounded() {
        let (outbox, outbound) = Outbox::new(64, 8);
        let w = DirectWriter::new(Room::new(1024), outbox.waker());
        assert!(w.try_idle(&outbound));
        // Busy (something queued): a pong is kept, in order, not written.
        w.take();
        assert_eq!(w.write_control(b"pong").unwrap(), 4);
        assert_eq!(w.take_pending().as_deref(), Some(&b"pong"[..]));
        assert_eq!(w.take_pending(), None);
        // A client flooding pings while not reading cannot grow the backlog without bound.
        let big = vec![0u8; 1024];
        let failed = (0..(MAX_PENDING_CONTROL / 1024 + 2)).any(|_| w.write_control(&big).is_err());
        assert!(failed, "control backlog unbounded");
    }

    use crate::transport::outbox::Batch;
}
