//! [`ScyllaStoreOptions`] and the small enums it is made of.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chat_core::{Error, Result};

/// Default number of seqs per partition of the `messages` table (see the crate docs).
pub const DEFAULT_BUCKET_SIZE: u64 = 512;

/// Consistency level of the plain reads and writes (the CQL names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Consistency {
    /// `ONE`.
    One,
    /// `LOCAL_ONE`.
    LocalOne,
    /// `QUORUM`.
    Quorum,
    /// `LOCAL_QUORUM` (the default: a quorum of the replicas in the local datacenter).
    LocalQuorum,
    /// `EACH_QUORUM`.
    EachQuorum,
    /// `ALL`.
    All,
}

impl Consistency {
    pub(crate) fn to_driver(self) -> scylla::statement::Consistency {
        use scylla::statement::Consistency as C;
        match self {
            Self::One => C::One,
            Self::LocalOne => C::LocalOne,
            Self::Quorum => C::Quorum,
            Self::LocalQuorum => C::LocalQuorum,
            Self::EachQuorum => C::EachQuorum,
            Self::All => C::All,
        }
    }
}

impl FromStr for Consistency {
    type Err = Error;
    /// The CQL name, any case: `one`, `local_one`, `quorum`, `local_quorum`, `each_quorum`, `all`.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "one" => Self::One,
            "local_one" => Self::LocalOne,
            "quorum" => Self::Quorum,
            "local_quorum" => Self::LocalQuorum,
            "each_quorum" => Self::EachQuorum,
            "all" => Self::All,
            _ => return Err(Error::invalid(format!("unknown consistency level {s:?}"))),
        })
    }
}

/// Serial consistency of the lightweight transactions (`IF NOT EXISTS`, `IF col = …`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SerialConsistency {
    /// `LOCAL_SERIAL` (the default: Paxos among the replicas of the local datacenter).
    LocalSerial,
    /// `SERIAL` (Paxos across every datacenter).
    Serial,
}

impl SerialConsistency {
    pub(crate) fn to_driver(self) -> scylla::statement::SerialConsistency {
        use scylla::statement::SerialConsistency as S;
        match self {
            Self::LocalSerial => S::LocalSerial,
            Self::Serial => S::Serial,
        }
    }
}

impl FromStr for SerialConsistency {
    type Err = Error;
    /// `local_serial` or `serial`, any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "local_serial" => Ok(Self::LocalSerial),
            "serial" => Ok(Self::Serial),
            _ => Err(Error::invalid(format!("unknown serial consistency {s:?}"))),
        }
    }
}

/// Replication of the keyspace, used only when the store creates it (an existing keyspace is
/// never altered).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Replication {
    /// `SimpleStrategy` with this replication factor: single-datacenter test clusters.
    Simple {
        /// Copies of every row.
        replication_factor: u32,
    },
    /// `NetworkTopologyStrategy`: the replication factor per datacenter (production).
    NetworkTopology(Vec<(String, u32)>),
}

impl Default for Replication {
    fn default() -> Self {
        Self::Simple {
            replication_factor: 1,
        }
    }
}

impl Replication {
    /// The CQL map literal of the `replication` keyspace option.
    pub(crate) fn cql(&self) -> String {
        match self {
            Self::Simple { replication_factor } => {
                format!("{{'class': 'SimpleStrategy', 'replication_factor': {replication_factor}}}")
            }
            Self::NetworkTopology(dcs) => {
                let mut s = String::from("{'class': 'NetworkTopologyStrategy'");
                for (dc, rf) in dcs {
                    s.push_str(&format!(", '{}': {rf}", dc.replace('\'', "''")));
                }
                s.push('}');
                s
            }
        }
    }
}

impl FromStr for Replication {
    type Err = Error;
    /// `simple:<rf>` (e.g. `simple:1`) or `<dc>:<rf>,<dc>:<rf>…` for NetworkTopologyStrategy
    /// (e.g. `dc1:3,dc2:3`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(format!(
                "replication {s:?}: expected simple:<rf> or <dc>:<rf>[,<dc>:<rf>…]"
            ))
        };
        let parse_rf = |v: &str| v.trim().parse::<u32>().ok().filter(|rf| *rf > 0);
        if let Some(rf) = s.strip_prefix("simple:") {
            return Ok(Self::Simple {
                replication_factor: parse_rf(rf).ok_or_else(bad)?,
            });
        }
        let mut dcs = Vec::new();
        for part in s.split(',') {
            let (dc, rf) = part.split_once(':').ok_or_else(bad)?;
            let dc = dc.trim();
            if dc.is_empty() {
                return Err(bad());
            }
            dcs.push((dc.to_owned(), parse_rf(rf).ok_or_else(bad)?));
        }
        Ok(Self::NetworkTopology(dcs))
    }
}

/// Whether the keyspace is created with `tablets = {'enabled': false}`.
///
/// ScyllaDB releases that create keyspaces with tablets by default do not support
/// lightweight transactions on them in some versions; `ScyllaStore` needs LWT, so on ScyllaDB
/// the keyspace must use vnodes. Apache Cassandra has no tablets and rejects the option.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Tablets {
    /// Add the option when the cluster is ScyllaDB (detected by its `system.scylla_local`
    /// table), omit it on Cassandra (the default).
    #[default]
    DisableOnScylla,
    /// Always add `tablets = {'enabled': false}`.
    Disable,
    /// Never add the option.
    Omit,
}

/// Settings of a [`ScyllaStore`](super::ScyllaStore).
///
/// ```
/// use std::time::Duration;
/// use chat_store::{Replication, ScyllaStoreOptions};
///
/// let options = ScyllaStoreOptions::new("chat")
///     .with_replication("dc1:3".parse().unwrap())
///     .with_request_timeout(Duration::from_secs(2));
/// assert_eq!(options.keyspace, "chat");
/// assert_eq!(options.replication, Replication::NetworkTopology(vec![("dc1".into(), 3)]));
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScyllaStoreOptions {
    /// Keyspace of every table (created if missing). ASCII letters, digits and `_`, starting
    /// with a letter, at most 48 characters.
    pub keyspace: String,
    /// Replication used when the keyspace is created (default `SimpleStrategy`, factor 1).
    pub replication: Replication,
    /// Tablets option of a new keyspace (ScyllaDB only).
    pub tablets: Tablets,
    /// Consistency of plain reads and writes (default `LOCAL_QUORUM`).
    pub consistency: Consistency,
    /// Serial consistency of lightweight transactions (default `LOCAL_SERIAL`).
    pub serial_consistency: SerialConsistency,
    /// The local datacenter: requests go to its nodes first (token-aware within it). `None`:
    /// any datacenter (fine for one datacenter).
    pub local_datacenter: Option<String>,
    /// Bound on one request to the cluster, retries by the driver included (default 5 s).
    pub request_timeout: Duration,
    /// Bound on one whole store operation (several requests), so every operation either
    /// completes or fails with `Error::Unavailable` (default 10 s).
    pub operation_timeout: Duration,
    /// Bound on opening one connection (default 3 s).
    pub connect_timeout: Duration,
    /// Bound on the whole start of a store: connecting, creating or migrating the schema
    /// (creating a keyspace's tables takes seconds on Cassandra) and preparing the statements
    /// (default 60 s).
    pub startup_timeout: Duration,
    /// Seqs per `messages` partition when the schema is created; a store opening an existing
    /// keyspace uses the stored value (default [`DEFAULT_BUCKET_SIZE`]).
    pub bucket_size: u64,
    /// Conditional-insert attempts of one `append` before it fails with `Error::Conflict`
    /// (default 64).
    pub append_attempts: usize,
    /// Optional credentials (`PasswordAuthenticator`).
    pub credentials: Option<(String, String)>,
}

impl fmt::Debug for ScyllaStoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScyllaStoreOptions")
            .field("keyspace", &self.keyspace)
            .field("replication", &self.replication)
            .field("tablets", &self.tablets)
            .field("consistency", &self.consistency)
            .field("serial_consistency", &self.serial_consistency)
            .field("local_datacenter", &self.local_datacenter)
            .field("request_timeout", &self.request_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("startup_timeout", &self.startup_timeout)
            .field("bucket_size", &self.bucket_size)
            .field("append_attempts", &self.append_attempts)
            .field("credentials", &self.credentials.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl Default for ScyllaStoreOptions {
    fn default() -> Self {
        Self::new("chat")
    }
}

impl ScyllaStoreOptions {
    /// Defaults with this keyspace.
    pub fn new(keyspace: impl Into<String>) -> Self {
        Self {
            keyspace: keyspace.into(),
            replication: Replication::default(),
            tablets: Tablets::default(),
            consistency: Consistency::LocalQuorum,
            serial_consistency: SerialConsistency::LocalSerial,
            local_datacenter: None,
            request_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            startup_timeout: Duration::from_secs(60),
            bucket_size: DEFAULT_BUCKET_SIZE,
            append_attempts: 64,
            credentials: None,
        }
    }

    /// Sets [`replication`](Self::replication).
    pub fn with_replication(mut self, replication: Replication) -> Self {
        self.replication = replication;
        self
    }

    /// Sets [`tablets`](Self::tablets).
    pub fn with_tablets(mut self, tablets: Tablets) -> Self {
        self.tablets = tablets;
        self
    }

    /// Sets [`consistency`](Self::consistency).
    pub fn with_consistency(mut self, consistency: Consistency) -> Self {
        self.consistency = consistency;
        self
    }

    /// Sets [`serial_consistency`](Self::serial_consistency).
    pub fn with_serial_consistency(mut self, serial: SerialConsistency) -> Self {
        self.serial_consistency = serial;
        self
    }

    /// Sets [`local_datacenter`](Self::local_datacenter).
    pub fn with_local_datacenter(mut self, dc: impl Into<String>) -> Self {
        self.local_datacenter = Some(dc.into());
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`operation_timeout`](Self::operation_timeout).
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`startup_timeout`](Self::startup_timeout).
    pub fn with_startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Sets [`bucket_size`](Self::bucket_size).
    pub fn with_bucket_size(mut self, seqs: u64) -> Self {
        self.bucket_size = seqs;
        self
    }

    /// Sets [`append_attempts`](Self::append_attempts).
    pub fn with_append_attempts(mut self, attempts: usize) -> Self {
        self.append_attempts = attempts;
        self
    }

    /// Sets [`credentials`](Self::credentials).
    pub fn with_credentials(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.credentials = Some((user.into(), password.into()));
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let ks = &self.keyspace;
        let ok = !ks.is_empty()
            && ks.len() <= 48
            && ks.starts_with(|c: char| c.is_ascii_alphabetic())
            && ks.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(Error::invalid(format!(
                "keyspace {ks:?}: letters, digits and _, starting with a letter, at most 48"
            )));
        }
        if self.bucket_size == 0 || self.bucket_size > 1 << 30 {
            return Err(Error::invalid("bucket_size must be in 1..=2^30"));
        }
        if self.append_attempts == 0 {
            return Err(Error::invalid("append_attempts must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_settings() {
        assert_eq!(
            "simple:3".parse::<Replication>().unwrap(),
            Replication::Simple {
                replication_factor: 3
            }
        );
        assert_eq!(
            "dc1:3, dc2:2".parse::<Replication>().unwrap(),
            Replication::NetworkTopology(vec![("dc1".into(), 3), ("dc2".into(), 2)])
        );
        for bad in ["", "simple:0", "simple:x", "dc1", ":3", "dc1:3,"] {
            assert!(bad.parse::<Replication>().is_err(), "{bad:?}");
        }
        assert_eq!(
            "LOCAL_QUORUM".parse::<Consistency>().unwrap(),
            Consistency::LocalQuorum
        );
        assert!("fast".parse::<Consistency>().is_err());
        assert_eq!(
            "serial".parse::<SerialConsistency>().unwrap(),
            SerialConsistency::Serial
        );
        assert_eq!(
            Replication::NetworkTopology(vec![("d'c".into(), 3)]).cql(),
            "{'class': 'NetworkTopologyStrategy', 'd''c': 3}"
        );
    }

    #[test]
    fn validates_keyspace_names() {
        for ok in ["chat", "chat_test_01", "C"] {
            assert!(ScyllaStoreOptions::new(ok).validate().is_ok(), "{ok}");
        }
        for bad in ["", "1chat", "chat-x", "chat;drop", &"a".repeat(49)] {
            assert!(ScyllaStoreOptions::new(bad).validate().is_err(), "{bad}");
        }
        assert!(
            ScyllaStoreOptions::new("x")
                .with_bucket_size(0)
                .validate()
                .is_err()
        );
    }
}
