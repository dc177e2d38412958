//! Criterion micro-benchmarks of the chat core: ids, codecs, the in-process send path, local
//! fan-out, the in-memory store and encode-once framing.
//!
//! Run: `cargo bench -p chat-benches --bench core` (one group: `cargo bench -p chat-benches
//! --bench core -- engine/`). Results and the machine they came from: `docs/benchmarks.md`.
//!
//! | group | what one iteration is |
//! |---|---|
//! | `ids/snowflake` | one `SnowflakeGenerator::next_raw` |
//! | `codec/*` | encode one `message` event / decode one `message` command (~100-byte text) |
//! | `engine/send_direct` | a direct-conversation send through an `InProcessClient`, up to its ack and the recipient's frame |
//! | `engine/fanout_500` | a send to a 501-member group up to the ack (500 local deliveries queued before it) |
//! | `store/append`, `store/history_page` | `MemoryStore::append`; a 50-message page of a 10,000-message conversation |
//! | `frame/encode_once_500`, `frame/encode_each_500` | JSON for 500 recipients: the shared `Frame` cache vs encoding 500 times |

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_core::id::{NodeId, SnowflakeGenerator};
use chat_core::memory::{InProcessClient, InProcessTransport, MemoryStore};
use chat_core::model::{ConversationKind, Message, MessageKind, NewConversation, NewMessage};
use chat_core::protocol::SendMessage;
use chat_core::{
    Chat, Command, ConversationId, Event, Frame, MessageStore, Outbound, Session, UserId,
};
use chat_transport::codec::Codec;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;

/// Measurement time of every benchmark (kept short: the whole file runs in a few minutes on a
/// 2-core box).
const MEASUREMENT: Duration = Duration::from_secs(3);
/// Warm-up time of every benchmark.
const WARM_UP: Duration = Duration::from_secs(1);
/// Samples per benchmark.
const SAMPLES: usize = 30;
/// Recipients of the fan-out and framing benchmarks.
const RECIPIENTS: usize = 500;
/// Messages of the conversation `store/history_page` reads from.
const HISTORY_LEN: usize = 10_000;
/// History page size.
const PAGE: usize = 50;
/// Messages appended to one conversation (store) or one engine before it is replaced outside
/// the measured time, so a long run measures a typical conversation rather than one with
/// millions of messages (and memory stays bounded).
const ROTATE_AFTER: u64 = 50_000;

/// A ~100-byte text, the typical chat message of these benchmarks.
const TEXT: &str =
    "Hey, are we still on for lunch tomorrow at noon? I can book the usual place near the office.";

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A stored message as the engine fans it out.
fn sample_message() -> Message {
    NewMessage {
        message_id: chat_core::MessageId::from_raw(7_318_349_394_477_056),
        conversation_id: ConversationId::from_raw(7_318_349_390_282_752),
        sender_id: UserId::from("alice"),
        client_msg_id: "c7b9f3e2-5d1a-4e8b-9f60-2a4d8c1e7b35".into(),
        kind: MessageKind::Text,
        content: TEXT.into(),
        media: None,
        reply_to: None,
        created_at: 1_745_000_000_000,
    }
    .into_message(1234)
}

/// A `message` command as a client sends it.
fn send_command(conversation: ConversationId, client_msg_id: String) -> Command {
    Command::Message(SendMessage {
        conversation_id: conversation,
        client_msg_id,
        content: TEXT.into(),
        kind: MessageKind::Text,
        media: None,
        reply_to: None,
    })
}

// ------------------------------------------------------------------------------------ ids

fn ids(c: &mut Criterion) {
    let mut g = c.benchmark_group("ids");
    g.measurement_time(MEASUREMENT)
        .warm_up_time(WARM_UP)
        .sample_size(SAMPLES)
        .throughput(Throughput::Elements(1));
    let generator = SnowflakeGenerator::new(NodeId::ZERO);
    g.bench_function("snowflake", |b| b.iter(|| black_box(generator.next_raw())));
    g.finish();
}

// ---------------------------------------------------------------------------------- codec

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.measurement_time(MEASUREMENT)
        .warm_up_time(WARM_UP)
        .sample_size(SAMPLES)
        .throughput(Throughput::Elements(1));
    let event = Event::Message {
        message: sample_message(),
        position: None,
    };
    let command = send_command(
        ConversationId::from_raw(7_318_349_390_282_752),
        "c7b9f3e2-5d1a-4e8b-9f60-2a4d8c1e7b35".into(),
    );
    for (name, codec) in [("json", Codec::Json), ("proto", Codec::Proto)] {
        let wire = codec.encode_command(&command);
        assert_eq!(codec.decode(&wire).expect("decodes"), command);
        assert_eq!(
            codec.decode_event(&codec.encode(&event)).expect("decodes"),
            event
        );
        g.bench_function(format!("{name}_encode"), |b| {
            b.iter(|| black_box(codec.encode(black_box(&event))));
        });
        g.bench_function(format!("{name}_decode"), |b| {
            b.iter(|| black_box(codec.decode(black_box(&wire))));
        });
    }
    g.finish();
}

// --------------------------------------------------------------------------------- engine

/// An engine with in-memory parts, no rate limit, and `outbound_queue` frames per connection.
async fn engine(outbound_queue: usize) -> Chat {
    Chat::builder()
        .configure(|c| {
            c.rate_limit = None;
            c.outbound_queue = outbound_queue;
        })
        .build()
        .await
        .expect("engine")
}

/// A direct conversation between two in-process clients.
struct Direct {
    chat: Chat,
    conversation: ConversationId,
    sender: InProcessClient,
    recipient: InProcessClient,
    /// Sends so far (for unique `client_msg_id`s).
    sent: u64,
}

impl Direct {
    async fn new() -> Self {
        let chat = engine(1024).await;
        let (alice, bob) = (UserId::from("alice"), UserId::from("bob"));
        let conversation = chat
            .create_conversation(&alice, ConversationKind::Direct, &[bob.clone()], None)
            .await
            .expect("conversation")
            .conversation
            .id;
        let transport = InProcessTransport::new(chat.clone());
        let sender = transport.connect(alice).await.expect("connect");
        let recipient = transport.connect(bob).await.expect("connect");
        let mut this = Self {
            chat,
            conversation,
            sender,
            recipient,
            sent: 0,
        };
        // Check the path once: an ack for the sender, the message for the recipient.
        this.send_one().await;
        this
    }

    /// One send, its ack, and the recipient's frame.
    async fn send_one(&mut self) {
        self.sent += 1;
        self.sender
            .send(send_command(self.conversation, format!("m{}", self.sent)))
            .await;
        let ack = self.sender.recv_frame().await.expect("ack");
        assert!(
            matches!(ack.event(), Event::MessageAck { .. }),
            "{:?}",
            ack.event()
        );
        let msg = self.recipient.recv_frame().await.expect("message");
        debug_assert!(matches!(msg.event(), Event::Message { .. }));
        black_box(msg);
    }

    async fn close(self) {
        self.chat.shutdown();
        self.sender.close().await;
        self.recipient.close().await;
    }
}

/// A group of `RECIPIENTS + 1` members, all connected here.
struct Group {
    chat: Chat,
    conversation: ConversationId,
    sender: InProcessClient,
    recipients: Vec<(Session, Outbound)>,
    sent: u64,
}

impl Group {
    async fn new() -> Self {
        // Room for many sends between drains; the bench drains after every send anyway.
        let chat = engine(4096).await;
        let owner = UserId::from("u0");
        let members: Vec<UserId> = (1..=RECIPIENTS)
            .map(|i| UserId::from(format!("u{i}")))
            .collect();
        let conversation = chat
            .create_conversation(&owner, ConversationKind::Group, &members, None)
            .await
            .expect("group")
            .conversation
            .id;
        let sender = InProcessTransport::new(chat.clone())
            .connect(owner)
            .await
            .expect("connect");
        let mut recipients = Vec::with_capacity(RECIPIENTS);
        for m in members {
            recipients.push(chat.connect(m).await.expect("connect"));
        }
        Self {
            chat,
            conversation,
            sender,
            recipients,
            sent: 0,
        }
    }

    /// One send up to its ack (fan-out to every local member is queued before the ack).
    async fn send_one(&mut self) {
        self.sent += 1;
        self.sender
            .send(send_command(self.conversation, format!("g{}", self.sent)))
            .await;
        let ack = self.sender.recv_frame().await.expect("ack");
        debug_assert!(matches!(ack.event(), Event::MessageAck { .. }));
        black_box(ack);
    }

    /// Empties every recipient's queue; returns the frames taken.
    fn drain(&mut self) -> usize {
        let mut n = 0;
        for (_, out) in &mut self.recipients {
            while out.try_recv().is_some() {
                n += 1;
            }
        }
        n
    }
}

fn engine_benches(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("engine");
    g.measurement_time(MEASUREMENT)
        .warm_up_time(WARM_UP)
        .sample_size(SAMPLES);

    g.throughput(Throughput::Elements(1));
    let mut direct = Some(rt.block_on(Direct::new()));
    g.bench_function("send_direct", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let d = direct.as_mut().expect("set");
                    let room = ROTATE_AFTER.saturating_sub(d.sent);
                    if room == 0 {
                        // A fresh engine, outside the measured time.
                        if let Some(old) = direct.take() {
                            old.close().await;
                        }
                        direct = Some(Direct::new().await);
                        continue;
                    }
                    let n = room.min(left);
                    let start = Instant::now();
                    for _ in 0..n {
                        d.send_one().await;
                    }
                    total += start.elapsed();
                    left -= n;
                }
                total
            })
        });
    });
    if let Some(d) = direct.take() {
        rt.block_on(d.close());
    }

    g.throughput(Throughput::Elements(RECIPIENTS as u64));
    let mut group = rt.block_on(Group::new());
    g.bench_function(format!("fanout_{RECIPIENTS}"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    group.send_one().await;
                    total += start.elapsed();
                    let drained = group.drain();
                    assert_eq!(drained, RECIPIENTS, "every member got the message");
                }
                total
            })
        });
    });
    let stats = group.chat.stats();
    assert_eq!(
        stats.slow_consumers, 0,
        "no session was cut as a slow consumer"
    );
    group.chat.shutdown();
    drop(group);
    g.finish();
}

// ---------------------------------------------------------------------------------- store

/// A store with one direct conversation.
async fn store_with_conversation(ids: &SnowflakeGenerator) -> (MemoryStore, ConversationId) {
    let store = MemoryStore::new();
    let conversation = store
        .create_conversation(NewConversation {
            id: ids.conversation_id(),
            kind: ConversationKind::Direct,
            name: None,
            creator: UserId::from("alice"),
            members: vec![UserId::from("bob")],
            created_at: 0,
        })
        .await
        .expect("conversation")
        .id;
    (store, conversation)
}

fn new_message(
    ids: &SnowflakeGenerator,
    conversation: ConversationId,
    sender: &UserId,
    n: u64,
) -> NewMessage {
    let message_id = ids.message_id();
    NewMessage {
        message_id,
        conversation_id: conversation,
        sender_id: sender.clone(),
        client_msg_id: format!("m{n}"),
        kind: MessageKind::Text,
        content: TEXT.into(),
        media: None,
        reply_to: None,
        created_at: message_id.timestamp_ms(),
    }
}

fn store(c: &mut Criterion) {
    let rt = runtime();
    let ids = SnowflakeGenerator::new(NodeId::ZERO);
    let alice = UserId::from("alice");
    let mut g = c.benchmark_group("store");
    g.measurement_time(MEASUREMENT)
        .warm_up_time(WARM_UP)
        .sample_size(SAMPLES);

    g.throughput(Throughput::Elements(1));
    let mut current = rt.block_on(store_with_conversation(&ids));
    let mut appended = 0_u64;
    g.bench_function("append", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    if appended >= ROTATE_AFTER {
                        current = store_with_conversation(&ids).await;
                        appended = 0;
                    }
                    let n = (ROTATE_AFTER - appended).min(left);
                    let (store, conversation) = &current;
                    // Built outside the measured time: a transport hands the store a
                    // ready `NewMessage`.
                    let batch: Vec<NewMessage> = (0..n)
                        .map(|i| new_message(&ids, *conversation, &alice, appended + i))
                        .collect();
                    let start = Instant::now();
                    for m in batch {
                        black_box(store.append(m).await.expect("append"));
                    }
                    total += start.elapsed();
                    appended += n;
                    left -= n;
                }
                total
            })
        });
    });

    g.throughput(Throughput::Elements(PAGE as u64));
    let (history_store, history_conv) = rt.block_on(async {
        let (store, conversation) = store_with_conversation(&ids).await;
        for n in 0..HISTORY_LEN as u64 {
            store
                .append(new_message(&ids, conversation, &alice, n))
                .await
                .expect("append");
        }
        (store, conversation)
    });
    g.bench_function("history_page", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let page = history_store
                        .history(history_conv, None, PAGE)
                        .await
                        .expect("history");
                    debug_assert_eq!(page.len(), PAGE);
                    black_box(page);
                }
                start.elapsed()
            })
        });
    });
    g.finish();
}

// ---------------------------------------------------------------------------------- frame

fn frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.measurement_time(MEASUREMENT)
        .warm_up_time(WARM_UP)
        .sample_size(SAMPLES)
        .throughput(Throughput::Elements(RECIPIENTS as u64));
    let event = Event::Message {
        message: sample_message(),
        position: None,
    };
    g.bench_function(format!("encode_once_{RECIPIENTS}"), |b| {
        b.iter_batched(
            || Arc::new(Frame::new(event.clone())),
            |frame| {
                // What each of the 500 connection writers does with the shared frame.
                for _ in 0..RECIPIENTS {
                    black_box(Codec::Json.encode_frame(&frame));
                }
                frame
            },
            BatchSize::SmallInput,
        );
    });
    g.bench_function(format!("encode_each_{RECIPIENTS}"), |b| {
        b.iter(|| {
            for _ in 0..RECIPIENTS {
                black_box(Codec::Json.encode(black_box(&event)));
            }
        });
    });
    g.finish();
}

criterion_group!(benches, ids, codec, engine_benches, store, frame);
criterion_main!(benches);
