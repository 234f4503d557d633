//! The control plane's configuration: a TOML file whose every key has a default,
//! documented in `control-plane/control-plane.toml` (a test keeps the two equal).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Everything the control plane can be told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The back-office HTTP API, metrics, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// PostgreSQL.
    pub database: DatabaseConfig,
    /// The data plane, and how to reach it.
    pub dataplane: DataplaneConfig,
    /// Bearer tokens of the back office.
    pub auth: AuthConfig,
    /// The drain of each shard's journal into the books.
    pub drain: DrainConfig,
    /// Pushing the catalog and stock changes to the data plane.
    pub push: PushConfig,
}

/// PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The connection URL; the environment's `DATABASE_URL` wins when set.
    pub url: String,
    /// Connections in the pool.
    pub connections: u32,
    /// Every statement is cancelled after this long.
    pub statement_timeout_ms: u64,
}

/// The data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// The name its certificate is issued to.
    pub server_name: String,
    /// The CA that signs the data plane's certificate.
    pub ca: PathBuf,
    /// Our client certificate, which must carry the `control` role.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// QUIC connections to it.
    pub connections: usize,
    /// One call's timeout.
    pub call_timeout_ms: u64,
}

/// Bearer tokens. An empty list refuses every request of that role.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Tokens that may change the catalog and stock (and read).
    pub admin_tokens: Vec<String>,
    /// Tokens that may only read.
    pub read_tokens: Vec<String>,
}

/// The drain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainConfig {
    /// Journal entries written into PostgreSQL per transaction, at most.
    pub batch_entries: u32,
    /// Journal entries asked for per read (the shard caps this at its `journal_read_max`).
    pub read_entries: u32,
    /// How long a drainer that found nothing new waits before asking again.
    pub idle_ms: u64,
    /// Batches written concurrently per shard (1: one after the other).
    pub writers: u32,
}

/// The pusher and reconciler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Upserts or adjustments pushed per round, at most.
    pub batch: u32,
    /// How long the pusher waits between rounds when nothing is due.
    pub idle_ms: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: "127.0.0.1:7500".parse().expect("a valid address"),
            database: DatabaseConfig::default(),
            dataplane: DataplaneConfig::default(),
            auth: AuthConfig::default(),
            drain: DrainConfig::default(),
            push: PushConfig::default(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> DatabaseConfig {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            connections: 16,
            statement_timeout_ms: 30_000,
        }
    }
}

impl Default for DataplaneConfig {
    fn default() -> DataplaneConfig {
        DataplaneConfig {
            addr: "127.0.0.1:7400".parse().expect("a valid address"),
            server_name: "localhost".into(),
            ca: "target/certs/ca.pem".into(),
            cert: "target/certs/control.pem".into(),
            key: "target/certs/control.key".into(),
            connections: 4,
            call_timeout_ms: 5_000,
        }
    }
}

impl Default for DrainConfig {
    fn default() -> DrainConfig {
        DrainConfig { batch_entries: 16_384, read_entries: 4_096, idle_ms: 20, writers: 2 }
    }
}

impl Default for PushConfig {
    fn default() -> PushConfig {
        PushConfig { batch: 32_768, idle_ms: 200 }
    }
}

impl Config {
    /// Reads a TOML file (keys left out keep their defaults), then `DATABASE_URL` and
    /// the `STOCKPLANE_ADMIN_TOKEN` / `STOCKPLANE_READ_TOKEN` environment variables.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read the config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parse the config file {}", path.display()))?
            }
            None => Config::default(),
        };
        if let Ok(url) = std::env::var("DATABASE_URL") {
            config.database.url = url;
        }
        if let Ok(token) = std::env::var("STOCKPLANE_ADMIN_TOKEN") {
            config.auth.admin_tokens.push(token);
        }
        if let Ok(token) = std::env::var("STOCKPLANE_READ_TOKEN") {
            config.auth.read_tokens.push(token);
        }
        config.validate()?;
        Ok(config)
    }

    /// Refuses values that cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.database.connections > 0, "database.connections must be above zero");
        anyhow::ensure!(self.dataplane.connections > 0, "dataplane.connections must be above zero");
        anyhow::ensure!(
            self.drain.batch_entries > 0 && self.drain.read_entries > 0,
            "drain batches must be above zero"
        );
        anyhow::ensure!(self.drain.writers > 0, "drain.writers must be above zero");
        anyhow::ensure!(self.push.batch > 0, "push.batch must be above zero");
        let tokens = self.auth.admin_tokens.iter().chain(&self.auth.read_tokens);
        for token in tokens {
            anyhow::ensure!(token.len() >= 16, "bearer tokens must be at least 16 characters");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_file_is_the_default() {
        let text = include_str!("../control-plane.toml");
        let parsed: Config = toml::from_str(text).expect("control-plane.toml parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_keys_and_short_tokens_are_refused() {
        assert!(toml::from_str::<Config>("nonsense = 1").is_err());
        let mut config = Config::default();
        config.auth.admin_tokens.push("short".into());
        assert!(config.validate().is_err());
    }
}
