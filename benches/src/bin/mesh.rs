//! Mesh benchmark: how many messages per second glommio's channel mesh moves from one
//! executor to another, batched as the data plane batches them.
//!
//! Two `LocalExecutor`s, pinned to two CPUs (`Placement::Fixed`), join a
//! `MeshBuilder::<Vec<Reply>, Full>::full(2, capacity)`, the same kind of mesh the data
//! plane's cores use. The producer sends batches (a `Vec` of `batch` engine `Reply`s, the
//! payload of the server's `MeshMessage::Replies`) to the consumer, which reads every
//! message and, by default, sends the emptied `Vec` back on the reverse channel so that
//! the producer refills it: the measurement is the mesh, not the allocator (each batch
//! then costs two channel messages, one each way; `--no-recycle` allocates a fresh `Vec`
//! per batch and frees it on the consumer, as the server does today).
//!
//! A case ends when its time is up: the producer closes its side, the consumer drains
//! the channel and closes its own, and the producer's clock stops when it sees that, so
//! every message sent is counted as received. The report is plain text, headed like every
//! other report in `perf-reports/`.
//!
//! Run with `make bench-mesh`, or
//! `cargo run --release -p stockplane-benches --bin mesh -- --seconds 2`.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::{GlommioError, LocalExecutorBuilder, Placement, ResourceType};
use stockplane_engine::Reply;
use stockplane_loadgen::machine::report_header;
use stockplane_wire::{Body, Status};

/// How many batches the producer sends between two looks at the clock.
const CLOCK_EVERY_BATCHES: u64 = 64;

/// The mesh benchmark: messages per second between two pinned glommio executors.
#[derive(Debug, Clone, Parser)]
#[command(about)]
struct Cli {
    /// Seconds per case.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Messages per batch, one case each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    batches: Vec<usize>,
    /// Batches a channel holds before the sender waits (the server's
    /// `mesh.channel_messages_max` default).
    #[arg(long, default_value_t = 1_024)]
    capacity: usize,
    /// The two executors' CPUs.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    cpus: Vec<usize>,
    /// Allocate a new `Vec` per batch (freed by the consumer) instead of sending it back.
    #[arg(long)]
    no_recycle: bool,
    /// How long an idle executor spins before it parks (the data plane uses 50 us).
    #[arg(long, default_value_t = 50)]
    spin_before_park_us: u64,
}

/// What one case measured, on the producer's clock.
struct CaseResult {
    messages: u64,
    batches: u64,
    elapsed: Duration,
    received: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.cpus.len() != 2 || cli.cpus[0] == cli.cpus[1] {
        bail!("--cpus takes two different CPUs");
    }
    if cli.batches.contains(&0) || cli.capacity == 0 || cli.seconds <= 0.0 {
        bail!("--batches, --capacity and --seconds must be above 0");
    }
    print!("{}", report_header("stockplane mesh benchmark (glommio channel_mesh, two pinned executors)"));
    println!(
        "parameters: {} s per case, channel capacity {} batches, executors pinned to CPUs {} and {} \
         (mesh peer 0, the lower executor id, produces), message = engine Reply ({} bytes), {}, spin before park {} us",
        cli.seconds,
        cli.capacity,
        cli.cpus[0],
        cli.cpus[1],
        std::mem::size_of::<Reply>(),
        if cli.no_recycle {
            "a new Vec per batch, freed by the consumer"
        } else {
            "Vecs recycled: the consumer sends each emptied Vec back (one message each way per batch)"
        },
        cli.spin_before_park_us
    );
    println!();
    println!(
        "{:>7} {:>14} {:>13} {:>12} {:>12} {:>10}",
        "batch", "messages/s", "batches/s", "ns/batch", "ns/message", "seconds"
    );
    for &batch in &cli.batches {
        let result = run_case(&cli, batch).with_context(|| format!("run the case of batch {batch}"))?;
        if result.received != result.messages {
            bail!("batch {batch}: sent {} messages but the consumer counted {}", result.messages, result.received);
        }
        let secs = result.elapsed.as_secs_f64();
        println!(
            "{:>7} {:>14.0} {:>13.0} {:>12.1} {:>12.2} {:>10.2}",
            batch,
            result.messages as f64 / secs,
            result.batches as f64 / secs,
            secs * 1e9 / result.batches as f64,
            secs * 1e9 / result.messages as f64,
            secs
        );
    }
    Ok(())
}

/// One case: a fresh mesh, two fresh executors, `batch` messages per batch.
fn run_case(cli: &Cli, batch: usize) -> anyhow::Result<CaseResult> {
    let mesh = MeshBuilder::<Vec<Reply>, Full>::full(2, cli.capacity);
    let recycle = !cli.no_recycle;
    let duration = Duration::from_secs_f64(cli.seconds);
    let capacity = cli.capacity;
    let mut handles = Vec::with_capacity(2);
    for (role, &cpu) in cli.cpus.iter().enumerate() {
        let mesh = mesh.clone();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(if role == 0 { "mesh-producer" } else { "mesh-consumer" })
            .io_memory(512 << 10)
            .spin_before_park(Duration::from_micros(cli.spin_before_park_us))
            .spawn(move || async move {
                let (senders, receivers) = mesh.join().await.map_err(|e| anyhow!("join the mesh: {e}"))?;
                // The mesh numbers peers by executor id; peer 0 produces.
                if senders.peer_id() == 0 {
                    run_case_produce(senders, receivers, batch, duration, recycle, capacity).await
                } else {
                    run_case_consume(senders, receivers, recycle).await
                }
            })
            .map_err(|e| anyhow!("start an executor on CPU {cpu}: {e}"))?;
        handles.push(handle);
    }
    let mut produced = None;
    let mut received = None;
    for handle in handles {
        match handle.join().map_err(|e| anyhow!("an executor failed: {e}"))?? {
            Side::Produced(result) => produced = Some(result),
            Side::Consumed(count) => received = Some(count),
        }
    }
    let mut result = produced.context("no producer finished")?;
    result.received = received.context("no consumer finished")?;
    Ok(result)
}

/// What each executor returns.
enum Side {
    Produced(CaseResult),
    Consumed(u64),
}

/// Sends batches to peer 1 until `duration` is up, then waits for the consumer to finish.
async fn run_case_produce(
    senders: Senders<Vec<Reply>>,
    mut receivers: Receivers<Vec<Reply>>,
    batch: usize,
    duration: Duration,
    recycle: bool,
    capacity: usize,
) -> anyhow::Result<Side> {
    let (_, returns) = receivers.streams().pop().context("no channel from the consumer")?;
    // No more Vecs than the return channel holds, so that the consumer never waits on it.
    let mut pool: Vec<Vec<Reply>> =
        if recycle { (0..capacity).map(|_| Vec::with_capacity(batch)).collect() } else { Vec::new() };
    let started = Instant::now();
    let deadline = started + duration;
    let (mut messages, mut batches) = (0u64, 0u64);
    loop {
        if batches.is_multiple_of(CLOCK_EVERY_BATCHES) && Instant::now() >= deadline {
            break;
        }
        let mut replies = if !recycle {
            Vec::with_capacity(batch)
        } else if let Some(replies) = pool.pop() {
            replies
        } else {
            returns.recv().await.context("the consumer closed early")?
        };
        for i in 0..batch as u64 {
            replies.push(Reply { client: 7, request_id: messages + i, status: Status::Reserved, body: Body::Empty });
        }
        match senders.try_send_to(1, replies) {
            Ok(()) => {}
            Err(GlommioError::WouldBlock(ResourceType::Channel(replies))) => {
                senders.send_to(1, replies).await.map_err(|e| anyhow!("send a batch: {e}"))?;
            }
            Err(error) => bail!("send a batch: {error}"),
        }
        messages += batch as u64;
        batches += 1;
    }
    senders.close();
    // The consumer closes its side once it has read everything.
    while returns.recv().await.is_some() {}
    Ok(Side::Produced(CaseResult { messages, batches, elapsed: started.elapsed(), received: 0 }))
}

/// Reads batches from peer 0 until it closes, touching every message; sends each emptied
/// `Vec` back when recycling.
async fn run_case_consume(
    senders: Senders<Vec<Reply>>,
    mut receivers: Receivers<Vec<Reply>>,
    recycle: bool,
) -> anyhow::Result<Side> {
    let (_, incoming) = receivers.streams().pop().context("no channel from the producer")?;
    let (mut count, mut check) = (0u64, 0u64);
    while let Some(mut replies) = incoming.recv().await {
        count += replies.len() as u64;
        for reply in &replies {
            check ^= reply.request_id;
        }
        if recycle {
            replies.clear();
            senders.send_to(0, replies).await.map_err(|e| anyhow!("return a batch: {e}"))?;
        }
    }
    senders.close();
    std::hint::black_box(check);
    Ok(Side::Consumed(count))
}
