//! A file system that forgets what was never synced, and the crash loop run over it.
//!
//! [`CrashStorage`] is a [`Storage`] in memory, in the style of SQLite's crash VFS
//! (`src/test6.c`) and FoundationDB's `AsyncFileNonDurable`. Files are inodes that remember
//! the bytes the last `fsync`/`fdatasync` made durable and what was written since; the
//! namespace is kept twice, as the program sees it and as the last directory syncs left it
//! (a file created, renamed or removed counts only once its directory is synced). It counts
//! every operation that changes something ("writes": create, write, set_len, rename, remove,
//! mkdir) or makes it durable ("syncs"), and can crash right after the k-th one: from then on
//! every operation fails, and [`CrashStorage::crashed`] gives the disk a machine would find
//! after a power cut at that moment (unsynced bytes dropped, or the last write torn at a
//! chosen byte; unsynced directory entries dropped), or after a kill of the process only
//! (everything kept).
//!
//! The test below runs a scenario of the log once to count its operations, then once per
//! crash point and way of crashing, reopens the spool on what survived and checks it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::storage::{Storage, StorageFile};
use super::*;

/// What a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir,
}

/// A file's bytes: those made durable, and those the program sees.
#[derive(Debug, Clone, Default)]
struct Inode {
    synced: Vec<u8>,
    current: Vec<u8>,
}

/// The kind of a counted operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpKind {
    Write,
    Sync,
}

/// One counted operation: its kind, and for a write to a file, how many unsynced bytes that
/// file then held past its synced ones (where a tear can fall).
#[derive(Debug, Clone, Copy)]
pub(super) struct Op {
    pub kind: OpKind,
    pub tail: usize,
}

/// Which directory entries a crash keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Entries {
    /// Only those a directory sync made durable (a power cut).
    Synced,
    /// All of them (a process killed, or a file system that happened to write them).
    All,
}

/// Which file bytes a crash keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Data {
    /// Only synced bytes.
    Synced,
    /// Synced bytes, and the first `n` unsynced bytes after them in the file written last
    /// (a write torn at that byte).
    Torn(usize),
    /// Everything written.
    All,
}

/// How a crash goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Crash {
    pub entries: Entries,
    pub data: Data,
}

#[derive(Debug, Default)]
struct State {
    live: BTreeMap<PathBuf, Node>,
    durable: BTreeMap<PathBuf, Node>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    ops: Vec<Op>,
    /// Crash once this many operations are done.
    crash_after: Option<usize>,
    crash: Option<Crash>,
    /// The file written last (a torn write tears it).
    last_written: Option<u64>,
    /// The disk as the crash left it.
    image: Option<Arc<CrashStorage>>,
}

/// An in-memory file system that keeps synced and unsynced state apart (see the module).
#[derive(Debug, Default)]
pub(super) struct CrashStorage {
    state: Mutex<State>,
}

fn crashed() -> io::Error {
    io::Error::other("the machine crashed (simulated)")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

impl State {
    fn check(&self) -> io::Result<()> {
        match self.image {
            Some(_) => Err(crashed()),
            None => Ok(()),
        }
    }

    /// Counts an operation that took effect, and crashes if it is the chosen one.
    fn count(&mut self, kind: OpKind, tail: usize) {
        self.ops.push(Op { kind, tail });
        if self.crash_after == Some(self.ops.len()) {
            let crash = self.crash.expect("a crash comes with its kind");
            self.image = Some(Arc::new(self.image_after(crash)));
        }
    }

    fn unsynced_tail(inode: &Inode) -> usize {
        if inode.current.starts_with(&inode.synced) {
            inode.current.len() - inode.synced.len()
        } else {
            inode.current.len()
        }
    }

    /// The disk a machine finds after `crash`.
    fn image_after(&self, crash: Crash) -> CrashStorage {
        let names = match crash.entries {
            Entries::Synced => &self.durable,
            Entries::All => &self.live,
        };
        // An entry whose directory did not survive is gone with it.
        let reachable: BTreeMap<PathBuf, Node> = names
            .iter()
            .filter(|(path, _)| {
                path.ancestors()
                    .skip(1)
                    .all(|a| a.as_os_str().is_empty() || names.get(a) == Some(&Node::Dir))
            })
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        let mut inodes = HashMap::new();
        for node in reachable.values() {
            let Node::File(id) = *node else { continue };
            let inode = &self.inodes[&id];
            let bytes = match crash.data {
                Data::All => inode.current.clone(),
                Data::Torn(n) if self.last_written == Some(id) => {
                    if inode.current.starts_with(&inode.synced) {
                        let keep = (inode.synced.len() + n).min(inode.current.len());
                        inode.current[..keep].to_vec()
                    } else if n > 0 {
                        // Not an append (the file was cut or rewritten): old or new.
                        inode.current.clone()
                    } else {
                        inode.synced.clone()
                    }
                }
                _ => inode.synced.clone(),
            };
            inodes.insert(
                id,
                Inode {
                    synced: bytes.clone(),
                    current: bytes,
                },
            );
        }
        CrashStorage {
            state: Mutex::new(State {
                live: reachable.clone(),
                durable: reachable,
                inodes,
                next_inode: self.next_inode,
                ..State::default()
            }),
        }
    }

    fn file(&self, path: &Path) -> io::Result<u64> {
        match self.live.get(path) {
            Some(Node::File(id)) => Ok(*id),
            Some(Node::Dir) => Err(io::Error::other(format!(
                "{} is a directory",
                path.display()
            ))),
            None => Err(not_found(path)),
        }
    }

    fn parent_exists(&self, path: &Path) -> io::Result<()> {
        match path.parent().map(|p| self.live.get(p)) {
            Some(Some(Node::Dir)) => Ok(()),
            _ => Err(not_found(path)),
        }
    }

    fn new_file(&mut self, path: &Path) -> u64 {
        let id = self.next_inode;
        self.next_inode += 1;
        self.inodes.insert(id, Inode::default());
        self.live.insert(path.to_owned(), Node::File(id));
        id
    }

    /// The paths at or under `path`.
    fn under(map: &BTreeMap<PathBuf, Node>, path: &Path) -> Vec<PathBuf> {
        map.keys()
            .filter(|p| p.starts_with(path))
            .cloned()
            .collect()
    }
}

impl CrashStorage {
    /// An empty disk holding the (durable) directory `root`.
    pub(super) fn new(root: &Path) -> Arc<CrashStorage> {
        let fs = CrashStorage::default();
        {
            let mut state = fs.lock();
            for dir in root.ancestors().filter(|a| !a.as_os_str().is_empty()) {
                state.live.insert(dir.to_owned(), Node::Dir);
                state.durable.insert(dir.to_owned(), Node::Dir);
            }
        }
        Arc::new(fs)
    }

    /// The same disk, set to crash (`crash`) right after its `after`-th counted operation.
    pub(super) fn crash_after(self: &Arc<Self>, after: usize, crash: Crash) {
        let mut state = self.lock();
        state.crash_after = Some(after);
        state.crash = Some(crash);
    }

    /// A copy of the disk as it is now, counting its own operations from zero.
    pub(super) fn fork(&self) -> Arc<CrashStorage> {
        Arc::new(self.lock().image_after(Crash {
            entries: Entries::All,
            data: Data::All,
        }))
    }

    /// The counted operations so far.
    pub(super) fn ops(&self) -> Vec<Op> {
        self.lock().ops.clone()
    }

    /// The disk left by the crash, once it happened.
    pub(super) fn crashed(&self) -> Option<Arc<CrashStorage>> {
        self.lock().image.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A file of [`CrashStorage`].
struct CrashFile {
    fs: Arc<CrashStorage>,
    inode: u64,
}

impl fmt::Debug for CrashFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CrashFile({})", self.inode)
    }
}

impl CrashFile {
    fn sync(&mut self) -> io::Result<()> {
        let mut state = self.fs.lock();
        state.check()?;
        let inode = state.inodes.get_mut(&self.inode).expect("inodes live on");
        inode.synced = inode.current.clone();
        state.count(OpKind::Sync, 0);
        Ok(())
    }
}

impl StorageFile for CrashFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut state = self.fs.lock();
        state.check()?;
        let inode = state.inodes.get_mut(&self.inode).expect("inodes live on");
        inode.current.extend_from_slice(buf);
        let tail = State::unsynced_tail(inode);
        state.last_written = Some(self.inode);
        state.count(OpKind::Write, tail);
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.sync()
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.sync()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut state = self.fs.lock();
        state.check()?;
        let inode = state.inodes.get_mut(&self.inode).expect("inodes live on");
        inode.current.resize(len as usize, 0);
        let tail = State::unsynced_tail(inode);
        state.last_written = Some(self.inode);
        state.count(OpKind::Write, tail);
        Ok(())
    }
}

/// Storage is implemented on the shared handle, so files can point back at their disk.
#[derive(Debug, Clone)]
pub(super) struct Shared(pub Arc<CrashStorage>);

impl Shared {
    fn file(&self, inode: u64) -> Box<dyn StorageFile> {
        Box::new(CrashFile {
            fs: self.0.clone(),
            inode,
        })
    }
}

impl Storage for Shared {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.0.lock();
        state.check()?;
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty() && !state.live.contains_key(*a))
            .map(Path::to_owned)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        for dir in missing.into_iter().rev() {
            state.live.insert(dir, Node::Dir);
        }
        state.count(OpKind::Write, 0);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.0.lock();
        state.check()?;
        if state.live.get(dir) != Some(&Node::Dir) {
            return Err(not_found(dir));
        }
        Ok(state
            .live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| Some(p.file_name()?.to_str()?.to_owned()))
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        self.0.lock().live.contains_key(path)
    }

    fn is_file(&self, path: &Path) -> bool {
        matches!(self.0.lock().live.get(path), Some(Node::File(_)))
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        let state = self.0.lock();
        state.check()?;
        let id = state.file(path)?;
        Ok(state.inodes[&id].current.len() as u64)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.0.lock();
        state.check()?;
        let id = state.file(path)?;
        Ok(state.inodes[&id].current.clone())
    }

    fn read_range(&self, path: &Path, offset: u64, len: u64) -> io::Result<Box<dyn Read + '_>> {
        let bytes = self.read(path)?;
        let start = (offset as usize).min(bytes.len());
        let end = (start + len as usize).min(bytes.len());
        Ok(Box::new(io::Cursor::new(bytes[start..end].to_vec())))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let mut state = self.0.lock();
        state.check()?;
        state.parent_exists(path)?;
        let id = match state.live.get(path) {
            Some(Node::File(id)) => {
                let id = *id;
                state.inodes.get_mut(&id).expect("inode").current.clear();
                id
            }
            Some(Node::Dir) => return Err(io::Error::other("is a directory")),
            None => state.new_file(path),
        };
        state.count(OpKind::Write, 0);
        Ok(self.file(id))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let mut state = self.0.lock();
        state.check()?;
        state.parent_exists(path)?;
        if state.live.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        let id = state.new_file(path);
        state.count(OpKind::Write, 0);
        Ok(self.file(id))
    }

    fn open_write(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let state = self.0.lock();
        state.check()?;
        let id = state.file(path)?;
        Ok(self.file(id))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.0.lock();
        state.check()?;
        if !state.live.contains_key(from) {
            return Err(not_found(from));
        }
        state.parent_exists(to)?;
        for old in State::under(&state.live, to) {
            state.live.remove(&old);
        }
        for path in State::under(&state.live, from) {
            let node = state.live.remove(&path).expect("listed");
            let rest = path.strip_prefix(from).expect("under from");
            let moved = if rest.as_os_str().is_empty() {
                to.to_owned()
            } else {
                to.join(rest)
            };
            state.live.insert(moved, node);
        }
        state.count(OpKind::Write, 0);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.0.lock();
        state.check()?;
        state.file(path)?;
        state.live.remove(path);
        state.count(OpKind::Write, 0);
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.0.lock();
        state.check()?;
        let gone = State::under(&state.live, path);
        if gone.is_empty() {
            return Err(not_found(path));
        }
        for p in gone {
            state.live.remove(&p);
        }
        state.count(OpKind::Write, 0);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.0.lock();
        state.check()?;
        if state.live.get(dir) != Some(&Node::Dir) {
            return Err(not_found(dir));
        }
        let in_dir = |p: &Path| p.parent() == Some(dir);
        state.durable.retain(|p, _| !in_dir(p));
        let entries: Vec<(PathBuf, Node)> = state
            .live
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        state.durable.extend(entries);
        state.count(OpKind::Sync, 0);
        Ok(())
    }

    fn lock(&self, _path: &Path) -> io::Result<Option<Box<dyn fmt::Debug + Send>>> {
        // One process per simulated disk: nothing to exclude.
        Ok(Some(Box::new(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETAIN: Duration = Duration::from_secs(3600);
    const HOUR_MS: u64 = 3_600_000;

    fn message(id: &str) -> NatsMessage {
        NatsMessage {
            subject: format!("cmc.deliveries.{id}"),
            headers: vec![("Nats-Msg-Id".into(), id.to_owned())],
            payload: Bytes::from(format!(
                "{{\"id\":\"{id}\",\"pad\":\"{}\"}}",
                "x".repeat(40)
            )),
        }
    }

    fn id_of(record: &Record) -> String {
        match record {
            Record::Message(m) => m.header("Nats-Msg-Id").unwrap_or("?").to_owned(),
            Record::Mail(mail) => format!("mail {}", mail.dir),
        }
    }

    /// What the scenario did, as far as it got: the promises a reopened log must keep.
    #[derive(Debug, Default, Clone)]
    pub(super) struct Expected {
        /// Every record handed to a write of the spool, in order (a replay's copies too).
        spool: Vec<String>,
        /// `spool[..spool_ok]` were written and synced (their append was answered `Ok`).
        spool_ok: usize,
        /// `spool[..consumed_ok]` were consumed (committed or quarantined) and answered `Ok`;
        /// `spool[..consumed_tried]` were at least tried.
        consumed_ok: usize,
        consumed_tried: usize,
        /// Every record handed to a write of the retained log, in order.
        retained: Vec<String>,
        /// When each of `retained` was written, on the retained log's clock (for records of
        /// an earlier run: when the spool was opened again).
        retained_at: Vec<u64>,
        retained_ok: usize,
        /// `retained[..dropped_ok]` were replayed or expired, answered `Ok`;
        /// `retained[..dropped_tried]` were at least tried.
        dropped_ok: usize,
        dropped_tried: usize,
        quarantined_ok: Vec<String>,
        quarantined_tried: Vec<String>,
        /// Quarantined records put back at the end of the spool (`spool requeue`).
        requeued_ok: Vec<String>,
        requeued_tried: Vec<String>,
        /// Every record whose request was answered `200` (spooled or retained `Ok`).
        answered: Vec<String>,
        /// Records whose expiry was tried: they may be gone.
        expired: HashSet<String>,
    }

    fn batch_of(ids: &[&str]) -> (Vec<u8>, u64) {
        let messages: Vec<NatsMessage> = ids.iter().map(|id| message(id)).collect();
        let mut buf = Vec::new();
        let n = messages.encode(&mut buf, now_ms()).unwrap();
        (buf, n)
    }

    /// Batches appended to the spool as one group (one write, one sync), each answered.
    fn spool_group(spool: &mut Spool, ex: &mut Expected, group: &[&[&str]]) -> Result<(), String> {
        for ids in group {
            ex.spool.extend(ids.iter().map(|s| s.to_string()));
        }
        let answers = spool.append_group(group.iter().map(|ids| batch_of(ids)).collect());
        if let Some(e) = answers.iter().find_map(|a| a.as_ref().err()) {
            return Err(e.to_string());
        }
        ex.spool_ok = ex.spool.len();
        for ids in group {
            ex.answered.extend(ids.iter().map(|s| s.to_string()));
        }
        Ok(())
    }

    /// Batches published directly, written to the retained log as one group at `at` (the
    /// retained log's clock).
    fn retain_group(
        spool: &mut Spool,
        ex: &mut Expected,
        group: &[&[&str]],
        at: u64,
    ) -> Result<(), String> {
        for ids in group {
            ex.retained.extend(ids.iter().map(|s| s.to_string()));
            ex.retained_at.extend(ids.iter().map(|_| at));
        }
        let records: Vec<Box<dyn Records>> = group
            .iter()
            .map(|ids| {
                Box::new(ids.iter().map(|id| message(id)).collect::<Vec<_>>()) as Box<dyn Records>
            })
            .collect();
        let answers = spool.retain_group(&records, now_ms());
        if let Some(e) = answers.iter().find_map(|a| a.as_ref().err()) {
            return Err(e.to_string());
        }
        ex.retained_ok = ex.retained.len();
        for ids in group {
            ex.answered.extend(ids.iter().map(|s| s.to_string()));
        }
        Ok(())
    }

    /// The drainer: reads `n` records, publishes them (nothing to do here) and commits them,
    /// which copies them to the retained log before the cursor moves.
    fn drain(spool: &mut Spool, ex: &mut Expected, n: usize, at: u64) -> Result<(), String> {
        let batch = spool.read(n).map_err(|e| e.to_string())?;
        let read: Vec<String> = batch
            .messages
            .iter()
            .map(|m| id_of(&Record::Message(m.clone())))
            .collect();
        let want = &ex.spool[ex.consumed_ok..ex.consumed_ok + n];
        assert_eq!(read, want, "the drainer reads the spool in order");
        ex.consumed_tried = ex.consumed_ok + n;
        ex.retained_at.extend(read.iter().map(|_| at));
        ex.retained.extend(read);
        spool.commit(&batch, n).map_err(|e| e.to_string())?;
        ex.consumed_ok = ex.consumed_tried;
        ex.retained_ok = ex.retained.len();
        Ok(())
    }

    /// NATS refuses the next record for good: it goes to the quarantine.
    fn quarantine_next(spool: &mut Spool, ex: &mut Expected) -> Result<(), String> {
        let batch = spool.read(1).map_err(|e| e.to_string())?;
        let id = ex.spool[ex.consumed_ok].clone();
        ex.consumed_tried = ex.consumed_ok + 1;
        ex.quarantined_tried.push(id.clone());
        spool
            .quarantine(&batch, 0, "refused for good")
            .map_err(|e| e.to_string())?;
        ex.consumed_ok = ex.consumed_tried;
        ex.quarantined_ok.push(id);
        Ok(())
    }

    /// NATS, last seen answering at `until` (the retained log's clock), came back restarted:
    /// the retained records written in the hold before `until` go behind the spool; older
    /// ones (synced by then) are dropped, as if expired.
    fn replay(spool: &mut Spool, ex: &mut Expected, until: u64) -> Result<(), String> {
        // The retention and the retained log's margin of a second.
        let since = until.saturating_sub(RETAIN.as_millis() as u64 + 1_000);
        let pending = ex.dropped_ok..ex.retained.len();
        let (moving, dropped): (Vec<usize>, Vec<usize>) =
            pending.partition(|&i| ex.retained_at[i] >= since);
        let moving: Vec<String> = moving.iter().map(|&i| ex.retained[i].clone()).collect();
        ex.expired
            .extend(dropped.iter().map(|&i| ex.retained[i].clone()));
        ex.spool.extend(moving.iter().cloned());
        ex.dropped_tried = ex.retained.len();
        let moved = spool.replay_retained(until).map_err(|e| e.to_string())?;
        assert_eq!(
            moved as usize,
            moving.len(),
            "a replay moves every retained record of the window"
        );
        ex.spool_ok = ex.spool.len();
        ex.dropped_ok = ex.dropped_tried;
        Ok(())
    }

    /// `spool requeue --all` (the service stopped): the quarantined records go back to the
    /// end of the spool, then leave the quarantine.
    fn requeue(spool: &mut Spool, ex: &mut Expected) -> Result<(), String> {
        let back: Vec<String> = ex
            .quarantined_ok
            .iter()
            .filter(|id| !ex.requeued_ok.contains(id))
            .cloned()
            .collect();
        ex.spool.extend(back.iter().cloned());
        ex.requeued_tried.extend(back.iter().cloned());
        let done = spool.requeue(&[]).map_err(|e| e.to_string())?;
        assert_eq!(done.requeued.len(), back.len(), "every entry is requeued");
        ex.spool_ok = ex.spool.len();
        ex.requeued_ok.extend(back);
        Ok(())
    }

    /// Expiry at `now`, which must drop the oldest `n` retained records (one segment).
    fn expire(spool: &mut Spool, ex: &mut Expected, now: u64, n: usize) -> Result<(), String> {
        ex.dropped_tried = ex.dropped_ok + n;
        ex.expired
            .extend(ex.retained[ex.dropped_ok..ex.dropped_tried].iter().cloned());
        spool.expire_retained(now).map_err(|e| e.to_string())?;
        ex.dropped_ok = ex.dropped_tried;
        Ok(())
    }

    /// The scenario: what the writer thread and the drainer do, in one thread, through `fs`.
    pub(super) fn scenario(
        fs: &Arc<CrashStorage>,
        dir: &Path,
        ex: &mut Expected,
    ) -> Result<(), String> {
        // The retained log's clock, moved by hand: hours pass between some steps.
        let clock = Arc::new(AtomicU64::new(1_000));
        let now = || clock.load(Ordering::SeqCst);
        let open = |ex: &mut Expected| -> Result<Spool, String> {
            let mut spool = Spool::open_with(Arc::new(Shared(fs.clone())), dir, 1 << 20)
                .map_err(|e| e.to_string())?;
            spool.set_clock(Clock::manual(&clock));
            spool.retain(RETAIN).map_err(|e| e.to_string())?;
            // What an earlier run retained counts as written at this start.
            let at = clock.load(Ordering::SeqCst);
            for written in &mut ex.retained_at[ex.dropped_ok..] {
                *written = at;
            }
            Ok(spool)
        };
        // A first start, on a disk where the spool directory does not exist yet: batches
        // published directly come before anything is spooled.
        let mut spool = open(ex)?;
        retain_group(&mut spool, ex, &[&["d1", "d2"], &["e1"]], now())?;
        spool_group(&mut spool, ex, &[&["a1", "a2", "a3"]])?;
        // A restart: the next append starts a new segment.
        drop(spool);
        let mut spool = open(ex)?;
        spool_group(&mut spool, ex, &[&["b1", "b2"], &["c1"]])?;
        // Two hours on: copies of a1..a3 start a new retained segment.
        clock.store(2 * HOUR_MS, Ordering::SeqCst);
        drain(&mut spool, ex, 3, now())?;
        quarantine_next(&mut spool, ex)?;
        // NATS last answered now: a1..a3 (copied by the drainer now) are replayed, d1..e1
        // (written two hours ago) are dropped.
        replay(&mut spool, ex, now())?;
        retain_group(&mut spool, ex, &[&["f1", "f2"]], now())?;
        spool_group(&mut spool, ex, &[&["g1"], &["g2", "g3"]])?;
        // An hour and two seconds on: the f segment is older than the hold; the copies made
        // now are not.
        clock.store(3 * HOUR_MS + 2_000, Ordering::SeqCst);
        drain(&mut spool, ex, 3, now())?;
        expire(&mut spool, ex, now(), 2)?;
        drain(&mut spool, ex, 2, now())?;
        // A stop, `spool requeue --all`, a start.
        drop(spool);
        let mut spool = open(ex)?;
        requeue(&mut spool, ex)?;
        drop(spool);
        let mut spool = open(ex)?;
        drain(&mut spool, ex, 4, now())?;
        Ok(())
    }

    /// Every record from the cursor on, in order, without moving the cursor.
    fn unconsumed(spool: &mut Spool) -> Result<Vec<String>, SpoolError> {
        let saved = spool.cursor;
        let mut ids = Vec::new();
        let read = (|| loop {
            let batch = spool.read(64)?;
            let Some(&(end, _)) = batch.ends.last() else {
                return Ok(());
            };
            ids.extend(
                batch
                    .messages
                    .iter()
                    .map(|m| id_of(&Record::Message(m.clone()))),
            );
            if let Some(mail) = batch.mail {
                ids.push(id_of(&Record::Mail(mail)));
            }
            spool.cursor = end;
        })();
        spool.cursor = saved;
        read.map(|()| ids)
    }

    /// Whether `found` is `all[s..e]` for some `s` in `starts` and `e` in `ends`.
    fn is_slice(
        found: &[String],
        all: &[String],
        starts: std::ops::RangeInclusive<usize>,
        ends: std::ops::RangeInclusive<usize>,
    ) -> bool {
        starts.into_iter().any(|s| {
            let e = s + found.len();
            ends.contains(&e) && all.get(s..e) == Some(found)
        })
    }

    /// What a reopened spool holds: its records from the cursor on, its retained log's, and
    /// the message ids in its quarantine.
    #[derive(Debug, Clone, PartialEq)]
    struct Observed {
        spool: Vec<String>,
        retained: Vec<String>,
        quarantined: Vec<String>,
    }

    fn retained_ids(spool: &Spool) -> Result<Vec<String>, String> {
        let log = spool.retained.as_ref().expect("retained log on");
        Ok(log
            .records()
            .map_err(|e| format!("read retained: {e}"))?
            .iter()
            .map(id_of)
            .collect())
    }

    /// Opens the spool on `fs` as a start does (the retained log on) and reads what it holds.
    fn reopen(fs: &Arc<CrashStorage>, dir: &Path) -> Result<(Spool, Observed), String> {
        let storage: Arc<dyn Storage> = Arc::new(Shared(fs.clone()));
        let mut spool =
            Spool::open_with(storage.clone(), dir, 1 << 20).map_err(|e| format!("reopen: {e}"))?;
        spool
            .retain(RETAIN)
            .map_err(|e| format!("reopen retained: {e}"))?;
        let in_spool = unconsumed(&mut spool).map_err(|e| format!("read spool: {e}"))?;
        let retained = retained_ids(&spool)?;
        let quarantined = list_quarantine(&*storage, dir)
            .map_err(|e| format!("read quarantine: {e}"))?
            .into_iter()
            .map(|e| e.msg_id)
            .collect();
        Ok((
            spool,
            Observed {
                spool: in_spool,
                retained,
                quarantined,
            },
        ))
    }

    /// Checks what a reopened spool holds against what the scenario had done (see the
    /// test's documentation).
    fn check(seen: &Observed, ex: &Expected) -> Result<(), String> {
        let all = format!("{seen:?}; expected {ex:?}");
        if !is_slice(
            &seen.spool,
            &ex.spool,
            ex.consumed_ok..=ex.consumed_tried,
            ex.spool_ok..=ex.spool.len(),
        ) {
            return Err(format!(
                "the spool is not what was written and not consumed: {all}"
            ));
        }
        if !is_slice(
            &seen.retained,
            &ex.retained,
            ex.dropped_ok..=ex.dropped_tried,
            ex.retained_ok..=ex.retained.len(),
        ) {
            return Err(format!(
                "the retained log is not what was retained and not dropped: {all}"
            ));
        }
        // Quarantined and not put back: there; put back (answered `Ok`): gone.
        let mut held = ex
            .quarantined_ok
            .iter()
            .filter(|id| !ex.requeued_tried.contains(id));
        let possible = ex
            .quarantined_tried
            .iter()
            .filter(|id| !ex.requeued_ok.contains(id))
            .collect::<Vec<_>>();
        if held.any(|id| !seen.quarantined.contains(id))
            || seen.quarantined.iter().any(|id| !possible.contains(&id))
        {
            return Err(format!("the quarantine is wrong: {all}"));
        }
        answered_are_kept(seen, ex)
    }

    /// Every record answered `200` whose expiry was not tried is in the spool, the retained
    /// log or the quarantine.
    fn answered_are_kept(seen: &Observed, ex: &Expected) -> Result<(), String> {
        for id in &ex.answered {
            let kept = seen.spool.contains(id)
                || seen.retained.contains(id)
                || seen.quarantined.contains(id);
            if !kept && !ex.expired.contains(id) {
                return Err(format!(
                    "{id} was answered 200 and is lost: {seen:?}; expected {ex:?}"
                ));
            }
        }
        Ok(())
    }

    /// What a start does next: the retained log is replayed behind the spool, in order, and
    /// the log goes on (an append and a retained record read back after what survived).
    fn check_start(mut spool: Spool, seen: &Observed) -> Result<(), String> {
        let moved = spool
            .replay_retained(0)
            .map_err(|e| format!("replay at start: {e}"))?;
        let mut want = seen.spool.clone();
        want.extend(seen.retained.iter().cloned());
        let (buf, n) = batch_of(&["after"]);
        spool
            .append(buf, n)
            .map_err(|e| format!("append after reopen: {e}"))?;
        want.push("after".into());
        let records: Vec<Box<dyn Records>> = vec![Box::new(vec![message("kept-after")])];
        if let Some(Err(e)) = spool.retain_group(&records, now_ms()).pop() {
            return Err(format!("retain after reopen: {e}"));
        }
        let now_in_spool = unconsumed(&mut spool).map_err(|e| format!("read spool: {e}"))?;
        let now_retained = retained_ids(&spool)?;
        if moved as usize != seen.retained.len()
            || now_in_spool != want
            || now_retained != ["kept-after"]
        {
            return Err(format!(
                "after a start's replay ({moved} moved) and an append, the spool reads \
                 {now_in_spool:?} and the retained log {now_retained:?}; before: {seen:?}"
            ));
        }
        Ok(())
    }

    /// A second crash, during the start after the first (the reopen and the replay of the
    /// retained log): the start after that still finds every record the first start found,
    /// in order, the spool's followed by part of the retained log's copies, and the retained
    /// log a suffix of what it was (its deleted segments, after their copies).
    fn check_second(first: &Observed, second: &Observed, ex: &Expected) -> Result<(), String> {
        let all = format!("first start found {first:?}, second {second:?}");
        let copied = second.spool.len().checked_sub(first.spool.len());
        let spool_ok = copied.is_some_and(|m| {
            second.spool[..first.spool.len()] == first.spool[..]
                && first.retained.get(..m) == Some(&second.spool[first.spool.len()..])
        });
        let retained_ok = first.retained.ends_with(&second.retained);
        if !spool_ok || !retained_ok || first.quarantined != second.quarantined {
            return Err(format!("a crash during the start changed the log: {all}"));
        }
        answered_are_kept(second, ex)
    }

    /// Byte positions at which to tear a write that left `tail` unsynced bytes.
    fn tears(tail: usize) -> Vec<usize> {
        let from_end = |n: usize| tail.saturating_sub(n);
        let mut at: Vec<usize> = [
            1,
            4,
            11,
            12,
            13,
            tail / 3,
            tail / 2,
            from_end(13),
            from_end(12),
            from_end(1),
        ]
        .into_iter()
        .filter(|&t| t > 0 && t < tail)
        .collect();
        at.sort_unstable();
        at.dedup();
        at
    }

    /// The crash loop. The scenario (appends of batches, one by one and as a group; batches
    /// published directly and retained as a group; drainer reads and commits, which copy to
    /// the retained log; a quarantine; a replay of the retained log's window before NATS was
    /// last seen (older records dropped); an expiry; restarts, and
    /// a `spool requeue` between two of them) is run once to count its storage operations. Then, for every
    /// k, it is run again on a disk that crashes right after the k-th operation, in each of
    /// these ways: a power cut (only synced bytes and synced directory entries survive); the
    /// same with the directory entries all kept; a process killed (everything written
    /// survives); and, after a write, the written file torn at several bytes of its unsynced
    /// tail (with and without the unsynced entries). The spool is reopened on what survived,
    /// with its retained log, and checked:
    ///
    /// - the spool, read from its cursor, is exactly `spool[s..e]` of the records handed to
    ///   its writes in order, where `s` is at least the count consumed with an `Ok` answer
    ///   (a commit or quarantine answered `Ok` is never read again) and at most the count
    ///   whose consuming was tried, and `e` at least the count answered `Ok` (no answered
    ///   record is missing, none is out of order) and at most the count handed over (a group
    ///   that was being written may survive as whole records, never as a torn one);
    /// - the retained log likewise: `retained[x..y]`, `x` between what was dropped (replayed
    ///   or expired) with an `Ok` and what a drop was tried for, `y` at least what was
    ///   retained with an `Ok`;
    /// - the quarantine holds every record quarantined with an `Ok`, and nothing else;
    /// - every record answered `200` is in the spool, the retained log or the quarantine,
    ///   unless its expiry was tried (or a replay dropped it as older than its window);
    /// - nothing unreadable is returned (reading fails the check);
    /// - the start goes on as the service's does: the retained log's records are replayed
    ///   behind the spool's, in order, and a new append and a new retained record read back
    ///   after what survived.
    ///
    /// After each power cut, the start itself (reopen, cut torn tails, replay) is crashed
    /// after each of its own operations, and the next start must find what the first one
    /// found: the spool's records, then a prefix of the retained log's copies, and a suffix
    /// of the retained log (a crash between a replay's copy and its deletes leaves both,
    /// published twice and de-duplicated by `Nats-Msg-Id`), and every record answered
    /// `200`.
    #[test]
    fn every_crash_point_keeps_what_was_answered_and_nothing_torn() {
        let (root, dir) = (Path::new("/crash"), Path::new("/crash/spool"));
        let fs = CrashStorage::new(root);
        let mut full = Expected::default();
        scenario(&fs, dir, &mut full).expect("the scenario runs without a crash");
        assert_eq!(full.answered.len(), 14, "the scenario answered every batch");
        let ops = fs.ops();
        let (writes, syncs) = (
            ops.iter().filter(|o| o.kind == OpKind::Write).count(),
            ops.iter().filter(|o| o.kind == OpKind::Sync).count(),
        );
        let (mut checked, mut second_checked) = (0, 0);
        // Over every first start: records answered `200` (and not expired), those found, and
        // records the start's replay publishes twice (de-duplicated by their `Nats-Msg-Id`).
        let (mut answered, mut stored, mut duplicates) = (0, 0, 0);
        let mut failures = Vec::new();
        for (k, op) in ops.iter().enumerate() {
            for crash in crashes(op) {
                let fs = CrashStorage::new(root);
                fs.crash_after(k + 1, crash);
                let mut ex = Expected::default();
                let ran = scenario(&fs, dir, &mut ex);
                let image = fs
                    .crashed()
                    .unwrap_or_else(|| panic!("crash point {} not reached: {ran:?}", k + 1));
                checked += 1;
                let at = format!("crash after op {} ({:?}) {crash:?}", k + 1, op.kind);
                let first = match reopen(&image.fork(), dir) {
                    Ok((spool, seen)) => {
                        if let Err(e) = check(&seen, &ex).and_then(|()| check_start(spool, &seen)) {
                            failures.push(format!("{at}: {e}"));
                            continue;
                        }
                        let promised: Vec<&String> = ex
                            .answered
                            .iter()
                            .filter(|id| !ex.expired.contains(*id))
                            .collect();
                        answered += promised.len();
                        stored += promised
                            .iter()
                            .filter(|id| {
                                seen.spool.contains(id)
                                    || seen.retained.contains(id)
                                    || seen.quarantined.contains(id)
                            })
                            .count();
                        let published: Vec<&String> =
                            seen.spool.iter().chain(&seen.retained).collect();
                        let distinct: HashSet<&String> = published.iter().copied().collect();
                        duplicates += published.len() - distinct.len();
                        seen
                    }
                    Err(e) => {
                        failures.push(format!("{at}: {e}"));
                        continue;
                    }
                };
                // Power cuts only, for the second crash: the first start's own operations,
                // counted once, then crashed after each.
                if crash.entries != Entries::Synced || crash.data == Data::All {
                    continue;
                }
                let start = |fs: &Arc<CrashStorage>| -> Result<(), String> {
                    let (mut spool, _) = reopen(fs, dir)?;
                    spool.replay_retained(0).map_err(|e| e.to_string())?;
                    Ok(())
                };
                let counting = image.fork();
                start(&counting).expect("a start after the crash runs");
                for (j, second_op) in counting.ops().iter().enumerate() {
                    for second in crashes(second_op) {
                        if second.entries != Entries::Synced {
                            continue;
                        }
                        let fs = image.fork();
                        fs.crash_after(j + 1, second);
                        let _ = start(&fs);
                        let image = fs.crashed().expect("the start crashed");
                        second_checked += 1;
                        let result = reopen(&image, dir)
                            .and_then(|(_, seen)| check_second(&first, &seen, &ex));
                        if let Err(e) = result {
                            failures.push(format!(
                                "{at}, then after op {} of the start {second:?}: {e}",
                                j + 1
                            ));
                        }
                    }
                }
            }
        }
        println!(
            "crash points={} (writes={writes} syncs={syncs}) checked={checked} \
             second crashes during the start checked={second_checked} failed={}; \
             over the first starts: answered={answered} stored={stored} \
             published twice by the replay={duplicates}",
            ops.len(),
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "{} failures, first ones:\n{}",
            failures.len(),
            failures[..failures.len().min(5)].join("\n")
        );
        assert!(
            checked > 2 * ops.len(),
            "every crash point is checked in several ways"
        );
    }

    /// The ways to crash right after `op`: a power cut (only synced bytes and entries kept),
    /// the same with every directory entry kept, a killed process (everything kept), and,
    /// after a write, the file torn at several bytes of its unsynced tail.
    fn crashes(op: &Op) -> Vec<Crash> {
        let mut crashes = Vec::new();
        for entries in [Entries::Synced, Entries::All] {
            crashes.push(Crash {
                entries,
                data: Data::Synced,
            });
            crashes.push(Crash {
                entries,
                data: Data::All,
            });
            if op.kind == OpKind::Write {
                for t in tears(op.tail) {
                    crashes.push(Crash {
                        entries,
                        data: Data::Torn(t),
                    });
                }
            }
        }
        crashes
    }
}
