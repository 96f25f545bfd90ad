//! Time as a plain input value: core code never reads a clock.

/// Milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    /// This instant moved forward by `ms` (saturating).
    pub fn plus_ms(self, ms: i64) -> Self {
        UnixMillis(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, never negative.
    pub fn millis_since(self, earlier: UnixMillis) -> i64 {
        self.0.saturating_sub(earlier.0).max(0)
    }
}
