//! The data plane's configuration: a TOML file whose every key has a default.
//!
//! `dataplane/dataplane.toml` lists every key with its default and what it bounds; a test
//! keeps that file and [`Config::default`] equal. The command line overrides a few keys
//! (`--listen`, `--cores`, ...); everything else comes from the file or the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use stockplane_engine::ShardConfig;
use stockplane_wire::frame::Limits;

/// Everything the data plane needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The UDP address every core's QUIC endpoint binds (with `SO_REUSEPORT`).
    pub listen: SocketAddr,
    /// The HTTP address of `/metrics`, `/healthz` and `/readyz`.
    pub admin_listen: SocketAddr,
    /// How many cores run a shard; 0 means every core of the machine.
    pub cores: usize,
    /// The first CPU to pin to; core `k` runs on CPU `cpu_first + k`.
    pub cpu_first: usize,
    /// Bytes of DMA memory each executor reserves for io_uring (locked memory).
    pub io_memory_bytes: usize,
    /// Microseconds an idle executor keeps polling before it sleeps in the kernel. A
    /// sleeping core wakes late, most of all a virtual CPU that halts (the hypervisor must
    /// schedule it again), so a longer spin lowers latency at moderate load; but a spinning
    /// shard leaves a `SCHED_IDLE` snapshot thread on its CPU almost no time (the kill -9
    /// test took no snapshot at 1000 us on two shards of two CPUs). Raise it only when
    /// some CPUs run no shard: background threads go there (`server::background_cpus`).
    /// A spinning shard keeps its CPU busy even when idle, which costs on a virtual
    /// machine that stops when all its vCPUs are busy at once (`jitter --cpus`).
    pub spin_before_park_us: u64,
    /// Where each shard keeps its write-ahead log (`<data_dir>/shard-<k>/`).
    pub data_dir: PathBuf,
    /// The write-ahead log.
    pub wal: WalSettings,
    /// Certificates and keys.
    pub tls: TlsFiles,
    /// Limits on what clients may send.
    pub limits: ClientLimits,
    /// QUIC transport settings.
    pub quic: Quic,
    /// Bounds of each core's shard (`shard` and `shards` come from `cores`, not the file).
    pub shard: ShardConfig,
    /// Cross-core message mesh.
    pub mesh: Mesh,
}

/// The write-ahead log's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalSettings {
    /// `sync`: a reply to a state change leaves after the `fdatasync` that covers it;
    /// `batch=<ms>`: replies leave at once and the log is synced every `ms`, so up to
    /// that much acknowledged work can be lost with the machine; `none`: nothing is
    /// written (benchmarks of the server without its disk only).
    pub durability: String,
    /// Size of each log segment file (preallocated and zero-filled ahead of use).
    pub segment_bytes: u64,
    /// Cut the log at a damaged record instead of refusing to start (losing what follows).
    pub truncate_corrupt_tail: bool,
    /// Take a snapshot after this many more segments were closed (0: never). Snapshots
    /// are written on a thread of its own; the two newest are kept, and the segments the
    /// older one covers are deleted.
    pub snapshot_every_segments: u32,
    /// Where each snapshot's state comes from (`docs/wal.md`, "Snapshots"):
    /// - `files` (the default): the previous snapshot and the closed segments read back
    ///   from disk and replayed on the snapshot thread (memory only while a snapshot is
    ///   built; the log is read twice, the work comes in bursts and falls behind under load);
    /// - `replica`: a replica of the shard's state on the snapshot thread, fed every durable
    ///   batch (a second copy of the state in memory, and the replay's CPU spread evenly, a
    ///   quarter of a core at 850 k requests/s; nothing read back): for machines with a
    ///   core to spare beside the shards;
    /// - `fork`: a copy of the serving process (`fork`, its memory shared copy-on-write)
    ///   archives the shard's state as it is and writes it; the serving core pauses for the
    ///   fork, and pays a page copy for each page it writes while the copy runs; the work is
    ///   the state's size, not the log's.
    pub snapshot_source: SnapshotSource,
    /// The share of the disk's time, in percent (1 to 100), that a snapshot's own reads
    /// and writes may take beside the serving log: after each 128 KiB it reads, or writes
    /// and syncs, it waits so that its I/O is busy that share of the time. 100: as fast as
    /// the disk goes. A log `fdatasync` waits for whatever is in the disk's queue and cache
    /// before it; a snapshot at full speed puts megabytes there (`docs/wal.md`, "Pacing").
    pub snapshot_disk_percent: u8,
    /// Under `sync`, while the core spends most of its time serving (75% on average over
    /// about the last 10 ms), the next group-commit round starts no sooner than this many
    /// microseconds after the previous one, so that each round's fixed cost (a write, an
    /// `fdatasync`, their interrupts) is paid for more records. Below that load a round
    /// starts as soon as the previous one allows. 0: never wait (`docs/wal.md`, "Rounds
    /// under load"). At most 100,000.
    pub busy_round_interval_us: u32,
}

/// Where snapshots come from (`wal.snapshot_source`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotSource {
    /// The previous snapshot and the closed segments, read back and replayed.
    #[default]
    Files,
    /// A replica of the state fed every durable batch.
    Replica,
    /// A forked copy of the serving process.
    Fork,
}

impl Default for WalSettings {
    fn default() -> WalSettings {
        WalSettings {
            durability: "sync".into(),
            segment_bytes: 64 << 20,
            truncate_corrupt_tail: false,
            snapshot_every_segments: 4,
            snapshot_source: SnapshotSource::Files,
            snapshot_disk_percent: 50,
            busy_round_interval_us: 2_000,
        }
    }
}

/// Where the TLS material is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
    /// The CA that signs client certificates (PEM); clients without one are refused.
    pub client_ca: PathBuf,
}

/// Limits on clients, each answered with a status or a documented close code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientLimits {
    /// Largest frame, header included; a larger one resets the stream (`Oversized`).
    pub frame_bytes_max: u32,
    /// Most requests in one frame; more resets the stream (`TooManyRequests`).
    pub requests_per_frame_max: u32,
    /// Bidirectional streams a client may have open at once on a connection (at most 254).
    pub streams_per_connection_max: u32,
    /// Connections each core serves; more are closed with `TOO_MANY_CONNECTIONS`.
    pub connections_per_core_max: u32,
    /// Requests of one connection waiting for their answer; more are answered `Busy`.
    pub requests_in_flight_per_connection_max: u32,
    /// Sustained requests per second a connection may send; more are answered `RateLimited`.
    pub requests_per_s_per_connection: u32,
    /// Requests a connection may send at once above its sustained rate.
    pub requests_burst_per_connection: u32,
}

/// QUIC transport settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quic {
    /// A connection silent for this long is closed.
    pub idle_timeout_ms: u32,
    /// Largest UDP payload the endpoint sends after path MTU discovery (loopback allows
    /// much more than Ethernet's 1452).
    pub udp_payload_bytes_max: u16,
    /// Bytes a client may have in flight on one stream before it must wait for the server.
    pub stream_receive_window_bytes: u32,
    /// Bytes a client may have in flight on a connection.
    pub connection_receive_window_bytes: u32,
    /// Bytes of replies the server keeps in flight per connection.
    pub send_window_bytes: u64,
    /// UDP socket buffer size, both directions.
    pub socket_buffer_bytes: usize,
    /// The congestion window a connection starts with (and its pacing rate with it); a
    /// data plane talks to checkout services in its own data centre, where QUIC's
    /// Internet default (about 14 KB) only delays the first round trips of every burst.
    pub initial_window_bytes: u64,
}

/// The cross-core message mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mesh {
    /// Messages (each a batch) queued between two cores before the sender waits.
    pub channel_messages_max: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: "127.0.0.1:7400".parse().expect("a literal address"),
            admin_listen: "127.0.0.1:7401".parse().expect("a literal address"),
            cores: 0,
            cpu_first: 0,
            io_memory_bytes: 2 << 20,
            spin_before_park_us: 50,
            data_dir: "target/data".into(),
            wal: WalSettings::default(),
            tls: TlsFiles::default(),
            limits: ClientLimits::default(),
            quic: Quic::default(),
            shard: ShardConfig::default(),
            mesh: Mesh::default(),
        }
    }
}

impl Default for TlsFiles {
    fn default() -> TlsFiles {
        TlsFiles {
            cert: "target/certs/server.pem".into(),
            key: "target/certs/server.key".into(),
            client_ca: "target/certs/ca.pem".into(),
        }
    }
}

impl Default for ClientLimits {
    fn default() -> ClientLimits {
        ClientLimits {
            frame_bytes_max: Limits::FRAME_BYTES_MAX_DEFAULT,
            requests_per_frame_max: Limits::REQUESTS_PER_FRAME_MAX_DEFAULT,
            streams_per_connection_max: 16,
            connections_per_core_max: 4_096,
            requests_in_flight_per_connection_max: 16_384,
            requests_per_s_per_connection: 2_000_000,
            requests_burst_per_connection: 200_000,
        }
    }
}

impl Default for Quic {
    fn default() -> Quic {
        Quic {
            idle_timeout_ms: 30_000,
            udp_payload_bytes_max: 1_452,
            stream_receive_window_bytes: 4 << 20,
            connection_receive_window_bytes: 16 << 20,
            send_window_bytes: 16 << 20,
            socket_buffer_bytes: 4 << 20,
            initial_window_bytes: 4 << 20,
        }
    }
}

impl Default for Mesh {
    fn default() -> Mesh {
        Mesh { channel_messages_max: 1_024 }
    }
}

impl Config {
    /// Reads a TOML file; keys it leaves out keep their defaults, unknown keys are errors.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let config: Config = toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        Ok(config)
    }

    /// The number of cores to run: `cores`, or every CPU of the machine when it is 0.
    pub fn core_count(&self) -> usize {
        if self.cores > 0 {
            self.cores
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }

    /// The durability mode `wal.durability` names.
    pub fn durability(&self) -> anyhow::Result<crate::wal::Durability> {
        self.wal.durability.parse().map_err(|e: String| anyhow::anyhow!("wal.durability: {e}"))
    }

    /// The frame limits that every core checks.
    pub fn frame_limits(&self) -> Limits {
        Limits {
            frame_bytes_max: self.limits.frame_bytes_max,
            requests_per_frame_max: self.limits.requests_per_frame_max,
        }
    }

    /// The engine configuration of shard `shard` of `shards`.
    pub fn shard_config(&self, shard: u32, shards: u32) -> ShardConfig {
        ShardConfig { shard, shards, ..self.shard.clone() }
    }

    /// Checks the settings against each other, before anything starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        let cores = self.core_count();
        if cores > 255 {
            bail!("cores must be at most 255, not {cores}");
        }
        let l = &self.limits;
        if l.streams_per_connection_max == 0 || l.streams_per_connection_max > 254 {
            bail!("limits.streams_per_connection_max must be in 1..=254");
        }
        if l.connections_per_core_max == 0 || l.connections_per_core_max > 65_535 {
            bail!("limits.connections_per_core_max must be in 1..=65535");
        }
        if l.requests_in_flight_per_connection_max == 0 || l.requests_per_s_per_connection == 0 {
            bail!("limits.requests_in_flight_per_connection_max and requests_per_s_per_connection must be above 0");
        }
        if l.requests_per_frame_max == 0 || (l.frame_bytes_max as usize) < stockplane_wire::frame::HEADER_LEN * 2 {
            bail!("limits.requests_per_frame_max must be above 0 and frame_bytes_max at least 32");
        }
        if self.quic.udp_payload_bytes_max < 1_200 {
            bail!("quic.udp_payload_bytes_max must be at least 1200 (QUIC's minimum)");
        }
        self.durability()?;
        crate::wal::DiskShare::percent(self.wal.snapshot_disk_percent).context("wal.snapshot_disk_percent")?;
        if self.wal.busy_round_interval_us > 100_000 {
            bail!(
                "wal.busy_round_interval_us must be at most 100000 (100 ms), not {}",
                self.wal.busy_round_interval_us
            );
        }
        if self.wal.segment_bytes < 1 << 20 || !self.wal.segment_bytes.is_multiple_of(crate::wal::BLOCK) {
            bail!("wal.segment_bytes must be at least 1 MiB and a multiple of {}", crate::wal::BLOCK);
        }
        if self.mesh.channel_messages_max == 0 {
            bail!("mesh.channel_messages_max must be above 0");
        }
        self.shard_config(0, cores as u32).validate().context("shard bounds")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_file_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataplane.toml");
        let config = Config::load(&path).expect("load dataplane.toml");
        assert_eq!(config, Config::default());
        // Every key of the defaults appears in the file, uncommented.
        let text = std::fs::read_to_string(&path).unwrap();
        let defaults = toml::to_string(&Config::default()).unwrap();
        for line in defaults.lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap();
            assert!(text.lines().any(|l| l.starts_with(&format!("{key} = "))), "dataplane.toml lacks {key}");
        }
        config.validate().expect("the defaults are valid");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let error = toml::from_str::<Config>("listne = \"127.0.0.1:1\"").unwrap_err();
        assert!(error.to_string().contains("unknown field"), "{error}");
        let config: Config = toml::from_str("[limits]\nstreams_per_connection_max = 300").unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("streams_per_connection_max"));
        let config: Config = toml::from_str("[shard]\ncart_lines_max = 0").unwrap();
        assert!(format!("{:#}", config.validate().unwrap_err()).contains("cart_lines_max"));
        for percent in [0, 101] {
            let config: Config = toml::from_str(&format!("[wal]\nsnapshot_disk_percent = {percent}")).unwrap();
            let error = format!("{:#}", config.validate().unwrap_err());
            assert!(error.contains("snapshot_disk_percent") && error.contains("1 to 100"), "{error}");
        }
        let error = toml::from_str::<Config>("[wal]\nsnapshot_disk_percent = 300").unwrap_err();
        assert!(error.to_string().contains("snapshot_disk_percent"), "{error}");
        let config: Config = toml::from_str("[wal]\nbusy_round_interval_us = 100001").unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("busy_round_interval_us"));
        let config: Config = toml::from_str("[wal]\nbusy_round_interval_us = 0").unwrap();
        config.validate().expect("0 turns the spacing off");
    }

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let config: Config = toml::from_str("cores = 3\n[quic]\nidle_timeout_ms = 5").unwrap();
        assert_eq!(config.cores, 3);
        assert_eq!(config.quic.idle_timeout_ms, 5);
        assert_eq!(config.quic.udp_payload_bytes_max, Quic::default().udp_payload_bytes_max);
        assert_eq!(config.limits, ClientLimits::default());
    }
}
