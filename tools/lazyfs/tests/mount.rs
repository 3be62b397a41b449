//! lazyfs against a real mount: a backing and a mount directory in a temp dir, the binary
//! started as a child, commands sent on its control socket. Needs /dev/fuse (and root, or
//! Debian's fuse3 for fusermount3): without it these tests fail, saying so.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A lazyfs mounted for one test; unmounted (SIGTERM) on drop.
struct Mounted {
    dir: tempfile::TempDir,
    child: Child,
    control: BufReader<UnixStream>,
}

impl Mounted {
    fn start(strict_dirs: bool) -> Self {
        assert!(
            Path::new("/dev/fuse").exists(),
            "FUSE unavailable: /dev/fuse is missing, lazyfs cannot mount (these tests need it)"
        );
        let dir = tempfile::tempdir().unwrap();
        for d in ["backing", "mnt"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        let socket = dir.path().join("control.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lazyfs"));
        cmd.arg("--backing")
            .arg(dir.path().join("backing"))
            .arg("--mount")
            .arg(dir.path().join("mnt"))
            .arg("--control")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if strict_dirs {
            cmd.arg("--strict-dirs");
        }
        let mut child = cmd.spawn().expect("starting lazyfs");
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("FUSE unavailable: lazyfs exited ({status}) before mounting: {err}");
            }
            if let Ok(s) = UnixStream::connect(&socket) {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "lazyfs did not mount within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            dir,
            child,
            control: BufReader::new(stream),
        }
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mnt().join(name)
    }

    fn command(&mut self, line: &str) -> String {
        writeln!(self.control.get_mut(), "{line}").unwrap();
        let mut answer = String::new();
        self.control.read_line(&mut answer).unwrap();
        let answer = answer.trim_end().to_string();
        assert!(answer.starts_with("ok"), "{line} -> {answer}");
        answer
    }

    fn power_cut(&mut self) -> String {
        self.command("drop")
    }

    /// `fsyncdir` of a directory of the mount.
    fn sync_dir(&self, dir: &Path) {
        File::open(dir).unwrap().sync_all().unwrap();
    }

    /// Writes `content` to a new file and makes it durable (file and directory synced).
    fn durable_file(&self, name: &str, content: &[u8]) {
        let path = self.path(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(content).unwrap();
        f.sync_all().unwrap();
        self.sync_dir(path.parent().unwrap());
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn append(path: &Path, data: &[u8]) -> File {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(data).unwrap();
    f
}

#[test]
fn unsynced_writes_are_dropped_by_a_power_cut() {
    // Arrange
    let mut m = Mounted::start(false);
    m.durable_file("f", b"synced");
    append(&m.path("f"), b" and not synced");
    let mut f = OpenOptions::new().write(true).open(m.path("f")).unwrap();
    f.write_all(b"SY").unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"SYnced and not synced");
    // Act
    let answer = m.power_cut();
    // Assert
    assert_eq!(answer, "ok 2 writes dropped, 0 entry changes undone");
    assert_eq!(fs::read(m.path("f")).unwrap(), b"synced");
}

#[test]
fn fsynced_writes_survive_a_power_cut_and_later_ones_do_not() {
    let mut m = Mounted::start(false);
    m.durable_file("f", b"one");
    let f = append(&m.path("f"), b" two");
    f.sync_data().unwrap();
    append(&m.path("f"), b" three");
    m.power_cut();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"one two");
}

#[test]
fn an_unsynced_truncation_is_undone() {
    let mut m = Mounted::start(false);
    m.durable_file("f", b"0123456789");
    OpenOptions::new()
        .write(true)
        .open(m.path("f"))
        .unwrap()
        .set_len(3)
        .unwrap();
    assert_eq!(fs::metadata(m.path("f")).unwrap().len(), 3);
    m.power_cut();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"0123456789");
}

#[test]
fn a_new_file_needs_its_directory_synced_in_strict_mode() {
    let mut m = Mounted::start(true);
    fs::create_dir(m.path("d")).unwrap();
    m.sync_dir(&m.mnt());
    // Its own fsync is not enough.
    let mut f = File::create(m.path("d/fsynced")).unwrap();
    f.write_all(b"data").unwrap();
    f.sync_all().unwrap();
    // A sync of its directory is.
    let mut g = File::create(m.path("dir-synced")).unwrap();
    g.write_all(b"data").unwrap();
    g.sync_all().unwrap();
    m.sync_dir(&m.mnt());
    File::create(m.path("after")).unwrap();
    m.power_cut();
    assert!(m.path("d").is_dir());
    assert!(!m.path("d/fsynced").exists());
    assert!(!m.path("after").exists());
    assert_eq!(fs::read(m.path("dir-synced")).unwrap(), b"data");
}

#[test]
fn a_new_file_is_kept_after_its_own_fsync_by_default() {
    let mut m = Mounted::start(false);
    fs::create_dir(m.path("d")).unwrap();
    let mut f = File::create(m.path("d/fsynced")).unwrap();
    f.write_all(b"data").unwrap();
    f.sync_all().unwrap();
    File::create(m.path("d/not"))
        .unwrap()
        .write_all(b"x")
        .unwrap();
    File::create(m.path("gone")).unwrap();
    let answer = m.power_cut();
    assert_eq!(answer, "ok 1 writes dropped, 2 entry changes undone");
    assert_eq!(fs::read(m.path("d/fsynced")).unwrap(), b"data");
    assert!(!m.path("d/not").exists());
    assert!(!m.path("gone").exists());
}

#[test]
fn an_unsynced_mkdir_is_undone_with_what_it_holds() {
    let mut m = Mounted::start(true);
    fs::create_dir(m.path("d")).unwrap();
    m.durable_file("d/f", b"x");
    m.power_cut();
    assert!(!m.path("d").exists());
    let names: Vec<_> = fs::read_dir(m.mnt()).unwrap().collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn unlink_and_rename_are_undone_until_the_directory_is_synced() {
    // Arrange
    let mut m = Mounted::start(false);
    m.durable_file("a", b"A");
    m.durable_file("b", b"B");
    m.durable_file("c", b"C");
    m.durable_file("kept-unlink", b"K");
    fs::remove_file(m.path("kept-unlink")).unwrap();
    m.sync_dir(&m.mnt());
    // Act
    fs::remove_file(m.path("a")).unwrap();
    fs::rename(m.path("b"), m.path("b2")).unwrap();
    fs::rename(m.path("c"), m.path("b2")).unwrap(); // replaces b2
    assert_eq!(fs::read(m.path("b2")).unwrap(), b"C");
    let answer = m.power_cut();
    // Assert
    assert_eq!(answer, "ok 0 writes dropped, 3 entry changes undone");
    assert_eq!(fs::read(m.path("a")).unwrap(), b"A");
    assert_eq!(fs::read(m.path("b")).unwrap(), b"B");
    assert_eq!(fs::read(m.path("c")).unwrap(), b"C");
    assert!(!m.path("b2").exists());
    assert!(!m.path("kept-unlink").exists());
}

#[test]
fn a_torn_cut_keeps_a_strict_prefix_of_the_last_write() {
    let mut m = Mounted::start(false);
    let last: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let mut lengths = Vec::new();
    for seed in 0..8 {
        m.durable_file("f", b"base");
        append(&m.path("f"), &last);
        let answer = m.command(&format!("drop-tear {seed}"));
        assert_eq!(
            answer,
            "ok 1 writes dropped, 1 torn, 0 entry changes undone"
        );
        let got = fs::read(m.path("f")).unwrap();
        assert_eq!(&got[..4], b"base");
        let kept = &got[4..];
        assert!(
            kept.len() < last.len(),
            "seed {seed}: the whole write was kept"
        );
        assert_eq!(kept, &last[..kept.len()], "seed {seed}: not a prefix");
        lengths.push(kept.len());
    }
    lengths.dedup();
    assert!(lengths.len() > 1, "every seed tore at {lengths:?}");
}

#[test]
fn concurrent_files_each_keep_exactly_their_synced_prefix() {
    let mut m = Mounted::start(false);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let path = m.path(&format!("f{w}"));
            std::thread::spawn(move || {
                let mut f = File::create(&path).unwrap();
                let mut synced = Vec::new();
                let mut kept = Vec::new();
                for i in 0..500 {
                    let line = format!("writer {w} line {i}\n");
                    f.write_all(line.as_bytes()).unwrap();
                    synced.extend_from_slice(line.as_bytes());
                    if i == 299 {
                        f.sync_data().unwrap();
                        kept = synced.clone();
                    }
                }
                kept
            })
        })
        .collect();
    let expected: Vec<Vec<u8>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let stats = m.command("stats");
    assert_eq!(
        stats,
        format!(
            "ok files=4 writes={} bytes={} entries=0",
            4 * 200,
            stats_bytes()
        )
    );
    m.power_cut();
    for (w, expected) in expected.iter().enumerate() {
        let got = fs::read(m.path(&format!("f{w}"))).unwrap();
        assert_eq!(&got, expected, "writer {w}");
        assert!(got.ends_with(format!("writer {w} line 299\n").as_bytes()));
    }
}

/// The bytes each of the four writers wrote after its sync: lines 300..500.
fn stats_bytes() -> usize {
    (0..4)
        .map(|w| {
            (300..500)
                .map(|i| format!("writer {w} line {i}\n").len())
                .sum::<usize>()
        })
        .sum()
}
