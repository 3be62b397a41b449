//! [`LazyMount`]: the `lazyfs` test file system (tools/lazyfs) mounted over a directory a
//! process keeps its data in, with a power cut at the file-system level on command: what the
//! process never fsynced is gone, and only that (docs/testing-power-loss.md).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::WAIT;

/// `lazyfs` mounted at `mount`, its backing directory a temp dir of its own; unmounted on
/// drop (stop the processes that use it first).
pub struct LazyMount {
    pub mount: PathBuf,
    child: Child,
    control: BufReader<UnixStream>,
    /// The backing directory and the control socket; removed after the unmount.
    _dir: tempfile::TempDir,
}

/// The `lazyfs` binary: `LAZYFS_BIN`, else `target/<profile>/lazyfs` beside this test binary.
pub fn lazyfs_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("LAZYFS_BIN").filter(|b| !b.is_empty()) {
        return bin.into();
    }
    // This binary is target/<profile>/deps/api-<hash>.
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    profile.join("lazyfs")
}

impl LazyMount {
    /// Mounts lazyfs at `mount` (made if missing) and waits until its control socket answers.
    /// Panics, saying why, when the binary is missing or FUSE is unavailable.
    pub fn start(mount: &Path) -> LazyMount {
        let bin = lazyfs_bin();
        assert!(
            bin.exists(),
            "{} is missing: build it with `cargo build -p lazyfs` (scripts/test does)",
            bin.display()
        );
        assert!(
            Path::new("/dev/fuse").exists(),
            "FUSE unavailable: /dev/fuse is missing, lazyfs cannot mount"
        );
        std::fs::create_dir_all(mount).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        std::fs::create_dir(&backing).unwrap();
        let socket = dir.path().join("control.sock");
        let mut child = Command::new(&bin)
            .arg("--backing")
            .arg(&backing)
            .arg("--mount")
            .arg(mount)
            .arg("--control")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let deadline = Instant::now() + WAIT;
        let stream = loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut log = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut log);
                panic!("FUSE unavailable: lazyfs exited ({status}) before mounting: {log}");
            }
            if let Ok(stream) = UnixStream::connect(&socket) {
                break stream;
            }
            assert!(
                Instant::now() < deadline,
                "lazyfs did not mount within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Keep draining its log (one line per command) so it never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
            }
        });
        LazyMount {
            mount: mount.to_path_buf(),
            child,
            control: BufReader::new(stream),
            _dir: dir,
        }
    }

    /// Sends one control command and returns its answer, which must start with `ok`.
    pub fn command(&mut self, line: &str) -> String {
        writeln!(self.control.get_mut(), "{line}").unwrap();
        let mut answer = String::new();
        self.control.read_line(&mut answer).unwrap();
        let answer = answer.trim_end().to_owned();
        assert!(answer.starts_with("ok"), "lazyfs: {line} -> {answer}");
        answer
    }

    /// A power cut: every write and entry change not synced is dropped. Returns lazyfs's
    /// answer (`ok <n> writes dropped, <m> entry changes undone`).
    pub fn power_cut(&mut self) -> String {
        self.command("drop")
    }

    /// A power cut that tears the last unsynced write of each file (a prefix of it, its
    /// length drawn from `seed`) instead of dropping it whole.
    pub fn power_cut_torn(&mut self, seed: u64) -> String {
        self.command(&format!("drop-tear {seed}"))
    }

    /// What is not synced yet: `ok files=… writes=… bytes=… entries=…`.
    pub fn stats(&mut self) -> String {
        self.command("stats")
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}
