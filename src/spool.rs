//! The durable local spool: messages NATS could not take in time are appended here (and
//! fsynced) before the request is answered `200`, then published in arrival order by
//! [`drain`] once NATS is back.
//!
//! # On-disk format
//!
//! `spool.dir` holds segment files `<20-digit id>.seg` and one `cursor` file.
//!
//! - A segment is a sequence of records: `b"CMCS"`, payload length (u32 LE), CRC-32 of the
//!   payload (u32 LE), payload. The payload is the message: subject (u16 LE length + bytes),
//!   header count (u16 LE), each header as name (u16 length + bytes) and value (u16 length +
//!   bytes), then the body (u32 LE length + bytes). Headers include `Nats-Msg-Id`, so a
//!   message published twice (e.g. after a crash between publish and cursor update) is
//!   stored once by JetStream.
//! - `cursor` holds `<segment id> <byte offset>`: the first record not yet acknowledged.
//!   It is replaced atomically (write, fsync, rename) after each acknowledged run.
//! - A new segment is started at every start-up and after 64 MiB. Consumed segments are
//!   deleted.
//!
//! A crash can tear the last record of the segment being written: at start-up every segment
//! is scanned, and a record with a short header, a length past the end of the file or a wrong
//! CRC ends the readable part of that segment; the file is truncated there (the request that
//! wrote it was never answered `200`, so nothing promised is lost).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::Notify;

use crate::publish::NatsMessage;

const MAGIC: &[u8; 4] = b"CMCS";
const RECORD_HEADER: usize = 12;
const SEGMENT_MAX: u64 = 64 * 1024 * 1024;
const CURSOR: &str = "cursor";

/// Why a batch could not be spooled.
#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("the spool is full (spool.max_bytes = {0})")]
    Full(u64),
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("a spooled message field is too long to encode")]
    TooLong,
}

/// A position in the spool: segment id and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    segment: u64,
    offset: u64,
}

/// Messages read for publishing, with the position after each.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub messages: Vec<NatsMessage>,
    ends: Vec<(Position, u64)>,
}

impl ReadBatch {
    /// The position after the first `n` messages and their encoded size.
    fn end_of(&self, n: usize) -> Option<(Position, u64)> {
        let (pos, _) = *self.ends.get(n.checked_sub(1)?)?;
        let bytes = self.ends[..n].iter().map(|(_, b)| b).sum();
        Some((pos, bytes))
    }
}

#[derive(Debug)]
struct Segment {
    id: u64,
    /// Bytes known to hold complete, synced records.
    size: u64,
}

#[derive(Debug)]
struct Inner {
    segments: VecDeque<Segment>,
    /// The segment being appended to (always the last of `segments`), when open.
    writer: Option<File>,
    next_id: u64,
    cursor: Position,
}

/// The spool of one process.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    /// Unacknowledged messages and their encoded bytes (for `max_bytes`, metrics, `is_empty`).
    messages: AtomicU64,
    bytes: AtomicU64,
    /// Wakes the drainer when something is appended.
    pub(crate) appended: Notify,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, scanning what a previous run left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir)?;
        let mut ids: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let cursor = read_cursor(dir)?.unwrap_or(Position {
            segment: ids.first().copied().unwrap_or(0),
            offset: 0,
        });
        let mut segments = VecDeque::new();
        let (mut messages, mut bytes) = (0u64, 0u64);
        for id in ids {
            let path = segment_path(dir, id);
            if id < cursor.segment {
                fs::remove_file(&path)?;
                continue;
            }
            let scan = scan_segment(&path)?;
            if scan.valid_len < scan.file_len {
                tracing::warn!(
                    segment = %path.display(),
                    kept = scan.valid_len,
                    dropped = scan.file_len - scan.valid_len,
                    "spool segment ends with a torn or corrupt record; truncating it"
                );
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(scan.valid_len)?;
            }
            for (end, size) in scan.records {
                if id > cursor.segment || end > cursor.offset {
                    messages += 1;
                    bytes += size;
                }
            }
            segments.push_back(Segment {
                id,
                size: scan.valid_len,
            });
        }
        let next_id = segments.back().map_or(cursor.segment.max(1), |s| s.id + 1);
        Ok(Spool {
            dir: dir.to_owned(),
            max_bytes,
            inner: Mutex::new(Inner {
                segments,
                writer: None,
                next_id,
                cursor,
            }),
            messages: AtomicU64::new(messages),
            bytes: AtomicU64::new(bytes),
            appended: Notify::new(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.messages.load(Ordering::Acquire) == 0
    }

    /// Messages waiting to be published.
    pub fn len(&self) -> u64 {
        self.messages.load(Ordering::Acquire)
    }

    /// Encoded bytes waiting to be published.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `messages` durably (fsync) as one write; all or nothing.
    pub fn append(&self, messages: &[NatsMessage]) -> Result<(), SpoolError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for m in messages {
            encode_record(&mut buf, m)?;
        }
        let size = buf.len() as u64;
        let mut inner = self.lock();
        if self.bytes.load(Ordering::Acquire) + size > self.max_bytes {
            return Err(SpoolError::Full(self.max_bytes));
        }
        let needs_new = match (&inner.writer, inner.segments.back()) {
            (Some(_), Some(last)) => last.size >= SEGMENT_MAX,
            _ => true,
        };
        if needs_new {
            let id = inner.next_id;
            inner.next_id += 1;
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(segment_path(&self.dir, id))?;
            sync_dir(&self.dir)?;
            inner.writer = Some(file);
            inner.segments.push_back(Segment { id, size: 0 });
        }
        let writer = inner.writer.as_mut().expect("writer opened above");
        let result = writer.write_all(&buf).and_then(|()| writer.sync_data());
        if let Err(e) = result {
            // The tail may hold part of this write: start a fresh segment next time, and
            // cut this one back to its last complete record.
            inner.writer = None;
            if let Some(last) = inner.segments.back() {
                let _ = OpenOptions::new()
                    .write(true)
                    .open(segment_path(&self.dir, last.id))
                    .and_then(|f| f.set_len(last.size));
            }
            return Err(e.into());
        }
        inner.segments.back_mut().expect("segment exists").size += size;
        self.messages
            .fetch_add(messages.len() as u64, Ordering::AcqRel);
        self.bytes.fetch_add(size, Ordering::AcqRel);
        drop(inner);
        self.appended.notify_one();
        Ok(())
    }

    /// Reads up to `max` messages from the cursor on, in order.
    pub fn read(&self, max: usize) -> Result<ReadBatch, SpoolError> {
        let (mut position, segments): (Position, Vec<(u64, u64)>) = {
            let inner = self.lock();
            let segments = inner
                .segments
                .iter()
                .filter(|s| s.id >= inner.cursor.segment)
                .map(|s| (s.id, s.size))
                .collect();
            (inner.cursor, segments)
        };
        let mut batch = ReadBatch::default();
        for (id, size) in segments {
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
            let mut file = File::open(segment_path(&self.dir, id))?;
            file.seek(SeekFrom::Start(position.offset))?;
            let mut reader = io::BufReader::new(file.take(size - position.offset));
            while batch.messages.len() < max && position.offset < size {
                let (message, len) = read_record(&mut reader)?;
                position.offset += len;
                batch.messages.push(message);
                batch.ends.push((position, len));
            }
        }
        Ok(batch)
    }

    /// Marks the first `n` messages of `batch` as published.
    pub fn commit(&self, batch: &ReadBatch, n: usize) -> Result<(), SpoolError> {
        let Some((end, bytes)) = batch.end_of(n) else {
            return Ok(());
        };
        let mut inner = self.lock();
        write_cursor(&self.dir, end)?;
        inner.cursor = end;
        self.messages.fetch_sub(n as u64, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        // Delete segments that are wholly consumed; the active one only when it is drained.
        while let Some(&Segment { id, size }) = inner.segments.front() {
            let consumed = id < inner.cursor.segment
                || (id == inner.cursor.segment && inner.cursor.offset >= size);
            if !consumed {
                break;
            }
            if inner.segments.len() == 1 {
                inner.writer = None;
            }
            inner.segments.pop_front();
            fs::remove_file(segment_path(&self.dir, id))?;
            if let Some(next) = inner.segments.front() {
                if inner.cursor.segment < next.id {
                    inner.cursor = Position {
                        segment: next.id,
                        offset: 0,
                    };
                }
            } else {
                inner.cursor = Position {
                    segment: inner.next_id,
                    offset: 0,
                };
            }
            write_cursor(&self.dir, inner.cursor)?;
        }
        Ok(())
    }
}

fn read_cursor(dir: &Path) -> Result<Option<Position>, SpoolError> {
    match fs::read_to_string(dir.join(CURSOR)) {
        Ok(text) => {
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

fn write_cursor(dir: &Path, position: Position) -> io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    let mut file = File::create(&tmp)?;
    writeln!(file, "{} {}", position.segment, position.offset)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(CURSOR))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct Scan {
    file_len: u64,
    valid_len: u64,
    /// End offset and size of each complete record.
    records: Vec<(u64, u64)>,
}

fn scan_segment(path: &Path) -> io::Result<Scan> {
    let data = fs::read(path)?;
    let mut offset = 0usize;
    let mut records = Vec::new();
    while let Some(len) = check_record(&data[offset..]) {
        offset += len;
        records.push((offset as u64, len as u64));
    }
    Ok(Scan {
        file_len: data.len() as u64,
        valid_len: offset as u64,
        records,
    })
}

/// The length of the complete, intact record at the start of `data`, if there is one.
fn check_record(data: &[u8]) -> Option<usize> {
    if data.len() < RECORD_HEADER || &data[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(data[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(data[8..12].try_into().ok()?);
    let payload = data.get(RECORD_HEADER..RECORD_HEADER + len)?;
    (crc32fast::hash(payload) == crc && decode_payload(payload).is_some())
        .then_some(RECORD_HEADER + len)
}

fn encode_record(out: &mut Vec<u8>, m: &NatsMessage) -> Result<(), SpoolError> {
    let start = out.len();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[0; 8]);
    put_str16(out, &m.subject)?;
    out.extend_from_slice(
        &u16::try_from(m.headers.len())
            .map_err(|_| SpoolError::TooLong)?
            .to_le_bytes(),
    );
    for (name, value) in &m.headers {
        put_str16(out, name)?;
        put_str16(out, value)?;
    }
    let body_len = u32::try_from(m.payload.len()).map_err(|_| SpoolError::TooLong)?;
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&m.payload);
    let payload = &out[start + RECORD_HEADER..];
    let len = u32::try_from(payload.len()).map_err(|_| SpoolError::TooLong)?;
    let crc = crc32fast::hash(payload);
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn put_str16(out: &mut Vec<u8>, s: &str) -> Result<(), SpoolError> {
    let len = u16::try_from(s.len()).map_err(|_| SpoolError::TooLong)?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn read_record(reader: &mut impl Read) -> Result<(NatsMessage, u64), SpoolError> {
    let mut header = [0u8; RECORD_HEADER];
    reader.read_exact(&mut header)?;
    let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    let intact = &header[..4] == MAGIC
        && crc32fast::hash(&payload)
            == u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    let message = intact
        .then(|| decode_payload(&payload))
        .flatten()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "corrupt spool record"))?;
    Ok((message, (RECORD_HEADER + len) as u64))
}

fn decode_payload(mut p: &[u8]) -> Option<NatsMessage> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (p.get(..n)?, p.get(n..)?);
        *p = rest;
        Some(head)
    }
    fn str16(p: &mut &[u8]) -> Option<String> {
        let len = u16::from_le_bytes(take(p, 2)?.try_into().ok()?) as usize;
        String::from_utf8(take(p, len)?.to_vec()).ok()
    }
    let subject = str16(&mut p)?;
    let count = u16::from_le_bytes(take(&mut p, 2)?.try_into().ok()?);
    let mut headers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        headers.push((str16(&mut p)?, str16(&mut p)?));
    }
    let body_len = u32::from_le_bytes(take(&mut p, 4)?.try_into().ok()?) as usize;
    let payload = Bytes::copy_from_slice(take(&mut p, body_len)?);
    p.is_empty().then_some(NatsMessage {
        subject,
        headers,
        payload,
    })
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

    fn drain_all(spool: &Spool) -> Vec<NatsMessage> {
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

    #[test]
    fn messages_come_back_in_order_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            spool.append(&[message(0), message(1)]).unwrap();
            spool.append(&[message(2)]).unwrap();
            assert_eq!(spool.len(), 3);
            // Publish one, then "crash".
            let batch = spool.read(1).unwrap();
            assert_eq!(batch.messages, [message(0)]);
            spool.commit(&batch, 1).unwrap();
        }
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.len(), 2);
        spool.append(&[message(3)]).unwrap();
        assert_eq!(drain_all(&spool), [message(1), message(2), message(3)]);
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        // Consumed segments are deleted.
        let segments = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("seg".as_ref()))
            .count();
        assert_eq!(segments, 0);
    }

    #[test]
    fn a_torn_last_record_is_dropped_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            spool.append(&[message(0), message(1)]).unwrap();
        }
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension() == Some("seg".as_ref()))
            .unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        // Tear the second record: keep its header and half its payload.
        let file = OpenOptions::new().write(true).open(&seg).unwrap();
        file.set_len(len - 10).unwrap();

        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.len(), 1);
        assert_eq!(drain_all(&spool), [message(0)]);
    }

    #[test]
    fn a_corrupt_record_ends_the_readable_part() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            spool.append(&[message(0), message(1), message(2)]).unwrap();
        }
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension() == Some("seg".as_ref()))
            .unwrap();
        let mut data = fs::read(&seg).unwrap();
        let first_len = check_record(&data).unwrap();
        data[first_len + RECORD_HEADER + 3] ^= 0xff; // flip a byte in the second payload
        fs::write(&seg, &data).unwrap();

        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(drain_all(&spool), [message(0)]);
    }

    #[test]
    fn a_full_spool_refuses_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 200).unwrap();
        spool.append(&[message(0)]).unwrap();
        let before = spool.len();
        assert!(matches!(
            spool.append(&[message(1), message(2), message(3)]),
            Err(SpoolError::Full(200))
        ));
        assert_eq!(spool.len(), before);
    }

    #[test]
    fn partial_commits_keep_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool
            .append(&(0..5).map(message).collect::<Vec<_>>())
            .unwrap();
        let batch = spool.read(5).unwrap();
        spool.commit(&batch, 2).unwrap();
        assert_eq!(spool.len(), 3);
        assert_eq!(drain_all(&spool), [message(2), message(3), message(4)]);
    }
}
