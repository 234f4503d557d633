//! Frame codec cost per request: encoding a 256-request batch into a reused buffer, and
//! decoding it with full bytecheck validation, as the data plane does for every frame.
//!
//! The batch is what a checkout fleet sends during a sale: half single-line reserves,
//! a fifth three-line carts, a fifth commits and a tenth releases. Throughput is counted
//! in requests, so criterion's time per element is the cost per request. Back of the
//! envelope: a shard's budget is about 1 µs per request in all, so the codec should stay
//! well under 50 ns per request.

use std::hint::black_box;

use criterion::{criterion_main, Criterion, Throughput};

use stockplane_wire::{
    frame::{decode_requests, encode_requests, encode_requests_into, AlignedVec, Limits},
    CartLine, HoldId, Op, Request, RequestBatch,
};

const BATCH_REQUESTS: usize = 256;

/// A deterministic xorshift stream: the batch is the same on every run.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

fn cart_line(rng: &mut Xorshift) -> CartLine {
    CartLine {
        sku: 1_000_000 + rng.below(200_000),
        location: if rng.below(4) == 0 { Some(rng.below(8) as u32) } else { None },
        qty: 1 + rng.below(3) as u32,
    }
}

fn hold(rng: &mut Xorshift) -> HoldId {
    HoldId((u128::from(rng.next()) << 64) | u128::from(rng.next()))
}

fn batch_realistic(requests: usize) -> RequestBatch {
    let mut rng = Xorshift(0x5eed_cafe_f00d_d00d);
    let requests = (0..requests as u64)
        .map(|id| {
            let op = match rng.below(10) {
                0..=4 => Op::Reserve { hold: hold(&mut rng), ttl_ms: 600_000, lines: vec![cart_line(&mut rng)] },
                5 | 6 => Op::Reserve {
                    hold: hold(&mut rng),
                    ttl_ms: 600_000,
                    lines: (0..3).map(|_| cart_line(&mut rng)).collect(),
                },
                7 | 8 => Op::Commit { hold: hold(&mut rng), lines: None },
                _ => Op::Release { hold: hold(&mut rng) },
            };
            Request { id, op }
        })
        .collect();
    RequestBatch { requests }
}

fn frame(c: &mut Criterion) {
    let batch = batch_realistic(BATCH_REQUESTS);
    let frame = encode_requests(&batch);
    let limits = Limits::default();
    assert_eq!(decode_requests(&frame, &limits).map(|b| b.requests.len()), Ok(BATCH_REQUESTS));

    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(BATCH_REQUESTS as u64));

    let mut out = AlignedVec::with_capacity(frame.len());
    group.bench_function("encode_256_into_reused_buffer", |b| {
        b.iter(|| {
            encode_requests_into(&mut out, black_box(&batch));
            black_box(out.len())
        })
    });

    group.bench_function("decode_256_validated", |b| {
        b.iter(|| {
            let batch = decode_requests(black_box(&frame), &limits);
            black_box(batch.map(|batch| batch.requests.len()))
        })
    });

    group.finish();
    println!(
        "frame: {} requests in {} bytes ({} bytes per request)",
        BATCH_REQUESTS,
        frame.len(),
        frame.len() / BATCH_REQUESTS
    );
}

// criterion_group! defines an undocumented `pub fn benches`; a private module keeps it
// out of the workspace's missing_docs lint.
mod group {
    criterion::criterion_group!(benches, super::frame);
}
criterion_main!(group::benches);
