//! Reputation: named allow/block lists of prefixes, and event counters for
//! self-learned scores (DESIGN.md, layer 2).
//!
//! Each list is stored flattened: nested prefixes become disjoint intervals,
//! each carrying its most specific prefix, so one "lower than or equal" seek
//! per list answers a longest-prefix match. (A single seek over nested
//! prefixes as stored gives wrong answers: the nearest lower key may be a
//! small prefix that ended before the address while a larger one covers it.)
//! Loading a list writes it under a fresh list id with LMDB's append mode and
//! drops the old id's rows in the same transaction: readers see the old list
//! or the new one, never half.

use crate::addr::{self, Prefix};
use crate::error::{shown, Result, StoreError};
use crate::recon::Sweep;
use crate::store::{be_u128, be_u32, be_u64, plock, Core};
use heed::{PutFlags, RoTxn, RwTxn};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Allow,
    Block,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind> {
        match s {
            "allow" => Ok(Kind::Allow),
            "block" => Ok(Kind::Block),
            _ => Err(StoreError::invalid(format!(
                "invalid list kind {} (want allow or block)",
                shown(s)
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Allow => "allow",
            Kind::Block => "block",
        }
    }
}

pub const ACTIONS: [&str; 5] = ["accept", "tag", "quarantine", "defer", "reject"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListInfo {
    pub id: u32,
    pub name: String,
    pub kind: Kind,
    pub action: String,
    pub score: i32,
    pub prefixes: u64,
    pub intervals: u64,
    pub loaded_at: u64,
}

impl ListInfo {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(33 + self.action.len());
        v.extend_from_slice(&self.id.to_be_bytes());
        v.push(matches!(self.kind, Kind::Block) as u8);
        v.extend_from_slice(&self.score.to_be_bytes());
        v.extend_from_slice(&self.prefixes.to_be_bytes());
        v.extend_from_slice(&self.intervals.to_be_bytes());
        v.extend_from_slice(&self.loaded_at.to_be_bytes());
        v.extend_from_slice(self.action.as_bytes());
        v
    }
    fn decode(name: &[u8], v: &[u8]) -> ListInfo {
        ListInfo {
            id: be_u32(v, 0),
            name: String::from_utf8_lossy(name).into_owned(),
            kind: if v.get(4) == Some(&1) {
                Kind::Block
            } else {
                Kind::Allow
            },
            score: be_u32(v, 5) as i32,
            prefixes: be_u64(v, 9),
            intervals: be_u64(v, 17),
            loaded_at: be_u64(v, 25),
            action: String::from_utf8_lossy(v.get(33..).unwrap_or_default()).into_owned(),
        }
    }
}

/// The list directory, cached per process: checked against the generation
/// counter in `meta` once per snapshot, re-read when it moved (another
/// process may load a list).
#[derive(Default)]
pub(crate) struct DirCache {
    gen: Option<u64>,
    /// The snapshot the cache was last checked against.
    txn_id: Option<usize>,
    lists: Arc<Vec<ListInfo>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    pub kind: Kind,
    pub list: Arc<Vec<ListInfo>>,
    pub index: usize,
    pub prefix: Prefix,
}

impl Match {
    pub fn info(&self) -> Option<&ListInfo> {
        self.list.get(self.index)
    }
}

/// Flatten prefixes into disjoint [start, end] intervals, each carrying the
/// length of the most specific prefix that covers it. Prefixes are either
/// nested or disjoint, so a stack of open prefixes does it in one pass.
pub fn flatten(ps: Vec<Prefix>) -> Vec<(u128, u128, u8)> {
    let ivs = flatten_nested(ps);
    // An IPv6 prefix shorter than /96 does not cover IPv4 sources: cut the
    // IPv4-mapped range out of its intervals (IPv4 prefixes nested in it
    // are /96 or longer and have intervals of their own).
    let mut out = Vec::with_capacity(ivs.len());
    for (s, e, len) in ivs {
        if len >= 96 || e < addr::V4_BASE || s > addr::V4_LAST {
            out.push((s, e, len));
            continue;
        }
        if s < addr::V4_BASE {
            out.push((s, addr::V4_BASE - 1, len));
        }
        if e > addr::V4_LAST {
            out.push((addr::V4_LAST + 1, e, len));
        }
    }
    out
}

fn flatten_nested(mut ps: Vec<Prefix>) -> Vec<(u128, u128, u8)> {
    ps.sort_unstable();
    ps.dedup();
    let mut out = Vec::with_capacity(ps.len());
    let mut stack: Vec<Prefix> = Vec::new();
    let mut cursor: u128 = 0;
    for p in ps {
        while let Some(top) = stack.last().copied() {
            if top.last() >= p.net {
                break;
            }
            if cursor <= top.last() {
                out.push((cursor, top.last(), top.len));
            }
            // top.last() < p.net, so this cannot overflow.
            cursor = top.last() + 1;
            stack.pop();
        }
        if let Some(top) = stack.last() {
            if cursor < p.net {
                out.push((cursor, p.net - 1, top.len));
            }
        }
        cursor = p.net;
        stack.push(p);
    }
    let mut done = false;
    while let Some(top) = stack.pop() {
        if !done && cursor <= top.last() {
            out.push((cursor, top.last(), top.len));
        }
        match top.last().checked_add(1) {
            Some(c) => cursor = c,
            None => done = true,
        }
    }
    out
}

fn iv_key(id: u32, a: u128) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(&id.to_be_bytes());
    k[4..].copy_from_slice(&a.to_be_bytes());
    k
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(format!(
            "invalid list name {} (1-64 of A-Z a-z 0-9 . _ : -)",
            shown(name)
        )))
    }
}

fn check_action(action: &str) -> Result<()> {
    if ACTIONS.contains(&action) {
        Ok(())
    } else {
        Err(StoreError::invalid(format!(
            "invalid action {} (want one of {})",
            shown(action),
            ACTIONS.join(", ")
        )))
    }
}

fn check_event(event: &str) -> Result<()> {
    let ok = !event.is_empty()
        && event.len() <= 32
        && event
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'.');
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(format!(
            "invalid event name {} (1-32 of a-z 0-9 _ .)",
            shown(event)
        )))
    }
}

/// Parse a feed file: one CIDR or address per line; blank lines and
/// comments (`#` or `;`, whole-line or trailing) are skipped.
pub fn parse_feed(path: &Path) -> Result<Vec<Prefix>> {
    let f = std::fs::File::open(path)
        .map_err(|e| StoreError::invalid(format!("cannot read {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
        let line =
            line.map_err(|e| StoreError::invalid(format!("cannot read {}: {e}", path.display())))?;
        let text = String::from_utf8_lossy(&line);
        let text = text.split(['#', ';']).next().unwrap_or("").trim();
        let Some(tok) = text.split_whitespace().next() else {
            continue;
        };
        let p = addr::parse_cidr(tok)
            .map_err(|e| StoreError::invalid(format!("{}:{}: {e}", path.display(), i + 1)))?;
        out.push(p);
    }
    Ok(out)
}

impl Core {
    fn rep_dir(&self, txn: &RoTxn) -> Result<Arc<Vec<ListInfo>>> {
        let id = txn.id();
        {
            let c = self.rep_cache.read().unwrap_or_else(|p| p.into_inner());
            if c.txn_id == Some(id) {
                return Ok(Arc::clone(&c.lists));
            }
        }
        let err = self.lmdb_err("reputation lookup");
        let gen = self.rep_gen(txn)?;
        let mut cache = self.rep_cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.gen != Some(gen) {
            let mut lists = Vec::new();
            for kv in self.rep_lists.iter(txn).map_err(&err)? {
                let (k, v) = kv.map_err(&err)?;
                lists.push(ListInfo::decode(k, v));
            }
            // Allow lists first: any allow match ends the question.
            lists.sort_by_key(|l| (l.kind == Kind::Block, l.id));
            cache.gen = Some(gen);
            cache.lists = Arc::new(lists);
        }
        cache.txn_id = Some(id);
        Ok(Arc::clone(&cache.lists))
    }

    fn rep_lookup_in(
        &self,
        txn: &RoTxn,
        dir: &Arc<Vec<ListInfo>>,
        ip: u128,
    ) -> Result<Option<Match>> {
        let err = self.lmdb_err("reputation lookup");
        let mut best: Option<(usize, Prefix)> = None;
        for (i, l) in dir.iter().enumerate() {
            if l.kind == Kind::Block {
                if let Some((bi, _)) = best {
                    if dir[bi].kind == Kind::Allow {
                        break;
                    }
                }
            }
            let Some((k, v)) = self
                .rep_iv
                .get_lower_than_or_equal_to(txn, &iv_key(l.id, ip))
                .map_err(&err)?
            else {
                continue;
            };
            if be_u32(k, 0) != l.id || ip > be_u128(v, 0) {
                continue;
            }
            let len = v.get(16).copied().unwrap_or(128);
            let p = Prefix {
                net: ip & addr::mask(len),
                len,
            };
            match (l.kind, best) {
                (Kind::Allow, _) => {
                    return Ok(Some(Match {
                        kind: Kind::Allow,
                        list: Arc::clone(dir),
                        index: i,
                        prefix: p,
                    }))
                }
                (Kind::Block, Some((_, bp))) if bp.len >= p.len => {}
                (Kind::Block, _) => best = Some((i, p)),
            }
        }
        Ok(best.map(|(i, p)| Match {
            kind: dir[i].kind,
            list: Arc::clone(dir),
            index: i,
            prefix: p,
        }))
    }

    /// Any allow match, else the longest block match across block lists.
    pub fn rep_lookup(&self, ip: u128) -> Result<Option<Match>> {
        self.read(|txn| {
            let dir = self.rep_dir(txn)?;
            self.rep_lookup_in(txn, &dir, ip)
        })
    }

    pub fn rep_lookup_many(&self, ips: &[u128]) -> Result<Vec<Option<Match>>> {
        let mut order: Vec<usize> = (0..ips.len()).collect();
        order.sort_unstable_by_key(|&i| ips[i]);
        let mut out = vec![None; ips.len()];
        self.read(|txn| {
            let dir = self.rep_dir(txn)?;
            for i in order {
                out[i] = self.rep_lookup_in(txn, &dir, ips[i])?;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Replace the list `name` with `prefixes`, atomically; the number of
    /// distinct prefixes stored.
    pub fn rep_load(
        &self,
        name: &str,
        kind: Kind,
        action: &str,
        score: i32,
        prefixes: Vec<Prefix>,
        now: u64,
    ) -> Result<u64> {
        check_name(name)?;
        check_action(action)?;
        let mut ps = prefixes;
        ps.sort_unstable();
        ps.dedup();
        let count = ps.len() as u64;
        let ivs = flatten(ps);
        let ctx = format!("cannot load list {name}");
        let err = self.lmdb_err(&ctx);
        self.write(|txn| {
            let next = self
                .meta
                .get(txn, b"rep_next_id")
                .map_err(&err)?
                .map(|v| be_u32(v, 0))
                .unwrap_or(1);
            let id = next;
            for (s, e, len) in &ivs {
                let mut v = [0u8; 17];
                v[..16].copy_from_slice(&e.to_be_bytes());
                v[16] = *len;
                self.rep_iv
                    .put_with_flags(txn, PutFlags::APPEND, &iv_key(id, *s), &v)
                    .map_err(&err)?;
            }
            if let Some(old) = self.rep_lists.get(txn, name.as_bytes()).map_err(&err)? {
                let old_id = be_u32(old, 0);
                self.drop_intervals(txn, old_id)?;
            }
            let info = ListInfo {
                id,
                name: name.to_string(),
                kind,
                action: action.to_string(),
                score,
                prefixes: count,
                intervals: ivs.len() as u64,
                loaded_at: now,
            };
            self.rep_lists
                .put(txn, name.as_bytes(), &info.encode())
                .map_err(&err)?;
            self.meta
                .put(txn, b"rep_next_id", &(next + 1).to_be_bytes())
                .map_err(&err)?;
            self.bump_rep_gen(txn)?;
            Ok(count)
        })
    }

    pub fn rep_load_file(
        &self,
        name: &str,
        kind: Kind,
        action: &str,
        score: i32,
        path: &Path,
        now: u64,
    ) -> Result<u64> {
        check_name(name)?;
        check_action(action)?;
        let ps = parse_feed(path)?;
        self.rep_load(name, kind, action, score, ps, now)
    }

    fn drop_intervals(&self, txn: &mut RwTxn, id: u32) -> Result<()> {
        let lo = iv_key(id, 0);
        let hi = (id as u64 + 1).to_be_bytes();
        let hi = &hi[4..];
        let range = (Bound::Included(&lo[..]), Bound::Excluded(hi));
        self.rep_iv
            .delete_range(txn, &range)
            .map_err(self.lmdb_err("cannot drop list"))?;
        Ok(())
    }

    /// The list directory's generation: it moves with every load and drop.
    fn rep_gen(&self, txn: &RoTxn) -> Result<u64> {
        Ok(self
            .meta
            .get(txn, b"rep_gen")
            .map_err(self.lmdb_err("cannot read the list directory"))?
            .map_or(0, |v| be_u64(v, 0)))
    }

    fn bump_rep_gen(&self, txn: &mut RwTxn) -> Result<()> {
        let err = self.lmdb_err("cannot update list directory");
        let gen = self.rep_gen(txn)?;
        self.meta
            .put(txn, b"rep_gen", &(gen + 1).to_be_bytes())
            .map_err(&err)
    }

    pub fn rep_drop(&self, name: &str) -> Result<bool> {
        check_name(name)?;
        let ctx = format!("cannot drop list {name}");
        let err = self.lmdb_err(&ctx);
        self.write(|txn| {
            let Some(old) = self.rep_lists.get(txn, name.as_bytes()).map_err(&err)? else {
                return Ok(false);
            };
            let id = be_u32(old, 0);
            self.drop_intervals(txn, id)?;
            self.rep_lists.delete(txn, name.as_bytes()).map_err(&err)?;
            self.bump_rep_gen(txn)?;
            Ok(true)
        })
    }

    pub fn rep_lists(&self) -> Result<Vec<ListInfo>> {
        self.read(|txn| Ok(self.rep_dir(txn)?.as_ref().clone()))
    }

    fn event_keys(&self, ip: u128, event: &str) -> [Vec<u8>; 2] {
        let net = if addr::is_v4(ip) {
            ip & addr::mask(120)
        } else {
            ip & addr::mask(48)
        };
        let k = |scope: u8, a: u128| {
            let mut k = Vec::with_capacity(17 + event.len());
            k.push(scope);
            k.extend_from_slice(&a.to_be_bytes());
            k.extend_from_slice(event.as_bytes());
            k
        };
        [k(b'a', ip), k(b'n', net)]
    }

    /// Count `n` events for `ip` and for its /24 (IPv4) or /48 (IPv6).
    pub fn rep_record(&self, ip: u128, event: &str, now: u64, n: u64) -> Result<()> {
        check_event(event)?;
        let keys = self.event_keys(ip, event);
        self.buffered(|b| {
            for k in keys {
                let e = b.cur.events.entry(k).or_insert((0, 0));
                e.0 = e.0.saturating_add(n);
                e.1 = e.1.max(now);
            }
        })
    }

    /// `{event: (count for the address, count for its network)}`.
    pub fn rep_counters(&self, ip: u128) -> Result<Vec<(String, u64, u64)>> {
        let mut m: HashMap<String, (u64, u64)> = HashMap::new();
        let [ka, kn] = self.event_keys(ip, "");
        let mut add = |k: &[u8], count: u64| {
            let (scope, ev) = (k.first().copied(), k.get(17..).unwrap_or_default());
            let e = m
                .entry(String::from_utf8_lossy(ev).into_owned())
                .or_insert((0, 0));
            if scope == Some(b'a') {
                e.0 += count;
            } else {
                e.1 += count;
            }
        };
        {
            let b = plock(&self.buf);
            let batches = std::iter::once(&b.cur).chain(b.inflight.as_deref());
            for batch in batches {
                for (k, (c, _)) in &batch.events {
                    if k.starts_with(&ka) || k.starts_with(&kn) {
                        add(k, *c);
                    }
                }
            }
        }
        let err = self.lmdb_err("reputation counters");
        self.read(|txn| {
            for pfx in [&ka, &kn] {
                for kv in self.rep_events.prefix_iter(txn, pfx).map_err(&err)? {
                    let (k, v) = kv.map_err(&err)?;
                    add(k, be_u64(v, 0));
                }
            }
            Ok(())
        })?;
        let mut out: Vec<(String, u64, u64)> = m.into_iter().map(|(k, (a, n))| (k, a, n)).collect();
        out.sort();
        Ok(out)
    }
}

/// Where the next `rep_sweep` begins, in `meta`: the sweep runs in one
/// process at a time (the server's sweeper), and a restart carries on
/// rather than rescanning from the start.
const SWEEP_CURSOR: &[u8] = b"rep_sweep_cursor";

impl Core {
    /// Forget event counters whose last event is more than `older_than`
    /// seconds before `now`, scanning at most `limit` counters from where the
    /// previous call stopped, in one write transaction. A counter with events
    /// still in the group-commit buffer is kept: its last event is recent,
    /// and deleting the stored part would let the commit restart its count.
    pub fn rep_sweep(&self, now: u64, older_than: u64, limit: u64) -> Result<Sweep> {
        let err = self.lmdb_err("reputation counters sweep");
        let mut res = Sweep::default();
        self.write(|txn| {
            let from = self
                .meta
                .get(txn, SWEEP_CURSOR)
                .map_err(&err)?
                .map(<[u8]>::to_vec);
            let mut doomed = Vec::new();
            let mut last = None;
            {
                let lower = match &from {
                    Some(k) => Bound::Excluded(k.as_slice()),
                    None => Bound::Unbounded,
                };
                let range = (lower, Bound::Unbounded);
                for kv in self.rep_events.range(txn, &range).map_err(&err)? {
                    if res.scanned >= limit {
                        break;
                    }
                    let (k, v) = kv.map_err(&err)?;
                    res.scanned += 1;
                    if now.saturating_sub(be_u64(v, 8)) > older_than {
                        doomed.push(k.to_vec());
                    }
                    last = Some(k.to_vec());
                }
            }
            res.wrapped = res.scanned < limit;
            {
                // The writer's lock is held: no batch is being committed, and
                // one buffered after this look is merged after our commit,
                // as a count that starts afresh.
                let b = plock(&self.buf);
                let buffered = |k: &Vec<u8>| {
                    b.cur.events.contains_key(k)
                        || b.inflight
                            .as_ref()
                            .is_some_and(|f| f.events.contains_key(k))
                };
                doomed.retain(|k| !buffered(k));
            }
            for k in &doomed {
                if self.rep_events.delete(txn, k).map_err(&err)? {
                    res.removed += 1;
                }
            }
            match last.filter(|_| !res.wrapped) {
                Some(k) => self.meta.put(txn, SWEEP_CURSOR, &k).map_err(&err)?,
                None => {
                    self.meta.delete(txn, SWEEP_CURSOR).map_err(&err)?;
                }
            }
            Ok(())
        })?;
        Ok(res)
    }
}

pub(crate) fn apply_events(
    core: &Core,
    txn: &mut RwTxn,
    events: &HashMap<Vec<u8>, (u64, u64)>,
) -> Result<()> {
    let err = core.lmdb_err("reputation counters commit");
    let mut ev: Vec<_> = events.iter().collect();
    ev.sort_unstable();
    for (k, (n, last)) in ev {
        let (old_n, old_last) = match core.rep_events.get(txn, k).map_err(&err)? {
            Some(v) => (be_u64(v, 0), be_u64(v, 8)),
            None => (0, 0),
        };
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&old_n.saturating_add(*n).to_be_bytes());
        v[8..].copy_from_slice(&old_last.max(*last).to_be_bytes());
        core.rep_events.put(txn, k, &v).map_err(&err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::parse_cidr;

    fn lpm_ref(ps: &[Prefix], a: u128) -> Option<u8> {
        ps.iter()
            .filter(|p| p.ranges().iter().any(|&(s, e)| s <= a && a <= e))
            .map(|p| p.len)
            .max()
    }

    fn lookup_flat(ivs: &[(u128, u128, u8)], a: u128) -> Option<u8> {
        let i = ivs.partition_point(|iv| iv.0 <= a);
        if i == 0 {
            return None;
        }
        let (_, e, len) = ivs[i - 1];
        (a <= e).then_some(len)
    }

    #[test]
    fn flatten_nested_and_overlapping() -> Result<()> {
        let ps: Vec<Prefix> = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.128/25",
            "10.200.0.0/16",
            "192.0.2.0/24",
            "0.0.0.0/0",
            "2001:db8::/32",
            "2001:db8:1::/48",
            "::/0",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
        ]
        .iter()
        .map(|s| parse_cidr(s))
        .collect::<Result<_>>()?;
        let ivs = flatten(ps.clone());
        for w in ivs.windows(2) {
            assert!(w[0].1 < w[1].0, "disjoint and sorted: {w:?}");
        }
        let probes = [
            "10.0.0.0",
            "9.255.255.255",
            "10.1.2.127",
            "10.1.2.128",
            "10.1.2.255",
            "10.1.3.0",
            "10.255.255.255",
            "11.0.0.0",
            "192.0.2.255",
            "1.1.1.1",
            "2001:db8::",
            "2001:db8:1::1",
            "2001:db9::",
            "::",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:0:0",
        ];
        for s in probes {
            let a = addr::parse_ip(s)?;
            assert_eq!(lookup_flat(&ivs, a), lpm_ref(&ps, a), "{s}");
        }
        // Edges of every prefix, and one either side.
        for p in &ps {
            for a in [
                p.net,
                p.last(),
                p.net.wrapping_sub(1),
                p.last().wrapping_add(1),
            ] {
                assert_eq!(lookup_flat(&ivs, a), lpm_ref(&ps, a), "{a:x}");
            }
        }
        Ok(())
    }

    fn open(window: std::time::Duration) -> Result<(tempfile::TempDir, Arc<crate::Store>)> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
        let opts = crate::Options {
            commit_window: window,
            ..Default::default()
        };
        let s = crate::Store::open(&dir.path().join("core"), &opts)?;
        Ok((dir, s))
    }

    fn count(s: &Core, ip: &str, event: &str) -> Result<Option<(u64, u64)>> {
        let got = s.rep_counters(addr::parse_ip(ip)?)?;
        Ok(got
            .into_iter()
            .find(|(e, _, _)| e == event)
            .map(|(_, a, n)| (a, n)))
    }

    const DAY: u64 = 86_400;
    const TTL: u64 = 30 * DAY;

    #[test]
    fn a_sweep_forgets_counters_whose_last_event_is_older_than_the_ttl() -> Result<()> {
        let (_dir, s) = open(std::time::Duration::ZERO)?;
        let t0 = 1_000_000;
        let ip = |a: &str| addr::parse_ip(a);
        s.rep_record(ip("192.0.2.7")?, "unknown_recipient", t0, 3)?;
        // Same /24: the network counter's last event is the later one.
        s.rep_record(ip("192.0.2.8")?, "unknown_recipient", t0 + 10 * DAY, 1)?;
        s.rep_record(ip("198.51.100.9")?, "spam", t0 + TTL, 2)?;
        s.rep_record(ip("2001:db8::1")?, "never_retried", t0, 1)?;
        let now = t0 + TTL + 1;
        let r = s.rep_sweep(now, TTL, 10_000)?;
        // 192.0.2.7's own counter and both of 2001:db8::1's are over the TTL.
        assert_eq!((r.scanned, r.removed, r.wrapped), (7, 3, true));
        assert_eq!(count(&s, "192.0.2.7", "unknown_recipient")?, Some((0, 4)));
        assert_eq!(count(&s, "192.0.2.8", "unknown_recipient")?, Some((1, 4)));
        assert_eq!(count(&s, "198.51.100.9", "spam")?, Some((2, 2)));
        assert_eq!(count(&s, "2001:db8::1", "never_retried")?, None);
        // Exactly the TTL old is kept; one second more is not.
        let r = s.rep_sweep(t0 + 10 * DAY + TTL, TTL, 10_000)?;
        assert_eq!(r.removed, 0);
        let r = s.rep_sweep(t0 + 10 * DAY + TTL + 1, TTL, 10_000)?;
        assert_eq!(r.removed, 2);
        assert_eq!(count(&s, "192.0.2.8", "unknown_recipient")?, None);
        assert_eq!(count(&s, "198.51.100.9", "spam")?, Some((2, 2)));
        Ok(())
    }

    #[test]
    fn a_sweep_is_bounded_and_carries_on_where_it_stopped() -> Result<()> {
        let (_dir, s) = open(std::time::Duration::ZERO)?;
        for i in 0..50u128 {
            // 50 addresses in 50 /24s: 100 counters.
            let a = addr::V4_BASE | (10 << 24) | (i << 8) | 1;
            s.rep_record(a, "spam", 1000, 1)?;
        }
        let now = 1000 + TTL + 1;
        let mut calls = 0;
        let mut removed = 0;
        loop {
            let r = s.rep_sweep(now, TTL, 30)?;
            assert!(r.scanned <= 30, "{r:?}");
            calls += 1;
            removed += r.removed;
            if r.wrapped {
                break;
            }
            assert!(calls < 10, "the sweep never wrapped");
        }
        assert_eq!((calls, removed), (4, 100));
        let r = s.rep_sweep(now, TTL, 30)?;
        assert_eq!((r.scanned, r.removed, r.wrapped), (0, 0, true));
        Ok(())
    }

    #[test]
    fn a_counter_with_events_in_the_buffer_is_not_swept() -> Result<()> {
        // A window no test outlasts: what is recorded stays buffered until
        // `flush`.
        let (_dir, s) = open(std::time::Duration::from_secs(3600))?;
        let a = addr::parse_ip("203.0.113.5")?;
        s.rep_record(a, "spam", 1000, 5)?;
        s.flush()?;
        let now = 1000 + TTL + 1;
        s.rep_record(a, "spam", now, 1)?;
        let r = s.rep_sweep(now, TTL, 10_000)?;
        assert_eq!((r.scanned, r.removed), (2, 0));
        s.flush()?;
        assert_eq!(count(&s, "203.0.113.5", "spam")?, Some((6, 6)));
        // Once committed, the last event is recent: still kept.
        assert_eq!(s.rep_sweep(now, TTL, 10_000)?.removed, 0);
        Ok(())
    }

    #[test]
    fn flatten_pseudo_random_matches_reference() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..50 {
            let ps: Vec<Prefix> = (0..60)
                .map(|_| {
                    // A small space so prefixes nest and collide often.
                    let a = addr::V4_BASE
                        | (next() as u128 & 0xff00_0000)
                        | (next() as u128 & 0x00ff_ff00);
                    let len = 96 + (next() % 33) as u8;
                    Prefix {
                        net: a & addr::mask(len),
                        len,
                    }
                })
                .collect();
            let ivs = flatten(ps.clone());
            for _ in 0..500 {
                let a = addr::V4_BASE | (next() as u128 & 0xffff_ffff);
                assert_eq!(lookup_flat(&ivs, a), lpm_ref(&ps, a));
            }
            for p in &ps {
                for a in [p.net, p.last(), p.net - 1, p.last() + 1] {
                    assert_eq!(lookup_flat(&ivs, a), lpm_ref(&ps, a));
                }
            }
        }
    }
}
