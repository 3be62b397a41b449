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

/// A reservation that grows as a request's data arrives (a body read chunk by chunk), in
/// steps of at least [`Reservation::STEP`] so a trickled body does not take a permit per
/// chunk.
#[derive(Debug, Default)]
pub struct Reservation {
    permits: Vec<Permit>,
    bytes: u64,
}

impl Reservation {
    pub const STEP: u64 = 256 * KIB;

    /// Makes the reservation cover at least `bytes`.
    pub fn grow_to(&mut self, budget: &Budget, bytes: u64) -> Result<(), Busy> {
        if bytes <= self.bytes {
            return Ok(());
        }
        let more = (bytes - self.bytes).max(Self::STEP);
        self.permits.push(budget.try_acquire(more)?);
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
    fn a_reservation_larger_than_the_budget_never_fits() {
        let budget = Budget::new(4 * KIB);
        assert!(budget.try_acquire(5 * KIB).is_err());
        assert!(budget.try_acquire(u64::MAX).is_err());
        assert_eq!(budget.available(), 4 * KIB);
        assert_eq!(budget.try_acquire(0).unwrap().bytes(), 0);
    }
}
