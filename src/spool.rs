//! The durable local spool: messages NATS could not take in time are appended here (and
//! fsynced) before the request is answered `200`, then published in arrival order by the
//! drainer (`deliver.rs`) once NATS is back.
//!
//! One [`Spool`] per directory and process: [`Spool::open`] takes an exclusive lock on
//! `<spool.dir>/lock` (held until the process ends), so a second service or a
//! `cmc-forwarder spool drain` can never work on a spool in use. The spool is owned by one
//! writer thread ([`SpoolHandle::start`]) that does group commit: every append waiting on its
//! channel is written with one `write_all` and made durable with one `sync_data`, then all of
//! them are answered. Requests never hold a lock or a thread of their own across an fsync.
//! Every file operation of the log (segments, cursor, quarantine, retained log) goes through
//! [`storage::Storage`] ([`Spool::open_with`]), so a test can crash it and keep only what was
//! synced; the files a spooled mail brings with it stay on the real disk.
//!
//! # On-disk format
//!
//! `spool.dir` holds segment files `<20-digit id>.seg`, one `cursor` file, the `lock` file and
//! the `quarantine/` directory.
//!
//! - A segment is a sequence of records: magic (`b"CMC2"`; `b"CMCS"` for records written by
//!   earlier versions, which have no time stamp), payload length (u32 LE), CRC-32 of the
//!   payload (u32 LE), payload. The payload is (`CMC2` only) the time it was spooled in ms
//!   since the Unix epoch (u64 LE), then the message: subject (u16 LE length + bytes), header
//!   count (u16 LE), each header as name (u16 length + bytes) and value (u16 length + bytes),
//!   then the body (u32 LE length + bytes). Headers include `Nats-Msg-Id`, so a message
//!   published twice (e.g. after a crash between publish and cursor update) is stored once
//!   by JetStream.
//! - `cursor` holds `<segment id> <byte offset>`: the first record not yet acknowledged.
//!   It is replaced atomically (write, fsync, rename) after each acknowledged run; a write
//!   that fails (a full disk) is retried, by the drainer, until it succeeds.
//! - A new segment is started at every start-up and after 64 MiB. Consumed segments are
//!   deleted. A segment id is never used twice, not even the id of a deleted segment the
//!   cursor still names (a crash between the delete and the cursor's next write): a cursor
//!   whose segment is gone stands for the start of the next one.
//! - `quarantine/` holds the messages NATS refused permanently: `<name>.rec` (the record as it
//!   was in the segment) and `<name>.json` (subject, message id, reason, time, size), and,
//!   named `unreadable-<segment>-<offset>`, the bytes of damaged records. Its bytes count in
//!   `spool.max_bytes`; [`Spool::requeue`] puts messages back at the end of the spool.
//!
//! A crash can tear the last record of the segment being written: at start-up every segment
//! is scanned, and a record with a short header, a length past the end of the file or a wrong
//! CRC, with no intact record after it, is a torn tail; the file is truncated there (the
//! request that wrote it was never answered `200`, so nothing promised is lost). When an
//! intact record (magic, length, CRC, decodable) does follow, the bytes in between are damage
//! in the middle of the segment: they are copied to the quarantine and skipped, and the
//! records after them, answered `200`, are published. A write that fails halfway is cut back
//! at once; if that fails too, nothing more is appended until it succeeds, and the drainer
//! never reads past a segment's last good record, so the complete records of a group answered
//! `503` are not published (only a process that ends before the cut succeeds leaves them for
//! the next start to find).

use std::collections::VecDeque;
#[cfg(test)]
use std::fs::OpenOptions;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{oneshot, Notify};

use crate::wire::NatsMessage;

#[cfg(test)]
mod crash;
mod retained;
mod storage;
pub use retained::Heartbeat;
use retained::{Freed, Piece, Retained};
use storage::{Disk, Storage, StorageFile};

const MAGIC_V1: &[u8; 4] = b"CMCS";
const MAGIC: &[u8; 4] = b"CMC2";
/// A mail record: the spooled mail's directory (its `mail.json` and attachment files) under
/// the spool directory, and the request id it arrived with.
const MAGIC_MAIL: &[u8; 4] = b"CMCM";
/// Where spooled mails' directories are, under the spool directory.
const MAIL_DIR: &str = "mail";
/// A mail directory's record of the mail (the inbound queue of earlier versions wrote it).
const MAIL_FILE: &str = "mail.json";
/// The request id a mail arrived with, in its directory (earlier versions).
const BATCH_FILE: &str = "batch_id";
/// The directory of spooled mails, under the spool directory.
pub fn mail_dir(spool_dir: &Path) -> PathBuf {
    spool_dir.join(MAIL_DIR)
}

/// Records read at a time when looking for mail records.
const DRAIN_SCAN: usize = 4096;
const RECORD_HEADER: usize = 12;
const SEGMENT_MAX: u64 = 64 * 1024 * 1024;
/// Bytes copied per write when the retained log is moved into the spool.
const REPLAY_CHUNK: usize = 1024 * 1024;
const CURSOR: &str = "cursor";
const LOCK: &str = "lock";
const QUARANTINE: &str = "quarantine";

/// Why a batch could not be spooled, or the spool could not be used.
#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("the spool is full (spool.max_bytes = {0})")]
    Full(u64),
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("a spooled message field is too long to encode")]
    TooLong,
    #[error("the spool in {0} is in use by another process (a running service or a spool drain); stop it first")]
    Locked(PathBuf),
    #[error("the spool writer has stopped")]
    Stopped,
    #[error("no quarantined message is named {0:?} (see `cmc-forwarder spool status`)")]
    NotQuarantined(String),
}

/// A position in the spool: segment id and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    segment: u64,
    offset: u64,
}

/// One mail to spool: the directory its request wrote its attachment files to, the mail's
/// record (`mail.json`, the inbound queue's format) and the request id. The writer thread,
/// in append order, writes both files into the directory, syncs its files, moves it to
/// `mail/<request id>` and only then appends the record that names it, so a record always
/// names a complete directory.
pub struct MailAppend {
    pub work: PathBuf,
    pub spool_dir: PathBuf,
    pub mail_json: Vec<u8>,
    pub batch_id: String,
    /// The bytes reserved for its files in `spool.max_bytes` (returned once it is sent).
    pub reserved: u64,
}

impl Drop for MailAppend {
    /// A mail that was never moved into the spool (refused, or sent and not retained) leaves
    /// no work directory behind; once moved, its work path no longer exists.
    fn drop(&mut self) {
        if self.work.exists() {
            let _ = fs::remove_dir_all(&self.work);
        }
    }
}

impl Records for MailAppend {
    fn encode(&self, out: &mut Vec<u8>, at_ms: u64) -> Result<u64, SpoolError> {
        if self.batch_id.is_empty()
            || !self
                .batch_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(SpoolError::TooLong);
        }
        // A mail's files are written where its request put them, before the writer sees
        // them, so they stay on the real disk (the log's seam covers the spool's own files).
        write_synced(&Disk, &self.work.join(MAIL_FILE), &self.mail_json)?;
        write_synced(&Disk, &self.work.join(BATCH_FILE), self.batch_id.as_bytes())?;
        for entry in fs::read_dir(&self.work)? {
            File::open(entry?.path())?.sync_all()?;
        }
        Disk.sync_dir(&self.work)?;
        let mails = self.spool_dir.join(MAIL_DIR);
        create_dir_durably(&Disk, &mails)?;
        fs::rename(&self.work, mails.join(&self.batch_id))?;
        Disk.sync_dir(&mails)?;
        let record = MailRecord {
            dir: format!("{MAIL_DIR}/{}", self.batch_id),
            batch_id: self.batch_id.clone(),
            file_bytes: self.reserved,
        };
        encode_mail(out, &record, at_ms)?;
        Ok(1)
    }
}

/// A spooled inbound mail: where its files are, and the request id it arrived with (its
/// message carries it as `Cmc-Batch-Id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailRecord {
    /// The mail's directory, relative to the spool directory (`mail/<n>`).
    pub dir: String,
    pub batch_id: String,
    /// The bytes of its files, counted in `spool.max_bytes`.
    pub file_bytes: u64,
}

/// What one record holds: one message of an event batch, or one mail.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Message(NatsMessage),
    Mail(MailRecord),
}

/// Records read for publishing, with the position after each: a run of messages, or one
/// mail (a read stops before a record of the other kind, so each batch is one kind of job).
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub messages: Vec<NatsMessage>,
    /// The mail at the cursor (then `messages` is empty).
    pub mail: Option<MailRecord>,
    ends: Vec<(Position, u64)>,
    /// Each message's record as it is on disk (kept for the quarantine).
    records: Vec<Vec<u8>>,
}

impl ReadBatch {
    /// The position after the first `n` messages and their encoded size.
    fn end_of(&self, n: usize) -> Option<(Position, u64)> {
        let (pos, _) = *self.ends.get(n.checked_sub(1)?)?;
        let bytes = self.ends[..n].iter().map(|(_, b)| b).sum();
        Some((pos, bytes))
    }
}

/// Counts shared between the writer thread and everyone who asks how full the spool is.
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Unacknowledged messages and their encoded bytes.
    messages: AtomicU64,
    bytes: AtomicU64,
    /// Appends handed to the writer and not yet finished: while any is pending, the spool
    /// counts as non-empty, so a later batch can never overtake one on its way to the disk.
    queued: AtomicU64,
    /// Messages in the quarantine, and the bytes of their records (`spool.max_bytes` counts
    /// them: they are on the same disk until requeued or removed).
    quarantined: AtomicU64,
    quarantined_bytes: AtomicU64,
    /// The cursor file is behind the cursor in memory (its last write failed): messages no
    /// longer count, but the file must still be written, or a restart replays them.
    cursor_pending: std::sync::atomic::AtomicBool,
    /// Bytes of the inbound spool (`<spool.dir>/inbound/`): `spool.max_bytes` bounds both
    /// spools together, so each side checks the other's bytes before it appends.
    inbound_bytes: AtomicU64,
    /// Bytes of the retained log (records NATS acknowledged, kept for `spool.retain`).
    retained_bytes: AtomicU64,
    /// How often the NATS server was found to be another one (restarted, or the connection
    /// moved): a drain step that spans a change does not count what it got acknowledged.
    server_changes: AtomicU64,
}

impl SpoolStats {
    /// Messages waiting to be published.
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::SeqCst)
    }

    /// Encoded bytes waiting to be published.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Nothing waits to be published and nothing is on its way to the spool.
    pub fn is_empty(&self) -> bool {
        self.queued.load(Ordering::SeqCst) == 0 && self.messages() == 0
    }

    /// Messages moved to the quarantine (in the directory, this run's and earlier ones).
    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::SeqCst)
    }

    /// Bytes held by the quarantine.
    pub fn quarantined_bytes(&self) -> u64 {
        self.quarantined_bytes.load(Ordering::SeqCst)
    }

    /// Whether the cursor file still has to be written (its last write failed).
    pub fn cursor_pending(&self) -> bool {
        self.cursor_pending.load(Ordering::SeqCst)
    }

    /// How often the NATS server was found to be another one.
    pub fn server_changes(&self) -> u64 {
        self.server_changes.load(Ordering::SeqCst)
    }

    /// Records that the NATS server is another one from now on.
    pub fn note_server_change(&self) {
        self.server_changes.fetch_add(1, Ordering::SeqCst);
    }

    /// Bytes held by the retained log: records NATS acknowledged and may not have synced.
    pub fn retained_bytes(&self) -> u64 {
        self.retained_bytes.load(Ordering::SeqCst)
    }

    /// Everything `spool.max_bytes` bounds but the spooled mails' files.
    fn held_but_mails(&self) -> u64 {
        self.bytes() + self.quarantined_bytes() + self.retained_bytes()
    }

    /// Bytes held by the inbound spool of the same directory.
    pub fn inbound_bytes(&self) -> u64 {
        self.inbound_bytes.load(Ordering::SeqCst)
    }

    /// Reserves `bytes` for the inbound spool if the two spools together stay within
    /// `max_bytes`; false (nothing reserved) otherwise.
    pub fn reserve_inbound(&self, bytes: u64, max_bytes: u64) -> bool {
        self.inbound_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                let others = self.held_but_mails();
                (others.saturating_add(held).saturating_add(bytes) <= max_bytes)
                    .then_some(held + bytes)
            })
            .is_ok()
    }

    /// Returns bytes the inbound spool no longer holds.
    pub fn release_inbound(&self, bytes: u64) {
        let _ = self
            .inbound_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                Some(held.saturating_sub(bytes))
            });
    }
}

/// Which log an append goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Log {
    /// The spool: records waiting to be published.
    Spool = 0,
    /// The retained log: records published (or being published) directly, kept in case NATS
    /// loses them.
    Retained = 1,
}

/// Something the writer thread encodes into records: the messages of one batch.
pub trait Records: Send + 'static {
    /// Appends the records to `out` (time stamp `at_ms`), returning how many.
    fn encode(&self, out: &mut Vec<u8>, at_ms: u64) -> Result<u64, SpoolError>;

    /// Hands the records to `out` a piece at a time, whole records in each, so a large batch
    /// is never one more buffer of its size; returns how many.
    fn write_to(
        &self,
        out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
        at_ms: u64,
    ) -> Result<u64, SpoolError> {
        let mut buf = Vec::new();
        let n = self.encode(&mut buf, at_ms)?;
        out(&buf)?;
        Ok(n)
    }
}

/// The size of the pieces [`Records::write_to`] hands over.
pub const WRITE_PIECE: usize = 256 * 1024;

#[derive(Debug)]
struct Segment {
    id: u64,
    /// Bytes known to hold complete, synced records.
    size: u64,
    /// Unreadable stretches `(start, end)` found at start-up between readable records: read
    /// past, their bytes in the quarantine.
    gaps: Vec<(u64, u64)>,
}

/// The spool of one directory, owned by one process (and, in it, by the writer thread).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segments: VecDeque<Segment>,
    /// The segment being appended to (always the last of `segments`), when open.
    writer: Option<Box<dyn StorageFile>>,
    next_id: u64,
    cursor: Position,
    /// The cursor in memory is ahead of the file (its last write failed).
    cursor_dirty: bool,
    /// A segment to cut back to its last complete record `(id, size)`: a failed write left
    /// part of a refused group after it, and cutting it off failed too. Nothing is appended
    /// until it is done, or those records, answered `503`, would be published after a restart.
    pending_cut: Option<(u64, u64)>,
    /// The retained log, in `jetstream` mode ([`Spool::retain`]).
    retained: Option<Retained>,
    /// What the retained log's ages are measured on.
    clock: Clock,
    /// What the retained log's heartbeat said at start-up: when an earlier run last saw NATS
    /// connected, and to which server.
    last_connected: Option<Heartbeat>,
    stats: Arc<SpoolStats>,
    /// Held for the life of the spool: the exclusive lock on `<dir>/lock`.
    _lock: Box<dyn std::fmt::Debug + Send>,
    /// Where every file operation of the log goes.
    fs: Arc<dyn Storage>,
    /// File operations a test makes fail (how many times each).
    #[cfg(test)]
    faults: std::collections::HashMap<Fault, u32>,
}

/// A point in the spool's file operations where a test can script a failure: a full disk,
/// or (dropping the spool right after) a crash between two operations.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Fault {
    /// Writing the cursor file fails (ENOSPC).
    CursorWrite,
    /// Right after a consumed segment is deleted, before the cursor moves past it.
    AfterSegmentRemoved,
    /// Appending writes the first half of its buffer, then fails (ENOSPC).
    PartialWrite,
    /// Cutting a segment back to its last complete record fails.
    Truncate,
    /// Writing a quarantined message's description fails (ENOSPC).
    QuarantineDescription,
    /// A replay's copy fails after its first chunk (ENOSPC).
    LaterReplayChunk,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// Milliseconds since the Unix epoch, on the wall clock: the time stamps in records and in
/// the quarantine, which are shown to people; nothing is decided on them.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds on the process's monotonic clock, since its first reading: ages within a run
/// are measured on it, so a step of the wall clock changes none of them.
pub fn mono_ms() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The monotonic clock the spool measures the retained log's ages on: [`mono_ms`], or a
/// test's hand-moved one.
#[derive(Debug, Clone, Default)]
pub struct Clock(Option<Arc<AtomicU64>>);

impl Clock {
    /// A clock that reads `ms` and moves only when a test stores another value in it.
    pub fn manual(ms: &Arc<AtomicU64>) -> Clock {
        Clock(Some(ms.clone()))
    }

    pub fn now(&self) -> u64 {
        match &self.0 {
            Some(ms) => ms.load(Ordering::SeqCst),
            None => mono_ms(),
        }
    }
}

fn lock_dir(fs: &dyn Storage, dir: &Path) -> Result<Box<dyn std::fmt::Debug + Send>, SpoolError> {
    fs.lock(&dir.join(LOCK))?
        .ok_or_else(|| SpoolError::Locked(dir.to_owned()))
}

fn list_segments(fs: &dyn Storage, dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids: Vec<u64> = fs
        .list(dir)?
        .into_iter()
        .filter_map(|name| name.strip_suffix(".seg")?.parse().ok())
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, taking its lock and scanning what a previous
    /// run left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        Spool::open_with(Arc::new(Disk), dir, max_bytes)
    }

    /// [`Spool::open`] with every file operation of the log going to `fs`.
    pub(crate) fn open_with(
        fs: Arc<dyn Storage>,
        dir: &Path,
        max_bytes: u64,
    ) -> Result<Spool, SpoolError> {
        create_dir_durably(&*fs, dir)?;
        let lock = lock_dir(&*fs, dir)?;
        let ids = list_segments(&*fs, dir)?;
        let mut cursor = find_cursor(&*fs, dir, &ids)?;
        let mut segments = VecDeque::new();
        let (mut messages, mut bytes, mut mail_bytes) = (0u64, 0u64, 0u64);
        for id in ids {
            let path = segment_path(dir, id);
            if id < cursor.segment {
                fs.remove_file(&path)?;
                continue;
            }
            let scan = scan_in(&*fs, &path)?;
            if id == cursor.segment && !on_boundary(cursor, &scan.records) {
                tracing::warn!(
                    segment = %path.display(),
                    offset = cursor.offset,
                    "the spool cursor is not at a record boundary (left by an earlier version after a crash); reading the segment from its start"
                );
                cursor.offset = 0;
            }
            if scan.valid_len < scan.file_len {
                tracing::warn!(
                    segment = %path.display(),
                    kept = scan.valid_len,
                    dropped = scan.file_len - scan.valid_len,
                    "spool segment ends with a torn or corrupt record; truncating it"
                );
                let mut file = fs.open_write(&path)?;
                file.set_len(scan.valid_len)?;
                file.sync_all()?;
            }
            for &(start, end) in &scan.gaps {
                if id > cursor.segment || start >= cursor.offset {
                    quarantine_unreadable(&*fs, dir, &path, id, start, end)?;
                }
            }
            for record in scan.records {
                if id > cursor.segment || record.end > cursor.offset {
                    messages += 1;
                    bytes += record.size;
                    mail_bytes += record.mail_bytes.unwrap_or(0);
                }
            }
            segments.push_back(Segment {
                id,
                size: scan.valid_len,
                gaps: scan.gaps,
            });
        }
        // Never the cursor's own segment again: a cursor can outlive its segment (a crash
        // between deleting the segment and moving the cursor on), and a new segment of that
        // id would be read from the stale offset, i.e. from the middle of a record.
        let next_id = segments
            .back()
            .map_or(1, |s| s.id + 1)
            .max(cursor.segment + 1);
        let stats = Arc::new(SpoolStats::default());
        stats.messages.store(messages, Ordering::SeqCst);
        stats.bytes.store(bytes, Ordering::SeqCst);
        // The files of spooled mails count in `spool.max_bytes` too.
        stats.inbound_bytes.store(mail_bytes, Ordering::SeqCst);
        let quarantined = list_quarantine(&*fs, dir)?;
        stats
            .quarantined
            .store(quarantined.len() as u64, Ordering::SeqCst);
        stats
            .quarantined_bytes
            .store(quarantined.iter().map(|e| e.bytes).sum(), Ordering::SeqCst);
        Ok(Spool {
            dir: dir.to_owned(),
            max_bytes,
            segments,
            writer: None,
            next_id,
            cursor,
            cursor_dirty: false,
            pending_cut: None,
            retained: None,
            last_connected: None,
            clock: Clock::default(),
            stats,
            _lock: lock,
            fs,
            #[cfg(test)]
            faults: Default::default(),
        })
    }

    /// Gives every mail directory a record: those of the inbound queue of earlier versions
    /// (`inbound/<n>/mail.json`, moved to `mail/<n>`, in their order) and any in `mail/` no
    /// record names (a crash between the rename that made a mail's directory complete and
    /// the append of its record). Run once at start-up, before the writer thread starts.
    /// Returns how many records it appended.
    pub fn adopt_mails(&mut self) -> Result<usize, SpoolError> {
        let fs = self.fs.clone();
        let numbered = |dir: &Path| -> io::Result<Vec<(u64, PathBuf)>> {
            let mut found = Vec::new();
            if let Ok(names) = fs.list(dir) {
                for name in names {
                    let Ok(n) = name.parse::<u64>() else {
                        continue;
                    };
                    if fs.is_file(&dir.join(&name).join(MAIL_FILE)) {
                        found.push((n, dir.join(name)));
                    }
                }
            }
            found.sort();
            Ok(found)
        };
        let mails = self.dir.join(MAIL_DIR);
        create_dir_durably(&*fs, &mails)?;
        let old = numbered(&self.dir.join("inbound"))?;
        if !old.is_empty() {
            // After any mail already here, in the old queue's order.
            let first = numbered(&mails)?.last().map_or(1, |(n, _)| n + 1);
            for (next, (_, from)) in (first..).zip(old) {
                fs.rename(&from, &mails.join(format!("{next:020}")))?;
            }
            fs.sync_dir(&mails)?;
            fs.sync_dir(&self.dir.join("inbound"))?;
        }
        let mut named = self.unconsumed_mail_dirs()?;
        // The retained log's mails keep their directories too (open it first: `retain`).
        if let Some(log) = &self.retained {
            named.extend(log.mail_dirs()?);
        }
        // A directory moved in whose record was never written (a crash, a failed append):
        // its request was not answered 200, so nothing promised is lost.
        for name in fs.list(&mails)? {
            let numbered = name.parse::<u64>().is_ok();
            if !numbered && !named.contains(&format!("{MAIL_DIR}/{name}")) {
                fs.remove_dir_all(&mails.join(name))?;
            }
        }
        let mut records = Vec::new();
        let (mut count, mut adopted_bytes) = (0, 0u64);
        for (n, path) in numbered(&mails)? {
            let dir = format!("{MAIL_DIR}/{n:020}");
            if named.contains(&dir) {
                continue;
            }
            let batch_id = fs
                .read(&path.join(BATCH_FILE))
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_else(|| format!("spool-{n:020}"));
            let file_bytes = fs
                .list(&path)?
                .into_iter()
                .filter_map(|name| fs.len(&path.join(name)).ok())
                .sum();
            adopted_bytes += file_bytes;
            let record = MailRecord {
                dir,
                batch_id,
                file_bytes,
            };
            encode_mail(&mut records, &record, now_ms())?;
            count += 1;
        }
        if count > 0 {
            self.append(records, count as u64)?;
            self.stats
                .inbound_bytes
                .fetch_add(adopted_bytes, Ordering::SeqCst);
        }
        Ok(count)
    }

    /// The directories the mail records from the cursor on name.
    fn unconsumed_mail_dirs(&mut self) -> Result<std::collections::HashSet<String>, SpoolError> {
        let saved = self.cursor;
        let mut named = std::collections::HashSet::new();
        let found = (|| loop {
            let batch = self.read(DRAIN_SCAN)?;
            let Some(&(end, _)) = batch.ends.last() else {
                return Ok(());
            };
            if let Some(mail) = batch.mail {
                named.insert(mail.dir);
            }
            self.cursor = end;
        })();
        self.cursor = saved;
        found.map(|()| named)
    }

    #[cfg(test)]
    fn fail_at(&mut self, fault: Fault) -> io::Result<()> {
        match self.faults.get_mut(&fault) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!("no space left on device (scripted at {fault:?})"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Makes the next `times` passes through `fault` fail.
    #[cfg(test)]
    pub(crate) fn inject(&mut self, fault: Fault, times: u32) {
        self.faults.insert(fault, times);
    }

    /// Measures the retained log's ages on `clock` (before [`Spool::retain`]).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// The counts, shared.
    pub fn stats(&self) -> Arc<SpoolStats> {
        self.stats.clone()
    }

    /// Appends one batch's encoded records durably (one write, one fsync); all or nothing.
    pub fn append(&mut self, records: Vec<u8>, count: u64) -> Result<(), SpoolError> {
        self.append_group(vec![(records, count)])
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Appends several batches with one write and one `sync_data`; each gets its own answer
    /// (a batch that does not fit in `max_bytes` is refused, the others are written).
    pub fn append_group(&mut self, group: Vec<(Vec<u8>, u64)>) -> Vec<Result<(), SpoolError>> {
        self.append_to(
            group
                .into_iter()
                .map(|(records, n)| (records, n, Log::Spool))
                .collect(),
        )
    }

    /// Appends a group whose batches go to the spool or to the retained log: one write and
    /// one sync per log that gets any. `spool.max_bytes` bounds both together.
    fn append_to(&mut self, group: Vec<(Vec<u8>, u64, Log)>) -> Vec<Result<(), SpoolError>> {
        let mut answers = Vec::with_capacity(group.len());
        let mut bufs = [Vec::new(), Vec::new()];
        let mut counts = [0u64; 2];
        let mut accepted = Vec::with_capacity(group.len());
        let now = self.clock.now();
        for (records, n, log) in group {
            let len = records.len() as u64;
            let log = if self.retained.is_some() {
                log
            } else {
                Log::Spool
            };
            // The spooled mails' files count too: `spool.max_bytes` bounds the directory.
            // So do the quarantine (on the same disk until requeued or removed) and the
            // retained log.
            let held = self.stats.held_but_mails() + self.stats.inbound_bytes();
            let size = (bufs[0].len() + bufs[1].len()) as u64;
            if held + size + len > self.max_bytes {
                answers.push(Some(Err(SpoolError::Full(self.max_bytes))));
                continue;
            }
            let buf = &mut bufs[log as usize];
            if buf.is_empty() {
                *buf = records;
            } else {
                buf.extend_from_slice(&records);
            }
            counts[log as usize] += n;
            accepted.push((answers.len(), log));
            answers.push(None);
        }
        let [spooled, retained] = bufs;
        let mut results = [Ok(()), Ok(())];
        if !spooled.is_empty() {
            results[0] = self.write_durably(&spooled);
            if results[0].is_ok() {
                self.stats.messages.fetch_add(counts[0], Ordering::SeqCst);
                self.stats
                    .bytes
                    .fetch_add(spooled.len() as u64, Ordering::SeqCst);
            }
        }
        if let (false, Some(log)) = (retained.is_empty(), self.retained.as_mut()) {
            results[1] = log.append(&retained, now);
            if results[1].is_ok() {
                self.stats
                    .retained_bytes
                    .fetch_add(retained.len() as u64, Ordering::SeqCst);
            }
        }
        for (i, log) in accepted {
            answers[i] = Some(match &results[log as usize] {
                Ok(()) => Ok(()),
                Err(e) => Err(SpoolError::Io(io::Error::new(e.kind(), e.to_string()))),
            });
        }
        answers.into_iter().map(|a| a.unwrap_or(Ok(()))).collect()
    }

    fn write_durably(&mut self, buf: &[u8]) -> io::Result<()> {
        self.cut_back()?;
        let needs_new = match (&self.writer, self.segments.back()) {
            (Some(_), Some(last)) => last.size >= SEGMENT_MAX,
            _ => true,
        };
        if needs_new {
            let id = self.next_id;
            self.next_id += 1;
            let file = self.fs.create_new(&segment_path(&self.dir, id))?;
            self.fs.sync_dir(&self.dir)?;
            self.writer = Some(file);
            self.segments.push_back(Segment {
                id,
                size: 0,
                gaps: Vec::new(),
            });
        }
        #[cfg(test)]
        let partial = self.fail_at(Fault::PartialWrite);
        let writer = self.writer.as_mut().expect("writer opened above");
        #[cfg(test)]
        let written = match partial {
            Ok(()) => writer.write_all(buf).and_then(|()| writer.sync_data()),
            Err(e) => writer.write_all(&buf[..buf.len() / 2]).and(Err(e)),
        };
        #[cfg(not(test))]
        let written = writer.write_all(buf).and_then(|()| writer.sync_data());
        if let Err(e) = written {
            // The tail may hold part of this write: start a fresh segment next time, and
            // cut this one back to its last complete record.
            self.writer = None;
            self.pending_cut = self.segments.back().map(|last| (last.id, last.size));
            if let Err(cut) = self.cut_back() {
                tracing::error!(error = %cut, "cannot cut a failed write off the spool; appends are refused until it is done");
            } else if let Some(&Segment { id, size: 0, .. }) = self.segments.back() {
                // An empty segment serves nothing: without this, every append refused on a
                // full disk would leave one more file behind.
                if self.fs.remove_file(&segment_path(&self.dir, id)).is_ok() {
                    self.segments.pop_back();
                }
            }
            return Err(e);
        }
        self.segments.back_mut().expect("segment exists").size += buf.len() as u64;
        Ok(())
    }

    /// Cuts the segment a failed write left a partial group in back to its last complete
    /// record, if that is still to do.
    fn cut_back(&mut self) -> io::Result<()> {
        let Some((id, size)) = self.pending_cut else {
            return Ok(());
        };
        #[cfg(test)]
        self.fail_at(Fault::Truncate)?;
        match self.fs.open_write(&segment_path(&self.dir, id)) {
            Ok(mut file) => {
                file.set_len(size)?;
                file.sync_all()?;
            }
            // Consumed and deleted meanwhile: nothing left to cut.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.pending_cut = None;
        Ok(())
    }

    /// Reads up to `max` messages from the cursor on, in order.
    pub fn read(&mut self, max: usize) -> Result<ReadBatch, SpoolError> {
        let mut position = self.cursor;
        let mut batch = ReadBatch::default();
        for segment in &self.segments {
            let (id, size) = (segment.id, segment.size);
            let gap_at = |offset: u64| segment.gaps.iter().find(|(start, _)| *start == offset);
            if id < position.segment {
                continue;
            }
            if batch.messages.len() >= max {
                break;
            }
            if id > position.segment {
                position = Position {
                    segment: id,
                    offset: 0,
                };
            }
            if position.offset >= size {
                continue;
            }
            let mut reader = self.fs.read_range(
                &segment_path(&self.dir, id),
                position.offset,
                size - position.offset,
            )?;
            while batch.messages.len() < max && position.offset < size {
                if let Some(&(start, end)) = gap_at(position.offset) {
                    io::copy(&mut (&mut reader).take(end - start), &mut io::sink())?;
                    position.offset = end;
                    continue;
                }
                let (read, record) = read_record(&mut reader, size - position.offset)?;
                let message = match read {
                    Record::Message(message) => message,
                    // A mail goes alone; after messages it waits for the next read.
                    Record::Mail(_) if !batch.messages.is_empty() => return Ok(batch),
                    Record::Mail(mail) => {
                        position.offset += record.len() as u64;
                        batch.ends.push((position, record.len() as u64));
                        batch.records.push(record);
                        batch.mail = Some(mail);
                        return Ok(batch);
                    }
                };
                let len = record.len() as u64;
                position.offset += len;
                batch.messages.push(message);
                batch.ends.push((position, len));
                batch.records.push(record);
            }
        }
        Ok(batch)
    }

    /// Marks the first `n` messages of `batch` as published (and, with `n = 0`, retries
    /// writing a cursor whose last write failed).
    ///
    /// The cursor in memory moves even when its file cannot be written, so the drainer never
    /// publishes the same messages again in this run; the file is written again at the next
    /// commit, and until then no segment is deleted.
    ///
    /// With the retained log on, the published records are copied there (and synced) before
    /// the cursor moves past them: NATS may not have synced them yet. If that copy fails the
    /// cursor stays, and the drainer publishes them again (de-duplicated).
    pub fn commit(&mut self, batch: &ReadBatch, n: usize) -> Result<(), SpoolError> {
        if let Some((end, bytes)) = batch.end_of(n) {
            if end > self.cursor {
                self.keep_published(&batch.records[..n])?;
            }
            self.advance(end, n as u64, bytes);
        }
        self.persist_cursor()
    }

    /// Copies records NATS just acknowledged into the retained log, when it is on. Every one
    /// is kept as acknowledged now, duplicates too: a duplicate's PubAck says NATS holds the
    /// message, not that it synced it (a record NATS stored late from its socket buffer, or
    /// stored again after a replay, is as unsynced as a new one).
    fn keep_published(&mut self, records: &[Vec<u8>]) -> Result<(), SpoolError> {
        let Some(log) = self.retained.as_mut() else {
            return Ok(());
        };
        let stamp = now_ms();
        let mut buf = Vec::with_capacity(records.iter().map(Vec::len).sum());
        for record in records {
            restamp(&mut buf, record, stamp)?;
        }
        if buf.is_empty() {
            return Ok(());
        }
        log.append(&buf, self.clock.now())?;
        self.stats
            .retained_bytes
            .fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    /// Writes the records of each of `group` (batches published directly) to the retained
    /// log, piece by piece, then makes them durable with one `fdatasync`; each gets its own
    /// answer (a batch over `spool.max_bytes` is cut off again and refused alone).
    fn retain_group(&mut self, group: &[Box<dyn Records>], at: u64) -> Vec<Result<(), SpoolError>> {
        let now = self.clock.now();
        let Some(log) = self.retained.as_mut() else {
            return group.iter().map(|_| Err(SpoolError::Stopped)).collect();
        };
        let room = self
            .max_bytes
            .saturating_sub(self.stats.held_but_mails() + self.stats.inbound_bytes());
        let start = match log.begin(now) {
            Ok(start) => start,
            Err(e) => return group.iter().map(|_| Err(copy_error(&e))).collect(),
        };
        let mut answers: Vec<Option<Result<(), SpoolError>>> = Vec::with_capacity(group.len());
        for records in group {
            let before = log.end();
            let written = records.write_to(
                &mut |piece| {
                    if log.end() - start + piece.len() as u64 > room {
                        return Err(io::Error::other(OverMaxBytes));
                    }
                    log.write(piece)
                },
                at,
            );
            match written {
                Ok(_) => answers.push(None),
                Err(e) => {
                    let full = matches!(&e, SpoolError::Io(io) if io.get_ref().is_some_and(|e| e.is::<OverMaxBytes>()));
                    if let Err(cut) = log.cut(before) {
                        log.abandon(start);
                        let e = copy_error(&cut);
                        return group.iter().map(|_| Err(copy_error_of(&e))).collect();
                    }
                    answers.push(Some(Err(if full {
                        SpoolError::Full(self.max_bytes)
                    } else {
                        e
                    })));
                }
            }
        }
        let written = log.end() - start;
        if let Err(e) = log.sync(now) {
            log.abandon(start);
            return group.iter().map(|_| Err(copy_error(&e))).collect();
        }
        self.stats
            .retained_bytes
            .fetch_add(written, Ordering::SeqCst);
        answers.into_iter().map(|a| a.unwrap_or(Ok(()))).collect()
    }

    /// Turns the retained log on (`jetstream` mode): records NATS acknowledges are kept
    /// `hold` after they were written (`spool.retain` and the longest a PubAck may take), in
    /// case it loses them (see [`retained`](self::retained)). What an earlier run retained is
    /// found again, as written now; call [`Spool::replay_retained`] before serving when NATS
    /// may have lost it meanwhile.
    pub fn retain(&mut self, hold: Duration) -> Result<(), SpoolError> {
        let opened = Retained::open(self.fs.clone(), &self.dir, hold, self.clock.now())?;
        self.stats
            .retained_bytes
            .store(opened.bytes, Ordering::SeqCst);
        self.stats
            .inbound_bytes
            .fetch_add(opened.mail_bytes, Ordering::SeqCst);
        self.last_connected = opened.retained.last_connected();
        self.retained = Some(opened.retained);
        Ok(())
    }

    /// Notes in the retained log's heartbeat that NATS answers from server process `server`,
    /// when that is another than the heartbeat names (written durably, so rarely).
    pub fn note_connected(&mut self, server: &str) {
        if self
            .last_connected
            .as_ref()
            .is_some_and(|last| last.server == server)
        {
            return;
        }
        if let Some(log) = &self.retained {
            let heartbeat = Heartbeat {
                at_ms: now_ms(),
                server: server.to_owned(),
            };
            match log.write_heartbeat(&heartbeat) {
                Ok(()) => self.last_connected = Some(heartbeat),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write the retained log's heartbeat; will retry")
                }
            }
        }
    }

    /// Whether the retained log is on.
    pub fn retains(&self) -> bool {
        self.retained.is_some()
    }

    /// NATS was last seen answering at `connected_until_ms` ([`mono_ms`]) and may have lost
    /// what it had not synced by then: moves the retained records it acknowledged in the
    /// hold before that moment to the end of the spool, durably, to be published again, and
    /// drops the older ones (synced by then). `0`: everything retained. Returns how many were
    /// moved.
    pub fn replay_retained(&mut self, connected_until_ms: u64) -> Result<u64, SpoolError> {
        let Some(mut log) = self.retained.take() else {
            return Ok(0);
        };
        let since_ms = log.needed_since(connected_until_ms);
        // Where the spool ended before the segment being copied: a copy that fails halfway
        // is cut off again, or every retry (the keeper's, each second) would add another
        // partial copy until the disk is full. Segments copied whole are deleted from the log
        // as they are, so they stay moved.
        let mut start = (
            self.segments.len(),
            self.segments.back().map(|s| (s.id, s.size)),
        );
        let (mut moved, mut copy_failed) = (0, false);
        let (mut segment_moved, mut segment_bytes) = (0, 0);
        let mut chunks = 0;
        let taken = log.take_all(REPLAY_CHUNK, since_ms, |piece| match piece {
            Piece::Records(chunk, count) => {
                chunks += 1;
                #[cfg(test)]
                if chunks > 1 {
                    if let Err(e) = self.fail_at(Fault::LaterReplayChunk) {
                        copy_failed = true;
                        return Err(e);
                    }
                }
                if let Err(e) = self.write_durably(chunk) {
                    copy_failed = true;
                    return Err(e);
                }
                self.stats.messages.fetch_add(count, Ordering::SeqCst);
                self.stats
                    .bytes
                    .fetch_add(chunk.len() as u64, Ordering::SeqCst);
                moved += count;
                segment_moved += count;
                segment_bytes += chunk.len() as u64;
                Ok(())
            }
            Piece::SegmentDone => {
                start = (
                    self.segments.len(),
                    self.segments.back().map(|s| (s.id, s.size)),
                );
                (segment_moved, segment_bytes) = (0, 0);
                Ok(())
            }
        });
        self.retained = Some(log);
        if copy_failed {
            self.undo_copy(start, segment_moved, segment_bytes);
            moved -= segment_moved;
        }
        let freed = taken?;
        self.release_retained(freed)?;
        Ok(moved)
    }

    /// Counts what expiring or taking the retained log freed, and deletes the directories of
    /// the mails whose records went.
    fn release_retained(&mut self, freed: Freed) -> Result<(), SpoolError> {
        let _ = self
            .stats
            .retained_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(freed.bytes))
            });
        for (dir, bytes) in freed.mails {
            match self.fs.remove_dir_all(&self.dir.join(&dir)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => self.stats.release_inbound(bytes),
            }
        }
        Ok(())
    }

    /// Takes back the part of a replay copied before it failed: the spool ends again where it
    /// did at `start` (its segment count, and its last segment's id and size).
    fn undo_copy(&mut self, start: (usize, Option<(u64, u64)>), moved: u64, bytes: u64) {
        let (count, last) = start;
        self.writer = None;
        while self.segments.len() > count {
            let Some(added) = self.segments.pop_back() else {
                break;
            };
            if let Err(e) = self.fs.remove_file(&segment_path(&self.dir, added.id)) {
                tracing::error!(error = %e, "cannot remove the part of a failed replay; it is published twice");
                self.segments.push_back(added);
                return;
            }
        }
        if let (Some((id, size)), Some(back)) = (last, self.segments.back_mut()) {
            if back.id == id {
                back.size = size;
                self.pending_cut = Some((id, size));
                if let Err(e) = self.cut_back() {
                    tracing::error!(error = %e, "cannot cut the part of a failed replay off the spool; appends are refused until it is done");
                }
            }
        }
        let _ = self
            .stats
            .messages
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |m| {
                Some(m.saturating_sub(moved))
            });
        let _ = self
            .stats
            .bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(bytes))
            });
    }

    /// Deletes what the retained log no longer needs at `now_ms` ([`mono_ms`]: records older
    /// than the hold; the caller calls it only just after the stream answered), with the directories of
    /// the mails among them.
    pub fn expire_retained(&mut self, now_ms: u64) -> Result<(), SpoolError> {
        let Some(log) = self.retained.as_mut() else {
            return Ok(());
        };
        let freed = log.expire(now_ms)?;
        self.release_retained(freed)
    }

    /// How many records and bytes the retained log holds (none when it is off).
    pub fn retained_count(&self) -> Result<(u64, u64), SpoolError> {
        Ok(match &self.retained {
            Some(log) => log.count()?,
            None => (0, 0),
        })
    }

    fn advance(&mut self, end: Position, n: u64, bytes: u64) {
        if end <= self.cursor {
            return;
        }
        self.cursor = end;
        self.mark_cursor_dirty();
        self.stats.messages.fetch_sub(n, Ordering::SeqCst);
        self.stats.bytes.fetch_sub(bytes, Ordering::SeqCst);
    }

    fn mark_cursor_dirty(&mut self) {
        self.cursor_dirty = true;
        self.stats.cursor_pending.store(true, Ordering::SeqCst);
    }

    /// Writes the cursor file; until that succeeds the cursor stays marked as pending, so the
    /// drainer tries again even once nothing is left to publish.
    fn write_cursor_file(&mut self) -> Result<(), SpoolError> {
        #[cfg(test)]
        self.fail_at(Fault::CursorWrite)?;
        store_cursor(&*self.fs, &self.dir, self.cursor)?;
        self.cursor_dirty = false;
        self.stats.cursor_pending.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn persist_cursor(&mut self) -> Result<(), SpoolError> {
        if !self.cursor_dirty {
            return Ok(());
        }
        self.write_cursor_file()?;
        // Delete segments that are wholly consumed; the active one only when it is drained.
        while let Some(&Segment { id, size, .. }) = self.segments.front() {
            let consumed = id < self.cursor.segment
                || (id == self.cursor.segment && self.cursor.offset >= size);
            if !consumed {
                break;
            }
            if self.segments.len() == 1 {
                self.writer = None;
            }
            self.segments.pop_front();
            self.fs.remove_file(&segment_path(&self.dir, id))?;
            // A crash here leaves a cursor naming a deleted segment: harmless, since a
            // segment id is never used twice (see `open`).
            #[cfg(test)]
            self.fail_at(Fault::AfterSegmentRemoved)?;
            let next = match self.segments.front() {
                Some(next) if self.cursor.segment < next.id => Position {
                    segment: next.id,
                    offset: 0,
                },
                Some(_) => self.cursor,
                None => Position {
                    segment: self.next_id,
                    offset: 0,
                },
            };
            if next != self.cursor {
                self.cursor = next;
                self.mark_cursor_dirty();
                self.write_cursor_file()?;
            }
        }
        Ok(())
    }

    /// Moves message `index` of `batch` (NATS refused it for good) to the quarantine with
    /// `reason`, durably, and past it the cursor, which must stand just before it.
    pub fn quarantine(
        &mut self,
        batch: &ReadBatch,
        index: usize,
        reason: &str,
    ) -> Result<(), SpoolError> {
        let (Some(record), Some(&(end, len))) = (batch.records.get(index), batch.ends.get(index))
        else {
            return Ok(());
        };
        // A message: its subject and id; a mail: its directory, moved along.
        let (subject, msg_id) = match (batch.messages.get(index), &batch.mail) {
            (Some(message), _) => (
                message.subject.clone(),
                message.header("Nats-Msg-Id").unwrap_or("").to_owned(),
            ),
            (None, Some(_)) => (String::new(), String::new()),
            (None, None) => return Ok(()),
        };
        let dir = self.dir.join(QUARANTINE);
        create_dir_durably(&*self.fs, &dir)?;
        let at = now_ms();
        let name = format!("{at:020}-{:010}-{:010}", end.segment, end.offset);
        if let Some(mail) = &batch.mail {
            let from = self.dir.join(&mail.dir);
            if self.fs.exists(&from) {
                self.fs.rename(&from, &dir.join(format!("{name}.mail")))?;
                self.fs.sync_dir(&dir)?;
            }
        }
        let entry = QuarantineEntry {
            name: name.clone(),
            subject,
            msg_id,
            reason: reason.to_owned(),
            quarantined_at_ms: at,
            bytes: len,
        };
        let (rec, json_path) = (
            dir.join(format!("{name}.rec")),
            dir.join(format!("{name}.json")),
        );
        let fs = self.fs.clone();
        let written = (|| {
            write_synced(&*fs, &rec, record)?;
            #[cfg(test)]
            self.fail_at(Fault::QuarantineDescription)?;
            let json = serde_json::to_vec_pretty(&entry).map_err(io::Error::other)?;
            write_synced(&*fs, &json_path, &json)?;
            fs.sync_dir(&dir)
        })();
        if let Err(e) = written {
            // A full disk: leave nothing half-written (each attempt would add a file, and
            // fill the disk further); the message stays in the spool and is tried again.
            let _ = fs.remove_file(&json_path);
            let _ = fs.remove_file(&rec);
            return Err(e.into());
        }
        self.stats.quarantined.fetch_add(1, Ordering::SeqCst);
        self.stats
            .quarantined_bytes
            .fetch_add(record.len() as u64, Ordering::SeqCst);
        self.advance(end, 1, len);
        self.persist_cursor()
    }
}

/// What [`Spool::requeue`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Requeued {
    /// The entries put back at the end of the spool.
    pub requeued: Vec<String>,
    /// Entries that are not a readable message (unreadable bytes kept as evidence), left in
    /// the quarantine.
    pub unreadable: Vec<String>,
}

impl Spool {
    /// Puts quarantined messages back at the end of the spool (`spool requeue`): all of them
    /// (`names` empty) or the named entries, in their quarantine order. Each is appended
    /// durably first and removed from the quarantine after, so a crash in between leaves it
    /// in both (published twice at worst, and de-duplicated by its `Nats-Msg-Id` within the
    /// stream's window), never in neither. The quarantine already counts in
    /// `spool.max_bytes`, so moving a message back never makes the spool full.
    pub fn requeue(&mut self, names: &[String]) -> Result<Requeued, SpoolError> {
        let entries = list_quarantine(&*self.fs, &self.dir)?;
        if let Some(unknown) = names
            .iter()
            .find(|name| !entries.iter().any(|e| &e.name == *name))
        {
            return Err(SpoolError::NotQuarantined(unknown.clone()));
        }
        let qdir = self.dir.join(QUARANTINE);
        let mut done = Requeued::default();
        let mut buf = Vec::new();
        let mut picked = Vec::new();
        let mut mail_bytes = 0;
        for entry in entries
            .into_iter()
            .filter(|e| names.is_empty() || names.contains(&e.name))
        {
            let record = self.fs.read(&qdir.join(format!("{}.rec", entry.name)))?;
            match check_record(&record) {
                Some((len, _)) if len == record.len() => {
                    match decode_any(MAGIC_MAIL, &record[RECORD_HEADER..]) {
                        // A mail's directory stays in the quarantine; its record names it
                        // there (nothing moves, so a crash cannot part the two).
                        Some((_, Record::Mail(mut mail))) if &record[..4] == MAGIC_MAIL => {
                            mail.dir = format!("{QUARANTINE}/{}.mail", entry.name);
                            mail_bytes += mail.file_bytes;
                            encode_mail(&mut buf, &mail, now_ms())?;
                        }
                        _ => buf.extend_from_slice(&record),
                    }
                    picked.push(entry);
                }
                _ => done.unreadable.push(entry.name),
            }
        }
        if picked.is_empty() {
            return Ok(done);
        }
        self.write_durably(&buf)?;
        self.stats
            .messages
            .fetch_add(picked.len() as u64, Ordering::SeqCst);
        self.stats
            .bytes
            .fetch_add(buf.len() as u64, Ordering::SeqCst);
        // A requeued mail's files wait in the spool again (as after a restart, where the
        // scan counts them).
        self.stats
            .inbound_bytes
            .fetch_add(mail_bytes, Ordering::SeqCst);
        for entry in picked {
            // The description first: an entry without one is not listed any more.
            self.fs
                .remove_file(&qdir.join(format!("{}.json", entry.name)))?;
            self.fs
                .remove_file(&qdir.join(format!("{}.rec", entry.name)))?;
            self.stats.quarantined.fetch_sub(1, Ordering::SeqCst);
            let _ = self.stats.quarantined_bytes.fetch_update(
                Ordering::SeqCst,
                Ordering::SeqCst,
                |held| Some(held.saturating_sub(entry.bytes)),
            );
            done.requeued.push(entry.name);
        }
        self.fs.sync_dir(&qdir)?;
        Ok(done)
    }
}

/// A retained batch would take the directory over `spool.max_bytes`.
#[derive(Debug, Error)]
#[error("over spool.max_bytes")]
struct OverMaxBytes;

/// One I/O error as the answer of each of several requests.
fn copy_error(e: &io::Error) -> SpoolError {
    SpoolError::Io(io::Error::new(e.kind(), e.to_string()))
}

fn copy_error_of(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::Io(io) => copy_error(io),
        SpoolError::Full(max) => SpoolError::Full(*max),
        other => SpoolError::Io(io::Error::other(other.to_string())),
    }
}

/// Creates `dir` and its missing parents so that a power cut cannot take them back: the
/// parent of each directory created is synced (a new directory's entry is durable only
/// then, and with it everything the log later syncs inside it).
fn create_dir_durably(fs: &dyn Storage, dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !fs.exists(a))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    fs.create_dir_all(dir)?;
    for created in missing.into_iter().rev() {
        match created.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => fs.sync_dir(parent)?,
            _ => fs.sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

fn write_synced(fs: &dyn Storage, path: &Path, data: &[u8]) -> io::Result<()> {
    let mut file = fs.create(path)?;
    file.write_all(data)?;
    file.sync_all()
}

/// One quarantined message, as described in its `.json` file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuarantineEntry {
    /// The entry's name in `quarantine/` (its files are `<name>.rec` and `<name>.json`), as
    /// `spool requeue` takes it.
    #[serde(default)]
    pub name: String,
    pub subject: String,
    pub msg_id: String,
    pub reason: String,
    pub quarantined_at_ms: u64,
    /// Size of its record.
    pub bytes: u64,
}

/// [`list_quarantine`] on the real disk.
fn quarantine_entries(dir: &Path) -> io::Result<Vec<QuarantineEntry>> {
    list_quarantine(&Disk, dir)
}

fn list_quarantine(fs: &dyn Storage, dir: &Path) -> io::Result<Vec<QuarantineEntry>> {
    let dir = dir.join(QUARANTINE);
    let mut files: Vec<PathBuf> = match fs.list(&dir) {
        Ok(names) => names
            .into_iter()
            .map(|name| dir.join(name))
            .filter(|p| p.extension() == Some("json".as_ref()))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    files.sort();
    Ok(files
        .iter()
        .filter_map(|p| {
            let mut entry: QuarantineEntry = serde_json::from_slice(&fs.read(p).ok()?).ok()?;
            entry.name = p.file_stem()?.to_str()?.to_owned();
            Some(entry)
        })
        .collect())
}

/// What `cmc-forwarder spool status` shows: read without taking the lock or changing a byte,
/// so it works beside a running service.
#[derive(Debug, Clone, Serialize)]
pub struct SpoolStatus {
    pub dir: PathBuf,
    /// A process (service or drain) holds the spool's lock.
    pub in_use: bool,
    pub messages: u64,
    pub bytes: u64,
    /// Age of the oldest waiting record, in seconds (records of earlier versions carry no
    /// time; the age is then unknown).
    pub oldest_age_seconds: Option<f64>,
    pub quarantined: Vec<QuarantineEntry>,
}

/// Reads the state of the spool in `dir` (which need not exist).
pub fn status(dir: &Path) -> Result<SpoolStatus, SpoolError> {
    full_status(dir).map(|status| status.events)
}

/// Counts into `status` the records waiting in segments `ids` (as listed) from `cursor` (as
/// read after the listing) on. Beside a running service the drainer may consume and delete
/// listed segments meanwhile: the count may then include records published since, but never
/// misses one still waiting when the cursor was read.
fn count_waiting(
    dir: &Path,
    ids: &[u64],
    mut cursor: Position,
    status: &mut FullStatus,
) -> Result<(), SpoolError> {
    let (mut oldest, mut oldest_mail): (Option<u64>, Option<u64>) = (None, None);
    for &id in ids.iter().filter(|&&id| id >= cursor.segment) {
        let records = match scan_segment(&segment_path(dir, id)) {
            Ok(scan) => scan.records,
            // A running drainer deletes a segment only once it is wholly consumed: one that
            // was listed and is gone now holds nothing still waiting.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        if id == cursor.segment && !on_boundary(cursor, &records) {
            cursor.offset = 0;
        }
        for record in records {
            if id > cursor.segment || record.end > cursor.offset {
                if let Some(file_bytes) = record.mail_bytes {
                    status.mails.mails += 1;
                    status.mails.bytes += file_bytes + record.size;
                    if oldest_mail.is_none() {
                        oldest_mail = record.at_ms;
                    }
                    continue;
                }
                status.events.messages += 1;
                status.events.bytes += record.size;
                if oldest.is_none() {
                    oldest = record.at_ms;
                }
            }
        }
    }
    let age = |at: u64| now_ms().saturating_sub(at) as f64 / 1000.0;
    status.events.oldest_age_seconds = oldest.map(age);
    status.mails.oldest_age_seconds = oldest_mail.map(age);
    Ok(())
}

/// The status of the event messages and of the mails.
pub fn full_status(dir: &Path) -> Result<FullStatus, SpoolError> {
    let mut status = FullStatus {
        events: SpoolStatus {
            dir: dir.to_owned(),
            in_use: false,
            messages: 0,
            bytes: 0,
            oldest_age_seconds: None,
            quarantined: Vec::new(),
        },
        mails: MailStatus::default(),
        retained: RetainedStatus::default(),
    };
    if !dir.exists() {
        return Ok(status);
    }
    // Read as it is (a running service may be deleting expired segments meanwhile).
    let retained_dir = dir.join(retained::RETAINED);
    for id in segment_ids(&retained_dir).unwrap_or_default() {
        match scan_segment(&segment_path(&retained_dir, id)) {
            Ok(scan) => {
                status.retained.records += scan.records.len() as u64;
                status.retained.bytes += scan.valid_len;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    status.events.in_use = match File::open(dir.join(LOCK)) {
        Ok(file) => match file.try_lock_shared() {
            Ok(()) => false,
            Err(fs::TryLockError::WouldBlock) => true,
            Err(fs::TryLockError::Error(e)) => return Err(e.into()),
        },
        Err(_) => false,
    };
    let ids = segment_ids(dir)?;
    let cursor = effective_cursor(dir, &ids)?;
    count_waiting(dir, &ids, cursor, &mut status)?;
    for entry in quarantine_entries(dir)? {
        let mail = dir.join(QUARANTINE).join(format!("{}.mail", entry.name));
        if !mail.is_dir() {
            status.events.quarantined.push(entry);
            continue;
        }
        let (subject, filter) = mail_fields(&mail);
        status.mails.quarantined.push(MailQuarantineEntry {
            id: format!("{}.mail", entry.name),
            subject,
            filter,
            reason: entry.reason,
        });
    }
    // The inbound queue of earlier versions, until a start or `spool drain` adopts it.
    if let Ok(entries) = fs::read_dir(dir.join("inbound")) {
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let numbered = entry.file_name().to_string_lossy().parse::<u64>().is_ok();
            if numbered && path.join(MAIL_FILE).is_file() {
                status.mails.mails += 1;
                status.mails.bytes += fs::read_dir(&path)?
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>();
            }
        }
    }
    // The quarantine of the inbound queue of earlier versions, kept where it was.
    if let Ok(entries) = fs::read_dir(dir.join("inbound/quarantine")) {
        let mut old: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        old.sort();
        for path in old {
            let (subject, filter) = mail_fields(&path);
            status.mails.quarantined.push(MailQuarantineEntry {
                id: format!(
                    "inbound/quarantine/{}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ),
                subject,
                filter,
                reason: fs::read_to_string(path.join("reason.txt")).unwrap_or_default(),
            });
        }
    }
    Ok(status)
}

/// A mail directory's `Subject` and `filter` (empty when its record is unreadable).
fn mail_fields(dir: &Path) -> (String, String) {
    let mail: serde_json::Value = fs::read(dir.join(MAIL_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let field = |name: &str| mail[name].as_str().unwrap_or_default().to_owned();
    (field("subject"), field("filter"))
}

/// One quarantined mail, for `spool status`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MailQuarantineEntry {
    /// Where it is, under the spool's quarantine.
    pub id: String,
    /// The mail's `Subject` (empty when its record is unreadable).
    pub subject: String,
    pub filter: String,
    pub reason: String,
}

/// What `spool status` shows of the spooled mails.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MailStatus {
    pub mails: u64,
    /// Their files and records.
    pub bytes: u64,
    pub oldest_age_seconds: Option<f64>,
    pub quarantined: Vec<MailQuarantineEntry>,
}

/// The spool's status: its event messages at the top level (as before mails joined it),
/// its mails under `inbound`.
#[derive(Debug, Clone, Serialize)]
pub struct FullStatus {
    #[serde(flatten)]
    pub events: SpoolStatus,
    #[serde(rename = "inbound")]
    pub mails: MailStatus,
    /// The retained log: records NATS acknowledged, kept for `spool.retain`.
    pub retained: RetainedStatus,
}

/// What the retained log holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RetainedStatus {
    pub records: u64,
    pub bytes: u64,
}

enum Op {
    Append {
        records: Box<dyn Records>,
        log: Log,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    Replay {
        connected_until_ms: u64,
        reply: oneshot::Sender<Result<u64, SpoolError>>,
    },
    Expire {
        now_ms: u64,
        server: String,
    },
    Read {
        max: usize,
        reply: oneshot::Sender<Result<ReadBatch, SpoolError>>,
    },
    Commit {
        batch: Arc<ReadBatch>,
        n: usize,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    Quarantine {
        batch: Arc<ReadBatch>,
        index: usize,
        reason: String,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
}

/// The async side of the writer thread; cheap to clone.
#[derive(Clone)]
pub struct SpoolHandle {
    tx: mpsc::Sender<Op>,
    stats: Arc<SpoolStats>,
    retains: bool,
    last_connected: Option<Heartbeat>,
    /// Wakes the drainer when something is appended.
    appended: Arc<Notify>,
}

impl SpoolHandle {
    /// Starts the writer thread that owns `spool` from now on.
    pub fn start(spool: Spool) -> io::Result<SpoolHandle> {
        let (tx, rx) = mpsc::channel();
        let stats = spool.stats();
        let retains = spool.retains();
        let last_connected = spool.last_connected.clone();
        let appended = Arc::new(Notify::new());
        let notify = appended.clone();
        std::thread::Builder::new()
            .name("cmc-spool".into())
            .spawn(move || writer_loop(spool, rx, notify))?;
        Ok(SpoolHandle {
            tx,
            stats,
            retains,
            last_connected,
            appended,
        })
    }

    pub fn stats(&self) -> &SpoolStats {
        &self.stats
    }

    /// The counts, shared (the inbound spool of the same directory adds its bytes to them).
    pub fn shared_stats(&self) -> Arc<SpoolStats> {
        self.stats.clone()
    }

    /// Hands `records` to the writer; from this call on the spool counts as non-empty. The
    /// answer comes once they are durable (or refused).
    pub fn begin_append(
        &self,
        records: Box<dyn Records>,
    ) -> oneshot::Receiver<Result<(), SpoolError>> {
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        self.send_append(records, Log::Spool)
    }

    /// Hands `records`, published directly, to the retained log (the spool's own when it is
    /// off: see [`SpoolHandle::retains`]). The answer comes once they are durable.
    pub fn begin_retain(
        &self,
        records: Box<dyn Records>,
    ) -> oneshot::Receiver<Result<(), SpoolError>> {
        self.send_append(records, Log::Retained)
    }

    fn send_append(
        &self,
        records: Box<dyn Records>,
        log: Log,
    ) -> oneshot::Receiver<Result<(), SpoolError>> {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::SendError(op)) = self.tx.send(Op::Append {
            records,
            log,
            reply,
        }) {
            if log == Log::Spool {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            }
            if let Op::Append { reply, .. } = op {
                let _ = reply.send(Err(SpoolError::Stopped));
            }
        }
        rx
    }

    /// Whether batches published directly are kept in the retained log (`jetstream` mode).
    pub fn retains(&self) -> bool {
        self.retains
    }

    /// [`Spool::replay_retained`] in the writer thread; from this call on the spool counts as
    /// non-empty until it is done, so later batches queue behind it.
    pub async fn replay_retained(&self, connected_until_ms: u64) -> Result<u64, SpoolError> {
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        let answer = self
            .call(|reply| Op::Replay {
                connected_until_ms,
                reply,
            })
            .await;
        if matches!(answer, Err(SpoolError::Stopped)) {
            let _ = self
                .stats
                .queued
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                    Some(q.saturating_sub(1))
                });
        }
        self.appended.notify_one();
        answer
    }

    /// Records that the stream answered a check at `now_ms` ([`mono_ms`]), NATS being on
    /// server process `server`, and deletes the retained records written more than the hold
    /// before (see `deliver::keep_retained`).
    pub fn answered_at(&self, server: &str, now_ms: u64) {
        let _ = self.tx.send(Op::Expire {
            now_ms,
            server: server.to_owned(),
        });
    }

    /// The heartbeat of an earlier run of the service: the server process it last saw NATS
    /// answer on (none: replay everything retained).
    pub fn last_connected(&self) -> Option<Heartbeat> {
        self.last_connected.clone()
    }

    /// Waits until something is appended (or a while has passed).
    pub async fn appended(&self) {
        self.appended.notified().await
    }

    pub async fn read(&self, max: usize) -> Result<ReadBatch, SpoolError> {
        self.call(|reply| Op::Read { max, reply }).await
    }

    /// [`Spool::commit`] in the writer thread.
    pub async fn commit(&self, batch: Arc<ReadBatch>, n: usize) -> Result<(), SpoolError> {
        self.call(|reply| Op::Commit { batch, n, reply }).await
    }

    pub async fn quarantine(
        &self,
        batch: Arc<ReadBatch>,
        index: usize,
        reason: String,
    ) -> Result<(), SpoolError> {
        self.call(|reply| Op::Quarantine {
            batch,
            index,
            reason,
            reply,
        })
        .await
    }

    async fn call<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, SpoolError>>) -> Op,
    ) -> Result<T, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(op(reply)).map_err(|_| SpoolError::Stopped)?;
        rx.await.map_err(|_| SpoolError::Stopped)?
    }
}

/// How long the writer waits for more appends when they arrive concurrently.
const LINGER: Duration = Duration::from_millis(1);
/// The same for a group of retained records only (published directly, answered after their
/// PubAcks): well under a JetStream round trip under concurrent load.
const RETAINED_LINGER: Duration = Duration::from_millis(4);
/// A group this large is written without waiting any longer.
const GROUP_TARGET: usize = 64;

fn writer_loop(mut spool: Spool, rx: mpsc::Receiver<Op>, appended: Arc<Notify>) {
    let mut next = None;
    let mut last_group = 0usize;
    loop {
        let op = match next.take() {
            Some(op) => op,
            None => match rx.recv() {
                Ok(op) => op,
                Err(_) => return,
            },
        };
        match op {
            Op::Append {
                records,
                log,
                reply,
            } => {
                // Group commit: everything that queued up while the last fsync ran goes
                // into this one write.
                let mut group = vec![(records, log, reply)];
                // When the last group had company, appends are arriving concurrently: wait a
                // moment for more (as Postgres's commit_delay does), so one fsync covers
                // them; a lone sender never waits. A group of retained records only waits
                // longer: each is written while its batch is published, and its request is
                // answered after the PubAcks anyway, which take longer than this under such
                // load, so the wait costs no latency and saves fsyncs (kernel CPU, shared
                // with nats-server).
                let began = Instant::now();
                let lingers = last_group > 1;
                let mut retained_only = log == Log::Retained;
                loop {
                    let linger = if retained_only {
                        RETAINED_LINGER
                    } else {
                        LINGER
                    };
                    let received = if lingers && group.len() < GROUP_TARGET {
                        let left = (began + linger).saturating_duration_since(Instant::now());
                        rx.recv_timeout(left).map_err(|_| ())
                    } else {
                        rx.try_recv().map_err(|_| ())
                    };
                    match received {
                        Ok(Op::Append {
                            records,
                            log,
                            reply,
                        }) => {
                            retained_only &= log == Log::Retained;
                            group.push((records, log, reply));
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(()) => break,
                    }
                }
                last_group = group.len();
                let at = now_ms();
                let mut encoded = Vec::with_capacity(group.len());
                let mut replies = Vec::with_capacity(group.len());
                let mut early = Vec::new();
                let done = group
                    .iter()
                    .filter(|(_, log, _)| *log == Log::Spool)
                    .count() as u64;
                // Batches published directly go to the retained log piece by piece (when it
                // is on; else, as nothing asks for them, they are answered with the spool's).
                let (retain, group): (Vec<_>, Vec<_>) = group
                    .into_iter()
                    .partition(|(_, log, _)| *log == Log::Retained && spool.retained.is_some());
                if !retain.is_empty() {
                    let (records, replies): (Vec<_>, Vec<_>) =
                        retain.into_iter().map(|(r, _, reply)| (r, reply)).unzip();
                    let answers = spool.retain_group(&records, at);
                    drop(records);
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(answer);
                    }
                }
                for (records, log, reply) in group {
                    let mut buf = Vec::new();
                    match records.encode(&mut buf, at) {
                        Ok(n) => {
                            encoded.push((buf, n, log));
                            replies.push(reply);
                        }
                        Err(e) => early.push((reply, e)),
                    }
                    drop(records);
                }
                let answers = spool.append_to(encoded);
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
                for (reply, e) in early {
                    let _ = reply.send(Err(e));
                }
                spool.stats.queued.fetch_sub(done, Ordering::SeqCst);
                appended.notify_one();
            }
            Op::Read { max, reply } => {
                let _ = reply.send(spool.read(max));
            }
            Op::Replay {
                connected_until_ms,
                reply,
            } => {
                let replayed = spool.replay_retained(connected_until_ms);
                spool.stats.queued.fetch_sub(1, Ordering::SeqCst);
                appended.notify_one();
                let _ = reply.send(replayed);
            }
            Op::Expire { now_ms, server } => {
                spool.note_connected(&server);
                if let Err(e) = spool.expire_retained(now_ms) {
                    tracing::warn!(error = %e, "cannot delete expired records of the retained log; will retry");
                }
            }
            Op::Commit { batch, n, reply } => {
                let _ = reply.send(spool.commit(&batch, n));
            }
            Op::Quarantine {
                batch,
                index,
                reason,
                reply,
            } => {
                let _ = reply.send(spool.quarantine(&batch, index, &reason));
            }
        }
    }
}

/// Where reading starts: the cursor file's position, or, when its segment no longer exists
/// (deleted once consumed, the cursor not yet moved past it), the start of the first segment
/// after it.
fn find_cursor(fs: &dyn Storage, dir: &Path, ids: &[u64]) -> Result<Position, SpoolError> {
    let first = |from: u64| Position {
        segment: ids.iter().copied().find(|&id| id >= from).unwrap_or(from),
        offset: 0,
    };
    Ok(match read_cursor(fs, dir)? {
        Some(cursor) if ids.contains(&cursor.segment) => cursor,
        Some(stale) => first(stale.segment + 1),
        None => first(0),
    })
}

/// Whether `cursor` (in the segment of `records`) stands where a record starts. It always
/// does, except for the cursor an earlier version could leave: one naming a segment that was
/// deleted and then created again under the same id, at an offset of the old segment.
fn on_boundary(cursor: Position, records: &[ScannedRecord]) -> bool {
    cursor.offset == 0 || records.iter().any(|r| r.end == cursor.offset)
}

fn read_cursor(fs: &dyn Storage, dir: &Path) -> Result<Option<Position>, SpoolError> {
    match fs.read(&dir.join(CURSOR)) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let mut parts = text.split_whitespace().map(str::parse::<u64>);
            match (parts.next(), parts.next()) {
                (Some(Ok(segment)), Some(Ok(offset))) => Ok(Some(Position { segment, offset })),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unreadable spool cursor {:?}", text),
                )
                .into()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// [`list_segments`] on the real disk.
fn segment_ids(dir: &Path) -> io::Result<Vec<u64>> {
    list_segments(&Disk, dir)
}

/// [`find_cursor`] on the real disk.
fn effective_cursor(dir: &Path, ids: &[u64]) -> Result<Position, SpoolError> {
    find_cursor(&Disk, dir, ids)
}

/// [`store_cursor`] on the real disk.
#[cfg(test)]
fn write_cursor(dir: &Path, position: Position) -> io::Result<()> {
    store_cursor(&Disk, dir, position)
}

fn store_cursor(fs: &dyn Storage, dir: &Path, position: Position) -> io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    let mut file = fs.create(&tmp)?;
    file.write_all(format!("{} {}\n", position.segment, position.offset).as_bytes())?;
    file.sync_all()?;
    fs.rename(&tmp, &dir.join(CURSOR))?;
    fs.sync_dir(dir)
}

struct ScannedRecord {
    end: u64,
    size: u64,
    at_ms: Option<u64>,
    /// A mail record: the bytes of its files.
    mail_bytes: Option<u64>,
}

struct Scan {
    file_len: u64,
    /// The end of the last intact record: what follows is a torn tail.
    valid_len: u64,
    records: Vec<ScannedRecord>,
    /// Unreadable stretches followed by intact records (damage, not a torn tail).
    gaps: Vec<(u64, u64)>,
}

/// Reads a segment's records. A record that cannot be read ends the readable part only when
/// no intact record (magic, length, CRC, decodable payload) follows it: that is the torn tail
/// of an interrupted write. Otherwise the bytes up to the next intact record are a gap, and
/// the records after it are read as usual.
fn scan_segment(path: &Path) -> io::Result<Scan> {
    scan_in(&Disk, path)
}

/// [`scan_segment`] through `fs`.
fn scan_in(fs: &dyn Storage, path: &Path) -> io::Result<Scan> {
    let data = fs.read(path)?;
    let mut offset = 0usize;
    let mut records = Vec::new();
    let mut gaps = Vec::new();
    loop {
        if let Some((len, at_ms)) = check_record(&data[offset..]) {
            let mail_bytes = (&data[offset..offset + 4] == MAGIC_MAIL)
                .then(|| decode_mail(&data[offset + RECORD_HEADER..offset + len]))
                .flatten()
                .map(|(_, mail)| mail.file_bytes);
            offset += len;
            records.push(ScannedRecord {
                end: offset as u64,
                size: len as u64,
                at_ms,
                mail_bytes,
            });
            continue;
        }
        let next = (offset + 1..data.len().saturating_sub(RECORD_HEADER - 1)).find(|&at| {
            let magic = &data[at..at + 4];
            (magic == MAGIC || magic == MAGIC_V1 || magic == MAGIC_MAIL)
                && check_record(&data[at..]).is_some()
        });
        match next {
            Some(next) => {
                gaps.push((offset as u64, next as u64));
                offset = next;
            }
            None => break,
        }
    }
    Ok(Scan {
        file_len: data.len() as u64,
        valid_len: offset as u64,
        records,
        gaps,
    })
}

/// Copies the unreadable bytes `start..end` of segment `id` to the quarantine, once (named
/// by their place, so a restart does not copy them again).
fn quarantine_unreadable(
    fs: &dyn Storage,
    dir: &Path,
    segment: &Path,
    id: u64,
    start: u64,
    end: u64,
) -> io::Result<()> {
    let qdir = dir.join(QUARANTINE);
    let name = format!("unreadable-{id:020}-{start:020}");
    let json_path = qdir.join(format!("{name}.json"));
    if fs.exists(&json_path) {
        return Ok(());
    }
    tracing::error!(
        segment = %segment.display(),
        start,
        end,
        "spool segment holds unreadable bytes between intact records; they are quarantined and the records after them kept"
    );
    create_dir_durably(fs, &qdir)?;
    let data = fs.read(segment)?;
    let bytes = data.get(start as usize..end as usize).unwrap_or_default();
    let entry = QuarantineEntry {
        name: name.clone(),
        subject: String::new(),
        msg_id: String::new(),
        reason: format!(
            "unreadable bytes in {} at offsets {start}..{end} (a damaged record: its message cannot be recovered)",
            segment.display()
        ),
        quarantined_at_ms: now_ms(),
        bytes: bytes.len() as u64,
    };
    let json = serde_json::to_vec_pretty(&entry).map_err(io::Error::other)?;
    write_synced(fs, &qdir.join(format!("{name}.rec")), bytes)?;
    write_synced(fs, &json_path, &json)?;
    fs.sync_dir(&qdir)
}

/// The length and time stamp of the complete, intact record at the start of `data`, if
/// there is one.
fn check_record(data: &[u8]) -> Option<(usize, Option<u64>)> {
    if data.len() < RECORD_HEADER {
        return None;
    }
    let magic: [u8; 4] = data[..4].try_into().ok()?;
    let len = u32::from_le_bytes(data[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(data[8..12].try_into().ok()?);
    let payload = data.get(RECORD_HEADER..RECORD_HEADER + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let (at, _) = decode_any(&magic, payload)?;
    Some((RECORD_HEADER + len, at))
}

/// Appends the record of one message to `out`, stamped `at_ms`.
pub fn encode_record<'a, V: AsRef<str>>(
    out: &mut Vec<u8>,
    subject: &str,
    headers: impl ExactSizeIterator<Item = (&'a str, V)>,
    payload: &[u8],
    at_ms: u64,
) -> Result<(), SpoolError> {
    let start = out.len();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&at_ms.to_le_bytes());
    put_str16(out, subject)?;
    out.extend_from_slice(
        &u16::try_from(headers.len())
            .map_err(|_| SpoolError::TooLong)?
            .to_le_bytes(),
    );
    for (name, value) in headers {
        put_str16(out, name)?;
        put_str16(out, value.as_ref())?;
    }
    let body_len = u32::try_from(payload.len()).map_err(|_| SpoolError::TooLong)?;
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(payload);
    let record = &out[start + RECORD_HEADER..];
    let len = u32::try_from(record.len()).map_err(|_| SpoolError::TooLong)?;
    let crc = crc32fast::hash(record);
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Appends the record of one spooled mail to `out`, stamped `at_ms`.
pub fn encode_mail(out: &mut Vec<u8>, mail: &MailRecord, at_ms: u64) -> Result<(), SpoolError> {
    let start = out.len();
    out.extend_from_slice(MAGIC_MAIL);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&at_ms.to_le_bytes());
    put_str16(out, &mail.dir)?;
    put_str16(out, &mail.batch_id)?;
    out.extend_from_slice(&mail.file_bytes.to_le_bytes());
    let record = &out[start + RECORD_HEADER..];
    let len = u32::try_from(record.len()).map_err(|_| SpoolError::TooLong)?;
    let crc = crc32fast::hash(record);
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Appends `record` (a whole record as stored) to `out` with its time stamp set to `at_ms`.
fn restamp(out: &mut Vec<u8>, record: &[u8], at_ms: u64) -> Result<(), SpoolError> {
    let magic: [u8; 4] = record
        .get(..4)
        .and_then(|m| m.try_into().ok())
        .ok_or(SpoolError::TooLong)?;
    match decode_any(&magic, record.get(RECORD_HEADER..).unwrap_or_default()) {
        Some((_, Record::Message(m))) => encode_message(out, &m, at_ms),
        Some((_, Record::Mail(mail))) => encode_mail(out, &mail, at_ms),
        None => Err(SpoolError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            "corrupt spool record",
        ))),
    }
}

/// Appends the record of `m` to `out`.
pub fn encode_message(out: &mut Vec<u8>, m: &NatsMessage, at_ms: u64) -> Result<(), SpoolError> {
    encode_record(
        out,
        &m.subject,
        m.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        &m.payload,
        at_ms,
    )
}

impl Records for Vec<NatsMessage> {
    fn encode(&self, out: &mut Vec<u8>, at_ms: u64) -> Result<u64, SpoolError> {
        for m in self {
            encode_message(out, m, at_ms)?;
        }
        Ok(self.len() as u64)
    }
}

fn put_str16(out: &mut Vec<u8>, s: &str) -> Result<(), SpoolError> {
    let len = u16::try_from(s.len()).map_err(|_| SpoolError::TooLong)?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Reads one record: the message and the record's bytes as stored.
///
/// `limit` is how many bytes the record can span (what is left of its segment): the header's
/// magic and length are checked against it before anything is allocated, so a position in the
/// middle of a record, or a damaged header, is an error, never a read of up to 4 GiB.
fn read_record(reader: &mut impl Read, limit: u64) -> Result<(Record, Vec<u8>), SpoolError> {
    let unreadable = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    let mut record = vec![0u8; RECORD_HEADER];
    reader.read_exact(&mut record)?;
    let magic: [u8; 4] = record[..4].try_into().expect("4 bytes");
    if ![MAGIC, MAGIC_V1, MAGIC_MAIL].contains(&&magic) {
        return Err(unreadable("not the start of a spool record").into());
    }
    let len = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes")) as usize;
    if (RECORD_HEADER + len) as u64 > limit {
        return Err(unreadable("spool record longer than its segment").into());
    }
    record.resize(RECORD_HEADER + len, 0);
    reader.read_exact(&mut record[RECORD_HEADER..])?;
    let intact = crc32fast::hash(&record[RECORD_HEADER..])
        == u32::from_le_bytes(record[8..12].try_into().expect("4 bytes"));
    let read = intact
        .then(|| decode_any(&magic, &record[RECORD_HEADER..]))
        .flatten()
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "corrupt spool record"))?;
    Ok((read, record))
}

/// The time stamp and content of a record's payload, by its magic.
fn decode_any(magic: &[u8; 4], payload: &[u8]) -> Option<(Option<u64>, Record)> {
    match magic {
        m if m == MAGIC => decode_payload(payload, true).map(|(at, m)| (at, Record::Message(m))),
        m if m == MAGIC_V1 => {
            decode_payload(payload, false).map(|(at, m)| (at, Record::Message(m)))
        }
        m if m == MAGIC_MAIL => decode_mail(payload).map(|(at, m)| (Some(at), Record::Mail(m))),
        _ => None,
    }
}

/// The first `n` bytes of `p`, which moves past them.
fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, rest) = (p.get(..n)?, p.get(n..)?);
    *p = rest;
    Some(head)
}

/// A string of a record: its length (u16 LE), then its UTF-8 bytes.
fn str16(p: &mut &[u8]) -> Option<String> {
    let len = u16::from_le_bytes(take(p, 2)?.try_into().ok()?) as usize;
    String::from_utf8(take(p, len)?.to_vec()).ok()
}

fn decode_mail(mut p: &[u8]) -> Option<(u64, MailRecord)> {
    let at = u64::from_le_bytes(take(&mut p, 8)?.try_into().ok()?);
    let dir = str16(&mut p)?;
    let batch_id = str16(&mut p)?;
    let file_bytes = u64::from_le_bytes(take(&mut p, 8)?.try_into().ok()?);
    p.is_empty().then_some((
        at,
        MailRecord {
            dir,
            batch_id,
            file_bytes,
        },
    ))
}

fn decode_payload(mut p: &[u8], versioned: bool) -> Option<(Option<u64>, NatsMessage)> {
    let at = if versioned {
        Some(u64::from_le_bytes(take(&mut p, 8)?.try_into().ok()?))
    } else {
        None
    };
    let subject = str16(&mut p)?;
    let count = u16::from_le_bytes(take(&mut p, 2)?.try_into().ok()?);
    let mut headers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        headers.push((str16(&mut p)?, str16(&mut p)?));
    }
    let body_len = u32::from_le_bytes(take(&mut p, 4)?.try_into().ok()?) as usize;
    let payload = Bytes::copy_from_slice(take(&mut p, body_len)?);
    p.is_empty().then_some((
        at,
        NatsMessage {
            subject,
            headers,
            payload,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(i: usize) -> NatsMessage {
        NatsMessage {
            subject: format!("cmc.deliveries.s{i}"),
            headers: vec![
                ("Nats-Msg-Id".into(), format!("id-{i}")),
                ("Cmc-Batch-Index".into(), i.to_string()),
            ],
            payload: Bytes::from(format!("{{\"n\":{i},\"text\":\"本番\"}}")),
        }
    }

    fn records(messages: &[NatsMessage]) -> (Vec<u8>, u64) {
        let mut buf = Vec::new();
        let n = messages.to_vec().encode(&mut buf, now_ms()).unwrap();
        (buf, n)
    }

    fn append(spool: &mut Spool, messages: &[NatsMessage]) -> Result<(), SpoolError> {
        let (buf, n) = records(messages);
        spool.append(buf, n)
    }

    /// A mail's record, its directory moved into `spool_dir` as the writer does: a work
    /// directory with `files`, then encoded.
    fn encoded_mail(spool_dir: &Path, batch_id: &str, files: &[(&str, &[u8])]) -> (Vec<u8>, u64) {
        encoded_mail_at(spool_dir, batch_id, files, now_ms())
    }

    /// [`encoded_mail`], stamped `at_ms`.
    fn encoded_mail_at(
        spool_dir: &Path,
        batch_id: &str,
        files: &[(&str, &[u8])],
        at_ms: u64,
    ) -> (Vec<u8>, u64) {
        let work = spool_dir.join(format!("work-{batch_id}"));
        fs::create_dir_all(&work).unwrap();
        for (name, data) in files {
            fs::write(work.join(name), data).unwrap();
        }
        let mail = MailAppend {
            work,
            spool_dir: spool_dir.to_owned(),
            mail_json: b"{}".to_vec(),
            batch_id: batch_id.into(),
            reserved: files.iter().map(|(_, d)| d.len() as u64).sum(),
        };
        let mut buf = Vec::new();
        let n = mail.encode(&mut buf, at_ms).unwrap();
        (buf, n)
    }

    /// A spool with its retained log on (60 s), in a directory of its own.
    /// A spool retaining for a hold of 60 s, its ages on a clock the test moves (starting at
    /// 1,000 ms).
    fn spool_on_a_clock(dir: &Path) -> (Spool, Arc<AtomicU64>) {
        let clock = Arc::new(AtomicU64::new(1_000));
        let mut spool = Spool::open(dir, 1 << 20).unwrap();
        spool.set_clock(Clock::manual(&clock));
        spool.retain(Duration::from_secs(60)).unwrap();
        (spool, clock)
    }

    /// The record of `m` for the retained log, stamped `at`.
    fn stamped(m: NatsMessage, at: u64) -> (Vec<u8>, u64, Log) {
        let mut buf = Vec::new();
        encode_message(&mut buf, &m, at).unwrap();
        (buf, 1, Log::Retained)
    }

    fn retain(spool: &mut Spool, messages: &[NatsMessage]) -> Result<(), SpoolError> {
        let (buf, n) = records(messages);
        spool
            .append_to(vec![(buf, n, Log::Retained)])
            .pop()
            .unwrap()
    }

    fn ids(batch: &ReadBatch) -> Vec<String> {
        batch
            .messages
            .iter()
            .map(|m| m.header("Nats-Msg-Id").unwrap().to_owned())
            .collect()
    }

    /// Records published directly wait in the retained log, not in the spool; a replay moves
    /// them, in order, behind what the spool held, and empties the log. They survive a
    /// reopen, and the spool counts their bytes against `spool.max_bytes`.
    #[test]
    fn a_replay_moves_the_retained_records_behind_the_spool_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let all: Vec<NatsMessage> = (0..6).map(message).collect();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            spool.retain(Duration::from_secs(60)).unwrap();
            retain(&mut spool, &all[..2]).unwrap();
            append(&mut spool, &all[2..3]).unwrap();
            retain(&mut spool, &all[3..]).unwrap();
            assert_eq!(
                spool.stats().messages(),
                1,
                "retained records wait for nothing"
            );
            assert!(spool.stats().retained_bytes() > 0);
            assert_eq!(spool.retained_count().unwrap().0, 5);
        }
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.retain(Duration::from_secs(60)).unwrap();
        assert_eq!(
            spool.retained_count().unwrap().0,
            5,
            "kept across a restart"
        );

        assert_eq!(spool.replay_retained(0).unwrap(), 5);

        assert_eq!(spool.stats().messages(), 6);
        assert_eq!(spool.stats().retained_bytes(), 0);
        assert_eq!(spool.retained_count().unwrap(), (0, 0));
        let batch = spool.read(100).unwrap();
        assert_eq!(
            ids(&batch),
            ["id-2", "id-0", "id-1", "id-3", "id-4", "id-5"],
            "the spool's own first, then the retained log in its order"
        );
        // The drainer's commit keeps what NATS acknowledged in the log again.
        spool.commit(&batch, 6).unwrap();
        assert_eq!(spool.retained_count().unwrap().0, 6);
        assert!(spool.stats().is_empty());
    }

    /// A replay moves only what NATS acknowledged in the retention before it was last seen
    /// connected: older records (synced by then) are dropped, not published again.
    #[test]
    fn a_replay_moves_only_the_segments_of_the_hold_before_nats_last_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, clock) = spool_on_a_clock(dir.path());
        // A segment is started every eighth of the hold (7.5 s): three segments.
        retain(&mut spool, &[message(0)]).unwrap();
        clock.store(40_000, Ordering::SeqCst);
        retain(&mut spool, &[message(1)]).unwrap();
        clock.store(100_000, Ordering::SeqCst);
        retain(&mut spool, &[message(2)]).unwrap();

        // Last answered at 100 s: the hold (and a margin of 1 s) before it starts at 39 s.
        assert_eq!(spool.replay_retained(100_000).unwrap(), 1 + 1);

        assert_eq!(ids(&spool.read(10).unwrap()), ["id-1", "id-2"]);
        assert_eq!(spool.retained_count().unwrap(), (0, 0));
        assert_eq!(spool.stats().retained_bytes(), 0);
    }

    /// What an earlier run retained counts as written at start-up, whatever its records' time
    /// stamps say (the wall clock, which may have stepped): it is kept a whole hold after the
    /// start, and then expires.
    #[test]
    fn records_of_an_earlier_run_count_as_written_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut spool, _) = spool_on_a_clock(dir.path());
            // Stamped at the epoch and an hour ahead of the wall clock.
            spool.append_to(vec![
                stamped(message(0), 0),
                stamped(message(1), now_ms() + 3_600_000),
            ]);
        }
        let clock = Arc::new(AtomicU64::new(500_000));
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.set_clock(Clock::manual(&clock));
        spool.retain(Duration::from_secs(60)).unwrap();

        spool.expire_retained(500_000 + 60_000).unwrap();
        assert_eq!(
            spool.retained_count().unwrap().0,
            2,
            "kept a hold after the start"
        );
        spool.expire_retained(500_000 + 61_001).unwrap();
        assert_eq!(spool.retained_count().unwrap().0, 0, "then expired");
    }

    /// A replay moves the log segment by segment, each deleted once its copy is durable, so
    /// it needs room for one segment, not for a second copy of the log: a copy that fails on
    /// a later segment keeps the earlier ones moved, and the retry moves the rest, nothing
    /// twice.
    #[test]
    fn a_replay_moves_the_log_segment_by_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        // A segment every 10 ms.
        let clock = Arc::new(AtomicU64::new(1_000));
        spool.set_clock(Clock::manual(&clock));
        spool.retain(Duration::from_millis(80)).unwrap();
        for i in 1..=3 {
            retain(&mut spool, &[message(i)]).unwrap();
            clock.fetch_add(20, Ordering::SeqCst);
        }
        assert_eq!(
            list_segments(&Disk, &dir.path().join("retained"))
                .unwrap()
                .len(),
            3
        );
        spool.inject(Fault::LaterReplayChunk, 1);

        assert!(spool.replay_retained(0).is_err());

        assert_eq!(
            ids(&spool.read(10).unwrap()),
            ["id-1"],
            "the first segment moved"
        );
        assert_eq!(
            spool.retained_count().unwrap().0,
            2,
            "the others still retained"
        );
        assert_eq!(spool.replay_retained(0).unwrap(), 2);
        assert_eq!(ids(&spool.read(10).unwrap()), ["id-1", "id-2", "id-3"]);
        assert_eq!(spool.retained_count().unwrap(), (0, 0));
        assert_eq!(spool.stats().retained_bytes(), 0);
    }

    /// A record the drainer publishes is kept from its own PubAck on, a duplicate too: NATS
    /// may hold it unsynced (stored late from its socket buffer, or stored again by a replay),
    /// so a later replay still moves it, however old its first acknowledgement.
    #[test]
    fn a_drained_duplicate_is_kept_from_its_own_acknowledgement() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, clock) = spool_on_a_clock(dir.path());
        retain(&mut spool, &[message(0), message(1)]).unwrap();
        assert_eq!(spool.replay_retained(1_000).unwrap(), 2);
        // Drained long after it was first acknowledged (NATS answers both as duplicates).
        clock.store(300_000, Ordering::SeqCst);
        let batch = spool.read(10).unwrap();

        spool.commit(&batch, 2).unwrap();

        assert_eq!(spool.replay_retained(300_000).unwrap(), 2);
        assert_eq!(ids(&spool.read(10).unwrap()), ["id-0", "id-1"]);
    }

    /// The heartbeat names the last server NATS answered from, across a restart; it is
    /// written (durably, by a rename) only when that server changes.
    #[test]
    fn the_heartbeat_names_the_last_server_and_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut spool, _) = spool_on_a_clock(dir.path());
            spool.note_connected("first");
            spool.note_connected("second");
        }
        let (spool, _) = spool_on_a_clock(dir.path());
        assert_eq!(spool.last_connected.unwrap().server, "second");
        let retained = dir.path().join("retained");
        assert!(!retained.join("connected.next").exists());
        let text = fs::read_to_string(retained.join("connected")).unwrap();
        assert!(text.ends_with(" second\n"), "{text:?}");
    }

    /// A mail record a replay drops (older than the window) takes its directory with it (its
    /// bytes leave `spool.max_bytes`' count, as an expiry's do).
    #[test]
    fn a_mail_a_replay_drops_takes_its_directory_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, clock) = spool_on_a_clock(dir.path());
        let (mail, n) = encoded_mail(dir.path(), "req-old", &[("a.bin", b"0123456789")]);
        spool.append_to(vec![(mail, n, Log::Retained)]);
        let mails: Vec<_> = fs::read_dir(dir.path().join("mail")).unwrap().collect();
        assert_eq!(mails.len(), 1);
        clock.store(101_000, Ordering::SeqCst);

        assert_eq!(spool.replay_retained(101_000).unwrap(), 0);

        assert_eq!(fs::read_dir(dir.path().join("mail")).unwrap().count(), 0);
    }

    /// A replay whose copy fails halfway (a full disk) leaves nothing of itself in the spool,
    /// and the retained log whole: a retry copies it once, not once more per attempt.
    #[test]
    fn a_replay_that_fails_halfway_is_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        spool.retain(Duration::from_secs(60)).unwrap();
        let big = |i: usize| NatsMessage {
            payload: Bytes::from(vec![b'x'; 600 * 1024]),
            ..message(i)
        };
        retain(&mut spool, &[big(1), big(2), big(3)]).unwrap();
        append(&mut spool, &[message(0)]).unwrap();
        spool.inject(Fault::LaterReplayChunk, 1);

        assert!(spool.replay_retained(0).is_err());

        assert_eq!(spool.stats().messages(), 1);
        assert_eq!(ids(&spool.read(10).unwrap()), ["id-0"]);
        assert_eq!(spool.retained_count().unwrap().0, 3);
        assert_eq!(spool.replay_retained(0).unwrap(), 3);
        assert_eq!(
            ids(&spool.read(10).unwrap()),
            ["id-0", "id-1", "id-2", "id-3"]
        );
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(
            spool.stats().messages(),
            4,
            "nothing of the failed copy is on disk"
        );
        assert_eq!(spool.read(10).unwrap().messages.len(), 4);
    }

    /// The retained log counts in `spool.max_bytes`: a log that fills it refuses more, and so
    /// does the spool.
    #[test]
    fn the_retained_log_counts_in_max_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (one, _) = records(&[message(1)]);
        let mut spool = Spool::open(dir.path(), one.len() as u64 * 2).unwrap();
        spool.retain(Duration::from_secs(60)).unwrap();
        retain(&mut spool, &[message(1)]).unwrap();
        retain(&mut spool, &[message(2)]).unwrap();
        assert!(matches!(
            retain(&mut spool, &[message(3)]),
            Err(SpoolError::Full(_))
        ));
        assert!(matches!(
            append(&mut spool, &[message(3)]),
            Err(SpoolError::Full(_))
        ));
    }

    /// Expiry deletes whole segments whose newest record is older than the retention, with
    /// the directories of their mails, and nothing younger.
    #[test]
    fn expiry_deletes_old_segments_and_their_mails_only() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(1_000));
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        spool.set_clock(Clock::manual(&clock));
        spool.retain(Duration::from_millis(400)).unwrap();
        let (buf, n) = encoded_mail(dir.path(), "req-1", &[("a.bin", b"attachment")]);
        assert!(spool.stats().reserve_inbound(10, 1 << 30));
        spool.append_to(vec![(buf, n, Log::Retained)]);
        retain(&mut spool, &[message(1)]).unwrap();
        let mail_dir = dir.path().join("mail/req-1");
        assert!(mail_dir.join("a.bin").is_file());

        spool.expire_retained(1_000 + 1_400).unwrap();
        assert_eq!(spool.retained_count().unwrap().0, 2, "nothing is old yet");

        // A later segment (after an eighth of the hold) stays when the first expires (the
        // hold and its margin of 1 s after its newest record).
        clock.store(2_500, Ordering::SeqCst);
        retain(&mut spool, &[message(2)]).unwrap();
        spool.expire_retained(2_500).unwrap();

        assert_eq!(spool.retained_count().unwrap().0, 1);
        assert!(
            !mail_dir.exists(),
            "an expired mail's directory goes with it"
        );
        assert_eq!(spool.stats().inbound_bytes(), 0);
        let (_, bytes) = spool.retained_count().unwrap();
        assert_eq!(spool.stats().retained_bytes(), bytes);
    }

    /// A restart keeps a retained mail's directory (the start-up clean-up removes only
    /// directories no record names).
    #[test]
    fn a_retained_mail_keeps_its_directory_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
            spool.retain(Duration::from_secs(60)).unwrap();
            let (buf, n) = encoded_mail(dir.path(), "req-7", &[]);
            spool.append_to(vec![(buf, n, Log::Retained)]);
        }
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        spool.retain(Duration::from_secs(60)).unwrap();
        assert_eq!(spool.adopt_mails().unwrap(), 0);
        assert!(dir.path().join("mail/req-7/mail.json").is_file());
        spool.replay_retained(0).unwrap();
        let batch = spool.read(10).unwrap();
        assert_eq!(batch.mail.unwrap().dir, "mail/req-7");
    }

    /// A quarantined mail is requeued with its directory where the quarantine keeps it: read
    /// back naming it, its files there, and its bytes counted again, in this run as after a
    /// restart.
    #[test]
    fn a_requeued_mail_names_its_directory_in_the_quarantine_and_counts_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let (buf, n) = encoded_mail(dir.path(), "req-9", &[("a.bin", b"0123456789")]);
        spool.append(buf, n).unwrap();
        let batch = spool.read(10).unwrap();
        spool.quarantine(&batch, 0, "refused").unwrap();
        spool.stats().release_inbound(10);
        let name = quarantine_entries(dir.path()).unwrap()[0].name.clone();

        let requeued = spool.requeue(&[]).unwrap();

        assert_eq!(requeued.requeued, std::slice::from_ref(&name));
        assert_eq!(spool.stats().inbound_bytes(), 10);
        let again = spool.read(10).unwrap().mail.unwrap();
        assert_eq!(again.dir, format!("{QUARANTINE}/{name}.mail"));
        assert!(dir.path().join(&again.dir).join("a.bin").is_file());
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(spool.stats().inbound_bytes(), 10);
        assert_eq!(spool.stats().messages(), 1);
    }

    /// A mail directory moved into `mail/` whose record was never appended (a crash between
    /// the two, or a failed append) is removed at start-up: its request was never answered
    /// `200`. A directory a record names stays.
    #[test]
    fn a_mail_directory_without_its_record_is_removed_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let orphan = dir.path().join("mail/req-orphan");
        fs::create_dir_all(&orphan).unwrap();
        fs::write(orphan.join("mail.json"), b"{}").unwrap();
        let (buf, n) = encoded_mail(dir.path(), "req-kept", &[]);
        spool.append(buf, n).unwrap();
        drop(spool);

        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(spool.adopt_mails().unwrap(), 0);

        assert!(!orphan.exists(), "the orphan directory is removed");
        assert!(dir.path().join("mail/req-kept/mail.json").is_file());
        assert_eq!(spool.read(10).unwrap().mail.unwrap().dir, "mail/req-kept");
    }

    /// A mail record between two runs of messages: each read is one kind of job, in the
    /// order appended, and the record survives a reopen (the segment scan knows its kind).
    #[test]
    fn a_mail_record_is_read_alone_and_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let mail = MailRecord {
            dir: "mail/00000000000000000001".into(),
            batch_id: "b-1".into(),
            file_bytes: 1234,
        };
        {
            let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
            append(&mut spool, &[message(0), message(1)]).unwrap();
            let mut buf = Vec::new();
            encode_mail(&mut buf, &mail, now_ms()).unwrap();
            spool.append(buf, 1).unwrap();
            append(&mut spool, &[message(2)]).unwrap();
        }
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(spool.stats().messages(), 4);

        let first = spool.read(10).unwrap();
        assert_eq!(first.messages, [message(0), message(1)]);
        assert_eq!(first.mail, None, "a read stops before a mail");
        spool.commit(&first, 2).unwrap();
        let second = spool.read(10).unwrap();
        assert!(second.messages.is_empty());
        assert_eq!(second.mail.as_ref(), Some(&mail));
        spool.commit(&second, 1).unwrap();
        let third = spool.read(10).unwrap();
        assert_eq!(third.messages, [message(2)]);
        assert_eq!(third.mail, None);
    }

    /// The inbound queue an earlier version left (`inbound/<n>/mail.json`, with its files
    /// and `batch_id`) becomes mail records of the one spool, in its order, behind the
    /// event messages already spooled; adopting again adds nothing.
    #[test]
    fn an_inbound_queue_of_the_previous_layout_is_adopted_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for (n, batch) in [(7u64, "old-7"), (12, "old-12")] {
            let mail = dir.path().join(format!("inbound/{n:020}"));
            fs::create_dir_all(&mail).unwrap();
            fs::write(mail.join(MAIL_FILE), b"{}").unwrap();
            fs::write(mail.join(BATCH_FILE), batch).unwrap();
            fs::write(mail.join("part-1"), vec![0u8; 100]).unwrap();
        }
        fs::create_dir_all(dir.path().join("inbound/tmp/abandoned")).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        append(&mut spool, &[message(0)]).unwrap();

        assert_eq!(spool.adopt_mails().unwrap(), 2);
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(spool.adopt_mails().unwrap(), 0, "adopted twice");

        let events = spool.read(10).unwrap();
        assert_eq!(events.messages, [message(0)]);
        spool.commit(&events, 1).unwrap();
        let batch = spool.read(10).unwrap();
        spool.commit(&batch, 1).unwrap();
        let first = batch.mail.unwrap();
        let second = spool.read(10).unwrap().mail.unwrap();
        assert_eq!(
            (first.batch_id.as_str(), second.batch_id.as_str()),
            ("old-7", "old-12")
        );
        assert!(dir.path().join(&first.dir).join("part-1").is_file());
        assert!(first.file_bytes >= 100, "{first:?}");
        assert!(!dir
            .path()
            .join("inbound")
            .join(format!("{:020}", 7))
            .exists());
    }

    fn drain_all(spool: &mut Spool) -> Vec<NatsMessage> {
        let mut out = Vec::new();
        loop {
            let batch = spool.read(3).unwrap();
            if batch.messages.is_empty() {
                return out;
            }
            spool.commit(&batch, batch.messages.len()).unwrap();
            out.extend(batch.messages);
        }
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension() == Some("seg".as_ref()))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn messages_come_back_in_order_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            append(&mut spool, &[message(0), message(1)]).unwrap();
            append(&mut spool, &[message(2)]).unwrap();
            assert_eq!(spool.stats().messages(), 3);
            // Publish one, then "crash".
            let batch = spool.read(1).unwrap();
            assert_eq!(batch.messages, [message(0)]);
            spool.commit(&batch, 1).unwrap();
        }
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.stats().messages(), 2);
        append(&mut spool, &[message(3)]).unwrap();
        assert_eq!(drain_all(&mut spool), [message(1), message(2), message(3)]);
        assert!(spool.stats().is_empty());
        assert_eq!(spool.stats().bytes(), 0);
        // Consumed segments are deleted.
        assert!(segment_files(dir.path()).is_empty());
    }

    #[test]
    fn a_torn_last_record_is_dropped_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            append(&mut spool, &[message(0), message(1)]).unwrap();
        }
        let seg = segment_files(dir.path()).remove(0);
        let len = fs::metadata(&seg).unwrap().len();
        // Tear the second record: keep its header and half its payload.
        let file = OpenOptions::new().write(true).open(&seg).unwrap();
        file.set_len(len - 10).unwrap();

        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.stats().messages(), 1);
        assert_eq!(drain_all(&mut spool), [message(0)]);
    }

    /// The state a crash between deleting the last consumed segment and moving the cursor past
    /// it leaves: a cursor naming a segment that no longer exists, at an offset inside it.
    #[test]
    fn a_crash_between_deleting_the_last_segment_and_moving_the_cursor_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            append(&mut spool, &[message(0), message(1), message(2)]).unwrap();
            spool.inject(Fault::AfterSegmentRemoved, 1);
            let batch = spool.read(10).unwrap();
            assert!(spool.commit(&batch, 3).is_err());
            assert!(segment_files(dir.path()).is_empty());
        } // The process dies here.
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.stats().messages(), 0);
        // Fewer bytes than the stale offset, then more: each must be read from its start.
        append(&mut spool, &[message(3)]).unwrap();
        assert_eq!(drain_all(&mut spool), [message(3)]);
        append(&mut spool, &(4..10).map(message).collect::<Vec<_>>()).unwrap();
        assert_eq!(
            drain_all(&mut spool),
            (4..10).map(message).collect::<Vec<_>>()
        );
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        append(&mut spool, &[message(10)]).unwrap();
        assert_eq!(drain_all(&mut spool), [message(10)]);
    }

    /// What an earlier version could leave after that crash: the segment created again under
    /// the cursor's id, the cursor at an offset of the old one (past its end, or mid-record).
    #[test]
    fn a_cursor_off_a_record_boundary_reads_its_segment_from_the_start() {
        for stale in [9_999u64, 5] {
            let dir = tempfile::tempdir().unwrap();
            {
                let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
                append(&mut spool, &[message(0), message(1)]).unwrap();
            }
            let id = segment_ids(dir.path()).unwrap()[0];
            write_cursor(
                dir.path(),
                Position {
                    segment: id,
                    offset: stale,
                },
            )
            .unwrap();
            assert_eq!(status(dir.path()).unwrap().messages, 2, "offset {stale}");
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(spool.stats().messages(), 2, "offset {stale}");
            assert_eq!(drain_all(&mut spool), [message(0), message(1)]);
        }
    }

    /// `spool status` beside a running drainer: it lists the segments and reads the cursor,
    /// then the drainer finishes the first segment and deletes it before status reads it.
    /// Status must still count what the later segments hold: failing instead let a caller
    /// that took "cannot read" for "nothing left" see a draining spool as empty.
    #[test]
    fn status_counts_what_is_left_when_a_listed_segment_is_consumed_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            append(&mut spool, &[message(0), message(1)]).unwrap();
        }
        // A start-up begins a new segment: the next records go to a second one.
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        append(&mut spool, &[message(2), message(3), message(4)]).unwrap();
        // Status's first two reads: the segment list, then the cursor.
        let ids = segment_ids(dir.path()).unwrap();
        assert_eq!(ids.len(), 2);
        let cursor = effective_cursor(dir.path(), &ids).unwrap();
        // The drainer publishes the first segment and deletes it.
        let batch = spool.read(2).unwrap();
        spool.commit(&batch, 2).unwrap();
        assert_eq!(segment_ids(dir.path()).unwrap(), ids[1..]);
        // Status goes on with what it read.
        let mut status = FullStatus {
            events: SpoolStatus {
                dir: dir.path().to_owned(),
                in_use: true,
                messages: 0,
                bytes: 0,
                oldest_age_seconds: None,
                quarantined: Vec::new(),
            },
            mails: MailStatus::default(),
            retained: RetainedStatus::default(),
        };
        count_waiting(dir.path(), &ids, cursor, &mut status).unwrap();
        assert_eq!(status.events.messages, 3);
        assert_eq!(status.events.bytes, spool.stats().bytes());
        assert!(status.events.oldest_age_seconds.is_some());
    }

    #[test]
    fn a_record_header_is_checked_before_its_length_is_trusted() {
        // Not a record (wrong magic) claiming 4 GiB: refused as unreadable, nothing allocated
        // or read past the header.
        let mut bogus = b"XXXX".to_vec();
        bogus.extend_from_slice(&u32::MAX.to_le_bytes());
        bogus.extend_from_slice(&[0; 4]);
        bogus.extend_from_slice(&[7; 64]);
        let err = match read_record(&mut &bogus[..], bogus.len() as u64) {
            Err(SpoolError::Io(e)) => e,
            other => panic!("expected an I/O error, got {other:?}"),
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // A record whose length runs past the end of its segment is refused the same way.
        let (mut data, _) = records(&[message(0)]);
        data[4..8].copy_from_slice(&(1u32 << 20).to_le_bytes());
        let err = match read_record(&mut &data[..], data.len() as u64) {
            Err(SpoolError::Io(e)) => e,
            other => panic!("expected an I/O error, got {other:?}"),
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    /// A write that fails halfway (ENOSPC) with a truncation that fails too: the complete
    /// records of the refused write must never be published, even after a restart.
    #[test]
    fn records_of_a_refused_write_never_come_back_when_cutting_them_off_failed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            append(&mut spool, &[message(0)]).unwrap();
            spool.inject(Fault::PartialWrite, 1);
            spool.inject(Fault::Truncate, 1);
            // Four records, half of them written whole: answered 503.
            assert!(append(&mut spool, &(1..5).map(message).collect::<Vec<_>>()).is_err());
            append(&mut spool, &[message(5)]).unwrap();
            assert_eq!(spool.stats().messages(), 2);
        }
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(drain_all(&mut spool), [message(0), message(5)]);
    }

    /// Appends refused one after another (a full disk) leave no empty segment files behind,
    /// and the spool goes on once the disk has room.
    #[test]
    fn failed_appends_leave_no_empty_segments_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        append(&mut spool, &[message(0)]).unwrap();
        spool.inject(Fault::PartialWrite, 20);
        for i in 1..=20 {
            assert!(append(&mut spool, &[message(i)]).is_err());
        }
        let segments = segment_ids(dir.path()).unwrap();
        assert!(segments.len() <= 2, "{} segment files", segments.len());
        append(&mut spool, &[message(21)]).unwrap();
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(drain_all(&mut spool), [message(0), message(21)]);
    }

    /// A full disk while the cursor is written: the cursor is written once there is room, and
    /// the quarantine leaves nothing half-written behind.
    #[test]
    fn a_quarantine_that_fails_on_a_full_disk_leaves_no_partial_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        append(&mut spool, &(0..3).map(message).collect::<Vec<_>>()).unwrap();
        let batch = spool.read(3).unwrap();
        spool.inject(Fault::QuarantineDescription, 1);
        assert!(spool.quarantine(&batch, 0, "refused").is_err());
        assert_eq!(spool.stats().quarantined(), 0);
        std::thread::sleep(Duration::from_millis(5));
        spool.quarantine(&batch, 0, "refused").unwrap();
        let files: Vec<_> = fs::read_dir(dir.path().join(QUARANTINE))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!(status(dir.path()).unwrap().quarantined.len(), 1);
        assert_eq!(drain_all(&mut spool), [message(1), message(2)]);
    }

    /// Damage in the middle of a segment (not a torn tail): the records after it were
    /// answered `200` and are still published; the unreadable bytes go to the quarantine.
    #[test]
    fn a_corrupt_record_mid_segment_is_quarantined_and_the_records_after_it_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            append(&mut spool, &(0..4).map(message).collect::<Vec<_>>()).unwrap();
        }
        let seg = segment_files(dir.path()).remove(0);
        let mut data = fs::read(&seg).unwrap();
        let (first_len, _) = check_record(&data).unwrap();
        data[first_len + RECORD_HEADER + 12] ^= 0xff; // flip a byte in the second payload
        fs::write(&seg, &data).unwrap();

        let before = status(dir.path()).unwrap();
        assert_eq!(before.messages, 3, "status counts what will be published");
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.stats().messages(), 3);
        assert_eq!(spool.stats().quarantined(), 1);
        assert_eq!(drain_all(&mut spool), [message(0), message(2), message(3)]);
        let s = status(dir.path()).unwrap();
        assert_eq!(s.quarantined.len(), 1);
        assert!(
            s.quarantined[0].reason.contains("unreadable"),
            "{:?}",
            s.quarantined[0]
        );
        drop(spool);
        // Quarantined once, not again at every start.
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.stats().quarantined(), 1);
    }

    #[test]
    fn records_of_the_earlier_format_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        // A v1 record: "CMCS", no time stamp.
        let (v2, _) = records(&[message(7)]);
        let mut payload = v2[RECORD_HEADER + 8..].to_vec();
        let mut v1 = MAGIC_V1.to_vec();
        v1.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v1.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        v1.append(&mut payload);
        fs::write(segment_path(dir.path(), 1), &v1).unwrap();
        let before = status(dir.path()).unwrap();
        assert_eq!(before.messages, 1);
        assert_eq!(before.oldest_age_seconds, None);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(drain_all(&mut spool), [message(7)]);
    }

    #[test]
    fn a_full_spool_refuses_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 250).unwrap();
        append(&mut spool, &[message(0)]).unwrap();
        let before = spool.stats().messages();
        assert!(matches!(
            append(&mut spool, &[message(1), message(2), message(3)]),
            Err(SpoolError::Full(250))
        ));
        assert_eq!(spool.stats().messages(), before);
    }

    #[test]
    fn a_group_is_one_write_and_a_batch_that_does_not_fit_is_refused_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (one, _) = records(&[message(0)]);
        let mut spool = Spool::open(dir.path(), 3 * one.len() as u64).unwrap();
        let answers = spool.append_group(vec![
            records(&[message(0)]),
            records(&[message(1), message(2), message(3)]),
            records(&[message(4)]),
        ]);
        assert!(answers[0].is_ok());
        assert!(matches!(answers[1], Err(SpoolError::Full(_))));
        assert!(answers[2].is_ok());
        assert_eq!(drain_all(&mut spool), [message(0), message(4)]);
    }

    #[test]
    fn partial_commits_keep_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        append(&mut spool, &(0..5).map(message).collect::<Vec<_>>()).unwrap();
        let batch = spool.read(5).unwrap();
        spool.commit(&batch, 2).unwrap();
        assert_eq!(spool.stats().messages(), 3);
        assert_eq!(drain_all(&mut spool), [message(2), message(3), message(4)]);
    }

    #[test]
    fn a_quarantined_message_leaves_the_spool_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            append(&mut spool, &(0..3).map(message).collect::<Vec<_>>()).unwrap();
            let batch = spool.read(3).unwrap();
            spool.commit(&batch, 1).unwrap();
            spool.quarantine(&batch, 1, "too large").unwrap();
            assert_eq!(spool.stats().messages(), 1);
            assert_eq!(spool.stats().quarantined(), 1);
            let s = status(dir.path()).unwrap();
            assert!(s.in_use);
            assert_eq!(s.messages, 1);
            assert!(s.oldest_age_seconds.is_some());
            assert_eq!(s.quarantined.len(), 1);
            assert_eq!(s.quarantined[0].subject, "cmc.deliveries.s1");
            assert_eq!(s.quarantined[0].msg_id, "id-1");
            assert_eq!(s.quarantined[0].reason, "too large");
        }
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.stats().quarantined(), 1);
        assert_eq!(drain_all(&mut spool), [message(2)]);
        drop(spool);
        assert!(!status(dir.path()).unwrap().in_use);
        // The quarantined record is kept intact.
        let rec = fs::read_dir(dir.path().join(QUARANTINE))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension() == Some("rec".as_ref()))
            .unwrap();
        let rec = fs::read(rec).unwrap();
        let (message_back, _) = read_record(&mut &rec[..], rec.len() as u64).unwrap();
        assert_eq!(message_back, Record::Message(message(1)));
    }

    #[test]
    fn a_requeued_message_goes_back_to_the_end_of_the_spool_and_leaves_the_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        append(&mut spool, &(0..3).map(message).collect::<Vec<_>>()).unwrap();
        let batch = spool.read(3).unwrap();
        spool.commit(&batch, 1).unwrap();
        spool.quarantine(&batch, 1, "refused").unwrap();
        let name = status(dir.path()).unwrap().quarantined[0].name.clone();
        assert!(matches!(
            spool.requeue(&["nope".into()]),
            Err(SpoolError::NotQuarantined(_))
        ));
        let done = spool.requeue(std::slice::from_ref(&name)).unwrap();
        assert_eq!(done.requeued, [name]);
        assert_eq!(spool.stats().quarantined(), 0);
        assert_eq!(spool.stats().quarantined_bytes(), 0);
        assert_eq!(spool.stats().messages(), 2);
        assert_eq!(drain_all(&mut spool), [message(2), message(1)]);
        assert!(status(dir.path()).unwrap().quarantined.is_empty());
        assert_eq!(spool.requeue(&[]).unwrap(), Requeued::default());
    }

    #[test]
    fn the_quarantine_counts_in_max_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (one, _) = records(&[message(0)]);
        let mut spool = Spool::open(dir.path(), 2 * one.len() as u64).unwrap();
        append(&mut spool, &[message(0)]).unwrap();
        let batch = spool.read(1).unwrap();
        spool.quarantine(&batch, 0, "refused").unwrap();
        assert_eq!(spool.stats().messages(), 0);
        append(&mut spool, &[message(1)]).unwrap();
        // One record waits, one is quarantined: the directory holds max_bytes.
        assert!(matches!(
            append(&mut spool, &[message(2)]),
            Err(SpoolError::Full(_))
        ));
        drop(spool);
        // Counted again after a restart.
        let mut spool = Spool::open(dir.path(), 2 * one.len() as u64).unwrap();
        assert!(matches!(
            append(&mut spool, &[message(2)]),
            Err(SpoolError::Full(_))
        ));
        // And by the inbound spool of the same directory.
        assert!(!spool.stats().reserve_inbound(1, 2 * one.len() as u64));
    }

    #[test]
    fn a_second_opener_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let err = Spool::open(dir.path(), 1 << 20).unwrap_err();
        assert!(matches!(err, SpoolError::Locked(_)), "{err}");
        assert!(err.to_string().contains("in use by another process"));
        drop(spool);
        Spool::open(dir.path(), 1 << 20).unwrap();
    }

    #[tokio::test]
    async fn concurrent_appends_share_fsyncs_through_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let spool = SpoolHandle::start(Spool::open(dir.path(), 1 << 30).unwrap()).unwrap();
        let pending: Vec<_> = (0..200)
            .map(|i| spool.begin_append(Box::new(vec![message(i)])))
            .collect();
        // Counted as non-empty from the moment they are handed over.
        assert!(!spool.stats().is_empty());
        for rx in pending {
            rx.await.unwrap().unwrap();
        }
        assert_eq!(spool.stats().messages(), 200);
        let batch = spool.read(1000).await.unwrap();
        let ids: Vec<String> = batch
            .messages
            .iter()
            .map(|m| m.header("Nats-Msg-Id").unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (0..200).map(|i| format!("id-{i}")).collect();
        assert_eq!(
            ids, expected,
            "appends are written in the order handed over"
        );
        spool.commit(Arc::new(batch), 200).await.unwrap();
        assert!(spool.stats().is_empty());
    }
}
