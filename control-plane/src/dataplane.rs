//! The control plane's link to the data plane: the `wire` client with the `control`
//! certificate, connected in the background and kept.
//!
//! The data plane may be down when the control plane starts, or restart later. The link
//! connects in a background task, retrying each second until it succeeds; once up, the
//! client's pool reconnects by itself and its circuit breaker fails calls fast while the
//! data plane is away. On connecting, the link learns the shard count (by reading each
//! shard's journal until the data plane says there is no such shard) and records it in
//! PostgreSQL, which refuses a count that differs from the one the books were made for.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use stockplane_wire::client::{Client, ClientConfig, ClientError, TlsMaterial};
use stockplane_wire::{Body, JournalEntry, Op, SkuAt, Status, StockLevel};
use tokio::sync::watch;

use crate::config::DataplaneConfig;
use crate::db::Db;

/// Shards a data plane may have, at most (a probe stops here).
const SHARDS_MAX: u32 = 1024;

/// A connected data plane and its shape.
#[derive(Clone, Debug)]
pub struct Dataplane {
    client: Client,
    shards: u32,
}

/// What a journal read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalRead {
    /// Entries from the position asked for, and the position after them.
    Entries {
        /// The entries, in position order.
        entries: Vec<JournalEntry>,
        /// The position after the last.
        next: u64,
        /// The shard's incarnation (it changes when the shard starts without its data).
        incarnation: u64,
    },
    /// The position asked for is past the shard's journal: the shard has fewer entries
    /// than the books drained, so it restarted without its state.
    Behind,
    /// The shard no longer keeps the entries from that position.
    Truncated,
}

/// A call the data plane answered with something other than what was hoped.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The client failed (transport, timeout, circuit open).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The data plane answered a status this call does not expect.
    #[error("the data plane answered {0:?}")]
    Status(Status),
}

impl Dataplane {
    /// Connects and learns the shard count.
    pub async fn connect(config: &DataplaneConfig) -> anyhow::Result<Dataplane> {
        let tls = TlsMaterial::Files { ca: config.ca.clone(), cert: config.cert.clone(), key: config.key.clone() };
        let mut client_config = ClientConfig::new(vec![config.addr], tls);
        client_config.server_name = config.server_name.clone();
        client_config.connections = config.connections;
        client_config.call_timeout = Duration::from_millis(config.call_timeout_ms);
        let client = Client::connect(client_config).await.context("connect to the data plane")?;
        let shards = Self::probe_shards(&client).await?;
        Ok(Dataplane { client, shards })
    }

    async fn probe_shards(client: &Client) -> anyhow::Result<u32> {
        for shard in 0..SHARDS_MAX {
            let outcome = client.journal(shard, 1, 1).await.context("read a journal to count the shards")?;
            match outcome.status {
                Status::Ok | Status::JournalTruncated => continue,
                // A shard that does not exist: the router refuses it, or with one core
                // the only shard says it is not the one asked for.
                Status::InvalidArgument | Status::WrongShard if shard > 0 => return Ok(shard),
                Status::Forbidden => anyhow::bail!("the data plane refuses our certificate the control role"),
                status => anyhow::bail!("the data plane answered {status:?} to a journal read of shard {shard}"),
            }
        }
        anyhow::bail!("the data plane claims more than {SHARDS_MAX} shards")
    }

    /// The data plane's shard count.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The `wire` client, for calls this module has no method for.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Reads a shard's journal from `from`.
    pub async fn journal(&self, shard: u32, from: u64, max_entries: u32) -> Result<JournalRead, CallError> {
        let outcome = self.client.journal(shard, from, max_entries).await?;
        match (outcome.status, outcome.body) {
            (Status::Ok, Body::Journal { entries, next, incarnation }) => {
                Ok(JournalRead::Entries { entries, next, incarnation })
            }
            (Status::InvalidArgument, _) => Ok(JournalRead::Behind),
            (Status::JournalTruncated, _) => Ok(JournalRead::Truncated),
            (status, _) => Err(CallError::Status(status)),
        }
    }

    /// Live stock of many SKU-locations: queries of 256 (the data plane's bound), sent
    /// together with `call_many`.
    pub async fn stock(&self, items: &[SkuAt]) -> Result<Vec<StockLevel>, CallError> {
        let queries = items.chunks(256).map(|chunk| Op::QueryStock { items: chunk.to_vec() }).collect();
        let mut levels = Vec::with_capacity(items.len());
        for outcome in self.client.call_many(queries).await {
            let outcome = outcome?;
            match (outcome.status, outcome.body) {
                (Status::Ok, Body::Stock(found)) => levels.extend(found),
                // Some SKU-location the shard does not know: the levels of the others.
                (Status::UnknownSku, Body::Stock(found)) => levels.extend(found),
                (Status::UnknownSku, _) => {}
                (status, _) => return Err(CallError::Status(status)),
            }
        }
        Ok(levels)
    }
}

/// The link: `None` until the data plane has been reached once, then the connection.
#[derive(Clone, Debug)]
pub struct Link {
    current: watch::Receiver<Option<Arc<Dataplane>>>,
}

impl Link {
    /// Starts connecting in the background; the returned link fills in once connected.
    pub fn start(config: DataplaneConfig, db: Db) -> Link {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let mut logged = false;
            loop {
                match Self::connect_once(&config, &db).await {
                    Ok(dataplane) => {
                        tracing::info!(shards = dataplane.shards(), addr = %config.addr, "connected to the data plane");
                        let _ = tx.send(Some(Arc::new(dataplane)));
                        return;
                    }
                    Err(error) => {
                        if !logged {
                            tracing::warn!(error = format!("{error:#}"), "cannot reach the data plane yet; retrying");
                            logged = true;
                        }
                        metrics::counter!("stockplane_cp_dataplane_connect_failures_total").increment(1);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Link { current: rx }
    }

    async fn connect_once(config: &DataplaneConfig, db: &Db) -> anyhow::Result<Dataplane> {
        let dataplane = Dataplane::connect(config).await?;
        db.shards_learn(dataplane.shards()).await?;
        Ok(dataplane)
    }

    /// The data plane, if it has been reached.
    pub fn get(&self) -> Option<Arc<Dataplane>> {
        self.current.borrow().clone()
    }

    /// Waits until the data plane has been reached.
    pub async fn wait(&self) -> Arc<Dataplane> {
        let mut rx = self.current.clone();
        loop {
            if let Some(dataplane) = rx.borrow_and_update().clone() {
                return dataplane;
            }
            if rx.changed().await.is_err() {
                // The connecting task ended without a data plane: it never does, but
                // waiting forever is the honest answer then.
                std::future::pending::<()>().await;
            }
        }
    }
}
