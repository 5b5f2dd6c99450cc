//! The LMDB environment, its databases, and the one writer.
//!
//! Every table write goes through `Core::write` (one in-process lock around
//! one LMDB write transaction) or through the group-commit buffer that
//! `Core::commit_buffer` drains the same way. That single place is where a
//! future replica feed would hook in (DESIGN.md, "Past one machine").
//!
//! Trusts: the caller to open an environment once per process, after fork.
//! A second `open` of the same path in one process shares the first.

use crate::error::{lmdb, Result, StoreError};
use heed::types::Bytes;
use heed::{CompactionOption, Database, Env, EnvOpenOptions, RoTxn, RwTxn};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

pub(crate) type Db = Database<Bytes, Bytes>;
/// Merged, sorted [start, end] address ranges.
pub(crate) type Ranges = Arc<Vec<(u128, u128)>>;

const SCHEMA_VERSION: u32 = 1;

/// How an environment is opened. Timings may change later (`configure`);
/// prefix lengths are fixed when the environment is created.
#[derive(Clone, Debug)]
pub struct Options {
    pub map_size: usize,
    /// None: the length stored in an existing environment (32/64 for a new one).
    pub ipv4_prefix: Option<u8>,
    pub ipv6_prefix: Option<u8>,
    pub min_delay: u64,
    pub retry_window: u64,
    pub pass_ttl: u64,
    /// Group-commit window; zero commits every write at once.
    pub commit_window: Duration,
    pub ipv6_new_per_48: u32,
    pub max_readers: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            map_size: 64 << 30,
            ipv4_prefix: Some(32),
            ipv6_prefix: Some(64),
            min_delay: 60,
            retry_window: 86_400,
            pass_ttl: 30 * 86_400,
            commit_window: Duration::from_millis(100),
            ipv6_new_per_48: 4096,
            max_readers: 1024,
        }
    }
}

/// Recon timings, readable without a lock on the hot path.
pub(crate) struct Timings {
    pub min_delay: AtomicU64,
    pub retry_window: AtomicU64,
    pub pass_ttl: AtomicU64,
}

impl Timings {
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.min_delay.load(Ordering::Relaxed),
            self.retry_window.load(Ordering::Relaxed),
            self.pass_ttl.load(Ordering::Relaxed),
        )
    }
}

/// Writes waiting for the next group commit. Reads consult `cur`, then the
/// batch being committed (`inflight`), then LMDB.
#[derive(Default)]
pub(crate) struct Batch {
    pub recon: HashMap<u128, crate::recon::Row>,
    pub pending: HashMap<Vec<u8>, u64>,
    pub v6cap: HashMap<u128, (u64, u32)>,
    pub events: HashMap<Vec<u8>, (u64, u64)>,
}

impl Batch {
    fn len(&self) -> usize {
        self.recon.len() + self.pending.len() + self.v6cap.len() + self.events.len()
    }
}

#[derive(Default)]
pub(crate) struct Buffer {
    pub cur: Batch,
    pub inflight: Option<Arc<Batch>>,
}

impl Buffer {
    pub fn recon(&self, k: u128) -> Option<crate::recon::Row> {
        self.cur
            .recon
            .get(&k)
            .or_else(|| self.inflight.as_ref().and_then(|b| b.recon.get(&k)))
            .copied()
    }
}

/// Above this many buffered rows a writer stops waiting for the window.
const BUFFER_HIGH_WATER: usize = 200_000;

pub struct Core {
    pub(crate) env: Env,
    pub(crate) path: PathBuf,
    pub(crate) map_size: usize,
    pub(crate) ipv4_prefix: u8,
    pub(crate) ipv6_prefix: u8,
    pub(crate) ipv6_new_per_48: AtomicU32,
    pub(crate) timings: Timings,
    commit_window_us: AtomicU64,
    pub(crate) meta: Db,
    pub(crate) recon: Db,
    pub(crate) exempt_raw: Db,
    pub(crate) exempt_iv: Db,
    pub(crate) pending: Db,
    pub(crate) v6cap: Db,
    pub(crate) rep_lists: Db,
    pub(crate) rep_iv: Db,
    pub(crate) rep_events: Db,
    pub(crate) community: Db,
    write_lock: Mutex<()>,
    pub(crate) buf: Mutex<Buffer>,
    wake: Condvar,
    shutdown: AtomicBool,
    closed: AtomicBool,
    /// Set when a commit hit MDB_MAP_FULL: new sources are then not
    /// remembered (deferred) until a commit succeeds again.
    pub(crate) map_full: AtomicBool,
    pub(crate) rep_cache: RwLock<crate::reputation::DirCache>,
    /// Exempt networks of the snapshot with this transaction id: the list
    /// is tiny and read on every check, so it is re-read only when a commit
    /// (of any process) has moved the snapshot.
    pub(crate) exempt_cache: RwLock<(usize, Ranges)>,
    pub(crate) sweep_cursor: Mutex<crate::recon::SweepCursor>,
    pub(crate) stats: Stats,
}

#[derive(Default)]
pub struct Stats {
    pub commits: AtomicU64,
    pub committed_rows: AtomicU64,
    pub dropped_rows: AtomicU64,
    pub commit_errors: AtomicU64,
    pub refused_new: AtomicU64,
}

/// A handle on an open environment; the last handle dropped flushes the
/// buffer and stops the group-commit thread.
pub struct Store {
    core: Arc<Core>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl std::ops::Deref for Store {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

static OPEN: LazyLock<Mutex<HashMap<PathBuf, Weak<Store>>>> = LazyLock::new(Default::default);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of our locks leaves plain data behind; the
    // store never panics on input, so recover rather than poison forever.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
pub(crate) use lock as plock;

fn storage(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(format!("{context}: {e}"))
}

impl Store {
    /// Open (creating when missing) the environment in directory `path`.
    pub fn open(path: &Path, opts: &Options) -> Result<Arc<Store>> {
        if let Some(p) = opts.ipv4_prefix.filter(|p| *p == 0 || *p > 32) {
            return Err(StoreError::invalid(format!(
                "ipv4_prefix must be 1..32, not {p}"
            )));
        }
        if let Some(p) = opts.ipv6_prefix.filter(|p| *p == 0 || *p > 128) {
            return Err(StoreError::invalid(format!(
                "ipv6_prefix must be 1..128, not {p}"
            )));
        }
        if opts.min_delay > opts.retry_window {
            return Err(StoreError::invalid(format!(
                "min_delay ({} s) is longer than retry_window ({} s)",
                opts.min_delay, opts.retry_window
            )));
        }
        std::fs::create_dir_all(path)
            .map_err(|e| storage(&format!("cannot create {}", path.display()), e))?;
        let canon = path
            .canonicalize()
            .map_err(|e| storage(&format!("cannot resolve {}", path.display()), e))?;
        let mut open = lock(&OPEN);
        if let Some(existing) = open.get(&canon).and_then(Weak::upgrade) {
            if existing.closed.load(Ordering::SeqCst) {
                return Err(StoreError::Storage(format!(
                    "the core at {} was closed but is still referenced in this process; \
                     drop those references before opening it again",
                    canon.display()
                )));
            }
            if !prefixes_agree(existing.ipv4_prefix, existing.ipv6_prefix, opts) {
                return Err(mismatch(
                    &canon,
                    existing.ipv4_prefix,
                    existing.ipv6_prefix,
                    opts,
                ));
            }
            existing.configure(
                Some(opts.min_delay),
                Some(opts.retry_window),
                Some(opts.pass_ttl),
            )?;
            return Ok(existing);
        }
        let core = Arc::new(Core::open(&canon, opts)?);
        let thread_core = Arc::clone(&core);
        let flusher = std::thread::Builder::new()
            .name("kithmail-commit".into())
            .spawn(move || thread_core.flusher_loop())
            .map_err(|e| storage("cannot start the group-commit thread", e))?;
        let store = Arc::new(Store {
            core,
            flusher: Mutex::new(Some(flusher)),
        });
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(canon, Arc::downgrade(&store));
        Ok(store)
    }

    /// Commit the buffer and stop the group-commit thread; later calls fail.
    pub fn close(&self) -> Result<()> {
        if self.core.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.core.shutdown.store(true, Ordering::SeqCst);
        self.core.wake.notify_all();
        if let Some(h) = lock(&self.flusher).take() {
            let _ = h.join();
        }
        self.core.commit_buffer()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn prefixes_agree(v4: u8, v6: u8, opts: &Options) -> bool {
    opts.ipv4_prefix.is_none_or(|p| p == v4) && opts.ipv6_prefix.is_none_or(|p| p == v6)
}

fn mismatch(path: &Path, v4: u8, v6: u8, opts: &Options) -> StoreError {
    let show = |p: Option<u8>, stored: u8| p.unwrap_or(stored);
    StoreError::ConfigMismatch(format!(
        "the Recon table in {} was built with ipv4_prefix = {v4}, ipv6_prefix = {v6}; \
         the config asks for ipv4_prefix = {}, ipv6_prefix = {}. Set them back, or move \
         the core directory aside to start the table afresh",
        path.display(),
        show(opts.ipv4_prefix, v4),
        show(opts.ipv6_prefix, v6)
    ))
}

impl Core {
    fn open(path: &Path, opts: &Options) -> Result<Core> {
        let mut eo = EnvOpenOptions::new();
        eo.map_size(opts.map_size)
            .max_dbs(16)
            .max_readers(opts.max_readers);
        // SAFETY: the environment is opened once per process (the OPEN
        // registry shares it), on a local filesystem, and never modified
        // behind LMDB's back; DESIGN.md requires opening after any fork.
        let env = unsafe { eo.open(path) }.map_err(|e| lmdb("cannot open the core", e, 0))?;
        // A reader killed mid-transaction leaves its slot; clear them now.
        env.clear_stale_readers()
            .map_err(|e| lmdb("cannot clear stale readers", e, opts.map_size))?;
        let map_size = env.info().map_size;
        let mut wtxn = env
            .write_txn()
            .map_err(|e| lmdb("cannot open the core", e, map_size))?;
        let mk = |txn: &mut RwTxn, name: &str| -> Result<Db> {
            env.create_database(txn, Some(name))
                .map_err(|e| lmdb(&format!("cannot open table {name}"), e, map_size))
        };
        let meta = mk(&mut wtxn, "meta")?;
        let dbs = [
            "recon",
            "recon_exempt",
            "recon_exempt_iv",
            "recon_pending",
            "recon_v6cap",
            "rep_lists",
            "rep_iv",
            "rep_events",
            "community",
        ]
        .iter()
        .map(|n| mk(&mut wtxn, n))
        .collect::<Result<Vec<_>>>()?;
        let get_u8 = |txn: &RwTxn, k: &[u8]| -> Result<Option<u8>> {
            Ok(meta
                .get(txn, k)
                .map_err(|e| lmdb("cannot read meta", e, map_size))?
                .and_then(|v| v.first().copied()))
        };
        let (v4, v6) = match (
            get_u8(&wtxn, b"ipv4_prefix")?,
            get_u8(&wtxn, b"ipv6_prefix")?,
        ) {
            (Some(v4), Some(v6)) => {
                if !prefixes_agree(v4, v6, opts) {
                    return Err(mismatch(path, v4, v6, opts));
                }
                (v4, v6)
            }
            _ => {
                let (v4, v6) = (
                    opts.ipv4_prefix.unwrap_or(32),
                    opts.ipv6_prefix.unwrap_or(64),
                );
                let put = |txn: &mut RwTxn, k: &[u8], v: &[u8]| {
                    meta.put(txn, k, v)
                        .map_err(|e| lmdb("cannot write meta", e, map_size))
                };
                put(&mut wtxn, b"ipv4_prefix", &[v4])?;
                put(&mut wtxn, b"ipv6_prefix", &[v6])?;
                put(&mut wtxn, b"schema", &SCHEMA_VERSION.to_be_bytes())?;
                (v4, v6)
            }
        };
        if let Some(v) = meta
            .get(&wtxn, b"schema")
            .map_err(|e| lmdb("cannot read meta", e, map_size))?
        {
            let found = v.try_into().map(u32::from_be_bytes).unwrap_or(u32::MAX);
            if found > SCHEMA_VERSION {
                return Err(StoreError::ConfigMismatch(format!(
                    "the core in {} has schema version {found}, newer than this kithmail \
                     understands ({SCHEMA_VERSION}); run the newer kithmail",
                    path.display()
                )));
            }
        }
        wtxn.commit()
            .map_err(|e| lmdb("cannot open the core", e, map_size))?;
        let d = |i: usize| dbs[i];
        Ok(Core {
            path: path.to_path_buf(),
            map_size,
            ipv4_prefix: v4,
            ipv6_prefix: v6,
            ipv6_new_per_48: AtomicU32::new(opts.ipv6_new_per_48),
            timings: Timings {
                min_delay: AtomicU64::new(opts.min_delay),
                retry_window: AtomicU64::new(opts.retry_window),
                pass_ttl: AtomicU64::new(opts.pass_ttl),
            },
            commit_window_us: AtomicU64::new(opts.commit_window.as_micros() as u64),
            meta,
            recon: d(0),
            exempt_raw: d(1),
            exempt_iv: d(2),
            pending: d(3),
            v6cap: d(4),
            rep_lists: d(5),
            rep_iv: d(6),
            rep_events: d(7),
            community: d(8),
            env,
            write_lock: Mutex::new(()),
            buf: Mutex::new(Buffer::default()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            map_full: AtomicBool::new(false),
            rep_cache: RwLock::new(Default::default()),
            exempt_cache: RwLock::new((usize::MAX, Arc::new(Vec::new()))),
            sweep_cursor: Mutex::new(Default::default()),
            stats: Stats::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn prefixes(&self) -> (u8, u8) {
        (self.ipv4_prefix, self.ipv6_prefix)
    }

    /// Change Recon timings in place (a config reload).
    pub fn configure(
        &self,
        min_delay: Option<u64>,
        retry_window: Option<u64>,
        pass_ttl: Option<u64>,
    ) -> Result<()> {
        let (m0, r0, p0) = self.timings.get();
        let (m, r, p) = (
            min_delay.unwrap_or(m0),
            retry_window.unwrap_or(r0),
            pass_ttl.unwrap_or(p0),
        );
        if m > r {
            return Err(StoreError::invalid(format!(
                "min_delay ({m} s) is longer than retry_window ({r} s)"
            )));
        }
        self.timings.min_delay.store(m, Ordering::Relaxed);
        self.timings.retry_window.store(r, Ordering::Relaxed);
        self.timings.pass_ttl.store(p, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            Err(StoreError::Storage(format!(
                "the core at {} is closed",
                self.path.display()
            )))
        } else {
            Ok(())
        }
    }

    /// Run `f` in one read transaction.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&RoTxn) -> Result<T>) -> Result<T> {
        self.check_open()?;
        let txn = self
            .env
            .read_txn()
            .map_err(|e| lmdb("cannot begin a read", e, self.map_size))?;
        f(&txn)
    }

    /// The one writer: run `f` in one write transaction and commit it.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut RwTxn) -> Result<T>) -> Result<T> {
        self.check_open()?;
        let _w = lock(&self.write_lock);
        self.write_locked(f)
    }

    fn write_locked<T>(&self, f: impl FnOnce(&mut RwTxn) -> Result<T>) -> Result<T> {
        let mut txn = self
            .env
            .write_txn()
            .map_err(|e| lmdb("cannot begin a write", e, self.map_size))?;
        let out = f(&mut txn)?;
        txn.commit()
            .map_err(|e| lmdb("cannot commit", e, self.map_size))?;
        Ok(out)
    }

    /// Map an LMDB error, naming what was being done. Borrows its context so
    /// the hot path allocates nothing unless an error happens.
    pub(crate) fn lmdb_err<'a>(
        &'a self,
        context: &'a str,
    ) -> impl Fn(heed::Error) -> StoreError + 'a {
        move |e| lmdb(context, e, self.map_size)
    }

    /// Put rows into the group-commit buffer and wake the committer when the
    /// window is zero or the buffer is large.
    pub(crate) fn buffered<T>(&self, f: impl FnOnce(&mut Buffer) -> T) -> Result<T> {
        let (out, n) = {
            let mut b = lock(&self.buf);
            let out = f(&mut b);
            (out, b.cur.len())
        };
        if self.commit_window_us.load(Ordering::Relaxed) == 0 {
            self.commit_buffer()?;
        } else if n >= BUFFER_HIGH_WATER {
            self.wake.notify_one();
        }
        Ok(out)
    }

    /// Commit everything buffered, in one transaction.
    pub fn flush(&self) -> Result<()> {
        self.check_open()?;
        self.commit_buffer()
    }

    pub(crate) fn commit_buffer(&self) -> Result<()> {
        let _w = lock(&self.write_lock);
        let batch = {
            let mut b = lock(&self.buf);
            if b.cur.len() == 0 {
                return Ok(());
            }
            let batch = Arc::new(std::mem::take(&mut b.cur));
            b.inflight = Some(Arc::clone(&batch));
            batch
        };
        let rows = batch.len() as u64;
        let res = self.write_locked(|txn| self.apply_batch(txn, &batch));
        lock(&self.buf).inflight = None;
        match res {
            Ok(()) => {
                self.map_full.store(false, Ordering::Relaxed);
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats.committed_rows.fetch_add(rows, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // The batch is dropped: Recon sightings and event counts only.
                // Losing them defers some sources once more; no mail is lost.
                if matches!(e, StoreError::MapFull { .. }) {
                    self.map_full.store(true, Ordering::Relaxed);
                }
                self.stats.dropped_rows.fetch_add(rows, Ordering::Relaxed);
                self.stats.commit_errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn apply_batch(&self, txn: &mut RwTxn, b: &Batch) -> Result<()> {
        crate::recon::apply(self, txn, b)?;
        crate::reputation::apply_events(self, txn, &b.events)
    }

    fn flusher_loop(&self) {
        loop {
            let window =
                Duration::from_micros(self.commit_window_us.load(Ordering::Relaxed).max(1000));
            {
                let b = lock(&self.buf);
                if !self.shutdown.load(Ordering::SeqCst) {
                    let _ = self.wake.wait_timeout(b, window);
                }
            }
            if self.shutdown.load(Ordering::SeqCst) {
                return;
            }
            // An error here was counted in stats; the next window retries.
            let _ = self.commit_buffer();
        }
    }

    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>> {
        let info = self.env.info();
        let used = self
            .env
            .non_free_pages_size()
            .map_err(self.lmdb_err("cannot read the map use"))?;
        let (recon_rows, rep_intervals, community_rows) = self.read(|txn| {
            let n = |d: &Db| d.len(txn).map_err(self.lmdb_err("cannot count"));
            Ok((n(&self.recon)?, n(&self.rep_iv)?, n(&self.community)?))
        })?;
        let buffered = lock(&self.buf).cur.len() as u64;
        let s = &self.stats;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ok(vec![
            ("ipv4_prefix", self.ipv4_prefix as u64),
            ("ipv6_prefix", self.ipv6_prefix as u64),
            ("map_size_bytes", info.map_size as u64),
            ("map_used_bytes", used),
            ("readers", info.number_of_readers as u64),
            ("recon_rows", recon_rows),
            ("reputation_intervals", rep_intervals),
            ("community_rows", community_rows),
            ("buffered_rows", buffered),
            ("commits", r(&s.commits)),
            ("committed_rows", r(&s.committed_rows)),
            ("dropped_rows", r(&s.dropped_rows)),
            ("commit_errors", r(&s.commit_errors)),
            ("refused_new_sources", r(&s.refused_new)),
            ("map_full", self.map_full.load(Ordering::Relaxed) as u64),
        ])
    }
}

/// Big-endian fixed-width helpers for values.
pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

pub(crate) fn be_u128(b: &[u8], at: usize) -> u128 {
    let mut a = [0u8; 16];
    if let Some(s) = b.get(at..at + 16) {
        a.copy_from_slice(s);
    }
    u128::from_be_bytes(a)
}

impl Core {
    /// Every `every`-th row of a table, up to `max` rows: raw key and value.
    /// For benchmarks and diagnostics (`kithmail-floor` samples its queries
    /// from the tables it measures).
    pub fn sample(&self, table: &str, every: u64, max: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let db = match table {
            "recon" => self.recon,
            "rep_iv" => self.rep_iv,
            "community" => self.community,
            other => return Err(StoreError::invalid(format!("no table {other:?}"))),
        };
        let every = every.max(1);
        let err = self.lmdb_err("sample");
        self.read(|txn| {
            let mut out = Vec::new();
            for (i, kv) in db.iter(txn).map_err(&err)?.enumerate() {
                if out.len() >= max {
                    break;
                }
                if (i as u64) % every == 0 {
                    let (k, v) = kv.map_err(&err)?;
                    out.push((k.to_vec(), v.to_vec()));
                }
            }
            Ok(out)
        })
    }

    pub fn len_of(&self, table: &str) -> Result<u64> {
        let db = match table {
            "recon" => self.recon,
            "rep_iv" => self.rep_iv,
            "community" => self.community,
            other => return Err(StoreError::invalid(format!("no table {other:?}"))),
        };
        self.read(|txn| db.len(txn).map_err(self.lmdb_err("count")))
    }
}

/// The name of the copy's data file inside its directory; LMDB makes the
/// lock file beside it when the copy is first opened.
pub const COPY_FILE: &str = "data.mdb";

impl Core {
    /// A consistent copy of the whole environment into `dir`, as
    /// `dir/data.mdb`; the number of bytes written.
    ///
    /// `dir` must be a new directory (its parent existing) or an empty one:
    /// anything else is refused, so a copy never lands on top of another
    /// environment. LMDB copies one read transaction's snapshot
    /// (`mdb_env_copyfd2`), so every transaction committed before the copy
    /// began is in it, none after, and writers of this and other processes
    /// go on meanwhile; `compact` (MDB_CP_COMPACT) leaves out free pages and
    /// renumbers the rest, and does not even take the writer's lock for the
    /// first pages as a plain copy does. The copy is written under a
    /// `.partial` name, fsync'd and renamed, so `data.mdb` in `dir` is always
    /// a whole copy. It opens as any environment does (`Store::open(dir)`).
    ///
    /// Rows still in this process's group-commit buffer are not committed,
    /// so not in the copy: `flush` first to have them (the copy itself never
    /// waits for a writer, this process's included).
    pub fn copy_to(&self, dir: &Path, compact: bool) -> Result<u64> {
        self.check_open()?;
        prepare_copy_dir(dir)?;
        let part = dir.join(format!("{COPY_FILE}.partial"));
        let res = self.copy_into(&part, compact);
        if res.is_err() {
            let _ = std::fs::remove_file(&part);
            return res;
        }
        let done = dir.join(COPY_FILE);
        std::fs::rename(&part, &done)
            .map_err(|e| storage(&format!("cannot rename {}", part.display()), e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| storage(&format!("cannot sync {}", dir.display()), e))?;
        res
    }

    fn copy_into(&self, part: &Path, compact: bool) -> Result<u64> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(part)
            .map_err(|e| storage(&format!("cannot create {}", part.display()), e))?;
        let option = if compact {
            CompactionOption::Enabled
        } else {
            CompactionOption::Disabled
        };
        self.env
            .copy_to_file(&mut file, option)
            .map_err(self.lmdb_err("cannot copy the core"))?;
        file.sync_all()
            .map_err(|e| storage(&format!("cannot sync {}", part.display()), e))?;
        file.metadata()
            .map(|m| m.len())
            .map_err(|e| storage(&format!("cannot stat {}", part.display()), e))
    }
}

/// Make sure `dir` is an empty directory, creating it (0700) when missing.
fn prepare_copy_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(StoreError::invalid(format!(
                "{} is not empty: the core is copied into a new or empty directory",
                dir.display()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| storage(&format!("cannot create {}", dir.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(StoreError::invalid(format!(
                "{} is not a directory: the core is copied into a new or empty directory",
                dir.display()
            )))
        }
        Err(e) => Err(storage(&format!("cannot read {}", dir.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compacted copy reads one snapshot and takes no writer's lock, so
    /// a write transaction held open meanwhile neither blocks it nor shows
    /// in it.
    #[test]
    fn a_copy_does_not_wait_for_the_writer() -> Result<()> {
        let io = |e: std::io::Error| StoreError::Storage(e.to_string());
        let dir = tempfile::tempdir().map_err(io)?;
        let s = Store::open(&dir.path().join("core"), &Options::default())?;
        let copy = dir.path().join("copy");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        s.write(|txn| {
            s.meta
                .put(txn, b"uncommitted", b"1")
                .map_err(s.lmdb_err("put"))?;
            let (s2, copy2) = (Arc::clone(&s), copy.clone());
            std::thread::spawn(move || {
                let _ = done_tx.send(s2.copy_to(&copy2, true));
            });
            // A generous bound: a copy that waited for this writer would
            // wait for ever (the transaction ends only after the answer).
            match done_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(res) => res.map(|_| ()),
                Err(e) => Err(StoreError::Storage(format!("the copy waited: {e}"))),
            }
        })?;
        let c = Store::open(&copy, &Options::default())?;
        let got = c.read(|txn| {
            c.meta
                .get(txn, b"uncommitted")
                .map_err(c.lmdb_err("get"))
                .map(|v| v.is_some())
        })?;
        assert!(
            !got,
            "the copy holds a write that was not committed when it began"
        );
        Ok(())
    }
}
