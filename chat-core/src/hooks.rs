//! Hooks: host rules that run before every command without forking the engine
//! (moderation, extra authorization, rate limits).
//!
//! ```
//! use async_trait::async_trait;
//! use chat_core::{Command, Error, hooks::{CommandHook, HookContext}};
//!
//! /// Rejects messages that mention a forbidden word.
//! #[derive(Debug)]
//! struct NoSpam;
//!
//! #[async_trait]
//! impl CommandHook for NoSpam {
//!     async fn before(&self, _ctx: &HookContext<'_>, cmd: &mut Command) -> Result<(), Error> {
//!         if let Command::Message(m) = cmd {
//!             if m.content.contains("spam") {
//!                 return Err(Error::forbidden("no spam"));
//!             }
//!         }
//!         Ok(())
//!     }
//! }
//! ```

use std::fmt::Debug;
use std::num::NonZeroU32;
use std::sync::Arc;

use async_trait::async_trait;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::{Error, Result};
use crate::id::{ConnectionId, UserId};
use crate::protocol::Command;

/// Who is issuing a command.
#[derive(Clone, Copy, Debug)]
pub struct HookContext<'a> {
    /// The authenticated user.
    pub user: &'a UserId,
    /// Their connection.
    pub connection: ConnectionId,
}

/// Runs before each command. Returning an error rejects the command (the client receives an
/// `error` frame with the error's code); the hook may also rewrite the command.
#[async_trait]
pub trait CommandHook: Send + Sync + Debug + 'static {
    /// Inspect, rewrite or reject `cmd`.
    async fn before(&self, ctx: &HookContext<'_>, cmd: &mut Command) -> Result<()>;

    /// Called periodically by the engine's housekeeping task (e.g. to forget idle keys).
    fn housekeeping(&self) {}
}

/// A shared hook.
pub type DynCommandHook = Arc<dyn CommandHook>;

/// Messages per second per user and the burst allowed above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Sustained rate (default 20 per second).
    pub per_second: NonZeroU32,
    /// Burst (default 50).
    pub burst: NonZeroU32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_second: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(50).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// Per-user token bucket (GCRA, from `governor`) over sends, edits, deletes and reactions — retries of a
/// send count too; typing, receipts, sync and presence do not. Over the limit the command is
/// rejected with `rate_limited`. The limit is per node: a user connected to two nodes gets
/// twice the rate.
#[derive(Debug)]
pub struct RateLimit {
    /// Keyed limiter; idle keys are dropped by [`CommandHook::housekeeping`].
    limiter: DefaultKeyedRateLimiter<UserId>,
}

impl RateLimit {
    /// A limiter with `config`.
    pub fn new(config: RateLimitConfig) -> Self {
        let quota = Quota::per_second(config.per_second).allow_burst(config.burst);
        Self {
            limiter: RateLimiter::keyed(quota),
        }
    }

    /// A limiter with a custom quota (e.g. per hour in tests).
    pub fn with_quota(quota: Quota) -> Self {
        Self {
            limiter: RateLimiter::keyed(quota),
        }
    }
}

#[async_trait]
impl CommandHook for RateLimit {
    async fn before(&self, ctx: &HookContext<'_>, cmd: &mut Command) -> Result<()> {
        let counted = matches!(
            cmd,
            Command::Message(_)
                | Command::Edit { .. }
                | Command::Delete { .. }
                | Command::React { .. }
                | Command::Unreact { .. }
        );
        if counted && self.limiter.check_key(ctx.user).is_err() {
            return Err(Error::RateLimited);
        }
        Ok(())
    }

    fn housekeeping(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}
