//! Rate-limit refusals, coalesced: a flood of refused requests must not
//! become a flood of audit records (which would fill the audit volume and,
//! failing closed, stop the service for everyone).
//!
//! Per (principal, operation): the first refusal in a window of one second
//! gets its own record, like any request. Further refusals in that window
//! are only counted; the count is written as one record (`detail`:
//! [`coalesced_detail`]) when the window closes ([`Refusals::due`], called
//! every few hundred milliseconds and at shutdown) or at the next refusal
//! after it, whichever comes first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::authz::Operation;

/// How long one window lasts.
pub const WINDOW: Duration = Duration::from_secs(1);

/// How many refused requests a coalesced record stands for, as its
/// `detail` says it.
pub fn coalesced_detail(count: u64) -> String {
    format!("coalesced: {count} further rate-limit refusals in one second")
}

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The first of its window: recorded as a request.
    Record,
    /// Counted in its window's coalesced record.
    Counted,
}

/// The refusals of one window that had no record of their own.
#[derive(Debug, PartialEq, Eq)]
pub struct Coalesced {
    pub principal: String,
    pub role: Option<String>,
    pub op: Operation,
    pub count: u64,
}

#[derive(Debug)]
struct Window {
    opened: Instant,
    role: Option<String>,
    counted: u64,
}

/// The open windows, by (principal, operation). At most one per pair; a
/// closed window is removed by [`Refusals::due`] or replaced by the next
/// refusal.
#[derive(Debug, Default)]
pub struct Refusals {
    windows: Mutex<HashMap<(String, Operation), Window>>,
}

impl Refusals {
    /// Notes one refusal at `now`; also returns the previous window's count
    /// if it closed with refusals not yet written.
    pub fn refuse(
        &self,
        principal: &str,
        role: Option<&str>,
        op: Operation,
        now: Instant,
    ) -> (Verdict, Option<Coalesced>) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let key = (principal.to_string(), op);
        if let Some(w) = windows.get_mut(&key)
            && now.saturating_duration_since(w.opened) < WINDOW
        {
            w.counted += 1;
            return (Verdict::Counted, None);
        }
        let fresh = Window {
            opened: now,
            role: role.map(str::to_string),
            counted: 0,
        };
        let closed = windows.insert(key, fresh).and_then(|w| {
            (w.counted > 0).then(|| Coalesced {
                principal: principal.to_string(),
                role: w.role,
                op,
                count: w.counted,
            })
        });
        (Verdict::Record, closed)
    }

    /// Removes the windows closed at `now` (every window with `all`, at
    /// shutdown) and returns the counts still to be written.
    pub fn due(&self, now: Instant, all: bool) -> Vec<Coalesced> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        windows.retain(|(principal, op), w| {
            let closed = all || now.saturating_duration_since(w.opened) >= WINDOW;
            if closed && w.counted > 0 {
                out.push(Coalesced {
                    principal: principal.clone(),
                    role: w.role.take(),
                    op: *op,
                    count: w.counted,
                });
            }
            !closed
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OP: Operation = Operation::Decrypt;

    #[test]
    fn one_record_per_second_then_the_count() {
        let r = Refusals::default();
        let t0 = Instant::now();
        assert_eq!(r.refuse("p", Some("service"), OP, t0).0, Verdict::Record);
        for i in 1..=5 {
            let at = t0 + Duration::from_millis(100 * i);
            assert_eq!(
                r.refuse("p", Some("service"), OP, at),
                (Verdict::Counted, None)
            );
        }
        // Another principal, or another operation, has its own window.
        assert_eq!(r.refuse("q", None, OP, t0).0, Verdict::Record);
        assert_eq!(
            r.refuse("p", None, Operation::Encrypt, t0).0,
            Verdict::Record
        );
        // Not due yet.
        assert!(r.due(t0 + Duration::from_millis(900), false).is_empty());
        // The next refusal after the window writes its count and is
        // recorded itself.
        let (verdict, closed) = r.refuse("p", Some("service"), OP, t0 + WINDOW);
        assert_eq!(verdict, Verdict::Record);
        assert_eq!(
            closed,
            Some(Coalesced {
                principal: "p".into(),
                role: Some("service".into()),
                op: OP,
                count: 5,
            })
        );
    }

    #[test]
    fn closed_windows_are_flushed_and_nothing_is_lost_at_shutdown() {
        let r = Refusals::default();
        let t0 = Instant::now();
        r.refuse("p", None, OP, t0);
        r.refuse("p", None, OP, t0);
        r.refuse("p", None, OP, t0);
        r.refuse("q", None, OP, t0);
        let due = r.due(t0 + WINDOW, false);
        assert_eq!(due.len(), 1, "q had no refusal beyond its first: {due:?}");
        assert_eq!(due[0].count, 2);
        // Flushed windows are gone: the next refusal is recorded on its own.
        assert_eq!(r.refuse("p", None, OP, t0 + WINDOW).0, Verdict::Record);
        r.refuse("p", None, OP, t0 + WINDOW);
        // Shutdown writes an open window's count at once.
        let all = r.due(t0 + WINDOW, true);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].count, 1);
        assert!(r.due(t0 + WINDOW * 10, true).is_empty());
    }
}
