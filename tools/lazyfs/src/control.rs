//! The control socket: one command a line, one answer a line, each answered only once done.
//! Owns the protocol; the power cut itself is `State::cut`.
//!
//! ```text
//! drop              -> ok <n> writes dropped, <m> entry changes undone
//! drop-tear <seed>  -> ok <n> writes dropped, <t> torn, <m> entry changes undone
//! stats             -> ok files=<f> writes=<w> bytes=<b> entries=<e>   (unsynced)
//! entries           -> ok <e>: <change>; <change>…   (the unsynced entry changes, oldest first)
//! sync-all          -> ok
//! anything else     -> err <why>
//! ```

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use fuser::{INodeNo, Notifier};

use crate::state::State;

/// Answers one command line.
pub fn answer(state: &State, notifier: Option<&Notifier>, line: &str) -> String {
    let mut words = line.split_whitespace();
    let command = words.next().unwrap_or("");
    let argument = words.next();
    if words.next().is_some() {
        return format!("err too many arguments to {command:?}");
    }
    match (command, argument) {
        ("drop", None) => {
            let cut = state.cut(None);
            forget(notifier, &cut.touched);
            format!(
                "ok {} writes dropped, {} entry changes undone{}",
                cut.writes,
                cut.entries,
                failures(cut.failures)
            )
        }
        ("drop-tear", Some(seed)) => {
            let Ok(seed) = seed.parse::<u64>() else {
                return format!("err seed {seed:?} is not a number");
            };
            let cut = state.cut(Some(seed));
            forget(notifier, &cut.touched);
            format!(
                "ok {} writes dropped, {} torn, {} entry changes undone{}",
                cut.writes,
                cut.torn,
                cut.entries,
                failures(cut.failures)
            )
        }
        ("stats", None) => {
            let s = state.stats();
            format!(
                "ok files={} writes={} bytes={} entries={}",
                s.files, s.writes, s.bytes, s.entries
            )
        }
        ("entries", None) => {
            let journal = state.journal();
            format!("ok {}: {}", journal.len(), journal.join("; "))
        }
        ("sync-all", None) => {
            state.sync_all();
            "ok".to_string()
        }
        _ => format!(
            "err unknown command {line:?} (drop, drop-tear <seed>, stats, entries, sync-all)"
        ),
    }
}

fn failures(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(", {n} undo steps failed")
    }
}

/// Tells the kernel to forget what it knew of the inodes a cut changed. Called with no lock
/// held: the kernel may wait for requests that wait for our locks.
fn forget(notifier: Option<&Notifier>, inos: &[u64]) {
    if let Some(n) = notifier {
        for ino in inos {
            // Unknown to the kernel is fine: it has nothing to forget.
            let _ = n.inval_inode(INodeNo(*ino), 0, 0);
        }
    }
}

/// Serves the socket until the process ends, one connection at a time.
pub fn serve(listener: UnixListener, state: Arc<State>, notifier: Option<Notifier>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(e) = session(stream, &state, notifier.as_ref()) {
                    eprintln!("lazyfs: control connection: {e}");
                }
            }
            Err(e) => eprintln!("lazyfs: control socket: {e}"),
        }
    }
}

fn session(stream: UnixStream, state: &State, notifier: Option<&Notifier>) -> io::Result<()> {
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = answer(state, notifier, line.trim());
        eprintln!("lazyfs: {} -> {reply}", line.trim());
        writeln!(out, "{reply}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_answered_on_one_line_and_unknown_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path(), false).unwrap();
        assert_eq!(
            answer(&state, None, "stats"),
            "ok files=0 writes=0 bytes=0 entries=0"
        );
        assert_eq!(
            answer(&state, None, "drop"),
            "ok 0 writes dropped, 0 entry changes undone"
        );
        assert_eq!(
            answer(&state, None, "drop-tear 5"),
            "ok 0 writes dropped, 0 torn, 0 entry changes undone"
        );
        assert_eq!(answer(&state, None, "sync-all"), "ok");
        assert!(answer(&state, None, "drop-tear x").starts_with("err "));
        assert!(answer(&state, None, "reboot").starts_with("err "));
    }
}
