//! The data directory: every file coffre keeps, named in one place.
//!
//! ```text
//! DIR/                      0700
//!   store/                  the key store (sled: generations under CURRENT)
//!   approvals/              legacy: approvals of an older coffre, one JSON file each
//!                           (moved into the store at start, then removed)
//!   audit.log               the audit log (unless `audit.path` says otherwise)
//!   audit-public-key.pem    its checkpoint key, for offline verification (dev)
//!   pki/                    the dev PKI (`pki::PkiPaths`: ca.pem, operator-ca.pem, server.pem, …)
//!   hsm-sim.state           the dev simulated HSM's state (PIN-encrypted)
//!   hsm-sim.pin             the dev simulated HSM's PIN (0600)
//!   crl-state.json          the highest CRL number seen per issuer (rollback guard)
//!   coffre.lock             flock'ed by the `coffre dev` using the directory; holds its pid
//! ```
//!
//! At the start of `coffre serve`, [`DataDir::secure`] refuses a directory
//! another user owns, and tightens what is wider than it should be: the
//! directory and its subdirectories to 0700, the files that hold wrapped
//! keys, secrets or records (the store, approvals, the audit log, the dev
//! HSM's state and PIN, the PKI's private keys) to 0600. It logs each
//! change. Files made afterwards are private because `coffre serve` runs
//! with umask 077.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::pki::PkiPaths;
use crate::store::SledStore;
use crate::store::approvals::ApprovalStore;

/// The audit log's file name, when the configuration names none.
pub const AUDIT_LOG_FILE: &str = "audit.log";

/// [`DataDir::lock`] held: released when dropped (or when the process
/// ends, however it ends).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// A data directory (`coffre dev --data-dir`, `data_dir` of `coffre serve`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    pub fn approvals(&self) -> PathBuf {
        self.root.join("approvals")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.root.join(AUDIT_LOG_FILE)
    }

    pub fn audit_public_key(&self) -> PathBuf {
        self.root.join("audit-public-key.pem")
    }

    pub fn pki(&self) -> PkiPaths {
        PkiPaths::new(&self.root)
    }

    pub fn hsm_state(&self) -> PathBuf {
        self.root.join("hsm-sim.state")
    }

    pub fn hsm_pin(&self) -> PathBuf {
        self.root.join("hsm-sim.pin")
    }

    /// The highest CRL number (and thisUpdate) seen per issuer: a CRL older
    /// than it is refused, across restarts (`grpc::tls`).
    pub fn crl_state(&self) -> PathBuf {
        self.root.join("crl-state.json")
    }

    /// `coffre dev --nodes`' list of its nodes (DESIGN.md, "Several
    /// nodes"); the client commands' `--node NAME` reads it.
    pub fn cluster_json(&self) -> PathBuf {
        self.root.join("cluster.json")
    }

    /// `coffre.lock`: held (`flock`) by the `coffre dev` process using the
    /// directory, with its pid in it.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("coffre.lock")
    }

    /// Takes [`DataDir::lock_file`] for as long as the returned guard
    /// lives, and writes this process's pid in it. Another process holding
    /// it is refused plainly, with its pid when the file names one. The
    /// directory must exist.
    pub fn lock(&self) -> anyhow::Result<DirLock> {
        use std::io::Write;
        let path = self.lock_file();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if let Err(e) = fs2::FileExt::try_lock_exclusive(&file) {
            if e.raw_os_error() != fs2::lock_contended_error().raw_os_error()
                && e.kind() != std::io::ErrorKind::WouldBlock
            {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
            let pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            bail!(
                "{} is in use by another coffre process{pid}; stop it or give another --data-dir",
                self.root.display()
            );
        }
        file.set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .and_then(|()| file.flush())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(DirLock { _file: file })
    }

    /// Creates the directory (mode 0700) if it does not exist.
    pub fn create(&self) -> anyhow::Result<()> {
        let dir = &self.root;
        if dir.exists() {
            if !dir.is_dir() {
                bail!("{} is not a directory", dir.display());
            }
            return Ok(());
        }
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))
    }

    /// Refuses the directory if another user owns it, then tightens modes
    /// that are wider than the module docs say (never widens one). `extra`:
    /// files kept elsewhere that are just as private (a configured audit
    /// log path). Returns what it changed, each as (path, old mode, new
    /// mode), and logs each at `warn`.
    #[cfg(unix)]
    pub fn secure(&self, extra: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, u32, u32)>> {
        use std::os::unix::fs::MetadataExt;
        let root = &self.root;
        let meta = std::fs::symlink_metadata(root)
            .with_context(|| format!("reading the data directory {}", root.display()))?;
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            bail!(
                "the data directory {} is owned by uid {}, not by this user (uid {me}): \
                 refusing to keep keys and records there",
                root.display(),
                meta.uid()
            );
        }
        let mut changed = Vec::new();
        tighten(root, 0o700, &mut changed)?;
        // Directories whose every file is private.
        for dir in [self.store(), self.approvals()] {
            tighten_tree(&dir, &mut changed)?;
        }
        let pki = self.pki();
        let mut files = vec![self.audit_log(), self.hsm_state(), self.hsm_pin()];
        files.extend(extra.iter().cloned());
        if let Ok(entries) = std::fs::read_dir(&pki.dir) {
            tighten(&pki.dir, 0o700, &mut changed)?;
            for entry in entries.flatten() {
                let path = entry.path();
                if path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with("-key.pem"))
                {
                    files.push(path);
                }
            }
        }
        for file in files {
            tighten(&file, 0o600, &mut changed)?;
        }
        for (path, old, new) in &changed {
            tracing::warn!(
                path = %path.display(),
                old = format!("{old:o}"),
                new = format!("{new:o}"),
                "tightened the permissions of a data directory entry"
            );
        }
        Ok(changed)
    }

    /// Opens the key store (off the async runtime: it reads and syncs).
    pub async fn open_store(&self) -> anyhow::Result<SledStore> {
        let dir = self.store();
        let what = format!("opening the store in {}", dir.display());
        let opened = tokio::task::spawn_blocking(move || SledStore::open(&dir))
            .await
            .context("opening the store")?;
        match opened {
            Ok(store) => Ok(store),
            Err(e) if locked(&self.store().join("LOCK")) => {
                let pid = self
                    .holder_pid()
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                Err(anyhow::Error::new(e).context(what).context(format!(
                    "{} is in use by another coffre process{pid}; stop it or give another \
                     --data-dir",
                    self.root.display()
                )))
            }
            Err(e) => Err(e).context(what),
        }
    }

    /// The pid [`DataDir::lock`]'s holder wrote, while it holds it (a
    /// stopped `coffre dev` leaves its pid behind: not named), unless it is
    /// this process.
    fn holder_pid(&self) -> Option<u32> {
        let path = self.lock_file();
        if !locked(&path) {
            return None;
        }
        // This process's own lock (`coffre dev` takes it first) names no
        // other holder.
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|pid| *pid != std::process::id())
    }

    /// Opens the legacy approvals directory, if there is one: approvals
    /// are kept in the key store, and the server moves those of an older
    /// data directory into it at start (then removes the directory).
    pub async fn open_legacy_approvals(&self) -> anyhow::Result<Option<ApprovalStore>> {
        let dir = self.approvals();
        if !dir.exists() {
            return Ok(None);
        }
        let what = format!("opening the approvals in {}", dir.display());
        let files = tokio::task::spawn_blocking(move || ApprovalStore::open(&dir))
            .await
            .context("opening the approvals")?
            .context(what)?;
        Ok(Some(files))
    }
}

/// Whether another process holds `path`'s `flock` (the reason an open
/// failed): a probe that takes it and at once lets it go.
pub(crate) fn locked(path: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return false;
    };
    fs2::FileExt::try_lock_exclusive(&file).is_err()
}

/// Sets `path`'s permission bits to `mode` if it has any bit `mode` lacks
/// (group or other access, execute on a file); a missing path is fine, a
/// symbolic link is left alone (its target is not ours to change).
#[cfg(unix)]
fn tighten(path: &Path, mode: u32, changed: &mut Vec<(PathBuf, u32, u32)>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let old = meta.permissions().mode() & 0o7777;
    if old & !mode == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the permissions of {} to {mode:o}", path.display()))?;
    changed.push((path.to_path_buf(), old, mode));
    Ok(())
}

/// A directory 0700 and everything under it private (0700 / 0600).
#[cfg(unix)]
fn tighten_tree(dir: &Path, changed: &mut Vec<(PathBuf, u32, u32)>) -> anyhow::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return tighten(dir, 0o600, changed);
    }
    tighten(dir, 0o700, changed)?;
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => tighten_tree(&path, changed)?,
            Ok(t) if t.is_file() => tighten(&path, 0o600, changed)?,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn set(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A data directory left wide by an umask or a copy: the directory
    /// becomes 0700, the audit log, approvals, store files, PIN and private
    /// keys 0600; what was already narrower, and the public key, stay.
    #[test]
    fn secure_tightens_what_is_too_wide_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("data"));
        dir.create().unwrap();
        let root = dir.root().to_path_buf();
        set(&root, 0o755);
        std::fs::create_dir_all(dir.store().join("gen-1")).unwrap();
        std::fs::create_dir_all(dir.approvals()).unwrap();
        std::fs::create_dir_all(dir.pki().dir).unwrap();
        let sled_file = dir.store().join("gen-1").join("db");
        let approval = dir.approvals().join("a.json");
        let server_key = dir.pki().dir.join("server-key.pem");
        let server_cert = dir.pki().dir.join("server.pem");
        let elsewhere = tmp.path().join("audit-elsewhere.log");
        for (f, m) in [
            (&dir.audit_log(), 0o644),
            (&sled_file, 0o664),
            (&approval, 0o644),
            (&dir.hsm_pin(), 0o640),
            (&dir.hsm_state(), 0o400),
            (&server_key, 0o644),
            (&server_cert, 0o644),
            (&dir.audit_public_key(), 0o644),
            (&elsewhere, 0o666),
        ] {
            std::fs::write(f, b"x").unwrap();
            set(f, m);
        }
        set(&dir.store(), 0o775);

        let changed = dir.secure(std::slice::from_ref(&elsewhere)).unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&dir.store()), 0o700);
        assert_eq!(mode(&dir.store().join("gen-1")), 0o700);
        for f in [
            &dir.audit_log(),
            &sled_file,
            &approval,
            &dir.hsm_pin(),
            &server_key,
            &elsewhere,
        ] {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        assert_eq!(mode(&dir.hsm_state()), 0o400, "narrower stays");
        assert_eq!(mode(&server_cert), 0o644, "a certificate is public");
        assert_eq!(
            mode(&dir.audit_public_key()),
            0o644,
            "a public key is public"
        );
        assert!(
            changed
                .iter()
                .any(|(p, old, new)| p == &root && *old == 0o755 && *new == 0o700),
            "{changed:?}"
        );
        // Run again: nothing left to change.
        assert!(dir.secure(&[]).unwrap().is_empty());
    }

    /// A directory another user owns is refused, and left as it was.
    #[test]
    fn a_directory_of_another_user_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let other = if nix::unistd::geteuid().is_root() {
            // As root (CI): a directory handed to nobody.
            let d = tmp.path().join("nobodys");
            std::fs::create_dir(&d).unwrap();
            set(&d, 0o755);
            std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
            d
        } else {
            // As anyone else: root's own directory.
            PathBuf::from("/")
        };
        let before = mode(&other);
        let err = format!("{:#}", DataDir::new(&other).secure(&[]).unwrap_err());
        assert!(err.contains("owned by uid"), "{err}");
        assert_eq!(mode(&other), before, "nothing changed");
    }

    #[test]
    fn a_missing_directory_is_an_error_and_missing_files_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(DataDir::new(tmp.path().join("none")).secure(&[]).is_err());
        let dir = DataDir::new(tmp.path());
        set(tmp.path(), 0o700);
        assert!(dir.secure(&[]).unwrap().is_empty());
    }
}
