//! The FUSE side: each request of the kernel becomes a call on the backing directory, or on
//! `State` for everything a power cut must be able to take back (writes, truncations, entry
//! changes, syncs). Owns the open handles; owns no durability rule.
//!
//! Attributes and entries are given with a time-to-live of zero and files are opened with
//! `FOPEN_DIRECT_IO`, so the kernel keeps no copy of what a cut may change behind its back.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

use crate::state::{State, GRAVES, ROOT};

/// Nothing is cached by the kernel: a cut changes files behind its back.
const TTL: Duration = Duration::ZERO;

/// The largest write request the kernel sends (it caps this at its own page limit).
const MAX_WRITE: u32 = 1024 * 1024;

/// A directory listing, taken at `opendir`: `(inode, kind, name)`.
type Listing = Vec<(u64, FileType, OsString)>;

pub struct LazyFs {
    state: Arc<State>,
    /// Open files, by handle number, and whether they were opened `O_SYNC`/`O_DSYNC` (each
    /// write through them is synced).
    files: Mutex<HashMap<u64, (Arc<File>, bool)>>,
    /// Open directories' listings, by handle number.
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    /// The next handle number.
    next_fh: AtomicU64,
}

impl LazyFs {
    pub fn new(state: Arc<State>) -> Self {
        Self {
            state,
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.handle_sync(fh).map(|(file, _)| file)
    }

    fn handle_sync(&self, fh: FileHandle) -> Result<(Arc<File>, bool), Errno> {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn add_handle(&self, file: File, flags: i32) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        // O_SYNC includes O_DSYNC's bit.
        let sync = flags & nix::libc::O_DSYNC != 0;
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, (Arc::new(file), sync));
        fh
    }

    fn attr(&self, md: &fs::Metadata) -> FileAttr {
        attr(self.state.ino(md), md)
    }

    /// The attributes of `ino`, from its open handle if there is one (it may have no name).
    fn getattr_of(&self, ino: u64, fh: Option<FileHandle>) -> io::Result<FileAttr> {
        if let Some(file) = fh.and_then(|fh| self.handle(fh).ok()) {
            let md = file.metadata()?;
            return Ok(attr(ino, &md));
        }
        let path = self.state.path(ino).ok_or_else(|| errno(Errno::ESTALE))?;
        let md = fs::symlink_metadata(path)?;
        Ok(attr(ino, &md))
    }
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.code())
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

fn kind(ft: fs::FileType) -> FileType {
    FileType::from_std(ft).unwrap_or(FileType::RegularFile)
}

fn attr(ino: u64, md: &fs::Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: md.len(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind(md.file_type()),
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: md.blksize() as u32,
        flags: 0,
    }
}

fn timespec(t: Option<TimeOrNow>) -> nix::sys::time::TimeSpec {
    use nix::sys::time::TimeSpec;
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            TimeSpec::from_duration(d)
        }
    }
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // The kernel keeps its own lower limit when ours is above it.
        let _ = config.set_max_write(MAX_WRITE);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self.state.child(parent.0, name).and_then(|path| {
            let md = fs::symlink_metadata(&path)?;
            let attr = self.attr(&md);
            self.state.remember(attr.ino.0, &path);
            Ok(attr)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e.into()),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_of(ino.0, fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e.into()),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| -> io::Result<FileAttr> {
            let handle = fh.and_then(|fh| self.handle(fh).ok());
            let path = self.state.path(ino.0);
            if let Some(len) = size {
                self.state.truncate(ino.0, handle.as_deref(), len)?;
            }
            if mode.is_some()
                || uid.is_some()
                || gid.is_some()
                || atime.is_some()
                || mtime.is_some()
            {
                let path = path.as_ref().ok_or_else(|| errno(Errno::ESTALE))?;
                if let Some(mode) = mode {
                    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))?;
                }
                if uid.is_some() || gid.is_some() {
                    std::os::unix::fs::lchown(path, uid, gid)?;
                }
                if atime.is_some() || mtime.is_some() {
                    nix::sys::stat::utimensat(
                        nix::fcntl::AT_FDCWD,
                        path.as_path(),
                        &timespec(atime),
                        &timespec(mtime),
                        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                    )
                    .map_err(io::Error::from)?;
                }
            }
            self.getattr_of(ino.0, fh)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e.into()),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.state.mkdir(parent.0, name, mode & !umask & 0o7777) {
            Ok((md, _)) => reply.entry(&TTL, &self.attr(&md), Generation(0)),
            Err(e) => reply.error(e.into()),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state.remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state.remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self
            .state
            .rename(parent.0, name, newparent.0, newname, noreplace)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = (|| -> io::Result<u64> {
            let path = self.state.path(ino.0).ok_or_else(|| errno(Errno::ESTALE))?;
            // A writer's descriptor can also read: the undo log copies overwritten bytes
            // through it.
            let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
            let file = OpenOptions::new().read(true).write(write).open(path)?;
            Ok(self.add_handle(file, flags.0))
        })();
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e.into()),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let exclusive = flags & nix::libc::O_EXCL != 0;
        let result = self
            .state
            .create(parent.0, name, mode & !umask & 0o7777, exclusive)
            .and_then(|(file, _, _)| {
                let md = file.metadata()?;
                Ok((self.attr(&md), self.add_handle(file, flags)))
            });
        match result {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e.into()),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let file = match self.handle(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(e.into()),
            }
        }
        reply.data(&buf[..filled]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self
            .handle_sync(fh)
            .map_err(errno)
            .and_then(|(file, sync)| {
                self.state.write(ino.0, &file, offset, data)?;
                if sync {
                    self.state.fsync(ino.0);
                }
                Ok(())
            });
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e.into()),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // No real fsync of the backing file: what lazyfs promises is the view through the
        // mount, and a test's speed should not depend on the disk under it.
        self.state.fsync(ino.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = (|| -> io::Result<u64> {
            let path = self.state.path(ino.0).ok_or_else(|| errno(Errno::ESTALE))?;
            let mut listing: Listing = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ROOT, FileType::Directory, "..".into()),
            ];
            for entry in fs::read_dir(&path)? {
                let entry = entry?;
                let name = entry.file_name();
                if ino.0 == ROOT && name == GRAVES {
                    continue;
                }
                let md = match entry.metadata() {
                    Ok(md) => md,
                    Err(_) => continue,
                };
                listing.push((self.state.ino(&md), kind(md.file_type()), name));
            }
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            self.dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(fh, Arc::new(listing));
            Ok(fh)
        })();
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e.into()),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listing = self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned();
        let Some(listing) = listing else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.state.fsyncdir(ino.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let Some(root) = self.state.path(ROOT) else {
            return reply.error(Errno::ESTALE);
        };
        match nix::sys::statvfs::statvfs(&root) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}
