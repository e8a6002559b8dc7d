//! File-system helpers: whole small files replaced atomically and durably
//! (dev PKI, dev HSM PIN, the audit public key, pending approvals), and the
//! `fsync`s they are built from, which the sled store uses too.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Writes `contents` to `path` atomically and durably: a temporary file in
/// the same directory (mode 0600 when `private`), `fsync`, rename over
/// `path`, `fsync` of the directory. After a crash or a power cut, `path`
/// holds its old contents (or is absent) or the new ones, never a part.
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    let tmp = dir.join(tmp_name);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let written = options
        .open(&tmp)
        .and_then(|file| write_and_sync(file, contents));
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Writes `contents` to `path` (created, or truncated) and `fsync`s it. Not
/// atomic: a crash can leave a part of it. For a temporary file that a
/// caller then renames into place, as [`write_atomic`] does.
pub fn write_synced(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_and_sync(fs::File::create(path)?, contents)
}

/// `fsync`s the directory `dir`, which makes its entries durable: a file
/// created, renamed or removed in it.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

fn write_and_sync(mut file: fs::File, contents: &[u8]) -> io::Result<()> {
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        write_atomic(&path, b"first", false).unwrap();
        write_atomic(&path, b"second", true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let err = write_atomic(&dir.path().join("missing/x"), b"", false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn write_synced_truncates_and_sync_dir_needs_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("CURRENT.tmp");
        write_synced(&path, b"gen-000002\n").unwrap();
        write_synced(&path, b"gen-3\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"gen-3\n");
        sync_dir(dir.path()).unwrap();
        let err = sync_dir(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
