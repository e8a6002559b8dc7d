//! The durability barrier (design/several-nodes.md §3.3): a key version
//! is used for new wraps only once the database has acknowledged a commit
//! of this node's that began after the version was read.
//!
//! Why: a commit acknowledged with synchronous replication is on the
//! standbys, but a version can be *visible* on the primary before it is
//! replicated. Its writer's wait for the standbys may have been cancelled
//! (PostgreSQL then commits locally and says only a WARNING), or the
//! primary may have crashed and restarted with the commit in its WAL. A
//! node that wrapped data keys under such a version would lose them to
//! the next failover, which erases the version. WAL is sequential: once a
//! commit of this node's that began after the read is acknowledged, every
//! commit the read saw is replicated too. This is the property sled's
//! lock gives a node alone, "a reader sees only durable states".
//!
//! Each barrier takes a number when it begins; a read's ticket asks for
//! a number above every barrier begun before the read returned. The
//! heartbeat is a barrier, and a wrap that meets a version not yet covered
//! forces one (one at a time; every waiter shares it). A rise of the
//! database's timeline between the read and the barrier (a failover)
//! makes the ticket lost: the new primary's acknowledgement says nothing
//! of what the old one showed, so the version is read again.
//!
//! Unwraps need no barrier: a blob that exists was made under a version
//! its maker had confirmed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// Taken before a store read (or write) whose result may be used for new
/// wraps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadMark {
    /// The timeline rises seen before the read.
    lineage: u64,
}

impl ReadMark {
    /// How many times the database's history was replaced under this
    /// process (its timeline rose) before the mark was taken.
    pub fn lineage(self) -> u64 {
        self.lineage
    }
}

/// What a barrier must reach for a read to count as durable: taken when
/// the read has returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DurableTicket {
    /// The first barrier number that began after the read.
    barrier: u64,
    lineage: u64,
}

/// Where a read stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// A barrier that began after it was acknowledged on the same
    /// timeline: what it saw is replicated.
    Durable,
    /// No such barrier yet.
    Pending,
    /// The timeline rose since the read: what it saw may be gone. Read
    /// again.
    Lost,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BarrierError {
    #[error(
        "the database moved to a new timeline (a failover) since the version was read; it is \
         read again"
    )]
    Lost,
    #[error("the database acknowledged no commit of this node's within {} ms", .0.as_millis())]
    TimedOut(Duration),
    #[error("the barrier's commit failed: {0}")]
    Failed(String),
}

#[derive(Clone, Debug, Default)]
struct State {
    /// The highest barrier acknowledged, and the lineage it began on.
    confirmed: u64,
    confirmed_lineage: u64,
    /// The highest barrier that failed, and why.
    failed: u64,
    failure: String,
}

/// A barrier under way: [`Barrier::finish`] it with its commit's outcome.
#[derive(Debug)]
#[must_use]
pub struct Started {
    n: u64,
    lineage: u64,
    forced: bool,
}

/// The barrier's bookkeeping; the backend runs the commits.
#[derive(Debug)]
pub struct Barrier {
    started: AtomicU64,
    /// A forced barrier is under way.
    running: AtomicBool,
    state: watch::Sender<State>,
}

impl Default for Barrier {
    fn default() -> Self {
        Self::new()
    }
}

impl Barrier {
    pub fn new() -> Self {
        Self {
            started: AtomicU64::new(0),
            running: AtomicBool::new(false),
            state: watch::Sender::new(State::default()),
        }
    }

    /// Before a read, `lineage` being the timeline rises seen so far.
    pub fn mark(&self, lineage: u64) -> ReadMark {
        ReadMark { lineage }
    }

    /// After the read marked `mark` returned.
    pub fn ticket(&self, mark: ReadMark) -> DurableTicket {
        DurableTicket {
            barrier: self.started.load(Ordering::SeqCst) + 1,
            lineage: mark.lineage,
        }
    }

    /// A barrier begins (the heartbeat's), before its commit is sent.
    pub fn begin(&self, lineage: u64) -> Started {
        Started {
            n: self.started.fetch_add(1, Ordering::SeqCst) + 1,
            lineage,
            forced: false,
        }
    }

    /// A barrier forced by [`Barrier::wait`] begins: the `start` it was
    /// given calls this.
    pub fn begin_forced(&self, lineage: u64) -> Started {
        Started {
            forced: true,
            ..self.begin(lineage)
        }
    }

    /// The barrier's commit returned `outcome`; `lineage` is the timeline
    /// rises seen after it. Acknowledged on the lineage it began on, it
    /// confirms every ticket up to its number.
    pub fn finish(&self, started: Started, outcome: Result<(), String>, lineage: u64) {
        if started.forced {
            // Before the news, so that a waiter it does not cover starts
            // the next one.
            self.running.store(false, Ordering::SeqCst);
        }
        let outcome = match outcome {
            Ok(()) if lineage != started.lineage => {
                Err("the database's timeline rose during the barrier".to_owned())
            }
            other => other,
        };
        self.state.send_modify(|state| match outcome {
            Ok(()) => {
                if started.n > state.confirmed {
                    state.confirmed = started.n;
                    state.confirmed_lineage = started.lineage;
                }
            }
            Err(why) => {
                if started.n > state.failed {
                    state.failed = started.n;
                    state.failure = why;
                }
            }
        });
    }

    /// Where `ticket` stands, `lineage` being the timeline rises seen now.
    pub fn durability(&self, ticket: DurableTicket, lineage: u64) -> Durability {
        judge(&self.state.borrow(), ticket, lineage)
    }

    /// Waits until `ticket` is durable, for `timeout` at most. When no
    /// forced barrier is under way it calls `start`, which must begin one
    /// ([`Barrier::begin_forced`]) and finish it in a task of its own, so
    /// that a waiter giving up never cuts a commit short.
    pub async fn wait(
        &self,
        ticket: DurableTicket,
        timeout: Duration,
        lineage: impl Fn() -> u64,
        start: impl Fn(),
    ) -> Result<(), BarrierError> {
        let mut news = self.state.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let state = news.borrow_and_update();
                match judge(&state, ticket, lineage()) {
                    Durability::Durable => return Ok(()),
                    Durability::Lost => return Err(BarrierError::Lost),
                    Durability::Pending if state.failed >= ticket.barrier => {
                        return Err(BarrierError::Failed(state.failure.clone()));
                    }
                    Durability::Pending => {}
                }
            }
            if !self.running.swap(true, Ordering::SeqCst) {
                start();
            }
            match tokio::time::timeout_at(deadline, news.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`: not while we borrow it.
                Ok(Err(_)) => return Err(BarrierError::Failed("the barrier is gone".into())),
                Err(_) => return Err(BarrierError::TimedOut(timeout)),
            }
        }
    }
}

fn judge(state: &State, ticket: DurableTicket, lineage: u64) -> Durability {
    if lineage != ticket.lineage {
        Durability::Lost
    } else if state.confirmed >= ticket.barrier && state.confirmed_lineage == ticket.lineage {
        Durability::Durable
    } else {
        Durability::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use super::*;

    #[test]
    fn only_a_barrier_begun_after_the_read_covers_it() {
        let barrier = Barrier::new();
        let before = barrier.begin(0);
        let mark = barrier.mark(0);
        let ticket = barrier.ticket(mark);
        assert_eq!(barrier.durability(ticket, 0), Durability::Pending);
        barrier.finish(before, Ok(()), 0);
        assert_eq!(
            barrier.durability(ticket, 0),
            Durability::Pending,
            "a barrier begun before the read returned proves nothing of it"
        );
        let after = barrier.begin(0);
        barrier.finish(after, Ok(()), 0);
        assert_eq!(barrier.durability(ticket, 0), Durability::Durable);
        // Once durable, later barriers change nothing.
        let failing = barrier.begin(0);
        barrier.finish(failing, Err("down".into()), 0);
        assert_eq!(barrier.durability(ticket, 0), Durability::Durable);
    }

    #[test]
    fn a_failed_barrier_confirms_nothing() {
        let barrier = Barrier::new();
        let ticket = barrier.ticket(barrier.mark(0));
        let b = barrier.begin(0);
        barrier.finish(b, Err("connection reset".into()), 0);
        assert_eq!(barrier.durability(ticket, 0), Durability::Pending);
    }

    #[test]
    fn a_timeline_rise_loses_what_was_read_before_it() {
        let barrier = Barrier::new();
        let ticket = barrier.ticket(barrier.mark(0));
        // The rise happens while the barrier's commit is under way: its
        // acknowledgement may come from the new primary.
        let b = barrier.begin(0);
        barrier.finish(b, Ok(()), 1);
        assert_eq!(barrier.durability(ticket, 1), Durability::Lost);
        // A barrier wholly on the new timeline does not save it either.
        let b = barrier.begin(1);
        barrier.finish(b, Ok(()), 1);
        assert_eq!(barrier.durability(ticket, 1), Durability::Lost);
        // A read made after the rise is covered as usual.
        let fresh = barrier.ticket(barrier.mark(1));
        let b = barrier.begin(1);
        barrier.finish(b, Ok(()), 1);
        assert_eq!(barrier.durability(fresh, 1), Durability::Durable);
    }

    /// A forced barrier: `start` spawns a task that runs the commit after
    /// `gate` lets it.
    fn starter(
        barrier: &Arc<Barrier>,
        gate: &Arc<tokio::sync::Semaphore>,
        started: &Arc<AtomicU64>,
    ) -> impl Fn() {
        let (barrier, gate, started) = (Arc::clone(barrier), Arc::clone(gate), Arc::clone(started));
        move || {
            started.fetch_add(1, Ordering::SeqCst);
            let s = barrier.begin_forced(0);
            let (barrier, gate) = (Arc::clone(&barrier), Arc::clone(&gate));
            tokio::spawn(async move {
                let permit = gate.acquire().await.unwrap();
                permit.forget();
                barrier.finish(s, Ok(()), 0);
            });
        }
    }

    #[tokio::test]
    async fn waiters_share_one_forced_barrier_and_time_out_while_it_hangs() {
        let barrier = Arc::new(Barrier::new());
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let started = Arc::new(AtomicU64::new(0));
        let ticket = barrier.ticket(barrier.mark(0));
        let short = Duration::from_millis(50);
        let waits =
            (0..3).map(|_| barrier.wait(ticket, short, || 0, starter(&barrier, &gate, &started)));
        for result in futures_util::future::join_all(waits).await {
            assert_eq!(result, Err(BarrierError::TimedOut(short)));
        }
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "one barrier for every waiter, and none more while it hangs"
        );
        // The hung commit returns: the next waiter finds the ticket
        // covered, without a barrier of its own.
        gate.add_permits(1);
        let long = Duration::from_secs(10);
        barrier
            .wait(ticket, long, || 0, starter(&barrier, &gate, &started))
            .await
            .unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 1);
        // A read after it needs a barrier of its own.
        let later = barrier.ticket(barrier.mark(0));
        gate.add_permits(1);
        barrier
            .wait(later, long, || 0, starter(&barrier, &gate, &started))
            .await
            .unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_waiter_learns_of_a_failed_barrier_at_once() {
        let barrier = Arc::new(Barrier::new());
        let ticket = barrier.ticket(barrier.mark(0));
        let failing = {
            let barrier = Arc::clone(&barrier);
            move || {
                let s = barrier.begin_forced(0);
                barrier.finish(s, Err("permission denied for table nodes".into()), 0);
            }
        };
        let err = barrier
            .wait(ticket, Duration::from_secs(30), || 0, failing)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            BarrierError::Failed("permission denied for table nodes".into())
        );
    }
}
