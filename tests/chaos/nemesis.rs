//! The nemesis: a schedule of overlapping faults drawn from the seed before the run begins
//! (printed, so a run can be compared with its replay), and the executor that applies it to
//! the real processes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::helpers::{NatsServer, Service, GRACE};
use crate::proxy::Proxy;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// SIGKILL of a forwarder (its host losing power: the spool's own crash safety is
    /// proven by the spool's storage tests); restarted at the end of the fault.
    KillForwarder,
    /// SIGTERM of a forwarder under load: it must exit 0 within its grace; restarted later.
    TermForwarder,
    /// The forwarder's proxy to NATS black-holed.
    Blackhole,
    /// The forwarder's spool volume (a tmpfs of its own) filled up.
    DiskFull,
    /// SIGKILL of a NATS node, restarted at the end.
    KillNode,
    /// SIGSTOP of a NATS node, SIGCONT at the end.
    PauseNode,
    /// Power loss of one node: its store copied at the start (its last sync), SIGKILL at the
    /// end, the copy put back, restarted.
    PowerNode,
    /// The same for the three nodes at once.
    PowerAll,
}

pub const ALL: [Kind; 8] = [
    Kind::KillForwarder,
    Kind::TermForwarder,
    Kind::Blackhole,
    Kind::DiskFull,
    Kind::KillNode,
    Kind::PauseNode,
    Kind::PowerNode,
    Kind::PowerAll,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillForwarder => "kill-forwarder",
            Kind::TermForwarder => "sigterm-forwarder",
            Kind::Blackhole => "blackhole",
            Kind::DiskFull => "disk-full",
            Kind::KillNode => "kill-node",
            Kind::PauseNode => "pause-node",
            Kind::PowerNode => "power-node",
            Kind::PowerAll => "power-all",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn is_power_loss(self) -> bool {
        matches!(self, Kind::PowerNode | Kind::PowerAll)
    }

    /// What a fault of this kind holds exclusively: forwarder `i` (0, 1), its proxy (2, 3),
    /// its disk (4, 5), node `j` (6, 7, 8).
    fn resources(self, target: usize) -> Vec<usize> {
        match self {
            Kind::KillForwarder | Kind::TermForwarder => vec![target],
            Kind::Blackhole => vec![2 + target],
            Kind::DiskFull => vec![4 + target],
            Kind::KillNode | Kind::PauseNode | Kind::PowerNode => vec![6 + target],
            Kind::PowerAll => vec![6, 7, 8],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: Kind,
    /// The forwarder (0, 1) or node (0..3) struck; unused by `PowerAll`.
    pub target: usize,
    pub at: Duration,
    pub len: Duration,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = match self.kind {
            Kind::PowerAll => "n1,n2,n3".to_owned(),
            Kind::KillNode | Kind::PauseNode | Kind::PowerNode => format!("n{}", self.target + 1),
            _ => format!("f{}", self.target + 1),
        };
        write!(
            f,
            "{:>7.1}s +{:>4.1}s {} {target}",
            self.at.as_secs_f64(),
            self.len.as_secs_f64(),
            self.kind.name()
        )
    }
}

/// The faults of a campaign whose faults all end by `active`: one every 1–4 s, each lasting
/// 2–10 s (SIGTERM: long enough for the grace period), so that they overlap; a fault whose
/// target is still struck (or recovering, 2 s) is skipped.
pub fn schedule(seed: u64, active: Duration, kinds: &[Kind]) -> Vec<Fault> {
    let mut rng = Rng::new(seed ^ 0x4E4E_4D45_5349_5321);
    let mut busy_until = [Duration::ZERO; 9];
    let mut faults = Vec::new();
    let mut t = Duration::from_secs(3);
    if kinds.is_empty() {
        return faults;
    }
    loop {
        t += Duration::from_millis(rng.range(1000, 4000));
        let kind = *rng.pick(kinds);
        let target = match kind {
            Kind::KillNode | Kind::PauseNode | Kind::PowerNode => rng.below(3) as usize,
            Kind::PowerAll => 0,
            _ => rng.below(2) as usize,
        };
        let len = match kind {
            Kind::TermForwarder => Duration::from_millis(rng.range(10_000, 14_000)),
            Kind::PowerAll => Duration::from_millis(rng.range(2_000, 6_000)),
            _ => Duration::from_millis(rng.range(2_000, 10_000)),
        };
        if t >= active {
            return faults;
        }
        if t + len > active {
            continue;
        }
        let held = kind.resources(target);
        if held.iter().any(|&r| busy_until[r] > t) {
            continue;
        }
        for r in held {
            busy_until[r] = t + len + Duration::from_secs(2);
        }
        faults.push(Fault {
            kind,
            target,
            at: t,
            len,
        });
    }
}

/// Everything the nemesis strikes.
pub struct World {
    pub nodes: Vec<NatsServer>,
    pub proxies: Vec<Proxy>,
    pub forwarders: Vec<Forwarder>,
    pub targets: crate::client::Targets,
    /// Where power-loss copies of the stores are kept.
    pub scratch: PathBuf,
    /// Anything that broke a promise other than loss or duplication (a SIGTERM not ending in
    /// exit 0 within the grace, a forwarder exiting by itself).
    pub anomalies: Vec<String>,
}

/// `spool.max_bytes` of each forwarder: half its volume (`VOLUME_MIB`, 48 MiB), as the README
/// tells an operator to size it. What the forwarder takes in is refused with `503` past it; a
/// drain copies what it publishes into the retained log before the spool's segment is
/// deleted, and keeps it `spool.retain`, so the volume needs room for up to twice as much.
/// Only the disk-full fault fills the volume itself.
const SPOOL_MAX_BYTES: &str = "20971520";

pub struct Forwarder {
    pub service: Option<Service>,
    /// The root of its spool volume; the spool is `volume/spool`.
    pub volume: PathBuf,
    /// Whether `volume` is a tmpfs of its own (the disk-full fault needs it).
    pub own_volume: bool,
    pub log: PathBuf,
    pub proxy_url: String,
}

impl Forwarder {
    pub fn spool(&self) -> PathBuf {
        self.volume.join("spool")
    }

    /// Starts the forwarder and waits until both its listeners accept connections. Ports
    /// found free can be taken by another socket before the forwarder binds them (it then
    /// exits: "Address already in use"): that is the harness's race, so it starts again on
    /// other ports.
    pub fn start(&mut self) -> String {
        for _ in 0..5 {
            let mut service = Service::start_with(
                &self.proxy_url,
                &self.spool(),
                &self.log,
                &[
                    ("NATS__STREAM__REPLICAS", "3"),
                    ("SPOOL__MAX_BYTES", SPOOL_MAX_BYTES),
                    // As the production configuration: room beyond spool.retain (2 m) for the
                    // outage and the replay's own time (README, "What 200 means").
                    ("NATS__STREAM__DUPLICATE_WINDOW", "10m"),
                ],
            );
            if listening(&mut service) {
                let url = service.webhook_url();
                self.service = Some(service);
                return url;
            }
            eprintln!("chaos: a forwarder's port was taken before it bound it; starting it again on others");
        }
        panic!("a forwarder could not start: {}", self.log.display());
    }

    fn filler(&self) -> PathBuf {
        self.volume.join("filler")
    }
}

/// Whether `service` listens on both its ports; false when it exited because one was taken.
fn listening(service: &mut Service) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    let up = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    while Instant::now() < deadline {
        if up(service.port) && up(service.admin_port) {
            return true;
        }
        if service.child.try_wait().unwrap().is_some() {
            let tail = service.log_tail();
            let last = tail.lines().last().unwrap_or_default();
            assert!(
                last.contains("Address already in use"),
                "a forwarder exited at start-up:\n{tail}"
            );
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "a forwarder did not listen within 10 s:\n{}",
        service.log_tail()
    );
}

/// A fault as it happened: for the availability figures.
#[derive(Debug, Clone)]
pub struct Struck {
    pub kind: Kind,
    pub from_ms: u64,
    pub to_ms: u64,
}

impl World {
    /// Applies `faults` from `epoch` on; returns when the last one has ended.
    pub async fn run(&mut self, faults: &[Fault], epoch: Instant) -> Vec<Struck> {
        let mut actions: Vec<(Duration, bool, usize)> = Vec::new();
        for (i, f) in faults.iter().enumerate() {
            actions.push((f.at, true, i));
            actions.push((f.at + f.len, false, i));
        }
        // Ends before starts at the same instant: a target is freed before it is struck again.
        actions.sort_by_key(|&(at, start, i)| (at, start, i));
        let mut started = vec![0u64; faults.len()];
        let mut struck = Vec::new();
        for (at, start, i) in actions {
            tokio::time::sleep_until((epoch + at).into()).await;
            let fault = &faults[i];
            let now = epoch.elapsed().as_millis() as u64;
            println!(
                "[{:>7.1}s] {} {}",
                now as f64 / 1000.0,
                if start { "start" } else { "end  " },
                fault
            );
            if start {
                started[i] = now;
                self.strike(fault).await;
            } else {
                self.heal(fault).await;
                struck.push(Struck {
                    kind: fault.kind,
                    from_ms: started[i],
                    to_ms: epoch.elapsed().as_millis() as u64,
                });
            }
        }
        struck
    }

    async fn strike(&mut self, fault: &Fault) {
        let t = fault.target;
        match fault.kind {
            Kind::KillForwarder => {
                self.check_alive(t);
                if let Some(mut service) = self.forwarders[t].service.take() {
                    let _ = service.child.kill();
                    let _ = service.child.wait();
                }
            }
            Kind::TermForwarder => {
                self.check_alive(t);
                if let Some(service) = &self.forwarders[t].service {
                    service.signal("-TERM");
                }
            }
            Kind::Blackhole => self.proxies[t].set_blackholed(true),
            Kind::DiskFull => fill(&self.forwarders[t].filler()),
            Kind::KillNode => self.nodes[t].stop(),
            Kind::PauseNode => signal(self.nodes[t].pid(), "-STOP"),
            Kind::PowerNode => self.last_sync(&[t]),
            Kind::PowerAll => self.last_sync(&[0, 1, 2]),
        }
    }

    async fn heal(&mut self, fault: &Fault) {
        let t = fault.target;
        match fault.kind {
            Kind::KillForwarder => self.restart_forwarder(t),
            Kind::TermForwarder => {
                if let Some(mut service) = self.forwarders[t].service.take() {
                    match service.child.try_wait().unwrap() {
                        Some(status) if status.success() => {}
                        Some(status) => self.anomalies.push(format!(
                            "f{}: exit status {status} after SIGTERM:\n{}",
                            t + 1,
                            service.log_tail()
                        )),
                        None => {
                            self.anomalies.push(format!(
                                "f{}: still running {:?} after SIGTERM (grace {GRACE:?})",
                                t + 1,
                                fault.len
                            ));
                            let _ = service.child.kill();
                            let _ = service.child.wait();
                        }
                    }
                }
                self.restart_forwarder(t);
            }
            Kind::Blackhole => self.proxies[t].set_blackholed(false),
            Kind::DiskFull => {
                let _ = std::fs::remove_file(self.forwarders[t].filler());
            }
            Kind::KillNode => launch(&mut self.nodes[t]),
            Kind::PauseNode => signal(self.nodes[t].pid(), "-CONT"),
            Kind::PowerNode => self.power_cut(&[t]),
            Kind::PowerAll => self.power_cut(&[0, 1, 2]),
        }
    }

    /// A forwarder that exited on its own is an anomaly: it is noted and started again. One
    /// that could not listen on the ports the harness chose for it (found free, then taken by
    /// another socket before it bound them) is the harness's race, not the forwarder's: it is
    /// started again on other ports, and only said.
    fn check_alive(&mut self, t: usize) {
        let exited = match &mut self.forwarders[t].service {
            Some(service) => service.child.try_wait().unwrap(),
            None => return,
        };
        if let Some(status) = exited {
            let tail = self.forwarders[t].service.as_ref().unwrap().log_tail();
            let last = tail.lines().last().unwrap_or_default();
            if last.contains("cannot start") && last.contains("Address already in use") {
                eprintln!(
                    "chaos: f{}: its port was taken before it bound it; started again on others",
                    t + 1
                );
            } else {
                self.anomalies
                    .push(format!("f{}: exited by itself ({status}):\n{tail}", t + 1));
            }
            self.restart_forwarder(t);
        }
    }

    fn restart_forwarder(&mut self, t: usize) {
        let url = self.forwarders[t].start();
        self.targets.lock().unwrap()[t] = url;
    }

    /// The store of each node as it is now, taken while the node is paused: what a power cut
    /// later will leave.
    fn last_sync(&mut self, nodes: &[usize]) {
        for &n in nodes {
            signal(self.nodes[n].pid(), "-STOP");
        }
        for &n in nodes {
            let copy = self.scratch.join(format!("last-sync-n{}", n + 1));
            let _ = std::fs::remove_dir_all(&copy);
            copy_dir(&self.nodes[n].dir().join("jetstream"), &copy);
        }
        for &n in nodes {
            signal(self.nodes[n].pid(), "-CONT");
        }
    }

    /// The power cut: SIGKILL, every write since the last sync dropped, restart.
    fn power_cut(&mut self, nodes: &[usize]) {
        for &n in nodes {
            self.nodes[n].stop();
        }
        for &n in nodes {
            let store = self.nodes[n].dir().join("jetstream");
            let copy = self.scratch.join(format!("last-sync-n{}", n + 1));
            std::fs::remove_dir_all(&store).unwrap();
            std::fs::rename(&copy, &store).unwrap();
        }
        for &n in nodes {
            launch(&mut self.nodes[n]);
        }
    }

    /// Ends whatever may still be wrong before the final checks: every node running and
    /// resumed, no proxy black-holed, no filler, both forwarders running.
    pub fn heal_all(&mut self) {
        for node in &mut self.nodes {
            // SIGCONT to a running process is harmless.
            signal(node.pid(), "-CONT");
        }
        for proxy in &self.proxies {
            proxy.set_blackholed(false);
        }
        for t in 0..self.forwarders.len() {
            let _ = std::fs::remove_file(self.forwarders[t].filler());
            self.check_alive(t);
            if self.forwarders[t].service.is_none() {
                self.restart_forwarder(t);
            }
        }
    }
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// Starts a node again on its port; a port taken meanwhile by another process is retried.
fn launch(node: &mut NatsServer) {
    let mut last = String::new();
    for _ in 0..5 {
        match tokio::task::block_in_place(|| node.try_launch()) {
            Ok(()) => return,
            Err(log) => last = log,
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("node {:?} did not restart:\n{last}", node.name);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    for entry in entries {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Writes `path` until its file system has no space left.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 1 << 20];
    while file.write_all(&chunk).is_ok() {}
    // The last partial chunk: fill what is left to the byte.
    let mut byte = [0u8; 4096];
    while file.write_all(&byte[..]).is_ok() {}
    byte[0] = 1;
    while file.write_all(&byte[..1]).is_ok() {}
    let _ = file.sync_all();
}
