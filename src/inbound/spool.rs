//! The inbound spool: mails NATS could not take in time, kept whole on disk in
//! `<spool.dir>/inbound/`, and the task that later sends them, in arrival order.
//!
//! Each mail is one directory named by its arrival number (`00000000000000000042`), holding
//! its attachment files and `mail.json`. A request's files are written first to its work
//! directory in `<spool.dir>/inbound/tmp/`; spooling fsyncs every file and the directory,
//! then renames it into place and fsyncs the parent, so a directory in the queue is always
//! complete. The drainer stores the objects and publishes the message of the oldest mail,
//! then removes it; a crash in between repeats the same objects (skipped, same digest) and the
//! same `Nats-Msg-Id` (dropped by JetStream), so each mail is on the bus exactly once.
//! Temporary failures back off exponentially (capped), permanent ones move the mail to
//! `quarantine/` with the reason.
//!
//! It shares two things with the event spool of the same `spool.dir`: the directory lock
//! (an [`InboundSpool`] can only be opened with the counts of a [`crate::spool::Spool`] that
//! holds it, so a second process never touches a spool in use) and `spool.max_bytes`, which
//! bounds both spools together. [`status`] reads it without the lock, for `spool status`;
//! [`drain_to_empty`] empties it for `spool drain`, with the same step as the service's
//! drainer.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use thiserror::Error;
use tokio::sync::{watch, Notify};

use super::mail::Mail;
use super::receive::WorkDir;
use super::store::InboundSink;
use crate::deliver::Backoff;
use crate::publish::Publish;
use crate::spool::SpoolStats;

const MAIL_FILE: &str = "mail.json";
/// The request id the mail arrived with, kept so its message carries the same `Cmc-Batch-Id`.
const BATCH_FILE: &str = "batch_id";

#[derive(Debug, Error)]
pub enum InboundSpoolError {
    #[error("inbound spool I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the spool is full (spool.max_bytes)")]
    Full,
    #[error("inbound spool record {0}: {1}")]
    Corrupt(PathBuf, String),
}

/// A queued mail's directory and its record (or why the record cannot be read).
type Queued = (PathBuf, Result<Mail, String>);

/// The on-disk queue of mails.
pub struct InboundSpool {
    dir: PathBuf,
    tmp: PathBuf,
    quarantine: PathBuf,
    max_bytes: u64,
    next: AtomicU64,
    mails: AtomicU64,
    /// Mails a request has decided to spool and whose append has not ended yet. They count as
    /// queued (as the event spool counts the appends handed to its writer), so a mail that
    /// arrives meanwhile goes behind them instead of overtaking them.
    appending: AtomicU64,
    /// The event spool's counts: this spool's bytes are kept there
    /// ([`SpoolStats::inbound_bytes`]) so each spool sees what the other holds.
    shared: Arc<SpoolStats>,
    appended: Notify,
}

fn entries(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse::<u64>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort_unstable_by_key(|(n, _)| *n);
    Ok(out)
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl InboundSpool {
    /// Opens `<spool_dir>/inbound/`, removing the work directories of requests a previous run
    /// did not finish (they were never answered 200). `shared` is the counts of the event
    /// spool opened on the same `spool_dir`: holding it means this process holds the
    /// directory's lock, so nothing here can belong to another running process.
    pub fn open(
        spool_dir: &Path,
        max_bytes: u64,
        shared: Arc<SpoolStats>,
    ) -> Result<InboundSpool, InboundSpoolError> {
        let dir = spool_dir.join("inbound");
        let tmp = dir.join("tmp");
        let quarantine = dir.join("quarantine");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        fs::create_dir_all(&quarantine)?;
        let queued = entries(&dir)?;
        // After the quarantined mails' numbers too: a new mail must never take the name of
        // one in the quarantine, or moving it there would fail every time.
        let quarantined = entries(&quarantine)?.last().map_or(0, |(n, _)| *n);
        let next = queued.last().map_or(1, |(n, _)| n + 1).max(quarantined + 1);
        let bytes = queued.iter().map(|(_, p)| dir_bytes(p)).sum();
        // Already on disk: counted whatever the limit (it only refuses new mails).
        shared.reserve_inbound(bytes, u64::MAX);
        Ok(InboundSpool {
            mails: AtomicU64::new(queued.len() as u64),
            appending: AtomicU64::new(0),
            shared,
            next: AtomicU64::new(next),
            dir,
            tmp,
            quarantine,
            max_bytes,
            appended: Notify::new(),
        })
    }

    /// Where requests write their files, so spooling them is a rename.
    pub fn work_root(&self) -> &Path {
        &self.tmp
    }

    /// Nothing is queued, and no append is under way.
    pub fn is_empty(&self) -> bool {
        // `appending` first: an append adds to `mails` before it leaves `appending`.
        self.appending.load(Ordering::Acquire) == 0 && self.mails.load(Ordering::Acquire) == 0
    }

    /// Counts a mail as queued from now until the returned guard is dropped: take it the moment
    /// a request decides to spool, hold it over [`InboundSpool::append`].
    pub fn begin_append(self: &Arc<Self>) -> Appending {
        self.appending.fetch_add(1, Ordering::AcqRel);
        Appending(self.clone())
    }

    pub fn len(&self) -> u64 {
        self.mails.load(Ordering::Acquire)
    }

    /// Makes `mail` (its files in `work`) durable at the end of the queue, with the id of the
    /// request it arrived in. Blocking I/O: run it on a blocking thread.
    pub fn append(
        &self,
        work: WorkDir,
        mail: &Mail,
        batch_id: &str,
    ) -> Result<(), InboundSpoolError> {
        let path = work.path().to_owned();
        let record = serde_json::to_vec(mail)
            .map_err(|e| InboundSpoolError::Corrupt(path.clone(), e.to_string()))?;
        // What the mail's directory will hold, reserved against both spools together.
        let size = mail.file_bytes() + record.len() as u64 + batch_id.len() as u64;
        if !self.shared.reserve_inbound(size, self.max_bytes) {
            return Err(InboundSpoolError::Full);
        }
        let written = self.write(work, &path, &record, batch_id);
        if written.is_err() {
            self.shared.release_inbound(size);
        }
        written
    }

    fn write(
        &self,
        work: WorkDir,
        path: &Path,
        record: &[u8],
        batch_id: &str,
    ) -> Result<(), InboundSpoolError> {
        let mut file = fs::File::create(path.join(MAIL_FILE))?;
        std::io::Write::write_all(&mut file, record)?;
        file.sync_all()?;
        fs::write(path.join(BATCH_FILE), batch_id)?;
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_name() != MAIL_FILE {
                fs::File::open(entry.path())?.sync_all()?;
            }
        }
        sync_dir(path)?;
        let n = self.next.fetch_add(1, Ordering::AcqRel);
        let target = self.dir.join(format!("{n:020}"));
        fs::rename(path, &target)?;
        // Renamed: the work directory must no longer be removed on drop.
        let _ = work.into_path();
        sync_dir(&self.dir)?;
        sync_dir(&self.tmp)?;
        self.mails.fetch_add(1, Ordering::AcqRel);
        self.appended.notify_one();
        Ok(())
    }

    /// The oldest mail and its directory.
    fn oldest(&self) -> Result<Option<Queued>, InboundSpoolError> {
        let Some((_, path)) = entries(&self.dir)?.into_iter().next() else {
            return Ok(None);
        };
        let mail = fs::read(path.join(MAIL_FILE))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Mail>(&b).map_err(|e| e.to_string()));
        Ok(Some((path, mail)))
    }

    /// Stops counting a mail that has left the queue (`bytes` its directory held): only once
    /// it has left, so a failed attempt, retried, never counts it out twice.
    fn forget(&self, bytes: u64) {
        self.shared.release_inbound(bytes);
        let _ = self
            .mails
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Removes a delivered mail.
    fn remove(&self, path: &Path) -> Result<(), InboundSpoolError> {
        let bytes = dir_bytes(path);
        fs::remove_dir_all(path)?;
        self.forget(bytes);
        sync_dir(&self.dir)?;
        Ok(())
    }

    /// Moves a mail NATS refused for good aside, with the reason.
    fn quarantine(&self, path: &Path, reason: &str) -> Result<(), InboundSpoolError> {
        let bytes = dir_bytes(path);
        let name = path.file_name().unwrap_or_default();
        let mut target = self.quarantine.join(name);
        if target.exists() {
            // Left by an earlier version, which could reuse a quarantined mail's number.
            let n = self.next.fetch_add(1, Ordering::AcqRel);
            target = self.quarantine.join(format!("{n:020}"));
        }
        fs::rename(path, &target)?;
        self.forget(bytes);
        fs::write(target.join("reason.txt"), reason)?;
        sync_dir(&self.dir)?;
        sync_dir(&self.quarantine)?;
        Ok(())
    }
}

/// A mail on its way into the queue ([`InboundSpool::begin_append`]).
pub struct Appending(Arc<InboundSpool>);

impl Drop for Appending {
    fn drop(&mut self) {
        self.0.appending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one step of a drainer did.
#[derive(Debug)]
pub enum Step {
    /// Nothing is queued.
    Empty,
    /// The oldest mail was published and removed.
    Sent,
    /// The oldest mail was moved to the quarantine (its reason).
    Quarantined(String),
    /// A temporary failure; the mail stays first in the queue.
    Retry(String),
}

/// One step of every drainer (the service's and `spool drain`): stores the objects and
/// publishes the message of the oldest mail, then removes it; quarantines it when NATS
/// refuses it for good.
pub async fn step<P: Publish>(spool: &Arc<InboundSpool>, sink: &InboundSink<P>) -> Step {
    let next = {
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || spool.oldest()).await
    };
    let done = |r: Result<(), String>, ok: Step| match r {
        Ok(()) => ok,
        Err(e) => Step::Retry(e),
    };
    match next {
        Ok(Ok(None)) => Step::Empty,
        Ok(Ok(Some((path, Err(reason))))) => {
            tracing::error!(dir = %path.display(), %reason, "inbound spool record unreadable; quarantined");
            let r = finish(spool, path, Some(reason.clone())).await;
            done(r, Step::Quarantined(reason))
        }
        Ok(Ok(Some((path, Ok(mail))))) => {
            let batch_id = fs::read_to_string(path.join(BATCH_FILE)).unwrap_or_else(|_| {
                let n = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                format!("spool-{n}")
            });
            match sink.deliver(&mail, &path, &batch_id).await {
                Ok(sent) => {
                    tracing::info!(
                        batch_id = %batch_id,
                        attachments = mail.attachments.len(),
                        uploaded = sent.uploaded,
                        duplicate = sent.duplicate,
                        "spooled inbound mail published"
                    );
                    crate::metrics::inbound_mail("drained");
                    crate::metrics::inbound_attachments(
                        "uploaded",
                        sent.uploaded,
                        sent.uploaded_bytes,
                    );
                    done(finish(spool, path, None).await, Step::Sent)
                }
                Err(e) if e.is_temporary() => {
                    tracing::debug!(error = %e, "inbound spool: NATS not ready; retrying");
                    Step::Retry(e.to_string())
                }
                Err(e) => {
                    tracing::error!(batch_id = %batch_id, error = %e, "spooled inbound mail refused by NATS; quarantined");
                    let reason = e.to_string();
                    let r = finish(spool, path, Some(reason.clone())).await;
                    done(r, Step::Quarantined(reason))
                }
            }
        }
        Ok(Err(e)) => Step::Retry(e.to_string()),
        Err(e) => Step::Retry(e.to_string()),
    }
}

/// Sends the spooled mails in order until `stop` turns true; never spins.
pub async fn drain<P: Publish>(
    spool: Arc<InboundSpool>,
    sink: Arc<InboundSink<P>>,
    mut stop: watch::Receiver<bool>,
    retry_max_interval: Duration,
) {
    // The event drainer's back-off, capped by the same setting.
    let mut backoff = Backoff::new(retry_max_interval);
    loop {
        if *stop.borrow() {
            return;
        }
        match step(&spool, &sink).await {
            Step::Empty => {
                tokio::select! {
                    () = spool.appended.notified() => {}
                    // A periodic look, in case a notification raced with the emptiness check.
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            Step::Sent | Step::Quarantined(_) => backoff.reset(),
            Step::Retry(_) => {
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_pause()) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

/// What [`drain_to_empty`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrainSummary {
    pub published: u64,
    pub quarantined: u64,
}

/// Sends every spooled mail, in order, until the queue is empty (`spool drain`). Gives up
/// after `attempts` failures in a row without progress, with the last reason; the mails not
/// sent stay queued.
pub async fn drain_to_empty<P: Publish>(
    spool: &Arc<InboundSpool>,
    sink: &InboundSink<P>,
    attempts: u32,
    retry_max: Duration,
) -> Result<DrainSummary, String> {
    let mut summary = DrainSummary::default();
    let mut failures = 0;
    let mut backoff = Backoff::new(retry_max);
    loop {
        match step(spool, sink).await {
            Step::Empty => return Ok(summary),
            Step::Sent => summary.published += 1,
            Step::Quarantined(_) => summary.quarantined += 1,
            Step::Retry(reason) => {
                failures += 1;
                if failures >= attempts {
                    return Err(format!(
                        "{} inbound mails stay in the spool: {reason}",
                        spool.len()
                    ));
                }
                tokio::time::sleep(backoff.next_pause()).await;
                continue;
            }
        }
        failures = 0;
        backoff.reset();
    }
}

/// One quarantined mail, for `spool status`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InboundQuarantineEntry {
    /// The mail's directory name (its arrival number).
    pub id: String,
    /// The mail's `Subject` (empty when its record is unreadable).
    pub subject: String,
    pub filter: String,
    pub reason: String,
}

/// What `spool status` shows of the inbound spool: read without the lock, changing nothing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InboundStatus {
    pub mails: u64,
    pub bytes: u64,
    /// Age in seconds of the oldest waiting mail (from its record's modification time).
    pub oldest_age_seconds: Option<f64>,
    pub quarantined: Vec<InboundQuarantineEntry>,
}

/// Reads the inbound spool of `spool_dir` (which need not exist).
pub fn status(spool_dir: &Path) -> Result<InboundStatus, InboundSpoolError> {
    let dir = spool_dir.join("inbound");
    let mut status = InboundStatus::default();
    if !dir.exists() {
        return Ok(status);
    }
    let queued = entries(&dir)?;
    status.mails = queued.len() as u64;
    status.bytes = queued.iter().map(|(_, p)| dir_bytes(p)).sum();
    status.oldest_age_seconds = queued.first().and_then(|(_, p)| {
        let modified = fs::metadata(p.join(MAIL_FILE)).ok()?.modified().ok()?;
        let age = SystemTime::now()
            .duration_since(modified)
            .unwrap_or_default();
        Some(age.as_secs_f64())
    });
    let quarantine = dir.join("quarantine");
    if quarantine.exists() {
        for (_, path) in entries(&quarantine)? {
            let mail = fs::read(path.join(MAIL_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<Mail>(&b).ok());
            status.quarantined.push(InboundQuarantineEntry {
                id: path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_owned(),
                subject: mail.as_ref().map(|m| m.subject.clone()).unwrap_or_default(),
                filter: mail.map(|m| m.filter).unwrap_or_default(),
                reason: fs::read_to_string(path.join("reason.txt")).unwrap_or_default(),
            });
        }
    }
    Ok(status)
}

async fn finish(
    spool: &Arc<InboundSpool>,
    path: PathBuf,
    quarantine: Option<String>,
) -> Result<(), String> {
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || match quarantine {
        None => spool.remove(&path),
        Some(reason) => spool.quarantine(&path, &reason),
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| {
        tracing::error!(error = %e, "inbound spool: cannot remove a sent mail");
        e.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::mail::parse_json;

    /// A mail counts as queued from the moment a request decides to spool it, so a later mail
    /// cannot pass it while its files are being synced.
    #[test]
    fn a_mail_being_appended_counts_as_queued() {
        let root = tempfile::tempdir().unwrap();
        let spool = Arc::new(InboundSpool::open(root.path(), 1 << 30, Arc::default()).unwrap());
        let mail = parse_json(include_bytes!("../../fixtures/inbound/json.json"))
            .unwrap()
            .validate()
            .unwrap();

        let given_up = spool.begin_append();
        assert!(!spool.is_empty(), "an append under way is queued");
        drop(given_up);
        assert!(spool.is_empty(), "an append given up leaves nothing");

        let appending = spool.begin_append();
        let work = WorkDir::create(spool.work_root()).unwrap();
        spool.append(work, &mail, "b").unwrap();
        drop(appending);
        assert!(!spool.is_empty());
        assert_eq!(spool.len(), 1);
    }

    #[test]
    fn mails_are_kept_in_order_across_a_reopen_and_unfinished_work_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let spool = InboundSpool::open(root.path(), 1 << 30, Arc::default()).unwrap();
        let mail = parse_json(include_bytes!("../../fixtures/inbound/json.json"))
            .unwrap()
            .validate()
            .unwrap();
        for subject in ["first", "second"] {
            let work = WorkDir::create(spool.work_root()).unwrap();
            fs::write(work.path().join("part-1"), b"data").unwrap();
            let mut m = mail.clone();
            m.subject = subject.into();
            spool.append(work, &m, subject).unwrap();
        }
        let abandoned = WorkDir::create(spool.work_root()).unwrap().into_path();
        assert_eq!(spool.len(), 2);
        drop(spool);

        let spool = InboundSpool::open(root.path(), 1 << 30, Arc::default()).unwrap();
        assert!(!abandoned.exists());
        assert_eq!(spool.len(), 2);
        let (path, first) = spool.oldest().unwrap().unwrap();
        assert_eq!(first.unwrap().subject, "first");
        assert_eq!(fs::read_to_string(path.join(BATCH_FILE)).unwrap(), "first");
        assert_eq!(fs::read(path.join("part-1")).unwrap(), b"data");
        spool.remove(&path).unwrap();
        let (path, second) = spool.oldest().unwrap().unwrap();
        assert_eq!(second.unwrap().subject, "second");
        spool.quarantine(&path, "refused").unwrap();
        assert!(spool.is_empty());
        assert!(spool.oldest().unwrap().is_none());
        assert_eq!(
            fs::read_to_string(
                root.path()
                    .join("inbound/quarantine")
                    .join(path.file_name().unwrap())
                    .join("reason.txt")
            )
            .unwrap(),
            "refused"
        );
    }

    fn queue(spool: &InboundSpool, subject: &str) {
        let mut mail = parse_json(include_bytes!("../../fixtures/inbound/json.json"))
            .unwrap()
            .validate()
            .unwrap();
        mail.subject = subject.into();
        let work = WorkDir::create(spool.work_root()).unwrap();
        spool.append(work, &mail, subject).unwrap();
    }

    /// Arrival numbers restart after the highest queued mail: a quarantined mail's number
    /// must never be given to a new mail, or quarantining that one fails, again and again.
    #[test]
    fn a_quarantined_mail_keeps_its_name_and_a_later_one_gets_its_own() {
        let root = tempfile::tempdir().unwrap();
        let spool = InboundSpool::open(root.path(), 1 << 30, Arc::default()).unwrap();
        queue(&spool, "first");
        let (path, _) = spool.oldest().unwrap().unwrap();
        spool.quarantine(&path, "refused").unwrap();
        drop(spool);

        let spool = InboundSpool::open(root.path(), 1 << 30, Arc::default()).unwrap();
        queue(&spool, "second");
        let (path, _) = spool.oldest().unwrap().unwrap();
        spool.quarantine(&path, "refused too").unwrap();
        assert!(spool.is_empty());
        let s = status(root.path()).unwrap();
        let subjects: Vec<&str> = s.quarantined.iter().map(|q| q.subject.as_str()).collect();
        assert_eq!(subjects, ["first", "second"]);
    }

    /// A quarantine that fails leaves the mail counted, and its bytes reserved, once.
    #[test]
    fn a_failed_quarantine_counts_the_mail_still_queued() {
        let root = tempfile::tempdir().unwrap();
        let shared = Arc::new(SpoolStats::default());
        let spool = InboundSpool::open(root.path(), 1 << 30, shared.clone()).unwrap();
        queue(&spool, "first");
        let held = shared.inbound_bytes();
        let (path, _) = spool.oldest().unwrap().unwrap();
        // The quarantine cannot take it (a file where its directory should be).
        let quarantine = root.path().join("inbound/quarantine");
        fs::remove_dir(&quarantine).unwrap();
        fs::write(&quarantine, b"").unwrap();
        for _ in 0..2 {
            assert!(spool.quarantine(&path, "refused").is_err());
            assert_eq!(spool.len(), 1);
            assert_eq!(shared.inbound_bytes(), held);
        }
        fs::remove_file(&quarantine).unwrap();
        fs::create_dir(&quarantine).unwrap();
        spool.quarantine(&path, "refused").unwrap();
        assert_eq!(spool.len(), 0);
        assert_eq!(shared.inbound_bytes(), 0);
    }

    #[test]
    fn a_full_spool_refuses() {
        let root = tempfile::tempdir().unwrap();
        let spool = InboundSpool::open(root.path(), 10, Arc::default()).unwrap();
        let mut mail = parse_json(include_bytes!("../../fixtures/inbound/json.json"))
            .unwrap()
            .validate()
            .unwrap();
        mail.attachments.push(crate::inbound::mail::Attachment {
            field: "attachment1".into(),
            filename: "a".into(),
            content_type: "x/y".into(),
            data: crate::inbound::mail::StoredFile {
                file: "part-1".into(),
                size: 100,
                sha256: String::new(),
            },
        });
        let work = WorkDir::create(spool.work_root()).unwrap();
        assert!(matches!(
            spool.append(work, &mail, "b"),
            Err(InboundSpoolError::Full)
        ));
        assert!(spool.is_empty());
    }

    #[test]
    fn spool_max_bytes_bounds_the_event_and_the_inbound_spool_together() {
        let root = tempfile::tempdir().unwrap();
        let mut events = crate::spool::Spool::open(root.path(), 4096).unwrap();
        // 3000 encoded bytes of events: a mail of about 1,500 bytes no longer fits.
        assert!(events.append_group(vec![(record_of(3000), 1)])[0].is_ok());
        let inbound = InboundSpool::open(root.path(), 4096, events.stats()).unwrap();
        let mail = parse_json(include_bytes!("../../fixtures/inbound/json.json"))
            .unwrap()
            .validate()
            .unwrap();
        let size = serde_json::to_vec(&mail).unwrap().len() as u64;
        assert!(size > 1100 && size < 4096, "{size}");
        let work = WorkDir::create(inbound.work_root()).unwrap();
        assert!(matches!(
            inbound.append(work, &mail, "b"),
            Err(InboundSpoolError::Full)
        ));
        assert_eq!(events.stats().inbound_bytes(), 0);
        // Alone it fits, and then the events count it: a second event record is refused.
        let root = tempfile::tempdir().unwrap();
        let mut events = crate::spool::Spool::open(root.path(), 4096).unwrap();
        let inbound = InboundSpool::open(root.path(), 4096, events.stats()).unwrap();
        let work = WorkDir::create(inbound.work_root()).unwrap();
        inbound.append(work, &mail, "b").unwrap();
        assert_eq!(events.stats().inbound_bytes(), size + 1);
        let left = 4096 - size - 1;
        assert!(events.append_group(vec![(record_of(left + 1), 1)])[0].is_err());
        assert!(events.append_group(vec![(record_of(left), 1)])[0].is_ok());
        // Sent: its bytes are free again.
        let (path, _) = inbound.oldest().unwrap().unwrap();
        inbound.remove(&path).unwrap();
        assert_eq!(events.stats().inbound_bytes(), 0);
    }

    /// Raw bytes of `len` standing for encoded records (only their size counts here).
    fn record_of(len: u64) -> Vec<u8> {
        vec![0u8; len as usize]
    }
}
