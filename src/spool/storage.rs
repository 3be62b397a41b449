//! The file operations of the spool's log (segments, cursor, quarantine, retained log) behind
//! one small trait, so a test can put a file system under the log that forgets, on a
//! simulated crash, whatever was never synced (see `crash` in the tests).
//!
//! [`Disk`] is the real one, over `std::fs`. A file being appended to is opened once and kept
//! as a [`StorageFile`], so the hot path (write, `fdatasync`) costs the same system calls as
//! calling `std::fs` directly. This module owns no policy: which operation comes when, and
//! what must be synced before what, is the log's business.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// A file opened for writing: what the log does to a segment or a small file it replaces.
pub(crate) trait StorageFile: Send + fmt::Debug {
    /// Writes all of `buf` at the end of what was written so far.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Makes the written bytes durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Makes the bytes and the file's metadata durable (`fsync`).
    fn sync_all(&mut self) -> io::Result<()>;
    /// Cuts the file to `len` bytes (later writes go after them).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// The file operations the log uses. Paths are absolute (under the spool directory).
pub(crate) trait Storage: Send + Sync + fmt::Debug {
    /// Creates `dir` and its missing parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the entries of `dir` (`NotFound` when it does not exist).
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Whether `path` names a file or directory.
    fn exists(&self, path: &Path) -> bool;
    /// Whether `path` names a regular file.
    fn is_file(&self, path: &Path) -> bool;
    /// The size of the file at `path`.
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// The whole content of a file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// A reader of the `len` bytes of `path` from `offset` on (buffered).
    fn read_range(&self, path: &Path, offset: u64, len: u64) -> io::Result<Box<dyn Read + '_>>;
    /// Creates the file, or empties it if it exists, for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Creates a file that must not exist yet, for appending.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Opens an existing file for writing (to cut it back).
    fn open_write(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of `dir` (files created, renamed or removed in it) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes the exclusive lock on the file `path` for the life of the returned guard; `None`
    /// when someone else holds it.
    fn lock(&self, path: &Path) -> io::Result<Option<Box<dyn fmt::Debug + Send>>>;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Disk;

/// A file of [`Disk`]: the open handle, kept between writes.
#[derive(Debug)]
struct DiskFile(File);

impl StorageFile for DiskFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Storage for Disk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(fs::read_dir(dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn is_file(&self, path: &Path) -> bool {
        path.is_file()
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn read_range(&self, path: &Path, offset: u64, len: u64) -> io::Result<Box<dyn Read + '_>> {
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(offset))?;
        Ok(Box::new(io::BufReader::new(file.take(len))))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(DiskFile(File::create(path)?)))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(path)?;
        Ok(Box::new(DiskFile(file)))
    }

    fn open_write(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(DiskFile(
            OpenOptions::new().write(true).open(path)?,
        )))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn lock(&self, path: &Path) -> io::Result<Option<Box<dyn fmt::Debug + Send>>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Box::new(file))),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }
}
