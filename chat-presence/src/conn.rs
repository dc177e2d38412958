//! The command connection: a multiplexed, auto-reconnecting connection with a deadline on
//! every call and the errors turned into `chat_core::Error::Unavailable`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chat_core::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisResult};
use tracing::debug;

use crate::options::RedisOptions;

/// The name every error of this crate carries in `Error::Unavailable { backend }`.
pub(crate) const BACKEND: &str = "redis";

/// A Redis client error as the public error type.
pub(crate) fn unavailable(err: impl Into<chat_core::error::BoxError>) -> Error {
    Error::unavailable(BACKEND, err)
}

/// The error of an operation that ran out of time.
pub(crate) fn timed_out(what: &str, after: Duration) -> Error {
    unavailable(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} timed out after {after:?}"),
    ))
}

/// Opens a client for `url` (`redis://host:port/db`, `rediss://…` is not compiled in).
pub(crate) fn client(url: &str) -> Result<Client> {
    Client::open(url).map_err(|e| Error::invalid(format!("bad Redis URL: {e}")))
}

/// Something that can be sent on a connection (a command or a pipeline).
pub(crate) trait Query {
    /// Sends it and parses the reply.
    fn run<T: FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
    ) -> impl Future<Output = RedisResult<T>> + Send;
}

impl Query for Cmd {
    fn run<T: FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
    ) -> impl Future<Output = RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

impl Query for Pipeline {
    fn run<T: FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
    ) -> impl Future<Output = RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

/// A cheap-to-clone handle on the shared command connection.
#[derive(Clone)]
pub(crate) struct Commands {
    /// Multiplexed: concurrent callers share one TCP connection (and its pipelining); replaced
    /// in the background when it drops.
    conn: ConnectionManager,
    /// The deadline of every call.
    op_timeout: Duration,
    /// Source of the Lua scripts the calls run (by `EVALSHA`): loaded at connect and again
    /// when the server answers `NOSCRIPT` (a restarted or flushed server has an empty cache).
    scripts: Arc<[&'static str]>,
}

impl fmt::Debug for Commands {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Commands")
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

impl Commands {
    /// Connects (bounded by `op_timeout`).
    pub(crate) async fn connect(
        client: Client,
        options: &RedisOptions,
        scripts: &[&'static str],
    ) -> Result<Self> {
        let op_timeout = options.checked_op_timeout();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op_timeout))
            .set_response_timeout(Some(op_timeout))
            .set_number_of_retries(2)
            .set_min_delay(options.checked_reconnect_min())
            .set_max_delay(options.checked_reconnect_max());
        let conn = tokio::time::timeout(
            op_timeout,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| timed_out("connecting to Redis", op_timeout))?
        .map_err(unavailable)?;
        let this = Self {
            conn,
            op_timeout,
            scripts: scripts.into(),
        };
        this.load_scripts().await?;
        Ok(this)
    }

    /// Runs `query` with a deadline. A call that failed because the connection dropped (the
    /// server restarted) or because the server lost the scripts is tried once more: every
    /// query of this crate may run twice (a duplicate publish is allowed; the scripts are
    /// idempotent).
    pub(crate) async fn query<T: FromRedisValue>(
        &self,
        what: &'static str,
        query: &impl Query,
    ) -> Result<T> {
        let attempt = async {
            let mut conn = self.conn.clone();
            match query.run(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    debug!("{what}: scripts missing on the server, loading them");
                    self.load_scripts_on(&mut conn).await?;
                    query.run(&mut conn).await
                }
                Err(e) if is_connection_error(&e) => {
                    debug!(error = %e, "{what}: connection lost, trying once more");
                    query.run(&mut conn).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.op_timeout, attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(timed_out(what, self.op_timeout)),
        }
    }

    async fn load_scripts(&self) -> Result<()> {
        if self.scripts.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        tokio::time::timeout(self.op_timeout, self.load_scripts_on(&mut conn))
            .await
            .map_err(|_| timed_out("loading scripts", self.op_timeout))?
            .map_err(unavailable)
    }

    async fn load_scripts_on(&self, conn: &mut ConnectionManager) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        for code in self.scripts.iter() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(*code).ignore();
        }
        pipe.query_async::<()>(conn).await
    }
}

/// Whether `err` says the connection (rather than the command) failed.
pub(crate) fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error()
}
