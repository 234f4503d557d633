//! The simulated clock's agenda: events ordered by time, then by the order they were
//! scheduled, so that two runs of one seed pop the same events in the same order.
//!
//! Invariant: time never goes backwards; an event scheduled in the past runs "now".
//! This module must not consult any clock but the simulated one.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use stockplane_engine::{PeerMessage, Reply, ShardId, Tick};
use stockplane_wire::Request;

/// Something that happens at a moment of simulated time.
#[derive(Debug, Clone)]
pub enum Event {
    /// A client's timer: think time is over, or a request timed out.
    Wake {
        /// The client.
        client: usize,
        /// The timer's token; a wake whose token is stale is ignored.
        token: u64,
    },
    /// A client's request reaches a shard.
    Request {
        /// The shard.
        shard: ShardId,
        /// The client.
        client: usize,
        /// The request.
        request: Request,
    },
    /// A shard's reply reaches a client.
    Reply {
        /// The client.
        client: usize,
        /// The reply.
        reply: Reply,
    },
    /// A message between shards arrives.
    Peer {
        /// The receiver.
        to: ShardId,
        /// The sender.
        from: ShardId,
        /// The message.
        message: PeerMessage,
    },
    /// A shard's fsync completes.
    Fsync {
        /// The shard.
        shard: ShardId,
        /// The shard's life it was issued in; a crash makes it stale.
        epoch: u64,
    },
    /// A shard loses power.
    Crash {
        /// The shard.
        shard: ShardId,
    },
    /// A crashed shard starts again from its durable bytes.
    Restart {
        /// The shard.
        shard: ShardId,
    },
    /// An operator restarts a shard whose disk failed (its supervisor kills it, and it
    /// starts again from what its disk kept).
    OperatorRestart {
        /// The shard.
        shard: ShardId,
        /// The shard's life whose disk failed; a crash since makes it stale.
        epoch: u64,
    },
}

struct Scheduled {
    at: Tick,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: the heap pops the earliest (time, sequence) first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Events waiting for their time.
#[derive(Default)]
pub struct Agenda {
    heap: BinaryHeap<Scheduled>,
    seq: u64,
}

impl Agenda {
    /// Schedules `event` at `at`.
    pub fn push(&mut self, at: Tick, event: Event) {
        self.seq += 1;
        self.heap.push(Scheduled { at, seq: self.seq, event });
    }

    /// The time of the earliest event.
    pub fn next_at(&self) -> Option<Tick> {
        self.heap.peek().map(|s| s.at)
    }

    /// Removes and returns the earliest event.
    pub fn pop(&mut self) -> Option<(Tick, Event)> {
        self.heap.pop().map(|s| (s.at, s.event))
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}
