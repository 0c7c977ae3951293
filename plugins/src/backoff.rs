//! Exponential backoff with jitter, shared by the spool drain and the sinks' own retries.

use std::time::Duration;

use rand::Rng;

/// Doubling delays between `min` and `max`, each scaled by a random factor in [0.5, 1].
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays starting at `min`, capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay to wait now; the following one doubles (up to the cap).
    pub fn step(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(self.max);
        cap.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }

    /// Jump straight to longer delays (the service said to slow down).
    pub fn slow_down(&mut self) {
        self.next = (self.next * 4).min(self.max);
    }

    /// Back to the shortest delay after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let d: Vec<_> = (0..5).map(|_| b.step()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[2] >= Duration::from_millis(200) && d[2] <= Duration::from_millis(400));
        assert!(d[4] <= Duration::from_millis(500));
        b.reset();
        assert!(b.step() <= Duration::from_millis(100));
    }
}
