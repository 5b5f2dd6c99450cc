//! Recon: greylisting by masked source address (DESIGN.md, layer 1).
//!
//! A retry is any attempt from the same masked source between `min_delay`
//! and `retry_window` after first sight, whatever its sender or recipient.
//! Known sources are answered from one LMDB read with no lock and no write;
//! everything else goes through the group-commit buffer.

use crate::addr::{self, Prefix};
use crate::error::{shown, Result, StoreError};
use crate::store::{be_u128, be_u32, be_u64, plock, Batch, Core, Db};
use heed::{RoTxn, RwTxn};
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A Recon row. Stored as 32 big-endian octets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Row {
    pub first_seen: u64,
    pub last_seen: u64,
    /// 0 while the source has not passed; else the end of its pass.
    pub pass_until: u64,
    pub attempts: u32,
    pub passes: u32,
}

impl Row {
    fn encode(&self) -> [u8; 32] {
        let mut v = [0u8; 32];
        v[0..8].copy_from_slice(&self.first_seen.to_be_bytes());
        v[8..16].copy_from_slice(&self.last_seen.to_be_bytes());
        v[16..24].copy_from_slice(&self.pass_until.to_be_bytes());
        v[24..28].copy_from_slice(&self.attempts.to_be_bytes());
        v[28..32].copy_from_slice(&self.passes.to_be_bytes());
        v
    }
    fn decode(v: &[u8]) -> Row {
        Row {
            first_seen: be_u64(v, 0),
            last_seen: be_u64(v, 8),
            pass_until: be_u64(v, 16),
            attempts: be_u32(v, 24),
            passes: be_u32(v, 28),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    New,
    TooEarly,
    Passed,
    Known,
    Exempt,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::New => "new",
            Status::TooEarly => "too_early",
            Status::Passed => "passed",
            Status::Known => "known",
            Status::Exempt => "exempt",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    pub first_seen: u64,
    pub pass_until: u64,
    /// False when a new source was not remembered (IPv6 /48 cap, full map).
    pub recorded: bool,
    /// A `New` answer for a source deferred before that never retried within
    /// the retry window: its earlier deferral lapsed (self-learned reputation
    /// counts these).
    pub lapsed: bool,
}

/// Whether a `New` answer from `base` is a lapsed deferral (seen, never passed).
fn lapsed(status: Status, base: Option<Row>) -> bool {
    status == Status::New && base.is_some_and(|r| r.pass_until == 0)
}

#[derive(Default)]
pub(crate) struct SweepCursor {
    recon: Option<u128>,
    pending: Option<Vec<u8>>,
    v6cap: Option<u128>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub scanned: u64,
    pub removed: u64,
    /// True when this call reached the end of the Recon table.
    pub wrapped: bool,
}

/// A stored row with its key, for `kith recon show`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub network: Prefix,
    pub row: Row,
}

/// A pass is renewed only when that moves it by more than this.
const RENEW_SLACK: u64 = 86_400;

/// The state machine, pure: what a check of `base` at `now` answers and
/// which row (if any) it writes.
pub fn decide(
    base: Option<Row>,
    now: u64,
    min_delay: u64,
    retry_window: u64,
    pass_ttl: u64,
) -> (Status, Row, bool) {
    let fresh = |passes| Row {
        first_seen: now,
        last_seen: now,
        pass_until: 0,
        attempts: 1,
        passes,
    };
    let Some(r) = base else {
        return (Status::New, fresh(0), true);
    };
    if r.pass_until > now {
        let until = now.saturating_add(pass_ttl);
        if until > r.pass_until.saturating_add(RENEW_SLACK) {
            let row = Row {
                last_seen: now,
                pass_until: until,
                ..r
            };
            return (Status::Known, row, true);
        }
        return (Status::Known, r, false);
    }
    if r.pass_until != 0 {
        // The pass has expired: the source starts over.
        return (Status::New, fresh(r.passes), true);
    }
    let elapsed = now.saturating_sub(r.first_seen);
    let seen = Row {
        last_seen: now.max(r.last_seen),
        attempts: r.attempts.saturating_add(1),
        ..r
    };
    if elapsed < min_delay {
        (Status::TooEarly, seen, true)
    } else if elapsed <= retry_window {
        let row = Row {
            pass_until: now.saturating_add(pass_ttl).max(now.saturating_add(1)),
            passes: r.passes.saturating_add(1),
            ..seen
        };
        (Status::Passed, row, true)
    } else {
        (Status::New, fresh(r.passes), true)
    }
}

enum Fast {
    Done(Outcome),
    Slow(u128),
}

fn key(a: u128) -> [u8; 16] {
    a.to_be_bytes()
}

fn in_ranges(ranges: &[(u128, u128)], a: u128) -> bool {
    let i = ranges.partition_point(|r| r.0 <= a);
    i > 0 && a <= ranges[i - 1].1
}

impl Core {
    fn masked(&self, ip: u128) -> u128 {
        addr::mask_source(ip, self.ipv4_prefix, self.ipv6_prefix)
    }

    fn fast(&self, txn: &RoTxn, exempt: &[(u128, u128)], ip: u128, now: u64) -> Result<Fast> {
        let err = self.lmdb_err("Recon lookup");
        if in_ranges(exempt, ip) {
            return Ok(Fast::Done(Outcome {
                status: Status::Exempt,
                first_seen: 0,
                pass_until: 0,
                recorded: false,
                lapsed: false,
            }));
        }
        let k = self.masked(ip);
        if let Some(v) = self.recon.get(txn, &key(k)).map_err(&err)? {
            let r = Row::decode(v);
            let ttl = self.timings.pass_ttl.load(Ordering::Relaxed);
            if r.pass_until > now
                && now.saturating_add(ttl) <= r.pass_until.saturating_add(RENEW_SLACK)
            {
                return Ok(Fast::Done(Outcome {
                    status: Status::Known,
                    first_seen: r.first_seen,
                    pass_until: r.pass_until,
                    recorded: true,
                    lapsed: false,
                }));
            }
        }
        Ok(Fast::Slow(k))
    }

    /// The slow path: under the buffer lock, from the freshest row.
    fn slow(&self, keys: &[(usize, u128)], now: u64, out: &mut [Option<Outcome>]) -> Result<()> {
        let (min_delay, retry_window, pass_ttl) = self.timings.get();
        let cap = self.ipv6_new_per_48.load(Ordering::Relaxed);
        let map_full = self.map_full.load(Ordering::Relaxed);
        let err = self.lmdb_err("Recon lookup");
        let mut refused = 0u64;
        self.buffered(|b| -> Result<()> {
            // The read transaction opens under the buffer lock: a batch that
            // left the buffer is then either still in flight or committed.
            let txn = self
                .env
                .read_txn()
                .map_err(self.lmdb_err("cannot begin a read"))?;
            for &(i, k) in keys {
                let base = match b.recon(k) {
                    Some(r) => Some(r),
                    None => self
                        .recon
                        .get(&txn, &key(k))
                        .map_err(&err)?
                        .map(Row::decode),
                };
                let (status, row, write) = decide(base, now, min_delay, retry_window, pass_ttl);
                let mut recorded = true;
                if status == Status::New {
                    recorded = !map_full && self.v6_admit(b, &txn, k, now, cap, retry_window)?;
                }
                if !recorded {
                    refused += 1;
                } else if write {
                    b.cur.recon.insert(k, row);
                }
                out[i] = Some(Outcome {
                    status,
                    first_seen: row.first_seen,
                    pass_until: row.pass_until,
                    recorded,
                    lapsed: lapsed(status, base),
                });
            }
            Ok(())
        })??;
        if refused > 0 {
            self.stats.refused_new.fetch_add(refused, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The per-/48 cap on new IPv6 rows: true when this one may be recorded.
    fn v6_admit(
        &self,
        b: &mut crate::store::Buffer,
        txn: &RoTxn,
        k: u128,
        now: u64,
        cap: u32,
        window: u64,
    ) -> Result<bool> {
        if addr::is_v4(k) {
            return Ok(true);
        }
        let net = k & addr::mask(48);
        let cur = match b
            .cur
            .v6cap
            .get(&net)
            .copied()
            .or_else(|| b.inflight.as_ref().and_then(|f| f.v6cap.get(&net).copied()))
        {
            Some(c) => c,
            None => match self
                .v6cap
                .get(txn, &key(net))
                .map_err(self.lmdb_err("Recon lookup"))?
            {
                Some(v) => (be_u64(v, 0), be_u32(v, 8)),
                None => (now, 0),
            },
        };
        let (start, count) = if now.saturating_sub(cur.0) > window {
            (now, 0)
        } else {
            cur
        };
        if count >= cap {
            return Ok(false);
        }
        b.cur.v6cap.insert(net, (start, count + 1));
        Ok(true)
    }

    /// Check one source at `now`.
    pub fn recon_check(&self, ip: u128, now: u64) -> Result<Outcome> {
        let fast = self.read(|txn| {
            let exempt = self.exempt_ranges(txn)?;
            self.fast(txn, &exempt, ip, now)
        })?;
        match fast {
            Fast::Done(o) => Ok(o),
            Fast::Slow(k) => {
                let mut out = [None];
                self.slow(&[(0, k)], now, &mut out)?;
                out[0].ok_or_else(|| StoreError::Storage("Recon check lost its answer".into()))
            }
        }
    }

    /// Check many sources at `now`, in key order inside one read transaction;
    /// answers come back in the order asked.
    pub fn recon_check_many(&self, ips: &[u128], now: u64) -> Result<Vec<Outcome>> {
        let mut order: Vec<usize> = (0..ips.len()).collect();
        order.sort_unstable_by_key(|&i| ips[i]);
        let mut out: Vec<Option<Outcome>> = vec![None; ips.len()];
        let mut slow = Vec::new();
        self.read(|txn| {
            // Once per batch: the exempt list of this snapshot.
            let exempt = self.exempt_ranges(txn)?;
            for &i in &order {
                match self.fast(txn, &exempt, ips[i], now)? {
                    Fast::Done(o) => out[i] = Some(o),
                    Fast::Slow(k) => slow.push((i, k)),
                }
            }
            Ok(())
        })?;
        if !slow.is_empty() {
            // Sources that share a masked key must be decided in the order
            // asked, as sequential checks would be.
            slow.sort_unstable_by_key(|&(i, _)| i);
            self.slow(&slow, now, &mut out)?;
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| StoreError::Storage("Recon check lost its answer".into())))
            .collect()
    }

    /// What `recon_check` would answer at `now`, without recording anything
    /// (for `kith recon show` and diagnostics).
    pub fn recon_peek(&self, ip: u128, now: u64) -> Result<Outcome> {
        let (min_delay, retry_window, pass_ttl) = self.timings.get();
        let k = self.masked(ip);
        let buffered = plock(&self.buf).recon(k);
        self.read(|txn| {
            if in_ranges(&self.exempt_ranges(txn)?, ip) {
                return Ok(Outcome {
                    status: Status::Exempt,
                    first_seen: 0,
                    pass_until: 0,
                    recorded: false,
                    lapsed: false,
                });
            }
            let base = match buffered {
                Some(r) => Some(r),
                None => self
                    .recon
                    .get(txn, &key(k))
                    .map_err(self.lmdb_err("Recon lookup"))?
                    .map(Row::decode),
            };
            let (status, row, _) = decide(base, now, min_delay, retry_window, pass_ttl);
            Ok(Outcome {
                status,
                first_seen: row.first_seen,
                pass_until: row.pass_until,
                recorded: status != Status::New || !self.map_full.load(Ordering::Relaxed),
                lapsed: lapsed(status, base),
            })
        })
    }

    /// The stored row of `ip`'s masked network (buffered writes included).
    pub fn recon_show(&self, ip: u128) -> Result<Option<Entry>> {
        let k = self.masked(ip);
        let len = if addr::is_v4(k) {
            96 + self.ipv4_prefix
        } else {
            self.ipv6_prefix
        };
        let network = Prefix { net: k, len };
        if let Some(row) = plock(&self.buf).recon(k) {
            return Ok(Some(Entry { network, row }));
        }
        self.read(|txn| {
            Ok(self
                .recon
                .get(txn, &key(k))
                .map_err(self.lmdb_err("Recon lookup"))?
                .map(|v| Entry {
                    network,
                    row: Row::decode(v),
                }))
        })
    }

    pub fn recon_len(&self) -> Result<u64> {
        let stored = self.read(|txn| self.recon.len(txn).map_err(self.lmdb_err("Recon count")))?;
        // Rows buffered but not yet committed that are new to LMDB.
        let buffered: Vec<u128> = plock(&self.buf).cur.recon.keys().copied().collect();
        let new = self.read(|txn| {
            let mut n = 0;
            for k in &buffered {
                if self
                    .recon
                    .get(txn, &key(*k))
                    .map_err(self.lmdb_err("Recon count"))?
                    .is_none()
                {
                    n += 1;
                }
            }
            Ok(n)
        })?;
        Ok(stored + new)
    }

    /// Is `ip` inside an exempt network?
    pub fn recon_is_exempt(&self, ip: u128) -> Result<bool> {
        self.read(|txn| Ok(in_ranges(&self.exempt_ranges(txn)?, ip)))
    }

    /// The exempt networks of this snapshot, as merged ranges.
    fn exempt_ranges(&self, txn: &RoTxn) -> Result<Arc<Vec<(u128, u128)>>> {
        let id = txn.id();
        {
            let c = self.exempt_cache.read().unwrap_or_else(|p| p.into_inner());
            if c.0 == id {
                return Ok(Arc::clone(&c.1));
            }
        }
        let err = self.lmdb_err("Recon exempt lookup");
        let mut ivs = Vec::new();
        for kv in self.exempt_iv.iter(txn).map_err(&err)? {
            let (k, v) = kv.map_err(&err)?;
            ivs.push((be_u128(k, 0), be_u128(v, 0)));
        }
        let ivs = Arc::new(ivs);
        *self.exempt_cache.write().unwrap_or_else(|p| p.into_inner()) = (id, Arc::clone(&ivs));
        Ok(ivs)
    }

    pub fn recon_exempt_add(&self, p: Prefix) -> Result<bool> {
        self.exempt_change(|raw, txn| {
            let k = prefix_key(p);
            let had = raw.get(txn, &k)?.is_some();
            raw.put(txn, &k, &[])?;
            Ok(!had)
        })
    }

    pub fn recon_exempt_remove(&self, p: Prefix) -> Result<bool> {
        self.exempt_change(|raw, txn| raw.delete(txn, &prefix_key(p)))
    }

    fn exempt_change(&self, f: impl FnOnce(&Db, &mut RwTxn) -> heed::Result<bool>) -> Result<bool> {
        let err = self.lmdb_err("cannot change exempt networks");
        self.write(|txn| {
            let changed = f(&self.exempt_raw, txn).map_err(&err)?;
            // Rebuild the interval index of the union; the list is small.
            let mut ps: Vec<Prefix> = Vec::new();
            for kv in self.exempt_raw.iter(txn).map_err(&err)? {
                let (k, _) = kv.map_err(&err)?;
                ps.push(Prefix {
                    net: be_u128(k, 0),
                    len: k.get(16).copied().unwrap_or(128),
                });
            }
            self.exempt_iv.clear(txn).map_err(&err)?;
            for (start, end) in union(ps) {
                self.exempt_iv
                    .put(txn, &key(start), &key(end))
                    .map_err(&err)?;
            }
            Ok(changed)
        })
    }

    pub fn recon_exempt_list(&self) -> Result<Vec<Prefix>> {
        let err = self.lmdb_err("cannot read exempt networks");
        self.read(|txn| {
            let mut out = Vec::new();
            for kv in self.exempt_raw.iter(txn).map_err(&err)? {
                let (k, _) = kv.map_err(&err)?;
                out.push(Prefix {
                    net: be_u128(k, 0),
                    len: k.get(16).copied().unwrap_or(128),
                });
            }
            Ok(out)
        })
    }

    /// Remember a Recon deferral of mail from `domain` to `rcpt`.
    pub fn recon_pending_add(&self, domain: &str, rcpt: &str, now: u64) -> Result<()> {
        let k = pending_key(domain, rcpt)?;
        let window = self.timings.retry_window.load(Ordering::Relaxed);
        self.buffered(|b| {
            let first = b.cur.pending.entry(k).or_insert(now);
            // An expired deferral starts over.
            if now.saturating_sub(*first) > window || *first > now {
                *first = now;
            }
        })
    }

    /// When mail from `domain` to `rcpt` was first deferred, if that is
    /// still within `retry_window`.
    pub fn recon_pending_get(&self, domain: &str, rcpt: &str, now: u64) -> Result<Option<u64>> {
        let k = pending_key(domain, rcpt)?;
        let window = self.timings.retry_window.load(Ordering::Relaxed);
        let buffered = {
            let b = plock(&self.buf);
            b.cur
                .pending
                .get(&k)
                .or_else(|| b.inflight.as_ref().and_then(|f| f.pending.get(&k)))
                .copied()
        };
        let stored = self.read(|txn| {
            Ok(self
                .pending
                .get(txn, &k)
                .map_err(self.lmdb_err("Recon pending lookup"))?
                .map(|v| be_u64(v, 0)))
        })?;
        let first = match (stored, buffered) {
            (Some(s), Some(b)) if now.saturating_sub(s) <= window => Some(s.min(b)),
            (_, Some(b)) => Some(b),
            (s, None) => s,
        };
        Ok(first.filter(|&t| t <= now && now - t <= window))
    }

    /// Remove expired rows, scanning at most `limit` rows of each keyspace
    /// from where the previous call stopped.
    pub fn recon_sweep(&self, now: u64, limit: u64) -> Result<Sweep> {
        let (_, window, _) = self.timings.get();
        let err = self.lmdb_err("Recon sweep");
        let mut cur = plock(&self.sweep_cursor);
        let mut res = Sweep::default();
        let (recon_next, pending_next, v6_next) = self.write(|txn| {
            let expired = |v: &[u8]| {
                let r = Row::decode(v);
                if r.pass_until != 0 {
                    r.pass_until <= now
                } else {
                    now.saturating_sub(r.first_seen) > window
                }
            };
            let a = sweep_db(
                &self.recon,
                txn,
                cur.recon.map(key).map(|k| k.to_vec()),
                limit,
                &expired,
                &mut res,
            )
            .map_err(&err)?;
            let stale = |v: &[u8]| now.saturating_sub(be_u64(v, 0)) > window;
            let mut other = Sweep::default();
            let b = sweep_db(
                &self.pending,
                txn,
                cur.pending.clone(),
                limit,
                &stale,
                &mut other,
            )
            .map_err(&err)?;
            let c = sweep_db(
                &self.v6cap,
                txn,
                cur.v6cap.map(key).map(|k| k.to_vec()),
                limit,
                &stale,
                &mut other,
            )
            .map_err(&err)?;
            res.scanned += other.scanned;
            res.removed += other.removed;
            Ok((a, b, c))
        })?;
        res.wrapped = recon_next.is_none();
        cur.recon = recon_next.map(|k| be_u128(&k, 0));
        cur.pending = pending_next;
        cur.v6cap = v6_next.map(|k| be_u128(&k, 0));
        Ok(res)
    }
}

/// Scan up to `limit` rows after `from`, deleting those `dead` says; the
/// next cursor, or None at the end of the table.
fn sweep_db(
    db: &Db,
    txn: &mut RwTxn,
    from: Option<Vec<u8>>,
    limit: u64,
    dead: &dyn Fn(&[u8]) -> bool,
    res: &mut Sweep,
) -> heed::Result<Option<Vec<u8>>> {
    let mut doomed = Vec::new();
    let mut last = None;
    let mut n = 0;
    {
        let lower = match &from {
            Some(k) => Bound::Excluded(k.as_slice()),
            None => Bound::Unbounded,
        };
        let range = (lower, Bound::Unbounded);
        for kv in db.range(txn, &range)? {
            let (k, v) = kv?;
            if n >= limit {
                break;
            }
            n += 1;
            if dead(v) {
                doomed.push(k.to_vec());
            }
            last = Some(k.to_vec());
        }
    }
    let at_end = n < limit;
    res.scanned += n;
    for k in &doomed {
        db.delete(txn, k)?;
        res.removed += 1;
    }
    Ok(if at_end { None } else { last })
}

fn prefix_key(p: Prefix) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..16].copy_from_slice(&key(p.net));
    k[16] = p.len;
    k
}

/// The union of prefixes as disjoint, sorted, merged [start, end] ranges.
pub fn union(ps: Vec<Prefix>) -> Vec<(u128, u128)> {
    let mut rs: Vec<(u128, u128)> = ps.iter().flat_map(Prefix::ranges).collect();
    rs.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::new();
    for (s, e) in rs {
        match out.last_mut() {
            // Overlapping, or adjacent (last.1 + 1 == s); MAX has no successor.
            Some(last) if s <= last.1 || last.1.checked_add(1) == Some(s) => {
                last.1 = last.1.max(e);
            }
            _ => out.push((s, e)),
        }
    }
    out
}

const MAX_PENDING_PART: usize = 320;

fn pending_key(domain: &str, rcpt: &str) -> Result<Vec<u8>> {
    let mut k = Vec::with_capacity(domain.len() + rcpt.len() + 1);
    for (what, s) in [("sender domain", domain), ("recipient", rcpt)] {
        if s.is_empty()
            || s.len() > MAX_PENDING_PART
            || s.bytes().any(|c| c == 0 || c.is_ascii_control())
        {
            return Err(StoreError::invalid(format!("invalid {what} {}", shown(s))));
        }
        if !k.is_empty() {
            k.push(0);
        }
        k.extend(s.to_lowercase().bytes());
    }
    Ok(k)
}

/// Merge a buffered batch into LMDB. Another process may have written the
/// same rows meanwhile: the row with the later sighting wins.
pub(crate) fn apply(core: &Core, txn: &mut RwTxn, b: &Batch) -> Result<()> {
    let err = core.lmdb_err("Recon commit");
    let (_, window, _) = core.timings.get();
    let mut rows: Vec<(&u128, &Row)> = b.recon.iter().collect();
    rows.sort_unstable_by_key(|(k, _)| **k);
    for (k, row) in rows {
        let kb = key(*k);
        // Another process may have written this row since ours was read:
        // the more recent sighting wins, and on a tie the longer pass.
        let merged = match core.recon.get(txn, &kb).map_err(&err)?.map(Row::decode) {
            Some(old) if (old.last_seen, old.pass_until) > (row.last_seen, row.pass_until) => old,
            _ => *row,
        };
        core.recon.put(txn, &kb, &merged.encode()).map_err(&err)?;
    }
    let mut pend: Vec<(&Vec<u8>, &u64)> = b.pending.iter().collect();
    pend.sort_unstable();
    for (k, t) in pend {
        if let Some(v) = core.pending.get(txn, k).map_err(&err)? {
            let old = be_u64(v, 0);
            if old <= *t && t - old <= window {
                continue;
            }
        }
        core.pending.put(txn, k, &t.to_be_bytes()).map_err(&err)?;
    }
    for (net, (start, count)) in &b.v6cap {
        let mut v = [0u8; 12];
        v[..8].copy_from_slice(&start.to_be_bytes());
        v[8..].copy_from_slice(&count.to_be_bytes());
        core.v6cap.put(txn, &key(*net), &v).map_err(&err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD: u64 = 60;
    const RW: u64 = 3600;
    const TTL: u64 = 30 * 86400;

    #[test]
    fn a_deferral_never_retried_lapses() {
        let (s, r, _) = decide(None, 1000, MD, RW, TTL);
        assert!(!lapsed(s, None), "a first sighting is new, not lapsed");
        let (s, fresh, _) = decide(Some(r), 1000 + RW + 1, MD, RW, TTL);
        assert_eq!(s, Status::New);
        assert!(lapsed(s, Some(r)), "no retry within the window: lapsed");
        let (_, passed, _) = decide(Some(r), 1000 + MD, MD, RW, TTL);
        let (s, _, _) = decide(Some(passed), 1000 + MD + TTL + 1, MD, RW, TTL);
        assert_eq!(s, Status::New);
        assert!(
            !lapsed(s, Some(passed)),
            "an expired pass is new again, not lapsed"
        );
        assert_eq!(fresh.first_seen, 1000 + RW + 1);
    }

    #[test]
    fn the_cycle() {
        let (s, r, _) = decide(None, 1000, MD, RW, TTL);
        assert_eq!((s, r.first_seen, r.pass_until), (Status::New, 1000, 0));
        let (s, r2, _) = decide(Some(r), 1030, MD, RW, TTL);
        assert_eq!(
            (s, r2.first_seen),
            (Status::TooEarly, 1000),
            "too_early never moves first_seen"
        );
        let (s, r3, _) = decide(Some(r2), 1060, MD, RW, TTL);
        assert_eq!((s, r3.pass_until), (Status::Passed, 1060 + TTL));
        let (s, _, write) = decide(Some(r3), 1061, MD, RW, TTL);
        assert_eq!(
            (s, write),
            (Status::Known, false),
            "a known check writes nothing"
        );
        let (s, r4, write) = decide(Some(r3), 1060 + 86401 + 1, MD, RW, TTL);
        assert_eq!(
            (s, write),
            (Status::Known, true),
            "renewed when it moves by more than a day"
        );
        assert_eq!(r4.pass_until, 1060 + 86402 + TTL);
        let (s, r5, _) = decide(Some(r3), 1060 + TTL, MD, RW, TTL);
        assert_eq!(
            (s, r5.first_seen),
            (Status::New, 1060 + TTL),
            "an expired pass starts over"
        );
    }

    #[test]
    fn retry_window_expiry() {
        let (_, r, _) = decide(None, 0, MD, RW, TTL);
        assert_eq!(decide(Some(r), RW, MD, RW, TTL).0, Status::Passed);
        let (s, r2, _) = decide(Some(r), RW + 1, MD, RW, TTL);
        assert_eq!((s, r2.first_seen), (Status::New, RW + 1));
    }

    #[test]
    fn union_merges_nested_and_adjacent() -> Result<()> {
        let ps = vec![
            addr::parse_cidr("10.0.0.0/8")?,
            addr::parse_cidr("10.1.0.0/16")?,
            addr::parse_cidr("11.0.0.0/8")?,
            addr::parse_cidr("192.0.2.0/24")?,
            addr::parse_cidr("::/0")?,
        ];
        let u = union(ps);
        // ::/0 covers every IPv6 source but no IPv4 one; the IPv4 prefixes
        // merge where nested or adjacent.
        let v4 = |a: &str| addr::parse_ip(a).unwrap_or_default();
        assert_eq!(
            u,
            vec![
                (0, addr::V4_BASE - 1),
                (v4("10.0.0.0"), v4("11.255.255.255")),
                (v4("192.0.2.0"), v4("192.0.2.255")),
                (addr::V4_LAST + 1, u128::MAX),
            ]
        );
        let u = union(vec![
            addr::parse_cidr("10.0.0.0/8")?,
            addr::parse_cidr("11.0.0.0/8")?,
            addr::parse_cidr("13.0.0.0/8")?,
        ]);
        assert_eq!(u.len(), 2);
        Ok(())
    }
}
