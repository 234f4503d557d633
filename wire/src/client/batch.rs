//! The batch collector: how a connection's writer turns a queue of calls into batches.
//!
//! The writer waits for the first call, then gathers every call already queued, then
//! waits up to `linger` for more, and stops early when the batch is full. Under load the
//! queue is never empty and batches fill without waiting; when idle, one call waits at
//! most `linger` for company.
//!
//! tokio's timers have a resolution of one millisecond, so a linger shorter than that
//! (the default is 100 µs) is not slept: the collector yields to the scheduler until the
//! deadline passes, letting the tasks that produce calls run meanwhile. That spends a
//! little CPU per batch when idle, and no more than `linger` of it.

use std::time::Duration;

use tokio::sync::mpsc;

/// Below this, a linger is waited by yielding rather than with a timer.
const LINGER_TIMER_MIN: Duration = Duration::from_millis(1);

/// Appends `first` and then more items from `queue` to `out`, until `out` holds `max`
/// items, `linger` has passed since the call, or the queue is closed and empty.
///
/// `out` is expected empty; it keeps its capacity between batches (no allocation).
pub(crate) async fn batch_collect<T>(
    queue: &mut mpsc::Receiver<T>,
    first: T,
    out: &mut Vec<T>,
    linger: Duration,
    max: usize,
) {
    let max = max.max(1);
    out.push(first);
    batch_drain(queue, out, max);
    if out.len() >= max || linger.is_zero() {
        return;
    }
    let deadline = tokio::time::Instant::now() + linger;
    if linger < LINGER_TIMER_MIN {
        while out.len() < max && tokio::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
            if batch_drain(queue, out, max) {
                return;
            }
        }
        return;
    }
    while out.len() < max {
        match tokio::time::timeout_at(deadline, queue.recv()).await {
            Ok(Some(item)) => {
                out.push(item);
                if batch_drain(queue, out, max) {
                    return;
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// Moves what is queued now into `out`, up to `max`; true when the queue is closed and
/// empty, so that waiting longer is pointless.
fn batch_drain<T>(queue: &mut mpsc::Receiver<T>, out: &mut Vec<T>, max: usize) -> bool {
    while out.len() < max {
        match queue.try_recv() {
            Ok(item) => out.push(item),
            Err(mpsc::error::TryRecvError::Empty) => return false,
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn takes_what_is_queued_up_to_the_maximum_without_waiting() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 1..10 {
            tx.send(i).await.expect("send");
        }
        let mut out = Vec::new();
        let started = Instant::now();
        batch_collect(&mut rx, 0, &mut out, Duration::from_secs(5), 4).await;
        assert_eq!(out, vec![0, 1, 2, 3]);
        assert!(started.elapsed() < Duration::from_secs(1), "a full batch does not linger");
        out.clear();
        batch_collect(&mut rx, 100, &mut out, Duration::ZERO, 4).await;
        assert_eq!(out, vec![100, 4, 5, 6]);
    }

    #[tokio::test]
    async fn zero_linger_sends_what_is_there() {
        let (_tx, mut rx) = mpsc::channel::<u32>(4);
        let mut out = Vec::new();
        batch_collect(&mut rx, 7, &mut out, Duration::ZERO, 256).await;
        assert_eq!(out, vec![7]);
    }

    #[tokio::test]
    async fn calls_arriving_during_the_linger_join_the_batch() {
        let (tx, mut rx) = mpsc::channel(16);
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            tx.send(1).await.expect("send");
            tx.send(2).await.expect("send");
            // Keep the queue open past the linger, so that the collector must time out.
            tokio::time::sleep(Duration::from_millis(400)).await;
            drop(tx);
        });
        let mut out = Vec::new();
        let started = Instant::now();
        batch_collect(&mut rx, 0, &mut out, Duration::from_millis(100), 256).await;
        assert_eq!(out, vec![0, 1, 2]);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100) && waited < Duration::from_millis(350), "{waited:?}");
        sender.await.expect("sender");
    }

    #[tokio::test]
    async fn a_short_linger_is_waited_without_a_timer_and_stops_on_close() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(1).await.expect("send");
        let mut out = Vec::new();
        let started = Instant::now();
        batch_collect(&mut rx, 0, &mut out, Duration::from_micros(100), 256).await;
        assert_eq!(out, vec![0, 1]);
        assert!(started.elapsed() < Duration::from_millis(500));
        drop(tx);
        out.clear();
        batch_collect(&mut rx, 9, &mut out, Duration::from_secs(5), 256).await;
        assert_eq!(out, vec![9], "a closed queue ends the linger at once");
    }
}
