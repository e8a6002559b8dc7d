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
    let mut file = AtomicFile::create(path, private)?;
    file.write_all(contents)?;
    file.commit()
}

/// A file written in full before it appears under its name: a temporary
/// file beside it (mode 0600 when `private`) that [`AtomicFile::commit`]
/// `fsync`s and renames over the path, then `fsync`s the directory. Dropped
/// without `commit` (an error half-way), the temporary file is removed and
/// the path is untouched. For streams of any length (`coffre seal` and
/// `open --out FILE`) as for small files.
#[derive(Debug)]
pub struct AtomicFile {
    file: Option<io::BufWriter<fs::File>>,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl AtomicFile {
    pub fn create(path: &Path, private: bool) -> io::Result<Self> {
        let dir = parent_dir(path);
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
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
        let file = options.open(&tmp)?;
        Ok(AtomicFile {
            file: Some(io::BufWriter::with_capacity(256 * 1024, file)),
            tmp,
            path: path.to_path_buf(),
        })
    }

    /// Makes the file durable under its name.
    pub fn commit(mut self) -> io::Result<()> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("the file was already committed"))?;
        let result = file
            .into_inner()
            .map_err(io::IntoInnerError::into_error)
            .and_then(|f| f.sync_all())
            .and_then(|()| fs::rename(&self.tmp, &self.path));
        if let Err(e) = result {
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        sync_dir(parent_dir(&self.path))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("the file was already committed")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
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
