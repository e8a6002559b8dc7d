//! Private PostgreSQL servers for tests (design/several-nodes.md §7.2):
//! each [`PgCluster`] is an `initdb` in its own temporary directory, a
//! `postgres` process the test owns (its pid, for SIGKILL), on a free
//! loopback port, removed when dropped. Tests gate on
//! `needs::POSTGRES` (see `build/needs.rs`).
//!
//! - Binaries: `pg_config --bindir`, else the newest
//!   `/usr/lib/postgresql/*/bin`.
//! - As root (CI, and the project's machines): `initdb` and `postgres`
//!   refuse to run as root, so the directory is chowned to `postgres` and
//!   every server-side binary runs through `setpriv`, which *execs* it as
//!   that user: the child's pid is the postmaster's, so `kill()` reaches
//!   it (`runuser` and `su` fork and would hide it). The directory is
//!   under `/tmp`, which `postgres` can traverse.
//! - A test process that dies (killed, aborted) takes its servers with it:
//!   the postmaster has a parent-death signal (`setpriv --pdeathsig`). Its
//!   temporary directory stays behind then (`/tmp/coffre-pg-*`).
//! - Administration (`create_database`, [`PgCluster::psql`]) goes through
//!   `psql` on the Unix socket in the directory, where the superuser
//!   `coffre` is trusted even in the password variant.
//! - Speed: `fsync = off` (unless [`PgBuilder::fsync`]) and `initdb
//!   --no-sync`; one server costs about a second.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The superuser every cluster is created with.
pub const SUPERUSER: &str = "coffre";
/// How long a server has to start accepting connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where PostgreSQL's binaries are: `pg_config --bindir` if it has
/// `initdb`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn bindir() -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file());
    if let Some(dir) = from_pg_config {
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("no PostgreSQL server binaries: neither pg_config --bindir nor /usr/lib/postgresql/*/bin has them")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `program` from the bindir, run as `postgres` when we are root.
fn server_command(bin: &Path, program: &str, cwd: &Path) -> Command {
    let path = bin.join(program);
    let mut cmd = if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(path);
        cmd
    } else {
        Command::new(path)
    };
    cmd.current_dir(cwd).env_remove("PGDATA");
    cmd
}

/// The postmaster: as [`server_command`], and SIGKILLed by the kernel if
/// the thread that started it ends first (`setpriv --pdeathsig`, set
/// after the change of user), so that a test process killed or aborted
/// leaves no server behind. Start a cluster on the test's own thread, not
/// on a pool thread that may end before the test does.
fn postmaster_command(bin: &Path, cwd: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg("--pdeathsig=KILL");
    if is_root() {
        cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
    }
    cmd.arg("--").arg(bin.join("postgres"));
    cmd.current_dir(cwd).env_remove("PGDATA");
    cmd
}

fn run_ok(mut cmd: Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Chowns `path` (not recursively) to `postgres` when we are root.
fn give_to_postgres(path: &Path) {
    if is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("running as root needs a postgres user to run PostgreSQL as");
        std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
    }
}

/// How to make a cluster: [`PgCluster::builder`].
#[derive(Debug, Default)]
pub struct PgBuilder {
    fsync: bool,
    password: Option<String>,
    tls: bool,
}

impl PgBuilder {
    /// `fsync = on`, for the tests that crash the server and count on
    /// what was acknowledged.
    pub fn fsync(mut self) -> Self {
        self.fsync = true;
        self
    }

    /// TCP logins need this password (scram-sha-256); the Unix socket,
    /// which the harness administers through, stays trusted.
    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.to_string());
        self
    }

    /// `ssl = on` with a server certificate for 127.0.0.1 and localhost
    /// issued by a fresh CA ([`PgCluster::ca_file`]).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    pub fn start(self) -> PgCluster {
        let started = Instant::now();
        let bin = bindir();
        let dir = tempfile::Builder::new()
            .prefix("coffre-pg-")
            .tempdir_in("/tmp")
            .unwrap();
        give_to_postgres(dir.path());
        let data = dir.path().join("data");
        let mut initdb = server_command(&bin, "initdb", dir.path());
        initdb.arg("-D").arg(&data).args([
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        match &self.password {
            Some(password) => {
                let pwfile = dir.path().join("pwfile");
                fs::write(&pwfile, password).unwrap();
                give_to_postgres(&pwfile);
                initdb
                    .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                    .arg(format!("--pwfile={}", pwfile.display()));
            }
            None => {
                initdb.arg("--auth=trust");
            }
        }
        run_ok(initdb, "initdb");
        let mut cluster = PgCluster {
            bin,
            data,
            port: 0,
            child: None,
            ca_file: None,
            fsync: self.fsync,
            dir,
        };
        if self.tls {
            cluster.make_certificates();
        }
        cluster.write_settings();
        cluster.start();
        eprintln!(
            "PostgreSQL on port {} ready in {:?} (initdb included)",
            cluster.port,
            started.elapsed()
        );
        cluster
    }
}

/// A private PostgreSQL server: see the module docs.
#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    child: Option<Child>,
    ca_file: Option<PathBuf>,
    fsync: bool,
    // Last: removed after the server is stopped (fields drop in order).
    dir: tempfile::TempDir,
}

impl PgCluster {
    /// A primary with the defaults: trust logins, no TLS, `fsync = off`.
    pub fn primary() -> Self {
        Self::builder().start()
    }

    pub fn builder() -> PgBuilder {
        PgBuilder::default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory (data directory, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA of the server's certificate (the TLS variant).
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// A URL for `db` over TCP as the superuser, without TLS.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// A fresh database `t_<uuid>`; its name.
    pub fn create_database(&self) -> String {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// Runs `sql` in `db` as the superuser through the Unix socket; its
    /// output (unaligned, tuples only), trimmed. Panics if it fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self.try_psql(db, sql);
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// [`Self::psql`] as `user`, without panicking.
    pub fn try_psql_as(&self, user: &str, db: &str, sql: &str) -> Output {
        Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", user, "-d", db])
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env_remove("PGPASSWORD")
            .output()
            .unwrap()
    }

    pub fn try_psql(&self, db: &str, sql: &str) -> Output {
        self.try_psql_as(SUPERUSER, db, sql)
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Starts the server on the data directory (again, after a stop or a
    /// kill) and waits until it accepts connections. A first start picks a
    /// free port, and another if that one was taken meanwhile.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        for _attempt in 0..20 {
            if self.port == 0 {
                self.port = super::binary::free_port();
                self.write_port();
            }
            match self.spawn_and_wait() {
                Ok(()) => return,
                // Taken meanwhile by someone else: another port.
                Err(log) if log.contains("could not bind") => self.port = 0,
                // Backends of a killed postmaster still hold its shared
                // memory for a moment.
                Err(log) if log.contains("still in use") || log.contains("already exists") => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(log) => panic!("PostgreSQL did not start:\n{log}"),
            }
        }
        panic!(
            "PostgreSQL did not start after 20 attempts:\n{}",
            self.log()
        );
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("postgres.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let logged_before = self.log().len();
        let this_run = |c: &Self| c.log().get(logged_before..).unwrap_or_default().to_string();
        let mut cmd = postmaster_command(&self.bin, self.dir.path());
        cmd.arg("-D")
            .arg(&self.data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("postgres exited ({status}):\n{}", this_run(self)));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", SUPERUSER, "-d", "postgres"])
                .status()
                .unwrap();
            if ready.success() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "not ready in {READY_TIMEOUT:?}:\n{}",
                    this_run(self)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `pg_ctl stop -m fast`: sessions are cut, a clean shutdown.
    pub fn stop_fast(&mut self) {
        self.pg_ctl_stop("fast");
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut cmd = server_command(&self.bin, "pg_ctl", self.dir.path());
        cmd.arg("-D")
            .arg(&self.data)
            .args(["stop", "-m", mode, "-w", "-t", "30"]);
        let stopped = cmd.output().is_ok_and(|o| o.status.success());
        if !stopped {
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// SIGKILL to the postmaster (its backends end when they notice); the
    /// next [`Self::start`] runs crash recovery.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
            // Backends notice the postmaster's death within moments; a new
            // postmaster waits for them (their shared memory) anyway.
        }
    }

    /// A streaming-replication standby of `self`, named `name` (its
    /// `application_name`, for `synchronous_standby_names`), started.
    pub fn standby(&self, name: &str) -> PgCluster {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("coffre-pg-standby-")
            .tempdir_in("/tmp")
            .unwrap();
        give_to_postgres(dir.path());
        let data = dir.path().join("data");
        let mut backup = server_command(&self.bin, "pg_basebackup", dir.path());
        backup
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                SUPERUSER,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ]);
        run_ok(backup, "pg_basebackup");
        let mut standby = PgCluster {
            bin: self.bin.clone(),
            data,
            port: 0,
            child: None,
            ca_file: self.ca_file.clone(),
            fsync: self.fsync,
            dir,
        };
        // Later lines win: the standby's own socket directory, and its
        // connection to the primary under its own name (in the file that
        // pg_basebackup -R wrote it to, which is read last).
        standby.append_conf(&format!(
            "unix_socket_directories = '{}'\n",
            standby.dir.path().display()
        ));
        let auto = standby.data.join("postgresql.auto.conf");
        let mut f = fs::OpenOptions::new().append(true).open(auto).unwrap();
        writeln!(
            f,
            "primary_conninfo = 'host=127.0.0.1 port={} user={SUPERUSER} application_name={name}'",
            self.port
        )
        .unwrap();
        standby.start();
        eprintln!(
            "standby {name} on port {} ready in {:?}",
            standby.port,
            started.elapsed()
        );
        standby
    }

    /// Commits on `self` wait for the standby `name` (ANY 1).
    pub fn require_synchronous_standby(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 ({name})'"),
        );
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    /// `pg_ctl promote`: the standby becomes a primary (waits for it).
    pub fn promote(&self) {
        let mut cmd = server_command(&self.bin, "pg_ctl", self.dir.path());
        cmd.arg("-D")
            .arg(&self.data)
            .args(["promote", "-w", "-t", "30"]);
        run_ok(cmd, "pg_ctl promote");
    }

    fn append_conf(&self, text: &str) {
        let path = self.data.join("postgresql.conf");
        let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn write_settings(&self) {
        let fsync = if self.fsync { "on" } else { "off" };
        let mut conf = format!(
            "\n# coffre test harness\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             fsync = {fsync}\n\
             full_page_writes = {fsync}\n\
             wal_level = replica\n\
             max_wal_senders = 4\n\
             max_connections = 60\n\
             shared_buffers = 16MB\n\
             logging_collector = off\n\
             log_min_messages = warning\n",
            self.dir.path().display()
        );
        if self.ca_file.is_some() {
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        self.append_conf(&conf);
    }

    /// The port, last in the file so that it wins (a standby's copy of its
    /// primary's file has the primary's).
    fn write_port(&self) {
        self.append_conf(&format!("port = {}\n", self.port));
    }

    /// A CA (in the directory, for clients) and the server's certificate
    /// and key (in the data directory, the postgres user's, key 0600).
    fn make_certificates(&mut self) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "coffre test PostgreSQL CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca_file = self.dir.path().join("ca.pem");
        fs::write(&ca_file, ca_cert.pem()).unwrap();
        for (name, pem) in [
            ("server.crt", cert.pem()),
            ("server.key", key.serialize_pem()),
        ] {
            let path = self.data.join(name);
            fs::write(&path, pem).unwrap();
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            give_to_postgres(&path);
        }
        self.ca_file = Some(ca_file);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Immediate: nothing to keep, and no checkpoint to wait for.
        self.pg_ctl_stop("immediate");
    }
}
