//! A private PostgreSQL server in a directory of its own, for
//! `coffre dev --nodes N`: made with `initdb` at the first start (a
//! random password for the `coffre` superuser, SCRAM logins, listening
//! on 127.0.0.1 only), started as a child process, stopped with
//! `pg_ctl stop -m fast`. Not for production: there, the database is the
//! operator's (docs/postgres.md).
//!
//! As root, `initdb` and `postgres` refuse to run: the directory is given
//! to the `postgres` user and both run through `setpriv`, which execs
//! them as that user. Every directory above must then be traversable by
//! `postgres`; the error says so when one is not.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use zeroize::Zeroizing;

/// The superuser, and the database coffre uses.
pub const USER: &str = "coffre";
pub const DATABASE: &str = "coffre";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the server binaries are: `pg_config --bindir` if it has
/// `initdb`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn bindir() -> anyhow::Result<PathBuf> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file());
    if let Some(dir) = from_pg_config {
        return Ok(dir);
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
    versions.pop().map(|(_, bin)| bin).context(
        "no PostgreSQL server found (neither pg_config --bindir nor /usr/lib/postgresql/*/bin): \
         install PostgreSQL 15 or newer (apt-get install postgresql)",
    )
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `program` from `bin`, as `postgres` when we are root.
fn server_command(bin: &Path, program: &str) -> Command {
    let path = bin.join(program);
    if is_root() {
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
    }
}

/// A private server: see the module docs.
#[derive(Debug)]
pub struct LocalPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    password: Zeroizing<String>,
    child: Option<Child>,
}

impl LocalPostgres {
    /// Starts the server in `dir` on `port` (making it first if `dir`
    /// holds none), and waits until it accepts connections.
    pub fn start(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let bin = bindir()?;
        let data = dir.join("data");
        let password_file = dir.join("password");
        if !data.join("PG_VERSION").is_file() {
            make(&bin, dir, &data, &password_file)?;
        }
        let password = Zeroizing::new(
            fs::read_to_string(&password_file)
                .with_context(|| format!("reading {}", password_file.display()))?
                .trim()
                .to_string(),
        );
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("postgres.log"))
            .with_context(|| format!("opening {}", dir.join("postgres.log").display()))?;
        let mut cmd = server_command(&bin, "postgres");
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .current_dir(dir)
            .env_remove("PGDATA")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("postgres.log")?)
            .stderr(log);
        let mut child = cmd.spawn().context("starting postgres")?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("waiting for postgres")? {
                bail!(
                    "postgres exited at start ({status}); see {}",
                    dir.join("postgres.log").display()
                );
            }
            let ready = Command::new(bin.join("pg_isready"))
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-d",
                    "postgres",
                ])
                .status()
                .context("running pg_isready")?;
            if ready.success() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "postgres did not accept connections within {READY_TIMEOUT:?}; see {}",
                    dir.join("postgres.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            bin,
            dir: dir.to_path_buf(),
            port,
            password,
            child: Some(child),
        })
    }

    /// The URL of the `coffre` database (the password in it: keep it in a
    /// private file).
    pub fn url(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{DATABASE}?sslmode=disable",
            self.password.as_str(),
            self.port
        ))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (`pg_ctl stop -m fast`) and waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let stopped = server_command(&self.bin, "pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `initdb` in `data` with a new random password, and the `coffre`
/// database.
fn make(bin: &Path, dir: &Path, data: &Path, password_file: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut random = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
        .map_err(|_| anyhow::anyhow!("no randomness for the database password"))?;
    let password = Zeroizing::new(hex::encode(random));
    crate::fsutil::write_atomic(password_file, password.as_bytes(), false)
        .with_context(|| format!("writing {}", password_file.display()))?;
    if is_root() {
        give_to_postgres(dir)?;
        give_to_postgres(password_file)?;
    }
    let out = server_command(bin, "initdb")
        .arg("-D")
        .arg(data)
        .args(["-U", USER, "-E", "UTF8", "--locale=C"])
        .args(["--auth-local=scram-sha-256", "--auth-host=scram-sha-256"])
        .arg(format!("--pwfile={}", password_file.display()))
        .current_dir(dir)
        .env_remove("PGDATA")
        .output()
        .context("running initdb")?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let hint = if is_root() && why.contains("ermission denied") {
            format!(
                " (as root, PostgreSQL runs as the postgres user, which must be able to reach \
                 {}: give a --data-dir under a directory every user can traverse, such as /tmp)",
                dir.display()
            )
        } else {
            String::new()
        };
        bail!("initdb failed{hint}:\n{why}");
    }
    Ok(())
}

/// Gives `path` to the `postgres` user.
fn give_to_postgres(path: &Path) -> anyhow::Result<()> {
    let user = nix::unistd::User::from_name("postgres")
        .context("looking up the postgres user")?
        .context("running as root needs a postgres user to run PostgreSQL as (apt-get install postgresql creates it)")?;
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .with_context(|| format!("giving {} to the postgres user", path.display()))
}

/// Creates the `coffre` database if it does not exist, through `psql` on
/// the server's Unix socket.
pub fn ensure_database(server: &LocalPostgres) -> anyhow::Result<()> {
    let psql = |sql: &str| -> anyhow::Result<String> {
        let out = Command::new(server.bin.join("psql"))
            .args(["-XtAq", "-h"])
            .arg(&server.dir)
            .args([
                "-p",
                &server.port.to_string(),
                "-U",
                USER,
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", server.password.as_str())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let exists = psql(&format!(
        "SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
    ))?;
    if exists != "1" {
        psql(&format!("CREATE DATABASE {DATABASE}"))?;
    }
    Ok(())
}
