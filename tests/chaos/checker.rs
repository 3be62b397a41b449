//! The checker: from the history and the stream's final contents, every event of a batch
//! ever answered `200` must be stored exactly once, and no event stored twice; every mail
//! answered `200` must have its message, once, naming its attachments, and every one of its
//! objects intact in the bucket; availability is the share of batches (mails included)
//! answered `200` within 10 s of their first attempt, overall, with no fault active, and for
//! each fault kind active at the first attempt.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::client::History;
use crate::helpers::Stored;
use crate::nemesis::{Kind, Struck};

pub const STREAM: &str = "CMC_EVENTS";
/// The Inbound mails' object store (`inbound.bucket`).
pub const BUCKET: &str = "CMC_INBOUND";
const AVAILABLE_WITHIN_MS: u64 = 10_000;

pub struct Verdict {
    pub lines: Vec<String>,
    /// Events, mails' messages and mails' objects answered `200` and not stored (or, for a
    /// mail, stored without its attachments as sent).
    pub lost: usize,
    /// Events and mails' messages stored more than once.
    pub duplicated: usize,
    /// Mails answered `200`: none means the mails' check proved nothing.
    pub mails_answered: usize,
}

/// `intact`: the objects (by name) read whole from the bucket with the SHA-256 and size their
/// mail was sent with.
pub fn check(
    history: &History,
    stored: &Stored,
    intact: &HashSet<String>,
    struck: &[Struck],
) -> Verdict {
    let mut first: HashMap<u64, u64> = HashMap::new();
    let mut ok_at: HashMap<u64, u64> = HashMap::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for a in &history.attempts {
        first
            .entry(a.batch)
            .and_modify(|s| *s = (*s).min(a.start))
            .or_insert(a.start);
        *statuses.entry(a.status).or_default() += 1;
        if a.status == 200 {
            ok_at
                .entry(a.batch)
                .and_modify(|e| *e = (*e).min(a.end))
                .or_insert(a.end);
        }
    }
    let sent_events: usize = history.batches.iter().map(|b| b.keys.len()).sum();
    let mut answered_events = 0;
    let mut lost = Vec::new();
    for batch in &history.batches {
        if ok_at.contains_key(&batch.id) {
            answered_events += batch.keys.len();
            lost.extend(batch.keys.iter().filter(|k| !stored.keys.contains_key(*k)));
        }
    }
    let known: HashSet<&String> = history.batches.iter().flat_map(|b| &b.keys).collect();
    let unknown = stored.keys.keys().filter(|k| !known.contains(k)).count();
    let duplicated = stored
        .keys
        .values()
        .map(|n| n - 1)
        .sum::<usize>()
        .max(stored.messages - stored.ids.len());
    let mut lines = vec![
        format!(
            "batches sent {}  answered 200 {}  gave up {}",
            history.batches.len(),
            ok_at.len(),
            history.batches.len() - ok_at.len()
        ),
        format!(
            "attempts {}  by status {}",
            history.attempts.len(),
            statuses
                .iter()
                .map(|(s, n)| format!(
                    "{}={n}",
                    match *s {
                        0 => "no-connection".to_owned(),
                        1 => "timeout".to_owned(),
                        s => s.to_string(),
                    }
                ))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        format!(
            "events sent {sent_events}  answered 200 {answered_events}  stored {} (distinct {})  \
             lost {}  duplicated {duplicated}  unknown {unknown}",
            stored.messages - stored.mails.values().map(Vec::len).sum::<usize>(),
            stored.keys.len(),
            lost.len()
        ),
    ];
    if !lost.is_empty() {
        lines.push(format!("lost, e.g.: {:?}", &lost[..lost.len().min(5)]));
    }
    let mails = check_mails(history, &ok_at, stored, intact);
    lines.extend(mails.lines);
    // Availability, by what was active at a batch's first attempt.
    let mut by_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for batch in &history.batches {
        let Some(&start) = first.get(&batch.id) else {
            continue;
        };
        let available = ok_at
            .get(&batch.id)
            .is_some_and(|&ok| ok - start <= AVAILABLE_WITHIN_MS);
        let mut kinds: Vec<Kind> = struck
            .iter()
            .filter(|s| s.from_ms <= start && start < s.to_ms)
            .map(|s| s.kind)
            .collect();
        kinds.sort();
        kinds.dedup();
        let mut count = |name: String| {
            let e = by_kind.entry(name).or_default();
            e.0 += 1;
            e.1 += usize::from(available);
        };
        count("(overall)".into());
        if kinds.is_empty() {
            count("(no fault)".into());
        }
        for kind in kinds {
            count(kind.name().into());
        }
    }
    lines.push("availability (200 within 10 s of the first attempt), by fault active then:".into());
    for (name, (batches, available)) in &by_kind {
        lines.push(format!(
            "  {name:<18} {available:>6} / {batches:<6} {:>6.1} %",
            100.0 * *available as f64 / (*batches).max(1) as f64
        ));
    }
    Verdict {
        lines,
        lost: lost.len() + mails.lost,
        duplicated: duplicated + mails.duplicated,
        mails_answered: mails.mails_answered,
    }
}

/// The mails' part of the verdict: each mail answered `200` has its message, stored once,
/// naming the attachments it was sent with, and each of those objects is intact.
fn check_mails(
    history: &History,
    ok_at: &HashMap<u64, u64>,
    stored: &Stored,
    intact: &HashSet<String>,
) -> Verdict {
    let (mut sent, mut answered, mut objects) = (0, 0, 0);
    let (mut missing, mut wrong, mut broken) = (Vec::new(), Vec::new(), Vec::new());
    let mut known = HashSet::new();
    for batch in &history.batches {
        let Some(mail) = &batch.mail else {
            continue;
        };
        sent += 1;
        known.insert(&mail.subject);
        if !ok_at.contains_key(&batch.id) {
            continue;
        }
        answered += 1;
        objects += mail.attachments.len();
        let expected: Vec<(String, String, u64)> = mail
            .attachments
            .iter()
            .map(|a| (a.sha256.clone(), a.sha256.clone(), a.size))
            .collect();
        match stored.mails.get(&mail.subject) {
            None => missing.push(&mail.subject),
            Some(copies) if copies.iter().any(|m| m.attachments != expected) => {
                wrong.push(&mail.subject)
            }
            Some(_) => {}
        }
        broken.extend(
            mail.attachments
                .iter()
                .filter(|a| !intact.contains(&a.sha256))
                .map(|a| format!("{} of {}", a.sha256, mail.subject)),
        );
    }
    let stored_messages: usize = stored.mails.values().map(Vec::len).sum();
    let duplicated: usize = stored.mails.values().map(|m| m.len() - 1).sum();
    let unknown = stored.mails.keys().filter(|k| !known.contains(k)).count();
    let mut lines = vec![format!(
        "mails sent {sent}  answered 200 {answered}  messages stored {stored_messages}  \
         without a message {}  with wrong attachments {}  duplicated {duplicated}  \
         unknown {unknown}  objects expected {objects}  missing or damaged {}",
        missing.len(),
        wrong.len(),
        broken.len()
    )];
    if !missing.is_empty() {
        lines.push(format!(
            "mails without a message, e.g.: {:?}",
            &missing[..missing.len().min(5)]
        ));
    }
    if !wrong.is_empty() {
        lines.push(format!(
            "mails with wrong attachments, e.g.: {:?}",
            &wrong[..wrong.len().min(5)]
        ));
    }
    if !broken.is_empty() {
        lines.push(format!(
            "objects missing or damaged, e.g.: {:?}",
            &broken[..broken.len().min(5)]
        ));
    }
    Verdict {
        lines,
        lost: missing.len() + wrong.len() + broken.len(),
        duplicated,
        mails_answered: answered,
    }
}
