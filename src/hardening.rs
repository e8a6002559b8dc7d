//! Process hardening at start.
//!
//! - **No core dumps.** A core file of coffre would hold CMK versions, data
//!   keys in flight and the audit keys, in clear, on disk. The soft and hard
//!   `RLIMIT_CORE` are set to 0 and, on Linux, the process is made
//!   non-dumpable (`PR_SET_DUMPABLE` 0), which also stops other processes of
//!   the same user from attaching to it or reading its memory through
//!   `/proc`. Failing to do either stops the start.
//! - **Not as root.** `coffre serve` refuses to run with effective uid 0
//!   unless the configuration says `allow_root = true` (or `--allow-root`):
//!   root needs no exploit to read the process's memory or the store, and a
//!   compromise of coffre should not hand over the machine. `coffre dev`,
//!   a one-machine trial often run in a root container, only warns.

use anyhow::Context;

/// Core dumps off for this process (see the module docs).
pub fn disable_core_dumps() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(Resource::RLIMIT_CORE, 0, 0).context("disabling core dumps (RLIMIT_CORE)")?;
    #[cfg(target_os = "linux")]
    nix::sys::prctl::set_dumpable(false)
        .context("making the process non-dumpable (PR_SET_DUMPABLE)")?;
    Ok(())
}

/// Whether the process runs with effective uid 0.
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Refuses root unless `allowed` (see the module docs).
pub fn refuse_root(allowed: bool) -> anyhow::Result<()> {
    if running_as_root() {
        if !allowed {
            anyhow::bail!(
                "coffre serve refuses to run as root: run it as a dedicated user, or set \
                 allow_root = true in the configuration (or pass --allow-root) to accept the risk"
            );
        }
        tracing::warn!("running as root (allowed by the configuration)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn core_dumps_are_off_after_the_call() {
        use nix::sys::resource::{Resource, getrlimit};
        disable_core_dumps().unwrap();
        assert_eq!(getrlimit(Resource::RLIMIT_CORE).unwrap(), (0, 0));
        #[cfg(target_os = "linux")]
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
    }

    #[test]
    fn root_is_refused_unless_allowed() {
        assert!(refuse_root(true).is_ok());
        assert_eq!(refuse_root(false).is_err(), running_as_root());
    }
}
