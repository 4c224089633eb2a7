//! One key's running totals in this process: the current UTC day and month.
//!
//! Both periods are kept for every tracked key, so that changing a key's
//! budget period takes effect at once with the right total. A total belongs to
//! the period that starts at `start`; a cost of a later period (or a check in
//! one) rolls it over to 0 first, a cost of an earlier period is not counted
//! (that period is over).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::BudgetPeriod;

/// How long after a failed seed the key is decided on the local count alone
/// before the ledger is asked again.
const SEED_RETRY: Duration = Duration::from_secs(10);

/// Spend of one key in the ledger, since the start of a day and of a month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sums {
    pub day_start: DateTime<Utc>,
    pub day: i64,
    pub month_start: DateTime<Utc>,
    pub month: i64,
}

/// The spend of one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Running {
    start: DateTime<Utc>,
    spent: i64,
}

impl Running {
    /// Moves to the period containing `now` if that is a later one.
    fn roll(&mut self, period: BudgetPeriod, now: DateTime<Utc>) {
        let start = period.start(now);
        if start > self.start {
            *self = Running { start, spent: 0 };
        }
    }

    fn add(&mut self, period: BudgetPeriod, cost: i64, started_at: DateTime<Utc>) {
        let start = period.start(started_at);
        if start == self.start {
            self.spent = self.spent.saturating_add(cost);
        } else if start > self.start {
            *self = Running { start, spent: cost };
        }
    }
}

/// Where a key's totals came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seed {
    /// Read from the ledger, then kept up to date.
    Seeded,
    /// The ledger is being read; costs arriving meanwhile are counted on top
    /// of `base` (what was counted when the read began).
    Seeding { base_day: i64, base_month: i64 },
    /// The ledger could not be read; counted here only until `retry_at`.
    Unseeded { retry_at: Instant },
}

/// The day and month totals of one key.
#[derive(Debug, Clone)]
pub(super) struct KeyTotals {
    day: Running,
    month: Running,
    seed: Seed,
}

impl KeyTotals {
    /// Empty totals for the periods containing `now`, not yet seeded.
    pub fn new(now: DateTime<Utc>) -> KeyTotals {
        KeyTotals {
            day: Running {
                start: BudgetPeriod::Day.start(now),
                spent: 0,
            },
            month: Running {
                start: BudgetPeriod::Month.start(now),
                spent: 0,
            },
            seed: Seed::Unseeded {
                retry_at: Instant::now(),
            },
        }
    }

    /// Whether the totals can be used without asking the ledger first.
    pub fn is_ready(&self) -> bool {
        match self.seed {
            Seed::Seeded => true,
            Seed::Seeding { .. } => false,
            Seed::Unseeded { retry_at } => Instant::now() < retry_at,
        }
    }

    /// Marks the start of a read of the ledger at `now`.
    pub fn begin_seed(&mut self, now: DateTime<Utc>) {
        self.day.roll(BudgetPeriod::Day, now);
        self.month.roll(BudgetPeriod::Month, now);
        self.seed = Seed::Seeding {
            base_day: self.day.spent,
            base_month: self.month.spent,
        };
    }

    /// Takes the ledger's sums. A row cannot be both in the sums and among
    /// the costs added since the read began (a cost is added when its record
    /// is finalised, before the record can reach the store), so those costs go
    /// on top; what was counted before the read is replaced by the ledger's
    /// figure unless it is larger (then the ledger had not caught up).
    pub fn finish_seed(&mut self, sums: Sums) {
        let (base_day, base_month) = match self.seed {
            Seed::Seeding {
                base_day,
                base_month,
            } => (base_day, base_month),
            _ => (self.day.spent, self.month.spent),
        };
        merge(&mut self.day, sums.day_start, sums.day, base_day);
        merge(&mut self.month, sums.month_start, sums.month, base_month);
        self.seed = Seed::Seeded;
    }

    /// The ledger could not be read: count locally, try again later.
    pub fn seed_failed(&mut self) {
        self.seed = Seed::Unseeded {
            retry_at: Instant::now() + SEED_RETRY,
        };
    }

    /// Counts a finalised cost in the periods its request started in.
    pub fn add(&mut self, cost: i64, started_at: DateTime<Utc>) {
        self.day.add(BudgetPeriod::Day, cost, started_at);
        self.month.add(BudgetPeriod::Month, cost, started_at);
    }

    /// The spend of the period containing `now`.
    pub fn spent(&mut self, period: BudgetPeriod, now: DateTime<Utc>) -> i64 {
        let running = self.running(period);
        running.roll(period, now);
        running.spent
    }

    /// Raises the total of the current period to `total` (seen in Redis).
    pub fn observe(&mut self, period: BudgetPeriod, now: DateTime<Utc>, total: i64) {
        let running = self.running(period);
        running.roll(period, now);
        if running.start == period.start(now) {
            running.spent = running.spent.max(total);
        }
    }

    fn running(&mut self, period: BudgetPeriod) -> &mut Running {
        match period {
            BudgetPeriod::Day => &mut self.day,
            BudgetPeriod::Month => &mut self.month,
        }
    }
}

fn merge(running: &mut Running, start: DateTime<Utc>, ledger: i64, base: i64) {
    // A total that rolled over while the ledger was read belongs to a newer
    // period than the sum: keep it.
    if running.start == start {
        let added_since = running.spent.saturating_sub(base);
        running.spent = base.max(ledger).saturating_add(added_since);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn sums(now: DateTime<Utc>, day: i64, month: i64) -> Sums {
        Sums {
            day_start: BudgetPeriod::Day.start(now),
            day,
            month_start: BudgetPeriod::Month.start(now),
            month,
        }
    }

    #[test]
    fn costs_during_a_seed_go_on_top_of_the_ledger() {
        let now = t("2025-03-10T12:00:00Z");
        let mut k = KeyTotals::new(now);
        k.begin_seed(now);
        assert!(!k.is_ready());
        k.add(7, now);
        k.finish_seed(sums(now, 100, 1000));
        assert!(k.is_ready());
        assert_eq!(k.spent(BudgetPeriod::Day, now), 107);
        assert_eq!(k.spent(BudgetPeriod::Month, now), 1007);
    }

    #[test]
    fn costs_file_under_the_period_their_request_started_in() {
        let now = t("2025-03-31T23:59:00Z");
        let mut k = KeyTotals::new(now);
        k.begin_seed(now);
        k.finish_seed(sums(now, 5, 50));
        // Started before midnight, finished after: yesterday's and March's.
        k.add(3, t("2025-03-31T23:59:30Z"));
        let after = t("2025-04-01T00:00:10Z");
        assert_eq!(k.spent(BudgetPeriod::Day, after), 0);
        assert_eq!(k.spent(BudgetPeriod::Month, after), 0);
        k.add(2, after);
        // A late cost of the previous period no longer counts anywhere.
        k.add(1000, t("2025-03-31T23:00:00Z"));
        assert_eq!(k.spent(BudgetPeriod::Day, after), 2);
        assert_eq!(k.spent(BudgetPeriod::Month, after), 2);
    }

    #[test]
    fn a_failed_seed_counts_locally_and_retries_later() {
        let now = t("2025-03-10T12:00:00Z");
        let mut k = KeyTotals::new(now);
        k.begin_seed(now);
        k.seed_failed();
        assert!(k.is_ready(), "decided locally until the retry");
        k.add(40, now);
        // The retry finds the ledger behind what was counted: keep the larger.
        k.begin_seed(now);
        k.finish_seed(sums(now, 30, 30));
        assert_eq!(k.spent(BudgetPeriod::Day, now), 40);
    }

    #[test]
    fn shared_totals_only_raise_the_local_one() {
        let now = t("2025-03-10T12:00:00Z");
        let mut k = KeyTotals::new(now);
        k.begin_seed(now);
        k.finish_seed(sums(now, 10, 10));
        k.observe(BudgetPeriod::Day, now, 500);
        k.observe(BudgetPeriod::Day, now, 20);
        assert_eq!(k.spent(BudgetPeriod::Day, now), 500);
        assert_eq!(k.spent(BudgetPeriod::Month, now), 10);
    }
}
