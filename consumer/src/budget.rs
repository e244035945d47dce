//! Prefetch budgets, one per lane: bytes fetched and not yet handed to the application.
//!
//! One budget per lane keeps a backlog of bulk records held on the client from stopping
//! the fetching of express ones: each lane fetches as long as its own budget has room.
//! A response may go over a lane's reservation by one batch (the broker's caps are soft
//! by one batch); the budget then goes below zero and that lane waits until the
//! application has taken enough.

use std::sync::Mutex;

use lanes_protocol::LANES_MAX;
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct LaneBudgets {
    /// Per lane: bytes that may still be fetched (negative after an oversized batch).
    available: Mutex<[i64; LANES_MAX]>,
    freed: Notify,
}

impl LaneBudgets {
    pub(crate) fn new(bytes_per_lane: usize) -> LaneBudgets {
        let bytes = i64::try_from(bytes_per_lane).unwrap_or(i64::MAX);
        LaneBudgets {
            available: Mutex::new([bytes; LANES_MAX]),
            freed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [i64; LANES_MAX]> {
        self.available.lock().expect("budget lock poisoned")
    }

    /// Takes up to `want` bytes of `lane`'s budget; returns how many (0 if none is free).
    pub(crate) fn reserve(&self, lane: usize, want: usize) -> usize {
        let mut available = self.lock();
        let take = usize::try_from(available[lane].max(0)).unwrap_or(0).min(want);
        available[lane] -= take as i64;
        take
    }

    /// Gives bytes back (unused reservations, records handed out or dropped).
    pub(crate) fn release(&self, lane: usize, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.lock()[lane] += bytes as i64;
        self.freed.notify_waiters();
    }

    /// Takes bytes beyond a reservation (an oversized batch); may go below zero.
    pub(crate) fn charge(&self, lane: usize, bytes: usize) {
        self.lock()[lane] -= bytes as i64;
    }

    /// Waits until one of `lanes` has budget.
    pub(crate) async fn wait_for_any(&self, lanes: &[usize]) {
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            if lanes.iter().any(|&lane| self.lock()[lane] > 0) {
                return;
            }
            freed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_releases_and_oversized_batches() {
        let budgets = LaneBudgets::new(100);
        assert_eq!(budgets.reserve(0, 60), 60);
        assert_eq!(budgets.reserve(0, 60), 40);
        assert_eq!(budgets.reserve(0, 60), 0);
        assert_eq!(budgets.reserve(1, 60), 60, "lanes are separate");
        budgets.charge(0, 50);
        budgets.release(0, 30);
        assert_eq!(
            budgets.reserve(0, 10),
            0,
            "still in debt after an oversized batch"
        );
        budgets.release(0, 30);
        assert_eq!(budgets.reserve(0, 100), 10);
    }

    #[tokio::test]
    async fn waiting_ends_when_a_lane_is_freed() {
        let budgets = std::sync::Arc::new(LaneBudgets::new(10));
        assert_eq!(budgets.reserve(2, 10), 10);
        let waiter = tokio::spawn({
            let budgets = std::sync::Arc::clone(&budgets);
            async move { budgets.wait_for_any(&[2]).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        budgets.release(2, 5);
        waiter.await.unwrap();
    }
}
