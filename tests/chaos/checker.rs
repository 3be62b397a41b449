//! The checker: from the history and the stream's final contents, every event of a batch
//! ever answered `200` must be stored exactly once, and no event stored twice; availability is
//! the share of batches answered `200` within 10 s of their first attempt, overall, with no
//! fault active, and for each fault kind active at the first attempt.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::client::History;
use crate::helpers::Stored;
use crate::nemesis::{Kind, Struck};

pub const STREAM: &str = "CMC_EVENTS";
const AVAILABLE_WITHIN_MS: u64 = 10_000;

pub struct Verdict {
    pub lines: Vec<String>,
    pub lost: usize,
    pub duplicated: usize,
}

pub fn check(history: &History, stored: &Stored, struck: &[Struck]) -> Verdict {
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
            stored.messages,
            stored.keys.len(),
            lost.len()
        ),
    ];
    if !lost.is_empty() {
        lines.push(format!("lost, e.g.: {:?}", &lost[..lost.len().min(5)]));
    }
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
        lost: lost.len(),
        duplicated,
    }
}
