// End-to-end test of the reference server's chat page (examples/static/index.html) in a real
// browser: two users, alice and bob, in two browser contexts side by side.
//
//   CHAT_SERVER_BIN=../../target/debug/chat-server npm test
//
// Starts chat-server itself on a free loopback port (dev mode, CHAT_OFFLINE_DEBOUNCE_MS=1000),
// drives Debian's Chromium (/usr/bin/chromium, or CHROMIUM_PATH) through playwright-core, and
// always stops the server at the end. Screenshots land in ./screenshots/.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { createHmac } from 'node:crypto';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SERVER_BIN = path.resolve(HERE, process.env.CHAT_SERVER_BIN || '../../target/debug/chat-server');
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SHOTS = path.join(HERE, 'screenshots');
const WAIT = 15_000; // generous: every wait polls and returns as soon as the condition holds
const VIEWPORT = { width: 1000, height: 640 };

let server = null;      // { proc, url, log }
let browser = null;
const pages = {};       // name -> page
const frames = {};      // name -> { sent: [frame], received: [frame] } over every socket of the page
const pageErrors = [];  // uncaught exceptions in the pages
let failed = false;

// ------------------------------------------------------------------ server

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function startServer(extraEnv = {}) {
  if (!existsSync(SERVER_BIN)) {
    throw new Error(`chat-server binary not found at ${SERVER_BIN} (build it: cargo build --bin chat-server, or set CHAT_SERVER_BIN)`);
  }
  // A freshly probed port can be taken by someone else before the server binds it: retry.
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    const env = { ...process.env, CHAT_BIND: `127.0.0.1:${port}`, CHAT_OFFLINE_DEBOUNCE_MS: '1000', CHAT_MAX_MESSAGE_BYTES: '2048', CHAT_RATE_BURST: '500' };
    delete env.CHAT_JWT_SECRET; // dev mode: ?user=<id> (unless extraEnv sets a secret)
    Object.assign(env, extraEnv);
    delete env.CHAT_REDIS_URL;
    delete env.CHAT_SCYLLA_URI;
    env.RUST_LOG = env.RUST_LOG || 'info';
    const proc = spawn(SERVER_BIN, [], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    const log = [];
    const keep = (chunk) => { log.push(chunk.toString()); if (log.length > 2000) log.shift(); };
    proc.stdout.on('data', keep);
    proc.stderr.on('data', keep);
    let exited = null;
    proc.on('exit', (code, signal) => { exited = { code, signal }; });
    const url = `http://127.0.0.1:${port}`;
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline && !exited) {
      try {
        const r = await fetch(url + '/healthz');
        if (r.ok) return { proc, url, log };
      } catch { /* not listening yet */ }
      await new Promise((r) => setTimeout(r, 100));
    }
    if (!exited) proc.kill('SIGKILL');
    const text = log.join('');
    if (exited && /cannot listen|address in use/i.test(text) && attempt < 3) continue;
    throw new Error(`chat-server did not become healthy on ${url} (${exited ? `exited: ${JSON.stringify(exited)}` : 'timeout'})\n${text}`);
  }
}

async function stopServer(which = server) {
  if (!which) return;
  const { proc } = which;
  if (proc.exitCode === null && proc.signalCode === null) {
    const done = new Promise((r) => proc.once('exit', r));
    proc.kill('SIGTERM');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
    await done;
    clearTimeout(timer);
  }
  if (which === server) server = null;
}
// Last resort if the runner is torn down without the after() hook.
process.on('exit', () => { if (server && server.proc.exitCode === null) server.proc.kill('SIGKILL'); });

// ------------------------------------------------------------------ helpers

/** A test step that is skipped once an earlier step failed (they build on each other). */
function step(name, fn) {
  test(name, async (t) => {
    if (failed) { t.skip('an earlier step failed'); return; }
    try {
      await fn(t);
    } catch (e) {
      failed = true;
      throw e;
    }
  });
}

/** An HS256 JWT for `claims`, signed with `secret` (what the host's identity provider issues). */
function hs256(claims, secret) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

const tid = (id, extra = '') => `[data-testid="${id}"]${extra}`;

async function openUser(name) {
  const context = await browser.newContext({ viewport: VIEWPORT });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('pageerror', (e) => pageErrors.push(`${name}: ${e.message}`));
  const log = frames[name] = { sent: [], received: [] };
  const parse = (payload) => { try { return JSON.parse(payload); } catch { return null; } };
  page.on('websocket', (ws) => {
    ws.on('framesent', (f) => { const v = parse(f.payload); if (v) log.sent.push(v); });
    ws.on('framereceived', (f) => { const v = parse(f.payload); if (v) log.received.push(v); });
  });
  page.on('console', (m) => {
    // Failed connection attempts while the test has the browser offline are expected.
    if (m.type() === 'error' && !/WebSocket connection|Failed to load resource|net::ERR_/.test(m.text())) {
      pageErrors.push(`${name} console: ${m.text()}`);
    }
  });
  await page.goto(server.url + '/');
  await page.locator(tid('user-name-input')).fill(name);
  await page.locator(tid('connect-button')).click();
  await page.locator(tid('connection-status', '[data-status="online"]')).waitFor();
  await page.locator(tid('me-name')).filter({ hasText: name }).waitFor();
  pages[name] = page;
  return page;
}

/** The conversation list item whose title is `title`. */
const convItem = (page, title) =>
  page.locator(tid('conversation-item')).filter({ has: page.locator(tid('conversation-name'), { hasText: new RegExp(`^${title}$`) }) });

async function shoot(page, name) {
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`) });
}

// ------------------------------------------------------------------ lifecycle

before(async () => {
  server = await startServer();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  try {
    if (failed) {
      for (const [name, page] of Object.entries(pages)) {
        if (!page.isClosed()) await shoot(page, `failure-${name}`).catch(() => {});
      }
      if (server) console.error('--- chat-server log (tail) ---\n' + server.log.join('').split('\n').slice(-60).join('\n'));
    }
    if (browser) await browser.close().catch(() => {});
  } finally {
    await stopServer();
  }
});

// ------------------------------------------------------------------ the story

step('the page is served at / and both users connect', async () => {
  const resp = await fetch(server.url + '/');
  assert.equal(resp.status, 200);
  assert.match(resp.headers.get('content-type') || '', /text\/html/);
  await openUser('alice');
  await openUser('bob');
});

step('alice creates a direct conversation with bob', async () => {
  const alice = pages.alice;
  await alice.locator(tid('new-kind-select')).selectOption('direct');
  await alice.locator(tid('new-members-input')).fill('bob');
  await alice.locator(tid('create-conversation-button')).click();
  await convItem(alice, 'bob').waitFor();
  await alice.locator(tid('conversation-title')).filter({ hasText: /^bob$/ }).waitFor();
});

step("bob's presence dot is online on alice's page", async () => {
  await pages.alice.locator(tid('conversation-header')).locator(tid('presence-dot', '[data-user="bob"][data-status="online"]')).waitFor();
});

step('alice sends a message with Enter; it is acked with seq 1', async () => {
  const alice = pages.alice;
  const input = alice.locator(tid('composer-input'));
  await input.fill('hello bob');
  await input.press('Enter');
  await alice.locator(tid('message-item', '[data-seq="1"][data-status="sent"]')).filter({ hasText: 'hello bob' }).waitFor();
  assert.equal(await input.inputValue(), '', 'the composer is cleared after sending');
});

step("bob sees the new conversation in his list, unread, with the message's preview", async () => {
  const bob = pages.bob;
  const item = convItem(bob, 'alice');
  await item.locator(tid('conversation-preview'), { hasText: 'hello bob' }).waitFor();
  await item.locator(tid('unread-badge'), { hasText: '1' }).waitFor();
});

step('bob opens the conversation and sees the history; alice sees "Read by bob"', async () => {
  const { alice, bob } = pages;
  await convItem(bob, 'alice').click();
  await bob.locator(tid('message-item', '[data-seq="1"]')).filter({ hasText: 'hello bob' }).waitFor();
  await convItem(bob, 'alice').locator(tid('unread-badge')).waitFor({ state: 'detached' });
  const receipt = alice.locator(tid('message-item', '[data-seq="1"]')).locator(tid('read-receipt', '[data-users="bob"]'));
  await receipt.waitFor();
  assert.match(await receipt.textContent(), /Read by bob/);
});

step('bob types: alice sees "bob is typing…", and it goes away without new typing', async () => {
  const { alice, bob } = pages;
  await bob.locator(tid('composer-input')).pressSequentially('hi ali', { delay: 30 });
  const typing = alice.locator(tid('typing-indicator'));
  await typing.filter({ hasText: 'bob is typing' }).waitFor();
  // A few seconds after the last typing event the indicator hides itself.
  await typing.waitFor({ state: 'hidden', timeout: WAIT });
});

step('bob replies live; alice (conversation open) reads it and bob sees "Read by alice"', async () => {
  const { alice, bob } = pages;
  const input = bob.locator(tid('composer-input'));
  await input.pressSequentially('ce!');
  await bob.locator(tid('send-button')).click();
  await bob.locator(tid('message-item', '[data-seq="2"][data-status="sent"]')).filter({ hasText: 'hi alice!' }).waitFor();
  await alice.locator(tid('message-item', '[data-seq="2"][data-sender="bob"]')).filter({ hasText: 'hi alice!' }).waitFor();
  await bob.locator(tid('message-item', '[data-seq="2"]')).locator(tid('read-receipt', '[data-users="alice"]')).waitFor();
  // Messages are in seq order on both pages.
  for (const page of [alice, bob]) {
    const seqs = await page.locator(tid('message-item', '[data-seq]')).evaluateAll((els) => els.map((e) => Number(e.dataset.seq)));
    assert.deepEqual(seqs, [1, 2]);
  }
});

step('an error frame (message too large) shows in the banner and the message is marked failed', async () => {
  const alice = pages.alice;
  const input = alice.locator(tid('composer-input'));
  await input.fill('x'.repeat(3000)); // the server runs with CHAT_MAX_MESSAGE_BYTES=2048
  await input.press('Enter');
  await alice.locator(tid('error-banner')).filter({ hasText: 'too_large' }).waitFor();
  const failedItem = alice.locator(tid('message-item', '[data-status="failed"]'));
  await failedItem.waitFor();
  await failedItem.getByRole('button', { name: 'discard' }).click();
  await failedItem.waitFor({ state: 'detached' });
  // The socket stays open.
  await alice.locator(tid('connection-status', '[data-status="online"]')).waitFor();
});

step('after a dropped connection alice reconnects and syncs what she missed', async () => {
  const { alice, bob } = pages;
  await alice.context().setOffline(true);
  await alice.evaluate(() => window.chatDebug.dropConnection());
  await alice.locator(tid('connection-status', '[data-status="online"]')).waitFor({ state: 'detached' });
  // While alice is away bob sends two messages; she gets them only through sync.
  for (const text of ['missed one', 'missed two']) {
    await bob.locator(tid('composer-input')).fill(text);
    await bob.locator(tid('composer-input')).press('Enter');
  }
  await bob.locator(tid('message-item', '[data-seq="4"][data-status="sent"]')).waitFor();
  assert.equal(await alice.locator(tid('message-item', '[data-seq="3"]')).count(), 0, 'alice was offline');
  await alice.context().setOffline(false);
  await alice.locator(tid('connection-status', '[data-status="online"]')).waitFor({ timeout: 30_000 });
  await alice.locator(tid('message-item', '[data-seq="4"]')).filter({ hasText: 'missed two' }).waitFor();
  const seqs = await alice.locator(tid('message-item', '[data-seq]')).evaluateAll((els) => els.map((e) => Number(e.dataset.seq)));
  assert.deepEqual(seqs, [1, 2, 3, 4], 'no gaps, no duplicates, in seq order');
});

step("a reload shows alice's history oldest at the top", async () => {
  const alice = pages.alice;
  await alice.reload();
  await alice.locator(tid('user-name-input')).waitFor();
  assert.equal(await alice.locator(tid('user-name-input')).inputValue(), 'alice', 'the name is remembered');
  await alice.locator(tid('connect-button')).click();
  await convItem(alice, 'bob').click();
  await alice.locator(tid('message-item', '[data-seq="4"]')).waitFor();
  const texts = await alice.locator(tid('message-item')).locator(tid('message-content')).allTextContents();
  assert.deepEqual(texts, ['hello bob', 'hi alice!', 'missed one', 'missed two']);
  await alice.locator(tid('conversation-header')).locator(tid('presence-dot', '[data-user="bob"][data-status="online"]')).waitFor();
});

step('a group of three: 60 messages; carol, connecting later, pages back with "load older"', async () => {
  const { alice, bob } = pages;
  await alice.locator(tid('new-kind-select')).selectOption('group');
  await alice.locator(tid('new-members-input')).fill('bob, carol');
  await alice.locator(tid('new-name-input')).fill('team');
  await alice.locator(tid('create-conversation-button')).click();
  await alice.locator(tid('conversation-title')).filter({ hasText: /^team$/ }).waitFor();
  // carol never connected: offline, never seen.
  await alice.locator(tid('conversation-header')).locator(tid('presence-dot', '[data-user="carol"][data-status="offline"]')).waitFor();
  const input = alice.locator(tid('composer-input'));
  for (let i = 1; i <= 60; i++) {
    await input.fill(`group message ${i}`);
    await input.press('Enter');
  }
  await alice.locator(tid('message-item', '[data-seq="60"][data-status="sent"]')).waitFor();
  // bob (online) learns about the group from its first message, gets all 60 live, unread.
  const item = convItem(bob, 'team');
  await item.locator(tid('unread-badge'), { hasText: /^60$/ }).waitFor();
  await item.click();
  await bob.locator(tid('message-item', '[data-seq="60"]')).filter({ hasText: 'group message 60' }).waitFor();
  await alice.locator(tid('message-item', '[data-seq="60"]')).locator(tid('read-receipt', '[data-users="bob"]')).waitFor();
  // carol connects only now: her list has the group with 60 unread; history comes in pages of 50.
  const carol = await openUser('carol');
  await alice.locator(tid('conversation-header')).locator(tid('presence-dot', '[data-user="carol"][data-status="online"]')).waitFor();
  const carolItem = convItem(carol, 'team');
  await carolItem.locator(tid('unread-badge'), { hasText: /^60$/ }).waitFor();
  await carolItem.click();
  await carol.locator(tid('message-item', '[data-seq="60"]')).filter({ hasText: 'group message 60' }).waitFor();
  const seqsOf = (page) => page.locator(tid('message-item', '[data-seq]')).evaluateAll((els) => els.map((e) => Number(e.dataset.seq)));
  assert.deepEqual(await seqsOf(carol), Array.from({ length: 50 }, (_, i) => i + 11), 'the newest 50, oldest at the top');
  await carol.locator(tid('load-older-button')).click();
  await carol.locator(tid('message-item', '[data-seq="1"]')).filter({ hasText: 'group message 1' }).waitFor();
  assert.deepEqual(await seqsOf(carol), Array.from({ length: 60 }, (_, i) => i + 1));
  await carol.locator(tid('load-older-button')).waitFor({ state: 'hidden' });
  await alice.locator(tid('message-item', '[data-seq="60"]')).locator(tid('read-receipt', '[data-users="bob,carol"]')).waitFor();
  await shoot(carol, 'carol-group');
  await carol.context().close();
  delete pages.carol;
  // Back to the direct conversation for the rest of the story.
  await convItem(alice, 'bob').click();
  await alice.locator(tid('message-item', '[data-seq="4"]')).waitFor();
});

const msgItem = (page, seq) => page.locator(tid('message-item', `[data-seq="${seq}"]`));
const reactionChip = (page, seq, key, extra = '') => msgItem(page, seq).locator(tid('reaction', `[data-key="${key}"]${extra}`));

step('offline bob catches up on an edit, a delete, a reaction and a read, without a reload', async () => {
  const { alice, bob } = pages;
  // bob has the direct conversation open; alice sends two messages he sees (and reads) live.
  await convItem(bob, 'alice').click();
  await msgItem(bob, 4).waitFor();
  for (const text of ['edit me', 'delete me']) {
    await alice.locator(tid('composer-input')).fill(text);
    await alice.locator(tid('composer-input')).press('Enter');
  }
  await msgItem(bob, 6).filter({ hasText: 'delete me' }).waitFor();
  await msgItem(alice, 6).locator(tid('read-receipt', '[data-users="bob"]')).waitFor();
  // alice looks at the group, so bob's next message stays unread on her side.
  await convItem(alice, 'team').click();
  await alice.locator(tid('conversation-title')).filter({ hasText: /^team$/ }).waitFor();
  await bob.locator(tid('composer-input')).fill('read me');
  await bob.locator(tid('composer-input')).press('Enter');
  await bob.locator(tid('message-item', '[data-seq="7"][data-status="sent"]')).waitFor();
  await convItem(alice, 'bob').locator(tid('unread-badge'), { hasText: /^1$/ }).waitFor();
  await msgItem(bob, 7).locator(tid('delivered-receipt', '[data-users="alice"]')).waitFor();
  assert.equal(await msgItem(bob, 7).locator(tid('read-receipt')).count(), 0, 'alice has not read it yet');

  // bob's page goes offline: its socket closes and reconnects fail, so it misses live frames.
  await bob.evaluate(() => { window.__sameDocument = true; });
  await bob.context().setOffline(true);
  await bob.evaluate(() => window.chatDebug.dropConnection());
  await bob.locator(tid('connection-status', '[data-status="online"]')).waitFor({ state: 'detached' });

  // Meanwhile alice reads (opening the conversation), edits, deletes and reacts from her page.
  await convItem(alice, 'bob').click();
  await convItem(alice, 'bob').locator(tid('unread-badge')).waitFor({ state: 'detached' });
  await msgItem(alice, 5).locator(tid('edit-button')).click();
  const editInput = msgItem(alice, 5).locator(tid('edit-input'));
  assert.equal(await editInput.inputValue(), 'edit me', 'the editor starts from the current text');
  await editInput.fill('edited while you were away');
  await editInput.press('Enter');
  await msgItem(alice, 5).locator(tid('message-content')).filter({ hasText: /^edited while you were away$/ }).waitFor();
  await msgItem(alice, 6).locator(tid('delete-button')).click();
  await msgItem(alice, 6).locator(tid('deleted-message')).waitFor();
  await msgItem(alice, 4).locator(tid('react-button')).click();
  await msgItem(alice, 4).locator(tid('reaction-picker')).locator(tid('reaction-option', '[data-key="👍"]')).click();
  await reactionChip(alice, 4, '👍', '[data-count="1"][data-mine="true"]').waitFor();
  await msgItem(alice, 4).locator(tid('reaction-picker')).waitFor({ state: 'detached' });
  // bob, offline, still shows the old state.
  assert.equal(await msgItem(bob, 5).locator(tid('message-content')).textContent(), 'edit me');
  assert.equal(await msgItem(bob, 6).locator(tid('deleted-message')).count(), 0);
  assert.equal(await msgItem(bob, 4).locator(tid('reaction')).count(), 0);

  // bob comes back: the reconnect's sync replays the current state of what changed.
  const sentBefore = frames.bob.sent.length;
  await bob.context().setOffline(false);
  await bob.locator(tid('connection-status', '[data-status="online"]')).waitFor({ timeout: 30_000 });
  await msgItem(bob, 5).locator(tid('message-content')).filter({ hasText: /^edited while you were away$/ }).waitFor();
  await msgItem(bob, 5).locator(tid('edited-marker')).waitFor();
  await msgItem(bob, 6).locator(tid('deleted-message')).filter({ hasText: 'message deleted' }).waitFor();
  await reactionChip(bob, 4, '👍', '[data-count="1"][data-mine="false"]').waitFor();
  await msgItem(bob, 7).locator(tid('read-receipt', '[data-users="alice"]')).waitFor();
  assert.equal(await bob.evaluate(() => window.__sameDocument), true, 'no page reload');
  assert.equal(await msgItem(bob, 5).locator(tid('edit-button')).count(), 0, "no Edit on someone else's message");
  assert.equal(await msgItem(bob, 7).locator(tid('edit-button')).count(), 1, 'Edit on his own message');
  const seqs = await bob.locator(tid('message-item', '[data-seq]')).evaluateAll((els) => els.map((e) => Number(e.dataset.seq)));
  assert.deepEqual(seqs, [1, 2, 3, 4, 5, 6, 7], 'no gaps, no duplicates, in seq order');
  // It was the streams form, from the epoch and position bob had.
  const conv = await bob.locator(tid('conversation-item', '.active')).getAttribute('data-conversation-id');
  const sync = frames.bob.sent.slice(sentBefore).find((f) => f.type === 'sync');
  assert.ok(sync && sync.streams && sync.streams[conv], `a streams sync of ${conv}: ${JSON.stringify(sync)}`);
  assert.match(sync.streams[conv].epoch, /^\d+$/);
  assert.ok(sync.streams[conv].position > 0);
  assert.equal(sync.conversations, undefined, 'not the seq form');
  await shoot(bob, 'bob-caught-up');
});

step('reactions from the page: a click toggles, the picker sets a key, the other page sees it live', async () => {
  const { alice, bob } = pages;
  // bob adds his 👍 to alice's on message 4 by clicking the chip.
  await reactionChip(bob, 4, '👍').click();
  await reactionChip(bob, 4, '👍', '[data-count="2"][data-mine="true"]').waitFor();
  await reactionChip(alice, 4, '👍', '[data-count="2"][data-mine="true"]').waitFor();
  assert.equal(await reactionChip(alice, 4, '👍').getAttribute('title'), 'alice, bob');
  // bob reacts ❤️ to alice's edited message through the picker.
  await msgItem(bob, 5).locator(tid('react-button')).click();
  await msgItem(bob, 5).locator(tid('reaction-picker')).locator(tid('reaction-option', '[data-key="❤️"]')).click();
  await reactionChip(alice, 5, '❤️', '[data-count="1"][data-mine="false"]').waitFor();
  // A new key replaces the old one (one reaction per user per message).
  await msgItem(bob, 5).locator(tid('react-button')).click();
  await msgItem(bob, 5).locator(tid('reaction-picker')).locator(tid('reaction-option', '[data-key="🎉"]')).click();
  await reactionChip(alice, 5, '🎉', '[data-count="1"]').waitFor();
  await reactionChip(alice, 5, '❤️').waitFor({ state: 'detached' });
  // A second click on his chip removes bob's 👍: alice's stays.
  await reactionChip(bob, 4, '👍').click();
  await reactionChip(alice, 4, '👍', '[data-count="1"][data-mine="true"]').waitFor();
  await reactionChip(bob, 4, '👍', '[data-count="1"][data-mine="false"]').waitFor();
  // Both pages applied the same contiguous stream positions.
  const conv = await bob.locator(tid('conversation-item', '.active')).getAttribute('data-conversation-id');
  const position = (page) => page.evaluate((id) => { const s = window.chatDebug.streams()[id]; return s && `${s.epoch}:${s.position}`; }, conv);
  const deadline = Date.now() + WAIT;
  let a, b;
  while (Date.now() < deadline) {
    [a, b] = [await position(alice), await position(bob)];
    if (a && a === b) break;
    await alice.waitForTimeout(100);
  }
  assert.ok(a, 'alice follows the stream');
  assert.equal(b, a, "bob's page reached the same position as alice's");
  await shoot(alice, 'alice-reactions');
});

const streamOf = (page, conv) => page.evaluate((id) => window.chatDebug.streams()[id], conv);

step('a live frame lost on the way is noticed by its position and filled in by a sync', async () => {
  const { alice, bob } = pages;
  const conv = await bob.locator(tid('conversation-item', '.active')).getAttribute('data-conversation-id');
  const sentBefore = frames.bob.sent.length;
  await bob.evaluate(() => window.chatDebug.dropNext('message_edited'));
  await msgItem(alice, 5).locator(tid('edit-button')).click();
  await msgItem(alice, 5).locator(tid('edit-input')).fill('edited twice');
  await msgItem(alice, 5).locator(tid('edit-save-button')).click();
  await msgItem(alice, 5).locator(tid('message-content')).filter({ hasText: /^edited twice$/ }).waitFor();
  // bob lost the edit; the next change (alice reacts to his message) arrives a position ahead.
  await msgItem(alice, 7).locator(tid('react-button')).click();
  await msgItem(alice, 7).locator(tid('reaction-option', '[data-key="😂"]')).click();
  await reactionChip(bob, 7, '😂', '[data-count="1"]').waitFor();
  await msgItem(bob, 5).locator(tid('message-content')).filter({ hasText: /^edited twice$/ }).waitFor();
  const sync = frames.bob.sent.slice(sentBefore).find((f) => f.type === 'sync');
  assert.ok(sync && sync.streams && sync.streams[conv], 'bob synced the conversation by streams');
  const deadline = Date.now() + WAIT;
  while (Date.now() < deadline && JSON.stringify(await streamOf(bob, conv)) !== JSON.stringify(await streamOf(alice, conv))) {
    await bob.waitForTimeout(100);
  }
  assert.deepEqual(await streamOf(bob, conv), await streamOf(alice, conv));
});

step('a sync from another epoch gets a reset: the page reloads the conversation and follows the stream', async () => {
  const { alice, bob } = pages;
  const conv = await bob.locator(tid('conversation-item', '.active')).getAttribute('data-conversation-id');
  const real = await streamOf(bob, conv);
  const receivedBefore = frames.bob.received.length;
  // As if bob's copy belonged to a history the server no longer has.
  await bob.evaluate((id) => { window.chatDebug.state.convs.get(id).stream.epoch = '12345'; window.chatDebug.dropConnection(); }, conv);
  const deadline = Date.now() + 30_000;
  let reset;
  while (Date.now() < deadline && !(reset = frames.bob.received.slice(receivedBefore).find((f) => f.type === 'reset'))) {
    await bob.waitForTimeout(100);
  }
  assert.ok(reset, 'a reset frame');
  assert.equal(reset.conversation_id, conv);
  assert.equal(reset.reason, 'epoch');
  assert.equal(reset.stream.epoch, real.epoch);
  await bob.locator(tid('connection-status', '[data-status="online"]')).waitFor();
  while (Date.now() < deadline && JSON.stringify(await streamOf(bob, conv)) !== JSON.stringify(await streamOf(alice, conv))) {
    await bob.waitForTimeout(100);
  }
  assert.deepEqual(await streamOf(bob, conv), await streamOf(alice, conv), 'back on the real epoch, at the same position');
  // The reloaded copy is the current state.
  await msgItem(bob, 5).locator(tid('message-content')).filter({ hasText: /^edited twice$/ }).waitFor();
  await msgItem(bob, 6).locator(tid('deleted-message')).waitFor();
  await reactionChip(bob, 4, '👍', '[data-count="1"]').waitFor();
  await reactionChip(bob, 5, '🎉', '[data-count="1"][data-mine="true"]').waitFor();
  await msgItem(bob, 7).locator(tid('read-receipt', '[data-users="alice"]')).waitFor();
  const seqs = await bob.locator(tid('message-item', '[data-seq]')).evaluateAll((els) => els.map((e) => Number(e.dataset.seq)));
  assert.deepEqual(seqs, [1, 2, 3, 4, 5, 6, 7]);
  // And live changes keep flowing.
  await alice.locator(tid('composer-input')).fill('after the reset');
  await alice.locator(tid('composer-input')).press('Enter');
  await msgItem(bob, 8).filter({ hasText: 'after the reset' }).waitFor();
});

step('against a server without change streams the page would sync by seq: that form still recovers messages', async () => {
  const { alice, bob } = pages;
  // As after the "keeps no change stream" error: the page switches to the seq-only form.
  await bob.evaluate(() => { window.chatDebug.state.seqOnly = true; });
  await bob.context().setOffline(true);
  await bob.evaluate(() => window.chatDebug.dropConnection());
  await bob.locator(tid('connection-status', '[data-status="online"]')).waitFor({ state: 'detached' });
  await alice.locator(tid('composer-input')).fill('sent while bob was away again');
  await alice.locator(tid('composer-input')).press('Enter');
  await alice.locator(tid('message-item', '[data-seq="9"][data-status="sent"]')).waitFor();
  const sentBefore = frames.bob.sent.length;
  await bob.context().setOffline(false);
  await bob.locator(tid('connection-status', '[data-status="online"]')).waitFor({ timeout: 30_000 });
  await msgItem(bob, 9).filter({ hasText: 'sent while bob was away again' }).waitFor();
  const conv = await bob.locator(tid('conversation-item', '.active')).getAttribute('data-conversation-id');
  const sync = frames.bob.sent.slice(sentBefore).find((f) => f.type === 'sync');
  assert.ok(sync && sync.conversations, `a seq-form sync: ${JSON.stringify(sync)}`);
  assert.equal(sync.conversations[conv], 8, 'from the last seq bob held');
  assert.equal(sync.streams, undefined);
  await bob.evaluate(() => { window.chatDebug.state.seqOnly = false; });
});

step('bob closes his page: after the offline debounce alice sees him offline', async () => {
  const { alice, bob } = pages;
  await shoot(alice, 'alice');
  await shoot(bob, 'bob');
  const dot = alice.locator(tid('conversation-header')).locator(tid('presence-dot', '[data-user="bob"]'));
  assert.equal(await dot.getAttribute('data-status'), 'online');
  await bob.context().close();
  // CHAT_OFFLINE_DEBOUNCE_MS=1000: the offline broadcast comes about a second after the close.
  await alice.locator(tid('conversation-header')).locator(tid('presence-dot', '[data-user="bob"][data-status="offline"]')).waitFor();
  await alice.locator(tid('conversation-item')).locator(tid('presence-dot', '[data-user="bob"][data-status="offline"]')).waitFor();
  await shoot(alice, 'alice-bob-offline');
});

step('with a JWT that expires, the page is closed with 4003, says so and stops reconnecting', async () => {
  const secret = 'browser-test-secret';
  const jwtServer = await startServer({ CHAT_JWT_SECRET: secret });
  const context = await browser.newContext({ viewport: VIEWPORT });
  try {
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT);
    page.on('pageerror', (e) => pageErrors.push(`dora: ${e.message}`));
    const token = hs256({ sub: 'dora', exp: Math.floor(Date.now() / 1000) + 3 }, secret);
    await page.goto(`${jwtServer.url}/?token=${token}`);
    await page.locator(tid('connection-status', '[data-status="online"]')).waitFor();
    // The server closes the socket at exp (4003); the page says why and does not retry.
    await page.locator(tid('error-banner', '[data-code="token_expired"]')).waitFor();
    await page.locator(tid('connection-status', '[data-status="offline"]')).waitFor();
    assert.equal(await page.locator('#conn-label').textContent(), 'token expired');
    await page.waitForTimeout(1500);
    assert.equal(await page.locator(tid('connection-status')).getAttribute('data-status'), 'offline',
      'the page reconnected with an expired token');
  } finally {
    await context.close();
    await stopServer(jwtServer);
  }
});

step('no uncaught errors in the pages', async () => {
  assert.deepEqual(pageErrors, []);
});
