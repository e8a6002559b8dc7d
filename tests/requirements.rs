//! Tests that need something from the machine (SoftHSM2, root for chattr or
//! a loop mount) are reported as not run where it is missing, and fail,
//! saying what to install, when they run without it (`build/needs.rs`).

use std::process::Command;

use crate::common::needs::{self, Need};

/// This test binary, running only `test` (ignored or not) with `env` added.
fn run_alone(test: &str, env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--include-ignored", "--test-threads=1"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Forced to run (`--include-ignored`, as `COFFRE_REQUIRE_SOFTHSM=1` forces
/// it at build time) where SoftHSM2's module is missing, a SoftHSM2 test
/// fails and says what is missing and how to get it. It no longer falls
/// back to another module, prints "NOT RUN" and passes.
#[test]
fn a_softhsm2_test_without_softhsm2_fails_and_says_what_to_install() {
    let missing = "/nonexistent/libsofthsm2.so";
    let (passed, out) = run_alone(
        "hsm_conformance::conformance_on_softhsm2_through_the_coffre_binary",
        &[("COFFRE_SOFTHSM_MODULE", missing)],
    );
    assert!(!passed, "passed without SoftHSM2:\n{out}");
    assert!(out.contains("1 failed"), "{out}");
    assert!(
        out.contains(&format!("COFFRE_SOFTHSM_MODULE={missing} is not a file")),
        "{out}"
    );
    assert!(out.contains("apt-get install softhsm2 opensc"), "{out}");
    assert!(!out.contains("NOT RUN"), "{out}");
}

/// The same for the loop mount: with no program on PATH, the storage-fault
/// test fails before it touches anything, naming what it needs.
#[test]
fn a_root_test_without_its_programs_fails_and_says_what_it_needs() {
    let (passed, out) = run_alone(
        "storage_faults::a_full_then_read_only_disk_fails_closed_and_loses_nothing_acknowledged",
        &[("PATH", "/nonexistent")],
    );
    assert!(!passed, "passed without mkfs.ext4 or mount:\n{out}");
    assert!(out.contains("1 failed"), "{out}");
    assert!(out.contains("mkfs.ext4 is not on PATH"), "{out}");
    assert!(out.contains("run it as root"), "{out}");
}

/// What the build decided (the cfgs this binary was compiled with) is what
/// this machine has, or what the build's environment required: a test is
/// ignored exactly where its component is missing and not required. A
/// stale decision (something installed or removed since the build, out of
/// the directories the build script watches) fails here: `touch build.rs`.
#[test]
fn each_test_is_ignored_exactly_where_its_component_is_missing_and_not_required() {
    let built: [(&Need, bool, Option<&str>); 6] = [
        (
            &needs::SOFTHSM,
            cfg!(coffre_has_softhsm),
            option_env!("COFFRE_REQUIRE_SOFTHSM"),
        ),
        (
            &needs::CHATTR,
            cfg!(coffre_has_chattr),
            option_env!("COFFRE_REQUIRE_ROOT"),
        ),
        (
            &needs::LOOP_MOUNT,
            cfg!(coffre_has_loop_mount),
            option_env!("COFFRE_REQUIRE_ROOT"),
        ),
        (
            &needs::POSTGRES,
            cfg!(coffre_has_postgres),
            option_env!("COFFRE_REQUIRE_POSTGRES"),
        ),
        (
            &needs::BOTOCORE,
            cfg!(coffre_has_botocore),
            option_env!("COFFRE_REQUIRE_BOTOCORE"),
        ),
        (
            &needs::PYTHON_CLIENT,
            cfg!(coffre_has_python_client),
            option_env!("COFFRE_REQUIRE_PYTHON_CLIENT"),
        ),
    ];
    let env = |var: &str| std::env::var(var).ok();
    for (need, cfg_set, required_at_build) in built {
        let present = need.detect(&env);
        let required = required_at_build == Some("1");
        assert_eq!(
            cfg_set,
            present.is_ok() || required,
            "{}: the build says {cfg_set}, the machine says {present:?}, {}={required_at_build:?} \
             at build time: rebuild (touch build.rs)",
            need.cfg,
            need.require
        );
    }

    // What this binary lists as ignored agrees, for the SoftHSM2 tests.
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["hsm_conformance::", "--list", "--ignored"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listed}");
    let ignored = listed.matches(": test").count();
    // One of them needs PostgreSQL too.
    let expected = match (cfg!(coffre_has_softhsm), cfg!(coffre_has_postgres)) {
        (true, true) => 0,
        (true, false) => 1,
        (false, _) => 5,
    };
    assert_eq!(ignored, expected, "{listed}");
}

/// The build script's decision for a required component it cannot find:
/// the cfg is set anyway (the tests run and fail) and Cargo shows a warning.
#[test]
fn a_required_component_is_never_ignored() {
    let env = |var: &str| match var {
        "COFFRE_SOFTHSM_MODULE" => Some("/nonexistent/libsofthsm2.so".to_string()),
        "PATH" => Some("/nonexistent".to_string()),
        "COFFRE_REQUIRE_SOFTHSM" => Some("1".to_string()),
        _ => None,
    };
    let lines = needs::build_script_lines(&env);
    let has = |l: &str| lines.iter().any(|x| x == l);
    assert!(
        has("cargo:rustc-check-cfg=cfg(coffre_has_softhsm)"),
        "{lines:#?}"
    );
    assert!(has("cargo:rustc-cfg=coffre_has_softhsm"), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l
            .starts_with("cargo:warning=COFFRE_REQUIRE_SOFTHSM=1, but this machine lacks")
            && l.contains("is not a file")),
        "{lines:#?}"
    );
    // Not required, and missing (no chattr on this PATH): no cfg, so ignored.
    assert!(!has("cargo:rustc-cfg=coffre_has_chattr"), "{lines:#?}");
    assert!(
        has("cargo:rustc-check-cfg=cfg(coffre_has_chattr)"),
        "{lines:#?}"
    );
    // A missing path is never watched (Cargo would rerun on every build).
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("/nonexistent") && l.starts_with("cargo:rerun-if-changed")),
        "{lines:#?}"
    );
}
