//! `lazyfs`: a FUSE pass-through file system for tests that forgets, on command, everything
//! that was not synced — a power cut at the file-system level, in the style of Jepsen's LazyFS.
//!
//! ```text
//! lazyfs --backing DIR --mount MNT --control SOCKET [--strict-dirs]
//! ```
//!
//! Reads and writes go through to `DIR` at once; what a power cut must take back is kept in
//! memory until the file's `fsync`/`fdatasync` (contents) or the parent's `fsyncdir` (entries;
//! by default a file's own fsync also makes the entry that created it durable, as on ext4;
//! `--strict-dirs` requires the directory sync). `drop` on the control socket undoes the
//! rest; `drop-tear <seed>` keeps a prefix of each file's last unsynced write. SIGTERM or
//! SIGINT unmounts and exits; what was unsynced then stays (the run was not a power cut).
//! See docs/testing-power-loss.md.
//!
//! # Layout
//!
//! - `main.rs`: arguments, mount, signals, the control thread; wiring only.
//! - `fs.rs`: the FUSE requests, passed through to the backing directory or to `State`.
//! - `state.rs`: what is synced and what is not; the power cut.
//! - `control.rs`: the control socket's line protocol.

#![forbid(unsafe_code)]

mod control;
mod fs;
mod state;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use fuser::{Config, MountOption, Session};
use nix::sys::signal::{SigSet, Signal};

use crate::fs::LazyFs;
use crate::state::State;

struct Args {
    backing: PathBuf,
    mount: PathBuf,
    control: PathBuf,
    strict_dirs: bool,
}

const USAGE: &str = "usage: lazyfs --backing DIR --mount MNT --control SOCKET [--strict-dirs]";

fn parse_args() -> Result<Args, String> {
    let (mut backing, mut mount, mut control, mut strict_dirs) = (None, None, None, false);
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.to_str() {
            Some("--backing") => backing = Some(value("--backing")?),
            Some("--mount") => mount = Some(value("--mount")?),
            Some("--control") => control = Some(value("--control")?),
            Some("--strict-dirs") => strict_dirs = true,
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    match (backing, mount, control) {
        (Some(backing), Some(mount), Some(control)) => Ok(Args {
            backing,
            mount,
            control,
            strict_dirs,
        }),
        _ => Err("--backing, --mount and --control are required".into()),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("lazyfs: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazyfs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    // Blocked here, before any thread starts, so that only the signal thread receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;

    let state = Arc::new(
        State::open(&args.backing, args.strict_dirs)
            .map_err(|e| format!("backing directory {}: {e}", args.backing.display()))?,
    );
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("lazyfs".into()),
        MountOption::Subtype("lazyfs".into()),
    ];
    // nats-server appends from several goroutines; two cores here.
    config.n_threads = Some(4);
    config.clone_fd = true;
    let mut session =
        Session::new(LazyFs::new(state.clone()), &args.mount, &config).map_err(|e| {
            format!(
                "mounting at {} (is /dev/fuse there, and are we root or is fuse3 installed?): {e}",
                args.mount.display()
            )
        })?;
    let mut unmounter = session.unmount_callable();
    let notifier = session.notifier();

    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control)
        .map_err(|e| format!("control socket {}: {e}", args.control.display()))?;
    {
        let state = state.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control::serve(listener, state, Some(notifier)))
            .map_err(|e| format!("control thread: {e}"))?;
    }
    let mount = args.mount.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                eprintln!("lazyfs: {signal}: unmounting {}", mount.display());
            }
            if let Err(e) = unmounter.unmount() {
                // Busy (a process still has files open): detach it; the kernel finishes the
                // unmount when the last one closes.
                eprintln!("lazyfs: unmount: {e}; detaching");
                let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
            }
        })
        .map_err(|e| format!("signal thread: {e}"))?;
    eprintln!(
        "lazyfs: {} mounted at {}, control {}{}",
        args.backing.display(),
        args.mount.display(),
        args.control.display(),
        if args.strict_dirs {
            ", strict dirs"
        } else {
            ""
        }
    );
    let served = session.run();
    let _ = std::fs::remove_file(&args.control);
    // A clean exit is no power cut: the entries waiting in the graveyard go.
    state.sync_all();
    served.map_err(|e| format!("serving: {e}"))
}
