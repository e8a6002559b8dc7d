//! What some tests need from the machine, and whether this machine has it.
//!
//! Shared by the build script (`build.rs`), which turns each [`Need`] into a
//! cfg so that a test that cannot run here is `#[ignore]`d with its reason
//! (`cargo test` reports it as ignored, never as passed), and by the tests
//! (`tests/common/mod.rs`), which check again when they start and fail,
//! saying what to install, if the component is missing after all (forced by
//! `COFFRE_REQUIRE_*`, run with `--include-ignored`, or the machine changed
//! since the build).
//!
//! A test that needs one of these carries
//! `#[cfg_attr(not(CFG), ignore = "not run: needs ...")]`; the reason starts
//! with `not run:` so that `.ci/run` can refuse any such line in its output.
//! `REQUIRE=1` in the build's environment makes the build emit the cfg
//! whatever it finds: the test then runs, and fails loudly if the component
//! is missing. Each side uses part of this file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Reads an environment variable (a parameter, so that tests can pretend).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Something a group of tests needs from the machine.
#[derive(Debug)]
pub struct Need {
    /// The cfg the build script emits when the machine has it.
    pub cfg: &'static str,
    /// The environment variable that, set to `1`, makes it required.
    pub require: &'static str,
    /// What it is, for people.
    pub what: &'static str,
    /// How to run the tests that need it ("To run it, {how}.").
    pub how: &'static str,
    detect: fn(Env<'_>) -> Result<(), String>,
}

impl Need {
    /// `Ok` if this machine has it; else what is missing.
    pub fn detect(&self, env: Env<'_>) -> Result<(), String> {
        (self.detect)(env)
    }

    /// Whether `env` makes it required (`REQUIRE=1`).
    pub fn required(&self, env: Env<'_>) -> bool {
        env(self.require).is_some_and(|v| v == "1")
    }
}

/// SoftHSM2 and pkcs11-tool: the PKCS#11 tests (`tests/hsm_conformance.rs`).
pub const SOFTHSM: Need = Need {
    cfg: "coffre_has_softhsm",
    require: "COFFRE_REQUIRE_SOFTHSM",
    what: "SoftHSM2 and pkcs11-tool",
    how: "install them (apt-get install softhsm2 opensc)",
    detect: |env| {
        let mut missing = Vec::new();
        if let Err(e) = softhsm_module(env) {
            missing.push(e);
        }
        for tool in ["softhsm2-util", "pkcs11-tool"] {
            if find_program(env, tool).is_none() {
                missing.push(format!("{tool} is not on PATH"));
            }
        }
        joined(missing)
    },
};

/// `chattr +i` on the audit log of a running server
/// (`audit_log::fail_closed_while_the_log_cannot_be_written_then_recover`).
pub const CHATTR: Need = Need {
    cfg: "coffre_has_chattr",
    require: "COFFRE_REQUIRE_ROOT",
    what: "root for chattr +i (CAP_LINUX_IMMUTABLE) and chattr",
    how: "run it as root, on ext4, xfs or btrfs, with e2fsprogs installed",
    detect: |env| {
        let mut missing = Vec::new();
        if !has_capability(CAP_LINUX_IMMUTABLE) {
            missing.push("this user lacks CAP_LINUX_IMMUTABLE (not root)".to_string());
        }
        if find_program(env, "chattr").is_none() {
            missing.push("chattr is not on PATH".to_string());
        }
        joined(missing)
    },
};

/// A small ext4 file system on a loop device (`tests/storage_faults.rs`).
pub const LOOP_MOUNT: Need = Need {
    cfg: "coffre_has_loop_mount",
    require: "COFFRE_REQUIRE_ROOT",
    what: "root for a loop mount (CAP_SYS_ADMIN, /dev/loop-control), e2fsprogs and util-linux",
    how: "run it as root with loop devices, with e2fsprogs, mount and util-linux installed",
    detect: |env| {
        let mut missing = Vec::new();
        if !has_capability(CAP_SYS_ADMIN) {
            missing.push("this user lacks CAP_SYS_ADMIN (not root)".to_string());
        }
        for path in ["/dev/loop-control", "/sys/fs/ext4"] {
            if !Path::new(path).exists() {
                missing.push(format!("{path} does not exist"));
            }
        }
        for tool in ["mkfs.ext4", "e2fsck", "mount", "umount", "findmnt"] {
            if find_program(env, tool).is_none() {
                missing.push(format!("{tool} is not on PATH"));
            }
        }
        joined(missing)
    },
};

/// A PostgreSQL server's binaries (`initdb`, `pg_ctl`), for the tests of
/// the PostgreSQL store (`tests/postgres_*.rs`, `tests/common/pg.rs`).
pub const POSTGRES: Need = Need {
    cfg: "coffre_has_postgres",
    require: "COFFRE_REQUIRE_POSTGRES",
    what: "PostgreSQL 15+ (initdb, pg_ctl)",
    how: "install PostgreSQL (apt-get install postgresql)",
    detect: |env| {
        let mut missing = Vec::new();
        for tool in ["initdb", "pg_ctl"] {
            if find_program(env, tool).is_none() && debian_postgres_bin(tool).is_none() {
                missing.push(format!(
                    "{tool} is neither on PATH nor in /usr/lib/postgresql/*/bin"
                ));
            }
        }
        joined(missing)
    },
};

/// Python with botocore, whose SigV4Auth signs the requests of the XKS
/// tests' independent client (`tests/xks.rs`): `COFFRE_XKS_PYTHON`, else
/// `python3` on PATH.
pub const BOTOCORE: Need = Need {
    cfg: "coffre_has_botocore",
    require: "COFFRE_REQUIRE_BOTOCORE",
    what: "Python with botocore",
    how: "pip install botocore, or point COFFRE_XKS_PYTHON at a python that has it (.ci/run makes a virtual environment)",
    detect: |env| python_imports(env, "COFFRE_XKS_PYTHON", "botocore.auth", "botocore"),
};

/// Python with the coffre_client package (`clients/python`) and what it
/// runs on (grpcio, cryptography), for the interop tests with the real
/// binary (`tests/python_client.rs`): `COFFRE_CLIENT_PYTHON`, else
/// `python3` on PATH.
pub const PYTHON_CLIENT: Need = Need {
    cfg: "coffre_has_python_client",
    require: "COFFRE_REQUIRE_PYTHON_CLIENT",
    what: "Python with the coffre_client package (clients/python)",
    how: "pip install ./clients/python into a virtual environment and point COFFRE_CLIENT_PYTHON at its python (.ci/run does)",
    detect: |env| {
        python_imports(
            env,
            "COFFRE_CLIENT_PYTHON",
            "coffre_client, grpc, cryptography",
            "coffre_client, grpc or cryptography",
        )
    },
};

/// Whether the python `var` names (else `python3` on PATH) can import
/// `modules` (a comma-separated list, as `import` takes it).
fn python_imports(env: Env<'_>, var: &str, modules: &str, what: &str) -> Result<(), String> {
    let python = match env(var).filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => find_program(env, "python3").ok_or("python3 is not on PATH")?,
    };
    match std::process::Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(_) => Err(format!("{} cannot import {what}", python.display())),
        Err(e) => Err(format!("{} does not run: {e}", python.display())),
    }
}

/// Every need, in the order the build script reports them.
pub const ALL: [&Need; 6] = [
    &SOFTHSM,
    &CHATTR,
    &LOOP_MOUNT,
    &POSTGRES,
    &BOTOCORE,
    &PYTHON_CLIENT,
];

/// Where SoftHSM2's PKCS#11 module usually is (Debian and Ubuntu put it in
/// the first, with a copy under the multiarch directory; source builds in
/// the last).
const SOFTHSM_MODULES: [&str; 4] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// SoftHSM2's module: `COFFRE_SOFTHSM_MODULE` if set (and then only it),
/// else the first of the usual places that exists.
pub fn softhsm_module(env: Env<'_>) -> Result<PathBuf, String> {
    if let Some(path) = env("COFFRE_SOFTHSM_MODULE").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "COFFRE_SOFTHSM_MODULE={} is not a file",
                path.display()
            ))
        };
    }
    SOFTHSM_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "libsofthsm2.so is in none of {} (or set COFFRE_SOFTHSM_MODULE)",
                SOFTHSM_MODULES.join(", ")
            )
        })
}

/// The first executable file named `name` in `PATH`.
pub fn find_program(env: Env<'_>, name: &str) -> Option<PathBuf> {
    let path = env("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn debian_postgres_bin(name: &str) -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|version| version.path().join("bin").join(name))
        .find(|p| is_executable(p))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

const CAP_LINUX_IMMUTABLE: u32 = 9;
const CAP_SYS_ADMIN: u32 = 21;

/// Whether this process has capability `bit` in its effective set (Linux,
/// from /proc/self/status; elsewhere never). Root has them all, unless a
/// container took them away, in which case the tests cannot run either.
fn has_capability(bit: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps >> bit & 1 == 1)
}

fn joined(missing: Vec<String>) -> Result<(), String> {
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

/// Directories whose change (a program installed or removed) makes Cargo
/// run the build script again, so that the cfgs follow the machine: where
/// apt and `make install` put these programs. Others: `touch build.rs`.
pub const WATCHED_DIRS: [&str; 6] = [
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/bin",
    "/sbin",
];

/// What the build script prints for the needs: check-cfg declarations,
/// rerun triggers, the cfgs of what is present or required, and a warning
/// for what is required but missing.
pub fn build_script_lines(env: Env<'_>) -> Vec<String> {
    let mut lines = Vec::new();
    let mut vars = vec![
        "COFFRE_SOFTHSM_MODULE",
        "COFFRE_XKS_PYTHON",
        "COFFRE_CLIENT_PYTHON",
        "USER",
        "SUDO_UID",
    ];
    for need in ALL {
        if !vars.contains(&need.require) {
            vars.push(need.require);
        }
    }
    for var in vars {
        lines.push(format!("cargo:rerun-if-env-changed={var}"));
    }
    let mut watched: Vec<PathBuf> = Vec::new();
    for dir in WATCHED_DIRS {
        // `/bin` is often a link to `/usr/bin`: watch each directory once.
        if let Ok(dir) = std::fs::canonicalize(dir) {
            if !watched.contains(&dir) {
                watched.push(dir);
            }
        }
    }
    // The module itself (never a missing path: Cargo would then run the
    // build script on every build).
    if let Ok(module) = softhsm_module(env) {
        watched.push(module);
    }
    for path in watched {
        lines.push(format!("cargo:rerun-if-changed={}", path.display()));
    }
    for need in ALL {
        lines.push(format!("cargo:rustc-check-cfg=cfg({})", need.cfg));
        match need.detect(env) {
            Ok(()) => lines.push(format!("cargo:rustc-cfg={}", need.cfg)),
            Err(missing) if need.required(env) => {
                lines.push(format!("cargo:rustc-cfg={}", need.cfg));
                lines.push(format!(
                    "cargo:warning={}=1, but this machine lacks {} ({missing}): its tests \
                     will run and fail",
                    need.require, need.what
                ));
            }
            Err(_) => {}
        }
    }
    lines
}
