//! The in-flight byte budget (`server.max_in_flight_bytes`, SPEC §1 "Limits on one request"):
//! the bytes of every request being worked on, counted in KiB permits of one semaphore.
//!
//! A request reserves its share with [`Budget::try_acquire`] and holds the [`Permit`] until it
//! is answered; when the budget cannot cover it the request is refused at once (`503` with
//! `Retry-After`), never queued, so memory in flight stays bounded whatever the senders do.
//! Any route that holds request data in memory (the event webhook, the inbound one) shares the
//! one budget of the process.

use std::sync::Arc;

use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const KIB: u64 = 1024;

/// The budget could not cover a reservation now.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
#[error(
    "{requested} bytes do not fit in the in-flight budget now ({available} of {total} bytes free)"
)]
pub struct Busy {
    pub requested: u64,
    pub available: u64,
    pub total: u64,
}

/// The process-wide byte budget; cheap to clone.
#[derive(Debug, Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    total_kib: u32,
}

/// A reservation, returned to the budget when dropped.
#[derive(Debug)]
pub struct Permit {
    _permit: Option<OwnedSemaphorePermit>,
}

#[cfg(test)]
impl Permit {
    /// Bytes this reservation holds (rounded up to whole KiB).
    pub fn bytes(&self) -> u64 {
        self._permit
            .as_ref()
            .map_or(0, |p| p.num_permits() as u64 * KIB)
    }
}

/// A reservation that grows as a request's data arrives.
///
/// When the size is known in advance (a body's `Content-Length`, a decompressed body) the
/// reservation is exactly what is asked for ([`Reservation::grow_exactly`]). A body of unknown
/// length (chunked) grows in steps of up to [`Reservation::STEP`] ([`Reservation::grow_to`]) so
/// a trickled body does not take a permit per chunk; a step never goes past the reservation's
/// ceiling (twice the body limit) nor past what the budget still has free, so a small chunked
/// body fits a small budget.
#[derive(Debug)]
pub struct Reservation {
    permits: Vec<Permit>,
    bytes: u64,
    /// What the steps of [`Reservation::grow_to`] may reach; a request asking for more is
    /// refused by its route before (the body limit), so this only bounds the rounding up.
    ceiling: u64,
}

impl Default for Reservation {
    fn default() -> Reservation {
        Reservation::up_to(u64::MAX)
    }
}

impl Reservation {
    pub const STEP: u64 = 256 * KIB;

    /// An empty reservation whose steps never reach past `ceiling` bytes.
    pub fn up_to(ceiling: u64) -> Reservation {
        Reservation {
            permits: Vec::new(),
            bytes: 0,
            ceiling,
        }
    }

    /// Makes the reservation cover `bytes`, taking exactly what is missing (a size that is
    /// known, such as a declared `Content-Length`).
    pub fn grow_exactly(&mut self, budget: &Budget, bytes: u64) -> Result<(), Busy> {
        if bytes <= self.bytes {
            return Ok(());
        }
        let more = bytes - self.bytes;
        self.permits.push(budget.try_acquire(more)?);
        self.bytes += more;
        Ok(())
    }

    /// Makes the reservation cover at least `bytes`, for data of unknown total size: it takes
    /// a step of up to [`Reservation::STEP`] when less is missing, cut to the ceiling and to
    /// what the budget has free (never refused for the step alone).
    pub fn grow_to(&mut self, budget: &Budget, bytes: u64) -> Result<(), Busy> {
        if bytes <= self.bytes {
            return Ok(());
        }
        let needed = bytes - self.bytes;
        let step = Self::STEP
            .min(self.ceiling.saturating_sub(self.bytes))
            .min(budget.available());
        let (permit, more) = match budget.try_acquire(needed.max(step)) {
            Ok(permit) => (permit, needed.max(step)),
            // Another request took some of the budget since `available` was read.
            Err(_) if step > needed => (budget.try_acquire(needed)?, needed),
            Err(busy) => return Err(busy),
        };
        self.permits.push(permit);
        self.bytes += more;
        Ok(())
    }

    /// Bytes reserved.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Budget {
    /// A budget of `bytes` (rounded down to whole KiB, at least one KiB).
    pub fn new(bytes: u64) -> Budget {
        let max = (Semaphore::MAX_PERMITS as u64).min(u64::from(u32::MAX));
        let total_kib = (bytes / KIB).clamp(1, max) as u32;
        Budget {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Reserves `bytes` now or says why not; never waits.
    pub fn try_acquire(&self, bytes: u64) -> Result<Permit, Busy> {
        let kib = bytes.div_ceil(KIB);
        if kib == 0 {
            return Ok(Permit { _permit: None });
        }
        let busy = || Busy {
            requested: bytes,
            available: self.available(),
            total: self.total(),
        };
        let kib = u32::try_from(kib).map_err(|_| busy())?;
        if kib > self.total_kib {
            return Err(busy());
        }
        match self.permits.clone().try_acquire_many_owned(kib) {
            Ok(permit) => Ok(Permit {
                _permit: Some(permit),
            }),
            Err(_) => Err(busy()),
        }
    }

    /// Bytes free now.
    pub fn available(&self) -> u64 {
        self.permits.available_permits() as u64 * KIB
    }

    /// The whole budget in bytes.
    pub fn total(&self) -> u64 {
        u64::from(self.total_kib) * KIB
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_refused_past_the_total_and_returned_on_drop() {
        let budget = Budget::new(10 * KIB);
        let a = budget.try_acquire(6 * KIB).unwrap();
        assert_eq!(a.bytes(), 6 * KIB);
        // 1 byte rounds up to a whole KiB.
        let b = budget.try_acquire(1).unwrap();
        assert_eq!(budget.available(), 3 * KIB);
        let refused = budget.try_acquire(4 * KIB).unwrap_err();
        assert_eq!(refused.available, 3 * KIB);
        assert_eq!(refused.total, 10 * KIB);
        drop(a);
        drop(b);
        assert_eq!(budget.available(), 10 * KIB);
        assert!(budget.try_acquire(10 * KIB).is_ok());
    }

    #[test]
    fn a_growing_reservation_takes_steps_and_stops_at_the_budget() {
        let budget = Budget::new(1024 * KIB);
        let mut r = Reservation::default();
        r.grow_to(&budget, 10).unwrap();
        assert_eq!(r.bytes(), Reservation::STEP);
        r.grow_to(&budget, 100).unwrap();
        assert_eq!(budget.available(), 768 * KIB);
        r.grow_to(&budget, 1000 * KIB).unwrap();
        assert!(r.grow_to(&budget, 1025 * KIB).is_err());
        drop(r);
        assert_eq!(budget.available(), 1024 * KIB);
    }

    #[test]
    fn a_known_size_reserves_exactly_that_size() {
        // Issue 29: a 1 KiB body read with its Content-Length holds twice 1 KiB, not a step.
        let budget = Budget::new(1024 * KIB);
        let mut r = Reservation::default();
        r.grow_exactly(&budget, 2 * KIB).unwrap();
        assert_eq!(r.bytes(), 2 * KIB);
        assert_eq!(budget.available(), 1022 * KIB);
        // A 44,364-byte batch fits a budget of a little more than twice its size.
        let budget = Budget::new(2 * 44_364 + 4 * KIB);
        let mut r = Reservation::default();
        r.grow_exactly(&budget, 2 * 44_364).unwrap();
        r.grow_to(&budget, 2 * 44_364).unwrap();
        assert_eq!(r.bytes(), 2 * 44_364);
        assert!(Reservation::default()
            .grow_exactly(&budget, 8 * KIB)
            .is_err());
    }

    #[test]
    fn a_step_never_goes_past_what_the_budget_has_free() {
        // Smaller than one step: a small chunked body still fits.
        let budget = Budget::new(100 * KIB);
        let mut r = Reservation::default();
        r.grow_to(&budget, 10).unwrap();
        assert!(r.bytes() >= 10 && r.bytes() <= 100 * KIB, "{}", r.bytes());
        drop(r);
        // Cut to what is free: another request holds 90 KiB.
        let held = budget.try_acquire(90 * KIB).unwrap();
        let mut r = Reservation::default();
        r.grow_to(&budget, 10).unwrap();
        assert_eq!(r.bytes(), 10 * KIB);
        assert!(r.grow_to(&budget, 11 * KIB).is_err());
        drop((r, held));
        // Cut to the ceiling (twice a body limit of 4 KiB).
        let mut r = Reservation::up_to(8 * KIB);
        r.grow_to(&budget, 10).unwrap();
        assert_eq!(r.bytes(), 8 * KIB);
        assert_eq!(budget.available(), 92 * KIB);
    }

    #[test]
    fn a_reservation_larger_than_the_budget_never_fits() {
        let budget = Budget::new(4 * KIB);
        assert!(budget.try_acquire(5 * KIB).is_err());
        assert!(budget.try_acquire(u64::MAX).is_err());
        assert_eq!(budget.available(), 4 * KIB);
        assert_eq!(budget.try_acquire(0).unwrap().bytes(), 0);
    }
}
