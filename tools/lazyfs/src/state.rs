//! What is durable and what is not: the undo logs of file contents and the journal of directory
//! entries changed since their last sync, and the power cut that plays them backwards.
//!
//! Every change is applied to the backing directory at once (reads need no merging); what a
//! power cut must take back is kept here. Owns the backing directory's graveyard
//! (`.lazyfs-graves`), where unlinked and replaced entries wait until the unlink is synced.
//! Knows nothing of FUSE: `fs.rs` translates requests into the calls below.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// The name, in the backing root, of the directory that holds unlinked entries until their
/// unlink is synced. Hidden from the mount.
pub const GRAVES: &str = ".lazyfs-graves";

/// The FUSE inode number of the mount's root.
pub const ROOT: u64 = 1;

/// One file's contents since its last `fsync`/`fdatasync`.
struct FileLog {
    /// A descriptor of the backing file (read and write), so that the undo reaches it whatever
    /// its name is now, or whether it still has one.
    file: File,
    /// The file's length at its last sync (at first sight for a file not written through us
    /// since the mount).
    synced_len: u64,
    /// The file's length now, as our writes and truncations left it.
    len: u64,
    /// The bytes below `synced_len` that unsynced writes and truncations overwrote, in order:
    /// `(offset, old bytes)`. Bytes at or past `synced_len` need no copy: the cut truncates.
    undo: Vec<(u64, Vec<u8>)>,
    /// Unsynced write requests, for the control socket's answers.
    writes: u64,
    /// Bytes written since the last sync.
    bytes: u64,
    /// The last unsynced write, `(offset, data)`, which a torn cut keeps a prefix of; `None`
    /// when the last change was a truncation.
    last_write: Option<(u64, Vec<u8>)>,
}

impl FileLog {
    fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            synced_len: len,
            len,
            undo: Vec::new(),
            writes: 0,
            bytes: 0,
            last_write: None,
        })
    }

    /// Copies the synced bytes of `[from, to)` that are about to be overwritten.
    fn save(&mut self, from: u64, to: u64) -> io::Result<()> {
        let end = to.min(self.len).min(self.synced_len);
        if from < end {
            let mut old = vec![0; (end - from) as usize];
            self.file.read_exact_at(&mut old, from)?;
            self.undo.push((from, old));
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.save(offset, offset + data.len() as u64)?;
        self.file.write_all_at(data, offset)?;
        self.len = self.len.max(offset + data.len() as u64);
        self.writes += 1;
        self.bytes += data.len() as u64;
        // The copy for a torn cut reuses its buffer: appends stay free of allocations.
        let mut last = self.last_write.take().map(|(_, v)| v).unwrap_or_default();
        last.clear();
        last.extend_from_slice(data);
        self.last_write = Some((offset, last));
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.save(len, u64::MAX)?;
        self.file.set_len(len)?;
        self.len = len;
        self.last_write = None;
        Ok(())
    }

    fn sync(&mut self) {
        self.synced_len = self.len;
        self.undo.clear();
        self.writes = 0;
        self.bytes = 0;
        self.last_write = None;
    }

    /// Puts the file back to its synced state; with `tear`, then writes a strict prefix (of a
    /// length drawn from `tear`) of the last unsynced write. Returns whether it tore one.
    fn cut(&mut self, tear: Option<&mut SplitMix>) -> io::Result<bool> {
        for (offset, old) in self.undo.drain(..).rev() {
            self.file.write_all_at(&old, offset)?;
        }
        self.file.set_len(self.synced_len)?;
        self.len = self.synced_len;
        let mut torn = false;
        if let (Some(rng), Some((offset, data))) = (tear, self.last_write.take()) {
            if !data.is_empty() {
                let keep = (rng.next() % data.len() as u64) as usize;
                self.file.write_all_at(&data[..keep], offset)?;
                if keep > 0 {
                    self.len = self.len.max(offset + keep as u64);
                }
                torn = true;
            }
        }
        self.sync();
        Ok(torn)
    }
}

/// A change of directory entries not yet synced, with what it takes to undo it. Paths are
/// relative to the backing root.
#[derive(Debug)]
enum Change {
    /// A file created (undo: remove it).
    Created { path: PathBuf },
    /// A directory made (undo: remove it and what is in it).
    MadeDir { path: PathBuf },
    /// A file or empty directory removed: it waits in the graveyard (undo: move it back).
    Removed {
        path: PathBuf,
        grave: PathBuf,
        ino: u64,
    },
    /// A rename, and the entry it replaced, which waits in the graveyard (undo: both back).
    Renamed {
        from: PathBuf,
        to: PathBuf,
        replaced: Option<(PathBuf, u64)>,
    },
}

impl Change {
    /// The paths the change names.
    fn paths(&self) -> Vec<&Path> {
        match self {
            Change::Created { path } | Change::MadeDir { path } | Change::Removed { path, .. } => {
                vec![path]
            }
            Change::Renamed { from, to, .. } => vec![from, to],
        }
    }
}

#[derive(Debug)]
struct Entry {
    change: Change,
    /// The directories (FUSE inode numbers) whose `fsyncdir` makes the change durable.
    dirs: [u64; 2],
    /// The inode the entry names (its own `fsync` makes it durable, unless `--strict-dirs`).
    subject: u64,
}

/// The figures of a power cut.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cut {
    pub writes: u64,
    pub torn: u64,
    pub entries: u64,
    /// Undo steps that failed (an entry changed again in a way the journal cannot retrace).
    pub failures: u64,
    /// The inodes whose contents or attributes changed, for the kernel's caches.
    pub touched: Vec<u64>,
}

/// Unsynced figures, for `stats`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub writes: u64,
    pub bytes: u64,
    pub entries: u64,
}

/// A tiny seeded generator (SplitMix64): the same seed tears the same way.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The whole file system's durability state, shared by the FUSE threads and the control socket.
///
/// Lock order: `gate`, then `entries`, then `paths`, then `files`, then one `FileLog`.
pub struct State {
    /// The backing directory (absolute).
    backing: PathBuf,
    /// `--strict-dirs`: only `fsyncdir` makes an entry change durable.
    strict_dirs: bool,
    /// The backing root's own inode number, shown as `ROOT`.
    root_ino: u64,
    /// Every change takes it shared, a power cut or `sync-all` exclusive: a cut never sees
    /// half a change.
    gate: RwLock<()>,
    /// Unsynced entry changes, oldest first.
    entries: Mutex<Vec<Entry>>,
    /// FUSE inode number -> path relative to the backing root, refreshed by every lookup.
    paths: Mutex<HashMap<u64, PathBuf>>,
    /// Files written or truncated since the mount, by inode number.
    files: Mutex<HashMap<u64, Arc<Mutex<FileLog>>>>,
    /// Names the next graveyard entry.
    graves: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking request thread leaves the state as consistent as any other I/O error would.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    /// Opens the backing directory. Whatever is in it is taken as synced; graves left by an
    /// earlier run (whose unlinks that run's exit made durable) are removed.
    pub fn open(backing: &Path, strict_dirs: bool) -> io::Result<Self> {
        let backing = fs::canonicalize(backing)?;
        let root_ino = fs::metadata(&backing)?.ino();
        let graves = backing.join(GRAVES);
        if graves.exists() {
            fs::remove_dir_all(&graves)?;
        }
        fs::DirBuilder::new().mode(0o700).create(&graves)?;
        let mut paths = HashMap::new();
        paths.insert(ROOT, PathBuf::new());
        Ok(Self {
            backing,
            strict_dirs,
            root_ino,
            gate: RwLock::new(()),
            entries: Mutex::new(Vec::new()),
            paths: Mutex::new(paths),
            files: Mutex::new(HashMap::new()),
            graves: AtomicU64::new(0),
        })
    }

    /// The FUSE inode number of a backing file.
    pub fn ino(&self, md: &fs::Metadata) -> u64 {
        if md.ino() == self.root_ino {
            ROOT
        } else {
            md.ino()
        }
    }

    /// The backing path of an inode, if a lookup has named it.
    pub fn path(&self, ino: u64) -> Option<PathBuf> {
        lock(&self.paths).get(&ino).map(|p| self.backing.join(p))
    }

    /// The backing path of `name` in directory `parent`, refusing the graveyard.
    pub fn child(&self, parent: u64, name: &OsStr) -> io::Result<PathBuf> {
        if parent == ROOT && name == GRAVES {
            return Err(io::Error::from_raw_os_error(nix::libc::ENOENT));
        }
        let paths = lock(&self.paths);
        let dir = paths.get(&parent).ok_or_else(stale)?;
        Ok(self.backing.join(dir).join(name))
    }

    /// Notes that `path` (absolute, in the backing directory) is inode `ino`.
    pub fn remember(&self, ino: u64, path: &Path) {
        if let Ok(rel) = path.strip_prefix(&self.backing) {
            lock(&self.paths).insert(ino, rel.to_path_buf());
        }
    }

    fn relative(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.backing)
            .unwrap_or(path)
            .to_path_buf()
    }

    fn record(&self, entries: &mut Vec<Entry>, change: Change, dirs: [u64; 2], subject: u64) {
        entries.push(Entry {
            change,
            dirs,
            subject,
        });
    }

    fn new_grave(&self) -> PathBuf {
        let n = self.graves.fetch_add(1, Ordering::Relaxed);
        self.backing.join(GRAVES).join(n.to_string())
    }

    fn log_for(
        &self,
        ino: u64,
        open: impl FnOnce() -> io::Result<File>,
    ) -> io::Result<Arc<Mutex<FileLog>>> {
        let mut files = lock(&self.files);
        if let Some(log) = files.get(&ino) {
            return Ok(log.clone());
        }
        let log = Arc::new(Mutex::new(FileLog::new(open()?)?));
        files.insert(ino, log.clone());
        Ok(log)
    }

    /// Writes `data` at `offset` of inode `ino`, through `handle` (a descriptor open for
    /// writing; duplicated the first time the file is written since its last cut).
    pub fn write(&self, ino: u64, handle: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let log = self.log_for(ino, || handle.try_clone())?;
        let mut log = lock(&log);
        log.write(offset, data)
    }

    /// Truncates (or extends) inode `ino` to `len`.
    pub fn truncate(&self, ino: u64, handle: Option<&File>, len: u64) -> io::Result<()> {
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let log = self.log_for(ino, || match handle {
            Some(h) => h.try_clone(),
            None => {
                let path = self.path(ino).ok_or_else(stale)?;
                OpenOptions::new().read(true).write(true).open(path)
            }
        })?;
        let mut log = lock(&log);
        log.truncate(len)
    }

    /// `fsync`/`fdatasync` of inode `ino`: its contents become durable, and (unless
    /// `--strict-dirs`) the entry changes that name it.
    pub fn fsync(&self, ino: u64) {
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut entries = lock(&self.entries);
        if !self.strict_dirs {
            // ext4 in its default mode commits the entry that names a file with the file's
            // own fsync, and the directories above it that are still new.
            let path = lock(&self.paths).get(&ino).cloned();
            self.commit_where(&mut entries, |e| {
                let ancestor = match (&e.change, &path) {
                    (Change::MadeDir { path: dir }, Some(p)) => p.starts_with(dir),
                    _ => false,
                };
                e.subject == ino || ancestor
            });
        }
        drop(entries);
        if let Some(log) = lock(&self.files).get(&ino).cloned() {
            lock(&log).sync();
        }
    }

    /// `fsyncdir`: every entry change in directory `dir` becomes durable.
    pub fn fsyncdir(&self, dir: u64) {
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut entries = lock(&self.entries);
        self.commit_where(&mut entries, |e| e.dirs.contains(&dir));
    }

    /// Commits the entry changes `chosen` picks, and every earlier change on the same path or
    /// below it: a journal commits in order, so a change never becomes durable before one it
    /// depends on (a directory emptied, removed, made again).
    fn commit_where(&self, entries: &mut Vec<Entry>, chosen: impl Fn(&Entry) -> bool) {
        let mut committed: Vec<PathBuf> = Vec::new();
        let mut keep = vec![true; entries.len()];
        for (i, e) in entries.iter().enumerate().rev() {
            let paths = e.change.paths();
            let depends = paths
                .iter()
                .any(|p| committed.iter().any(|c| p.starts_with(c)));
            if chosen(e) || depends {
                committed.extend(paths.into_iter().map(Path::to_path_buf));
                self.commit(e);
                keep[i] = false;
            }
        }
        let mut keep = keep.into_iter();
        entries.retain(|_| keep.next().unwrap_or(true));
    }

    /// An entry change becomes durable: what waited in the graveyard goes for good.
    fn commit(&self, e: &Entry) {
        let grave = match &e.change {
            Change::Removed { grave, ino, .. } => Some((grave, *ino)),
            Change::Renamed {
                replaced: Some((grave, ino)),
                ..
            } => Some((grave, *ino)),
            _ => None,
        };
        if let Some((grave, ino)) = grave {
            let _ = remove_any(grave);
            // Its inode number may now be reused by another file.
            lock(&self.files).remove(&ino);
        }
    }

    /// Creates a regular file `name` in `parent` (`O_CREAT`): returns it open for reading and
    /// writing, and whether we made it.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        exclusive: bool,
    ) -> io::Result<(File, PathBuf, bool)> {
        use std::os::unix::fs::OpenOptionsExt;
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut entries = lock(&self.entries);
        let path = self.child(parent, name)?;
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
        {
            Ok(file) => {
                let ino = self.ino(&file.metadata()?);
                self.remember(ino, &path);
                let rel = self.relative(&path);
                self.record(
                    &mut entries,
                    Change::Created { path: rel },
                    [parent, 0],
                    ino,
                );
                Ok((file, path, true))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !exclusive => {
                let file = OpenOptions::new().read(true).write(true).open(&path)?;
                Ok((file, path, false))
            }
            Err(e) => Err(e),
        }
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> io::Result<(fs::Metadata, PathBuf)> {
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut entries = lock(&self.entries);
        let path = self.child(parent, name)?;
        fs::DirBuilder::new().mode(mode).create(&path)?;
        let md = fs::symlink_metadata(&path)?;
        let ino = self.ino(&md);
        self.remember(ino, &path);
        let rel = self.relative(&path);
        self.record(
            &mut entries,
            Change::MadeDir { path: rel },
            [parent, 0],
            ino,
        );
        Ok((md, path))
    }

    /// `unlink` and `rmdir`: the entry moves to the graveyard.
    pub fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> io::Result<()> {
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut entries = lock(&self.entries);
        let path = self.child(parent, name)?;
        let md = fs::symlink_metadata(&path)?;
        if dir {
            if !md.is_dir() {
                return Err(io::Error::from_raw_os_error(nix::libc::ENOTDIR));
            }
            if fs::read_dir(&path)?.next().is_some() {
                return Err(io::Error::from_raw_os_error(nix::libc::ENOTEMPTY));
            }
        } else if md.is_dir() {
            return Err(io::Error::from_raw_os_error(nix::libc::EISDIR));
        }
        let grave = self.new_grave();
        fs::rename(&path, &grave)?;
        let ino = self.ino(&md);
        let rel = self.relative(&path);
        self.record(
            &mut entries,
            Change::Removed {
                path: rel,
                grave,
                ino,
            },
            [parent, 0],
            ino,
        );
        Ok(())
    }

    /// `rename`, replacing the target if there is one (`noreplace` refuses to).
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> io::Result<()> {
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut entries = lock(&self.entries);
        let from = self.child(parent, name)?;
        let to = self.child(newparent, newname)?;
        let md = fs::symlink_metadata(&from)?;
        let mut replaced = None;
        if let Ok(target) = fs::symlink_metadata(&to) {
            if noreplace {
                return Err(io::Error::from_raw_os_error(nix::libc::EEXIST));
            }
            if target.ino() == md.ino() {
                return Ok(());
            }
            match (md.is_dir(), target.is_dir()) {
                (false, true) => return Err(io::Error::from_raw_os_error(nix::libc::EISDIR)),
                (true, false) => return Err(io::Error::from_raw_os_error(nix::libc::ENOTDIR)),
                (true, true) if fs::read_dir(&to)?.next().is_some() => {
                    return Err(io::Error::from_raw_os_error(nix::libc::ENOTEMPTY))
                }
                _ => {}
            }
            let grave = self.new_grave();
            fs::rename(&to, &grave)?;
            replaced = Some((grave, self.ino(&target)));
        }
        if let Err(e) = fs::rename(&from, &to) {
            if let Some((grave, _)) = &replaced {
                let _ = fs::rename(grave, &to);
            }
            return Err(e);
        }
        let (from, to) = (self.relative(&from), self.relative(&to));
        self.move_paths(&from, &to);
        let ino = self.ino(&md);
        self.record(
            &mut entries,
            Change::Renamed { from, to, replaced },
            [parent, newparent],
            ino,
        );
        Ok(())
    }

    /// Renames the inode paths at or under `from` (relative) to be under `to`.
    fn move_paths(&self, from: &Path, to: &Path) {
        let mut paths = lock(&self.paths);
        for p in paths.values_mut() {
            if let Ok(rest) = p.strip_prefix(from) {
                *p = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }

    /// Everything becomes durable (`sync-all`, and a clean exit).
    pub fn sync_all(&self) {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let entries = std::mem::take(&mut *lock(&self.entries));
        for e in &entries {
            self.commit(e);
        }
        lock(&self.files).clear();
    }

    /// A power cut: every unsynced write and entry change is undone, newest first; with
    /// `tear`, the last unsynced write of each file keeps a strict prefix of a length drawn
    /// from the seed (files in inode order, so a seed always tears the same way).
    pub fn cut(&self, tear: Option<u64>) -> Cut {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut cut = Cut::default();
        let mut rng = tear.map(SplitMix::new);
        let mut files: Vec<(u64, Arc<Mutex<FileLog>>)> = lock(&self.files).drain().collect();
        files.sort_by_key(|(ino, _)| *ino);
        for (ino, log) in files {
            let mut log = lock(&log);
            if log.writes == 0 && log.undo.is_empty() && log.len == log.synced_len {
                continue;
            }
            cut.writes += log.writes;
            match log.cut(rng.as_mut()) {
                Ok(true) => cut.torn += 1,
                Ok(false) => {}
                Err(_) => cut.failures += 1,
            }
            cut.touched.push(ino);
        }
        let entries = std::mem::take(&mut *lock(&self.entries));
        for e in entries.into_iter().rev() {
            cut.entries += 1;
            cut.touched.push(e.subject);
            let change = format!("{:?}", e.change);
            if let Err(err) = self.undo(e) {
                eprintln!("lazyfs: cannot undo {change}: {err}");
                cut.failures += 1;
            }
        }
        cut
    }

    fn undo(&self, e: Entry) -> io::Result<()> {
        let b = &self.backing;
        match e.change {
            Change::Created { path } => {
                lock(&self.files).remove(&e.subject);
                lock(&self.paths).remove(&e.subject);
                fs::remove_file(b.join(path))
            }
            Change::MadeDir { path } => {
                lock(&self.paths).retain(|_, p| !p.starts_with(&path) || p.as_os_str().is_empty());
                fs::remove_dir_all(b.join(path))
            }
            Change::Removed { path, grave, ino } => {
                fs::rename(grave, b.join(&path))?;
                lock(&self.paths).insert(ino, path);
                Ok(())
            }
            Change::Renamed { from, to, replaced } => {
                fs::rename(b.join(&to), b.join(&from))?;
                self.move_paths(&to, &from);
                if let Some((grave, ino)) = replaced {
                    fs::rename(grave, b.join(&to))?;
                    lock(&self.paths).insert(ino, to);
                }
                Ok(())
            }
        }
    }

    /// The unsynced entry changes, oldest first, for `entries`.
    pub fn journal(&self) -> Vec<String> {
        lock(&self.entries)
            .iter()
            .map(|e| match &e.change {
                Change::Created { path } => format!("create {}", path.display()),
                Change::MadeDir { path } => format!("mkdir {}", path.display()),
                Change::Removed { path, .. } => format!("remove {}", path.display()),
                Change::Renamed { from, to, replaced } => format!(
                    "rename {} {}{}",
                    from.display(),
                    to.display(),
                    if replaced.is_some() {
                        " (replacing)"
                    } else {
                        ""
                    }
                ),
            })
            .collect()
    }

    pub fn stats(&self) -> Stats {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut s = Stats {
            entries: lock(&self.entries).len() as u64,
            ..Stats::default()
        };
        for log in lock(&self.files).values() {
            let log = lock(log);
            if log.writes > 0 || log.len != log.synced_len || !log.undo.is_empty() {
                s.files += 1;
                s.writes += log.writes;
                s.bytes += log.bytes;
            }
        }
        s
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

fn stale() -> io::Error {
    io::Error::from_raw_os_error(nix::libc::ESTALE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(strict: bool) -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path(), strict).unwrap();
        (dir, state)
    }

    #[test]
    fn a_cut_puts_overwritten_synced_bytes_back_and_truncates_to_the_synced_length() {
        // Arrange
        let (dir, s) = state(false);
        let (file, _, _) = s.create(ROOT, OsStr::new("f"), 0o644, true).unwrap();
        let ino = s.ino(&file.metadata().unwrap());
        s.write(ino, &file, 0, b"hello world").unwrap();
        s.fsync(ino);
        s.write(ino, &file, 6, b"WORLD and more").unwrap();
        s.truncate(ino, Some(&file), 3).unwrap();
        s.write(ino, &file, 3, b"p!").unwrap();
        // Act
        let cut = s.cut(None);
        // Assert
        assert_eq!(cut.writes, 2);
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"hello world");
    }

    #[test]
    fn a_torn_cut_keeps_a_strict_prefix_of_the_last_write_only() {
        for seed in 0..50 {
            let (dir, s) = state(false);
            let (file, _, _) = s.create(ROOT, OsStr::new("f"), 0o644, true).unwrap();
            let ino = s.ino(&file.metadata().unwrap());
            s.write(ino, &file, 0, b"base").unwrap();
            s.fsync(ino);
            s.write(ino, &file, 4, b"-first").unwrap();
            s.write(ino, &file, 10, b"-second").unwrap();
            let cut = s.cut(Some(seed));
            assert_eq!(cut.torn, 1);
            let got = fs::read(dir.path().join("f")).unwrap();
            assert!(got.len() < 4 + 6 + 7);
            assert_eq!(&got[..4], b"base");
            if got.len() > 4 {
                // The dropped first write leaves a hole; the kept prefix follows it.
                assert_eq!(&got[4..10], &[0; 6]);
                assert!(b"-second".starts_with(&got[10..]));
            }
        }
    }

    #[test]
    fn a_commit_takes_the_earlier_changes_on_its_path_with_it() {
        // Arrange: a directory made, removed and made again (as nats-server does at start),
        // then a file in it fsynced: by default that commits the file and the new directory.
        let (dir, s) = state(false);
        let name = OsStr::new("d");
        s.mkdir(ROOT, name, 0o755).unwrap();
        s.remove(ROOT, name, true).unwrap();
        let (md, _) = s.mkdir(ROOT, name, 0o755).unwrap();
        let d = s.ino(&md);
        let (file, _, _) = s.create(d, OsStr::new("f"), 0o644, true).unwrap();
        let ino = s.ino(&file.metadata().unwrap());
        s.write(ino, &file, 0, b"kept").unwrap();
        s.fsync(ino);
        s.create(ROOT, OsStr::new("g"), 0o644, true).unwrap();
        // Act
        let cut = s.cut(None);
        // Assert: only g's creation was left to undo, and it could be.
        assert_eq!((cut.entries, cut.failures), (1, 0));
        assert_eq!(fs::read(dir.path().join("d/f")).unwrap(), b"kept");
        assert!(!dir.path().join("g").exists());
    }

    #[test]
    fn the_same_seed_tears_the_same_way() {
        let a: Vec<u64> = {
            let mut r = SplitMix::new(7);
            (0..4).map(|_| r.next()).collect()
        };
        let mut r = SplitMix::new(7);
        assert_eq!(a, (0..4).map(|_| r.next()).collect::<Vec<_>>());
    }
}
