//! The retained log (`<spool.dir>/retained/`): records NATS has acknowledged but may not
//! have made durable yet.
//!
//! nats-server acknowledges a JetStream publish before it syncs its store (every
//! `sync_interval`, 2 minutes by default), so a power cut of its host loses what it
//! acknowledged since its last sync. The service therefore keeps every record it had
//! acknowledged, fsynced, for `spool.retain` after the acknowledgement: batches published
//! directly are written here while they are published (one group commit with the spool's
//! appends), and records the drainer published are copied here before its cursor moves past
//! them. When NATS may have lost what it acknowledged, [`super::Spool::replay_retained`]
//! moves the retained records into the spool, which publishes them again; `Nats-Msg-Id`
//! de-duplication drops what NATS still had.
//!
//! # Time
//!
//! Ages are measured on the process's monotonic clock ([`super::mono_ms`]), never on the
//! wall clock: a step of the wall clock (an NTP correction, a VM resumed) neither expires
//! records early nor keeps them for good. A segment is kept `hold` after its newest record
//! was written, where `hold` is `spool.retain` plus the longest a PubAck can come after the
//! write (`nats.publish_timeout`), so every record stays `retain` after its own PubAck.
//! Segments found at start-up count as written at start-up: how long they were kept before
//! is not known on this clock, so they are kept a whole `hold` more.
//!
//! Segments (`<20-digit id>.seg`, the spool's record format) are started every eighth of the
//! hold, and deleted whole once their newest record is older than the hold, and only after
//! the caller saw the stream answer (the caller decides when to expire): records
//! acknowledged just before an outage stay until they have been published again. Mail
//! records keep their directory under `<spool.dir>/mail/` until their segment is deleted.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::storage::{Storage, StorageFile};
use super::{
    create_dir_durably, list_segments, read_record, scan_in, segment_path, Record, SEGMENT_MAX,
};

/// The directory of the retained log, under the spool directory.
pub(super) const RETAINED: &str = "retained";
/// The heartbeat file in it: `<ms since the Unix epoch> <server id>`, the server process
/// NATS was last seen answering on, and when (for people: the service reads the id only).
const HEARTBEAT: &str = "connected";
/// The next heartbeat, before it is renamed over [`HEARTBEAT`].
const HEARTBEAT_NEXT: &str = "connected.next";

/// What the heartbeat file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// When it was written (ms since the Unix epoch, the wall clock: only shown).
    pub at_ms: u64,
    /// The id of the server process NATS was last seen answering on.
    pub server: String,
}

impl Heartbeat {
    fn to_text(&self) -> String {
        format!("{} {}\n", self.at_ms, self.server)
    }

    /// Reads [`Heartbeat::to_text`]'s form (anything after the id is ignored).
    fn from_text(text: &str) -> Option<Heartbeat> {
        let mut fields = text.split_whitespace();
        let at_ms = fields.next()?.parse().ok()?;
        let server = fields.next()?.to_owned();
        Some(Heartbeat { at_ms, server })
    }
}

/// Kept beyond the hold: nats-server's periodic sync takes a while to complete.
const MARGIN_MS: u64 = 1_000;

/// One retained segment.
#[derive(Debug)]
struct Kept {
    id: u64,
    /// Bytes known to hold complete, synced records.
    size: u64,
    /// When its first record was written ([`super::mono_ms`]).
    opened_ms: u64,
    /// When its newest record was written ([`super::mono_ms`]): it expires `hold` after that.
    newest_ms: u64,
    /// Unreadable stretches found at start-up, skipped when it is read.
    gaps: Vec<(u64, u64)>,
}

/// What [`Retained::take_all`] hands its caller.
pub(super) enum Piece<'a> {
    /// Whole records to copy, and how many.
    Records(&'a [u8], u64),
    /// Every record of a segment has been handed over: its copy must be durable now, since
    /// the segment is deleted next.
    SegmentDone,
}

/// What expiring or taking the retained log freed.
#[derive(Debug, Default)]
pub(super) struct Freed {
    pub bytes: u64,
    /// The mails whose records went: their directories and file bytes.
    pub mails: Vec<(String, u64)>,
}

/// The retained log of one spool directory; owned by the spool's writer thread.
#[derive(Debug)]
pub(super) struct Retained {
    /// Where its file operations go (the spool's storage).
    fs: Arc<dyn Storage>,
    dir: PathBuf,
    /// How long a segment is kept after its newest record was written (see the module's
    /// doc, "Time").
    hold_ms: u64,
    segments: VecDeque<Kept>,
    /// The segment being appended to (the last of `segments`), when open.
    writer: Option<Box<dyn StorageFile>>,
    /// Bytes written to the open segment and not yet synced (not counted in its size).
    unsynced: u64,
    next_id: u64,
    /// Segments were deleted and the directory not synced since: a power cut could bring
    /// them back, and their records (replayed, or older than the retention) would be
    /// published again.
    removals_unsynced: bool,
    /// What those deletions freed: reported once the directory sync made them durable.
    unsynced_freed: Freed,
}

/// What [`Retained::open`] found.
pub(super) struct Opened {
    pub retained: Retained,
    pub bytes: u64,
    /// The file bytes of the mails its records name.
    pub mail_bytes: u64,
}

impl Retained {
    /// Opens (or creates) the retained log under `spool_dir`, cutting torn tails off; each
    /// segment is kept `hold` after its newest record was written (the segments found count
    /// as written `now`).
    pub(super) fn open(
        fs: Arc<dyn Storage>,
        spool_dir: &Path,
        hold: Duration,
        now: u64,
    ) -> io::Result<Opened> {
        let dir = spool_dir.join(RETAINED);
        create_dir_durably(&*fs, &dir)?;
        let mut segments = VecDeque::new();
        let (mut bytes, mut mail_bytes) = (0, 0);
        for id in list_segments(&*fs, &dir)? {
            let path = segment_path(&dir, id);
            let scan = scan_in(&*fs, &path)?;
            if scan.valid_len < scan.file_len {
                let mut file = fs.open_write(&path)?;
                file.set_len(scan.valid_len)?;
                file.sync_all()?;
            }
            bytes += scan.valid_len;
            mail_bytes += scan
                .records
                .iter()
                .filter_map(|r| r.mail_bytes)
                .sum::<u64>();
            segments.push_back(Kept {
                id,
                size: scan.valid_len,
                opened_ms: now,
                newest_ms: now,
                gaps: scan.gaps,
            });
        }
        let next_id = segments.back().map_or(1, |s| s.id + 1);
        Ok(Opened {
            retained: Retained {
                fs,
                dir,
                hold_ms: hold.as_millis() as u64,
                segments,
                writer: None,
                unsynced: 0,
                next_id,
                removals_unsynced: false,
                unsynced_freed: Freed::default(),
            },
            bytes,
            mail_bytes,
        })
    }

    /// Appends `buf` (whole records) at `now_ms` ([`super::mono_ms`]) and syncs it. On failure nothing of
    /// it counts: the segment is closed and cut back to its last complete record.
    pub(super) fn append(&mut self, buf: &[u8], now_ms: u64) -> io::Result<()> {
        let start = self.begin(now_ms)?;
        let written = self.write(buf).and_then(|()| self.sync(now_ms));
        if written.is_err() {
            self.abandon(start);
        }
        written
    }

    /// Makes sure a segment is open for appending (a new one after an eighth of the
    /// hold, or at 64 MiB), and returns where the next write starts in it.
    pub(super) fn begin(&mut self, now_ms: u64) -> io::Result<u64> {
        let rotate = match (&self.writer, self.segments.back()) {
            (Some(_), Some(last)) => {
                last.size >= SEGMENT_MAX
                    || now_ms.saturating_sub(last.opened_ms) >= self.hold_ms / 8
            }
            _ => true,
        };
        if rotate {
            let id = self.next_id;
            self.next_id += 1;
            let file = self.fs.create_new(&segment_path(&self.dir, id))?;
            self.fs.sync_dir(&self.dir)?;
            self.writer = Some(file);
            self.unsynced = 0;
            self.segments.push_back(Kept {
                id,
                size: 0,
                opened_ms: now_ms,
                newest_ms: now_ms,
                gaps: Vec::new(),
            });
        }
        Ok(self.end())
    }

    /// Where the open segment ends, written bytes included.
    pub(super) fn end(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.size) + self.unsynced
    }

    /// Writes whole records to the open segment ([`Retained::begin`] first); they count
    /// once [`Retained::sync`] has made them durable.
    pub(super) fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| io::Error::other("no retained segment is open"))?;
        writer.write_all(buf)?;
        self.unsynced += buf.len() as u64;
        Ok(())
    }

    /// Cuts what was written since `to` (a position [`Retained::end`] gave) off again.
    pub(super) fn cut(&mut self, to: u64) -> io::Result<()> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        writer.set_len(to)?;
        let size = self.segments.back().map_or(0, |s| s.size);
        self.unsynced = to.saturating_sub(size);
        Ok(())
    }

    /// Makes everything written durable (one `fdatasync`).
    pub(super) fn sync(&mut self, now_ms: u64) -> io::Result<()> {
        if self.unsynced == 0 {
            return Ok(());
        }
        let writer = self.writer.as_mut().expect("written through it");
        writer.sync_data()?;
        let last = self.segments.back_mut().expect("segment exists");
        last.size += self.unsynced;
        last.newest_ms = last.newest_ms.max(now_ms);
        self.unsynced = 0;
        Ok(())
    }

    /// After a failed write or sync: closes the segment and cuts it back to `start`; the
    /// next append starts a new one. Best effort: a tail left here is a torn record, cut off
    /// at the next start.
    pub(super) fn abandon(&mut self, start: u64) {
        if let Some(mut writer) = self.writer.take() {
            let _ = writer.set_len(start).and_then(|()| writer.sync_all());
        }
        if let Some(last) = self.segments.back_mut() {
            last.size = last.size.min(start);
        }
        self.unsynced = 0;
    }

    /// The oldest write a replay needs when NATS was last seen answering at
    /// `connected_until_ms` ([`super::mono_ms`]): what it acknowledged in the retention before
    /// that moment (and [`MARGIN_MS`] more) may not have been synced when it went away.
    pub(super) fn needed_since(&self, connected_until_ms: u64) -> u64 {
        connected_until_ms.saturating_sub(self.hold_ms + MARGIN_MS)
    }

    /// Deletes the segments whose newest record a replay would no longer need at `now_ms`
    /// ([`super::mono_ms`]; the caller saw the stream answer just now).
    pub(super) fn expire(&mut self, now_ms: u64) -> io::Result<Freed> {
        let mut freed = Freed::default();
        let needed = self.needed_since(now_ms);
        while let Some(first) = self.segments.front() {
            if first.newest_ms >= needed {
                break;
            }
            self.remove_front(&mut freed)?;
        }
        self.finish_removals(freed)
    }

    /// Makes the deletion of segments durable (one directory sync), so a crash cannot bring
    /// them back, and only then reports what they freed (with what an earlier call could
    /// not make durable). On failure `freed` waits for the next expiry or replay.
    fn finish_removals(&mut self, mut freed: Freed) -> io::Result<Freed> {
        if self.removals_unsynced {
            if let Err(e) = self.fs.sync_dir(&self.dir) {
                self.unsynced_freed.bytes += freed.bytes;
                self.unsynced_freed.mails.append(&mut freed.mails);
                return Err(e);
            }
            self.removals_unsynced = false;
        }
        let earlier = std::mem::take(&mut self.unsynced_freed);
        freed.bytes += earlier.bytes;
        freed.mails.extend(earlier.mails);
        Ok(freed)
    }

    /// Every record of the segments written `since_ms` or later ([`super::mono_ms`]), oldest
    /// first, as whole records in chunks of about `chunk` bytes, handed to `copy` as
    /// [`Piece::Records`]; after each segment's records, [`Piece::SegmentDone`] (the caller's
    /// copy of it is durable by then), and the segment is deleted before the next is read, so
    /// a replay needs room for one segment, not for a second copy of the log. Older segments
    /// are deleted unread. A crash between a copy and its deletion leaves both: the records
    /// are published twice, and de-duplicated. On failure, the segments deleted so far stay
    /// deleted (their records are in the caller's copy), and what they freed is reported by the
    /// next expiry or replay.
    pub(super) fn take_all(
        &mut self,
        chunk: usize,
        since_ms: u64,
        mut copy: impl FnMut(Piece<'_>) -> io::Result<()>,
    ) -> io::Result<Freed> {
        self.writer = None;
        self.unsynced = 0;
        let mut freed = Freed::default();
        let mut taken = || -> io::Result<()> {
            while let Some(kept) = self.segments.front() {
                // Mails moved along with their records keep their directories; the others go.
                let mut moved_mails = std::collections::HashSet::new();
                if kept.newest_ms >= since_ms {
                    let mut buf = Vec::with_capacity(chunk.min(kept.size as usize));
                    let mut count = 0u64;
                    for_each_record(&*self.fs, &self.dir, kept, |record, read| {
                        if let Record::Mail(mail) = read {
                            moved_mails.insert(mail.dir);
                        }
                        buf.extend_from_slice(record);
                        count += 1;
                        if buf.len() >= chunk {
                            copy(Piece::Records(&buf, count))?;
                            buf.clear();
                            count = 0;
                        }
                        Ok(())
                    })?;
                    if !buf.is_empty() {
                        copy(Piece::Records(&buf, count))?;
                    }
                }
                copy(Piece::SegmentDone)?;
                let mut this = Freed::default();
                self.remove_front(&mut this)?;
                this.mails.retain(|(dir, _)| !moved_mails.contains(dir));
                freed.bytes += this.bytes;
                freed.mails.append(&mut this.mails);
            }
            Ok(())
        };
        match taken() {
            Ok(()) => self.finish_removals(freed),
            Err(e) => {
                self.unsynced_freed.bytes += freed.bytes;
                self.unsynced_freed.mails.append(&mut freed.mails);
                Err(e)
            }
        }
    }

    /// Replaces the heartbeat atomically: written to a file of its own, synced, renamed over
    /// the old one, and the directory synced. A full disk or a crash halfway leaves the old
    /// heartbeat whole, never an empty or torn one (which would read as no heartbeat, and
    /// replay the whole log to a server that lost nothing).
    pub(super) fn write_heartbeat(&self, heartbeat: &Heartbeat) -> io::Result<()> {
        let temporary = self.dir.join(HEARTBEAT_NEXT);
        let written = (|| {
            let mut file = self.fs.create(&temporary)?;
            file.write_all(heartbeat.to_text().as_bytes())?;
            file.sync_data()?;
            self.fs.rename(&temporary, &self.dir.join(HEARTBEAT))?;
            self.fs.sync_dir(&self.dir)
        })();
        if written.is_err() {
            let _ = self.fs.remove_file(&temporary);
        }
        written
    }

    /// What the heartbeat says.
    pub(super) fn last_connected(&self) -> Option<Heartbeat> {
        let text = String::from_utf8(self.fs.read(&self.dir.join(HEARTBEAT)).ok()?).ok()?;
        Heartbeat::from_text(&text)
    }

    /// How many records and bytes the log holds (for `spool status`).
    pub(super) fn count(&self) -> io::Result<(u64, u64)> {
        let mut records = 0;
        for kept in &self.segments {
            for_each_record(&*self.fs, &self.dir, kept, |_, _| {
                records += 1;
                Ok(())
            })?;
        }
        Ok((records, self.segments.iter().map(|s| s.size).sum()))
    }

    /// Every record it holds, oldest first (for tests that check what survived).
    #[cfg(test)]
    pub(super) fn records(&self) -> io::Result<Vec<Record>> {
        let mut records = Vec::new();
        for kept in &self.segments {
            for_each_record(&*self.fs, &self.dir, kept, |_, record| {
                records.push(record);
                Ok(())
            })?;
        }
        Ok(records)
    }

    /// The directories (relative to the spool directory) its mail records name.
    pub(super) fn mail_dirs(&self) -> io::Result<Vec<String>> {
        let mut dirs = Vec::new();
        for kept in &self.segments {
            for_each_record(&*self.fs, &self.dir, kept, |_, record| {
                if let Record::Mail(mail) = record {
                    dirs.push(mail.dir);
                }
                Ok(())
            })?;
        }
        Ok(dirs)
    }

    fn remove_front(&mut self, freed: &mut Freed) -> io::Result<()> {
        let Some(first) = self.segments.front() else {
            return Ok(());
        };
        for_each_record(&*self.fs, &self.dir, first, |_, record| {
            if let Record::Mail(mail) = record {
                freed.mails.push((mail.dir, mail.file_bytes));
            }
            Ok(())
        })?;
        if self.segments.len() == 1 {
            self.writer = None;
        }
        let first = self.segments.pop_front().expect("checked above");
        match self.fs.remove_file(&segment_path(&self.dir, first.id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => self.removals_unsynced = true,
        }
        freed.bytes += first.size;
        Ok(())
    }
}

/// Calls `f` with each intact record of `kept` (its bytes, and what it holds), in order.
fn for_each_record(
    fs: &dyn Storage,
    dir: &Path,
    kept: &Kept,
    mut f: impl FnMut(&[u8], Record) -> io::Result<()>,
) -> io::Result<()> {
    if kept.size == 0 {
        return Ok(());
    }
    let mut reader = fs.read_range(&segment_path(dir, kept.id), 0, kept.size)?;
    let mut offset = 0u64;
    while offset < kept.size {
        if let Some(&(start, end)) = kept.gaps.iter().find(|(start, _)| *start == offset) {
            io::copy(
                &mut io::Read::take(&mut reader, end - start),
                &mut io::sink(),
            )?;
            offset = end;
            continue;
        }
        let (record, bytes) = read_record(&mut reader, kept.size - offset)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        offset += bytes.len() as u64;
        f(&bytes, record)?;
    }
    Ok(())
}
