//! Loopback ports for processes that must be told theirs in advance.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// Below Linux's default ephemeral range (32768–60999): a port taken from
/// that range (`bind(":0")`) can be handed to one of the tests' many
/// outgoing connections (to PostgreSQL, to the HSM) between this call and
/// the process's own bind, which then fails with "Address already in use".
const LOW: u32 = 20_000;
const SPAN: u32 = 12_000;

/// A loopback port free at the time of the call. Ports are handed out in
/// turn from an offset drawn from the process id, so that one process
/// never hands out a port twice and two test processes seldom try the
/// same ones; each is checked free by binding it.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (offset + n) % SPAN).unwrap();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {}", LOW + SPAN);
}
