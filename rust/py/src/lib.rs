//! kithmail._core: the PyO3 glue over kithmail-store.
//!
//! It does three things only: take owned values out of Python, call the
//! store, and turn the result or error back. Batch calls, writes, loads and
//! sweeps release the GIL (`py.detach`). Single point lookups keep it:
//! measured on a 100 k-source table (release, `Recon.check`), keeping it gave
//! 1.83 M/s from one thread and 1.90 M/s from two; releasing it gave 1.79 M/s
//! and 1.25 M/s, the two threads then fighting over the GIL hand-off.

// Python keyword signatures map one to one onto Rust arguments.
#![allow(clippy::too_many_arguments)]

use kithmail_store::addr::{self, Prefix};
use kithmail_store::community::{self, Query, Scope, Source};
use kithmail_store::recon::{Outcome, Status};
use kithmail_store::reputation::{Kind, ListInfo, Match};
use kithmail_store::{Options, Store, StoreError};
use pyo3::exceptions::PyTypeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple, PyType};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------- errors

struct Exceptions {
    base: Py<PyType>,
    invalid: Py<PyType>,
    map_full: Py<PyType>,
    mismatch: Py<PyType>,
    storage: Py<PyType>,
}

static EXC: PyOnceLock<Exceptions> = PyOnceLock::new();

fn make_type(
    py: Python<'_>,
    name: &str,
    bases: Bound<'_, PyTuple>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    let ns = PyDict::new(py);
    ns.set_item("__module__", "kithmail._core")?;
    ns.set_item("__doc__", doc)?;
    let ty = py
        .import("builtins")?
        .getattr("type")?
        .call1((name, bases, ns))?;
    Ok(ty.cast_into::<PyType>()?.unbind())
}

fn exceptions(py: Python<'_>) -> PyResult<&'static Exceptions> {
    EXC.get_or_try_init(py, || {
        let exc = py.get_type::<pyo3::exceptions::PyException>();
        let value = py.get_type::<pyo3::exceptions::PyValueError>();
        let base = make_type(
            py,
            "CoreError",
            PyTuple::new(py, [exc])?,
            "Base of every error the core raises.",
        )?;
        let b = base.bind(py).clone();
        let invalid = make_type(
            py,
            "InvalidInputError",
            PyTuple::new(py, [b.clone(), value])?,
            "A malformed IP, CIDR, address, user or name; the message names it.",
        )?;
        let one = |name: &str, doc: &str| make_type(py, name, PyTuple::new(py, [b.clone()])?, doc);
        Ok(Exceptions {
            invalid,
            map_full: one(
                "MapFullError",
                "The LMDB map is full; the message names the setting to raise.",
            )?,
            mismatch: one(
                "ConfigMismatchError",
                "The environment was created with other prefix lengths than asked.",
            )?,
            storage: one(
                "StorageError",
                "Any other LMDB or I/O failure, with the LMDB cause in the message.",
            )?,
            base,
        })
    })
}

/// The one mapping from store errors to Python exceptions.
fn err(e: StoreError) -> PyErr {
    Python::attach(|py| {
        let exc = match exceptions(py) {
            Ok(x) => x,
            Err(e) => return e,
        };
        let ty = match &e {
            StoreError::InvalidInput(_) => &exc.invalid,
            StoreError::MapFull { .. } => &exc.map_full,
            StoreError::ConfigMismatch(_) => &exc.mismatch,
            StoreError::Storage(_) => &exc.storage,
        };
        PyErr::from_type(ty.bind(py).clone(), e.to_string())
    })
}

trait IntoPy<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, StoreError> {
    fn py(self) -> PyResult<T> {
        self.map_err(err)
    }
}

// ---------------------------------------------------------------- inputs

fn ip_of(ob: &Bound<'_, PyAny>) -> PyResult<u128> {
    if let Ok(s) = ob.cast::<PyString>() {
        addr::parse_ip(s.to_str()?).py()
    } else if let Ok(b) = ob.cast::<PyBytes>() {
        addr::parse_packed(b.as_bytes()).py()
    } else {
        Err(PyTypeError::new_err(format!(
            "an IP address must be str or bytes, not {}",
            ob.get_type().name()?
        )))
    }
}

fn ips_of(obs: &Bound<'_, PyAny>) -> PyResult<Vec<u128>> {
    // A str or bytes is iterable, but one address is not a batch of them.
    if obs.is_instance_of::<PyString>() || obs.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err(
            "expected a sequence of addresses, not a single str or bytes",
        ));
    }
    let mut v = Vec::with_capacity(obs.len().unwrap_or(0));
    for ob in obs.try_iter()? {
        v.push(ip_of(&ob?)?);
    }
    Ok(v)
}

fn kind_of(s: &str) -> PyResult<Kind> {
    Kind::parse(s).py()
}

// ---------------------------------------------------------------- Recon

#[pyclass(frozen, module = "kithmail._core")]
struct ReconResult {
    o: Outcome,
}

fn status_str<'py>(py: Python<'py>, s: Status) -> &'py Bound<'py, PyString> {
    match s {
        Status::New => intern!(py, "new"),
        Status::TooEarly => intern!(py, "too_early"),
        Status::Passed => intern!(py, "passed"),
        Status::Known => intern!(py, "known"),
        Status::Exempt => intern!(py, "exempt"),
    }
}

#[pymethods]
impl ReconResult {
    #[getter]
    fn status<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        status_str(py, self.o.status).clone()
    }
    #[getter]
    fn first_seen(&self) -> u64 {
        self.o.first_seen
    }
    #[getter]
    fn pass_until(&self) -> u64 {
        self.o.pass_until
    }
    #[getter]
    fn recorded(&self) -> bool {
        self.o.recorded
    }
    #[getter]
    fn lapsed(&self) -> bool {
        self.o.lapsed
    }
    fn __repr__(&self) -> String {
        format!(
            "ReconResult(status={:?}, first_seen={}, pass_until={}, recorded={}, lapsed={})",
            self.o.status.as_str(),
            self.o.first_seen,
            self.o.pass_until,
            if self.o.recorded { "True" } else { "False" },
            if self.o.lapsed { "True" } else { "False" }
        )
    }
}

#[pyclass(frozen, module = "kithmail._core", get_all)]
struct ReconEntry {
    network: String,
    first_seen: u64,
    last_seen: u64,
    pass_until: u64,
    attempts: u32,
    passes: u32,
}

#[pymethods]
impl ReconEntry {
    fn __repr__(&self) -> String {
        format!(
            "ReconEntry(network={:?}, first_seen={}, last_seen={}, pass_until={}, attempts={}, passes={})",
            self.network, self.first_seen, self.last_seen, self.pass_until, self.attempts, self.passes
        )
    }
}

#[pyclass(frozen, module = "kithmail._core", get_all)]
struct SweepResult {
    scanned: u64,
    removed: u64,
    wrapped: bool,
}

#[pymethods]
impl SweepResult {
    fn __repr__(&self) -> String {
        format!(
            "SweepResult(scanned={}, removed={}, wrapped={})",
            self.scanned,
            self.removed,
            if self.wrapped { "True" } else { "False" }
        )
    }
}

#[pyclass(frozen, module = "kithmail._core")]
struct Recon {
    s: Arc<Store>,
}

#[pymethods]
impl Recon {
    /// Check one source at `now` (GIL kept: see the module comment).
    fn check(&self, ip: &Bound<'_, PyAny>, now: u64) -> PyResult<ReconResult> {
        let a = ip_of(ip)?;
        Ok(ReconResult {
            o: self.s.recon_check(a, now).py()?,
        })
    }

    /// What `check` would answer, recording nothing.
    fn peek(&self, ip: &Bound<'_, PyAny>, now: u64) -> PyResult<ReconResult> {
        let a = ip_of(ip)?;
        Ok(ReconResult {
            o: self.s.recon_peek(a, now).py()?,
        })
    }

    fn check_many(
        &self,
        py: Python<'_>,
        ips: &Bound<'_, PyAny>,
        now: u64,
    ) -> PyResult<Vec<ReconResult>> {
        let v = ips_of(ips)?;
        let s = &self.s;
        let out = py.detach(|| s.recon_check_many(&v, now)).py()?;
        Ok(out.into_iter().map(|o| ReconResult { o }).collect())
    }

    fn show(&self, ip: &Bound<'_, PyAny>) -> PyResult<Option<ReconEntry>> {
        let a = ip_of(ip)?;
        Ok(self.s.recon_show(a).py()?.map(|e| ReconEntry {
            network: addr::fmt_prefix(e.network),
            first_seen: e.row.first_seen,
            last_seen: e.row.last_seen,
            pass_until: e.row.pass_until,
            attempts: e.row.attempts,
            passes: e.row.passes,
        }))
    }

    fn exempt_add(&self, py: Python<'_>, cidr: &str) -> PyResult<bool> {
        let p = addr::parse_cidr(cidr).py()?;
        py.detach(|| self.s.recon_exempt_add(p)).py()
    }

    fn exempt_remove(&self, py: Python<'_>, cidr: &str) -> PyResult<bool> {
        let p = addr::parse_cidr(cidr).py()?;
        py.detach(|| self.s.recon_exempt_remove(p)).py()
    }

    fn exempt_list(&self) -> PyResult<Vec<String>> {
        Ok(self
            .s
            .recon_exempt_list()
            .py()?
            .into_iter()
            .map(addr::fmt_prefix)
            .collect())
    }

    fn pending_add(&self, sender_domain: &str, recipient: &str, now: u64) -> PyResult<()> {
        self.s.recon_pending_add(sender_domain, recipient, now).py()
    }

    fn pending_get(&self, sender_domain: &str, recipient: &str, now: u64) -> PyResult<Option<u64>> {
        self.s.recon_pending_get(sender_domain, recipient, now).py()
    }

    #[pyo3(signature = (now, limit = 10000))]
    fn sweep(&self, py: Python<'_>, now: u64, limit: u64) -> PyResult<SweepResult> {
        let r = py.detach(|| self.s.recon_sweep(now, limit)).py()?;
        Ok(SweepResult {
            scanned: r.scanned,
            removed: r.removed,
            wrapped: r.wrapped,
        })
    }

    #[pyo3(signature = (*, min_delay = None, retry_window = None, pass_ttl = None))]
    fn configure(
        &self,
        min_delay: Option<u64>,
        retry_window: Option<u64>,
        pass_ttl: Option<u64>,
    ) -> PyResult<()> {
        self.s.configure(min_delay, retry_window, pass_ttl).py()
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(py.detach(|| self.s.recon_len()).py()? as usize)
    }
}

// ---------------------------------------------------------------- Reputation

/// Holds the match itself; the strings are made only when asked for, so a
/// batch of lookups pays for an object per hit and nothing more.
#[pyclass(frozen, module = "kithmail._core")]
struct RepMatch {
    m: Match,
}

fn kind_str<'py>(py: Python<'py>, k: Kind) -> Bound<'py, PyString> {
    match k {
        Kind::Allow => intern!(py, "allow").clone(),
        Kind::Block => intern!(py, "block").clone(),
    }
}

#[pymethods]
impl RepMatch {
    #[getter]
    fn kind<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        kind_str(py, self.m.kind)
    }
    #[getter]
    fn list(&self) -> &str {
        self.m.info().map_or("", |l| l.name.as_str())
    }
    #[getter]
    fn action(&self) -> &str {
        self.m.info().map_or("", |l| l.action.as_str())
    }
    #[getter]
    fn score(&self) -> i32 {
        self.m.info().map_or(0, |l| l.score)
    }
    #[getter]
    fn prefix(&self) -> String {
        addr::fmt_prefix(self.m.prefix)
    }
    fn __repr__(&self) -> String {
        format!(
            "RepMatch(kind={:?}, list={:?}, action={:?}, score={}, prefix={:?})",
            self.m.kind.as_str(),
            self.list(),
            self.action(),
            self.score(),
            self.prefix()
        )
    }
}

fn rep_match(m: Match) -> RepMatch {
    RepMatch { m }
}

#[pyclass(frozen, module = "kithmail._core")]
struct RepList {
    l: ListInfo,
}

#[pymethods]
impl RepList {
    #[getter]
    fn name(&self) -> &str {
        &self.l.name
    }
    #[getter]
    fn kind<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        kind_str(py, self.l.kind)
    }
    #[getter]
    fn action(&self) -> &str {
        &self.l.action
    }
    #[getter]
    fn score(&self) -> i32 {
        self.l.score
    }
    #[getter]
    fn prefixes(&self) -> u64 {
        self.l.prefixes
    }
    #[getter]
    fn intervals(&self) -> u64 {
        self.l.intervals
    }
    #[getter]
    fn loaded_at(&self) -> u64 {
        self.l.loaded_at
    }
    fn __repr__(&self) -> String {
        format!(
            "RepList(name={:?}, kind={:?}, action={:?}, score={}, prefixes={})",
            self.l.name,
            self.l.kind.as_str(),
            self.l.action,
            self.l.score,
            self.l.prefixes
        )
    }
}

#[pyclass(frozen, module = "kithmail._core")]
struct Reputation {
    s: Arc<Store>,
}

#[pymethods]
impl Reputation {
    #[pyo3(signature = (name, kind, entries, *, action = "reject", score = 0, now = 0))]
    fn load(
        &self,
        py: Python<'_>,
        name: &str,
        kind: &str,
        entries: &Bound<'_, PyAny>,
        action: &str,
        score: i32,
        now: u64,
    ) -> PyResult<u64> {
        let k = kind_of(kind)?;
        let mut ps: Vec<Prefix> = Vec::with_capacity(entries.len().unwrap_or(0));
        for (i, e) in entries.try_iter()?.enumerate() {
            let e = e?;
            let s = e.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!("entry {}: a CIDR must be str", i + 1))
            })?;
            let p = addr::parse_cidr(s.to_str()?)
                .map_err(|e| StoreError::InvalidInput(format!("entry {}: {e}", i + 1)))
                .py()?;
            ps.push(p);
        }
        py.detach(|| self.s.rep_load(name, k, action, score, ps, now))
            .py()
    }

    #[pyo3(signature = (name, kind, path, *, action = "reject", score = 0, now = 0))]
    fn load_file(
        &self,
        py: Python<'_>,
        name: &str,
        kind: &str,
        path: PathBuf,
        action: &str,
        score: i32,
        now: u64,
    ) -> PyResult<u64> {
        let k = kind_of(kind)?;
        py.detach(|| self.s.rep_load_file(name, k, action, score, &path, now))
            .py()
    }

    fn drop(&self, py: Python<'_>, name: &str) -> PyResult<bool> {
        py.detach(|| self.s.rep_drop(name)).py()
    }

    fn lists(&self) -> PyResult<Vec<RepList>> {
        Ok(self
            .s
            .rep_lists()
            .py()?
            .into_iter()
            .map(|l| RepList { l })
            .collect())
    }

    fn lookup(&self, ip: &Bound<'_, PyAny>) -> PyResult<Option<RepMatch>> {
        let a = ip_of(ip)?;
        Ok(self.s.rep_lookup(a).py()?.map(rep_match))
    }

    fn lookup_many<'py>(
        &self,
        py: Python<'py>,
        ips: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let v = ips_of(ips)?;
        let out = py.detach(|| self.s.rep_lookup_many(&v)).py()?;
        let items: Vec<Option<RepMatch>> = out.into_iter().map(|m| m.map(rep_match)).collect();
        PyList::new(py, items)
    }

    #[pyo3(signature = (ip, event, now, n = 1))]
    fn record(&self, ip: &Bound<'_, PyAny>, event: &str, now: u64, n: u64) -> PyResult<()> {
        let a = ip_of(ip)?;
        self.s.rep_record(a, event, now, n).py()
    }

    fn counters<'py>(
        &self,
        py: Python<'py>,
        ip: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let a = ip_of(ip)?;
        let d = PyDict::new(py);
        for (ev, ipc, netc) in self.s.rep_counters(a).py()? {
            d.set_item(ev, (ipc, netc))?;
        }
        Ok(d)
    }

    /// Forget counters whose last event is more than `older_than` seconds
    /// before `now`, scanning at most `limit` from where the last call
    /// stopped; GIL released.
    #[pyo3(signature = (now, older_than, limit = 10000))]
    fn sweep(
        &self,
        py: Python<'_>,
        now: u64,
        older_than: u64,
        limit: u64,
    ) -> PyResult<SweepResult> {
        let r = py
            .detach(|| self.s.rep_sweep(now, older_than, limit))
            .py()?;
        Ok(SweepResult {
            scanned: r.scanned,
            removed: r.removed,
            wrapped: r.wrapped,
        })
    }
}

// ---------------------------------------------------------------- Community

#[pyclass(frozen, module = "kithmail._core")]
struct Membership {
    m: community::Membership,
}

#[pymethods]
impl Membership {
    #[getter]
    fn status<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        match self.m.status {
            community::Status::Allowed => intern!(py, "allowed").clone(),
            community::Status::Blocked => intern!(py, "blocked").clone(),
            community::Status::Unknown => intern!(py, "unknown").clone(),
        }
    }
    #[getter]
    fn entry(&self) -> Option<&str> {
        self.m.matched.as_ref().map(|(e, _, _)| e.as_str())
    }
    #[getter]
    fn scope(&self) -> Option<&'static str> {
        self.m.matched.as_ref().map(|(_, s, _)| match s {
            Scope::User => "user",
            Scope::Org => "org",
        })
    }
    #[getter]
    fn source(&self) -> Option<&'static str> {
        self.m.matched.as_ref().map(|(_, _, s)| s.as_str())
    }
    fn __repr__(&self) -> String {
        let opt = |v: Option<&str>| v.map_or("None".to_string(), |s| format!("{s:?}"));
        format!(
            "Membership(status={:?}, entry={}, scope={}, source={})",
            self.m.status.as_str(),
            opt(self.entry()),
            opt(self.scope()),
            opt(self.source())
        )
    }
}

#[pyclass(frozen, module = "kithmail._core")]
struct CommunityEntry {
    e: community::Entry,
}

#[pymethods]
impl CommunityEntry {
    #[getter]
    fn entry(&self) -> &str {
        &self.e.entry
    }
    #[getter]
    fn kind<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        kind_str(py, self.e.kind)
    }
    #[getter]
    fn source(&self) -> &'static str {
        self.e.source.as_str()
    }
    #[getter]
    fn added(&self) -> u64 {
        self.e.added
    }
    fn __repr__(&self) -> String {
        format!(
            "CommunityEntry(entry={:?}, kind={:?}, source={:?}, added={})",
            self.e.entry,
            self.e.kind.as_str(),
            self.e.source.as_str(),
            self.e.added
        )
    }
}

#[pyclass(frozen, module = "kithmail._core")]
struct Community {
    s: Arc<Store>,
}

#[pymethods]
impl Community {
    #[pyo3(signature = (user, entry, kind = "allow", source = "manual", now = 0))]
    fn add(
        &self,
        py: Python<'_>,
        user: &str,
        entry: &str,
        kind: &str,
        source: &str,
        now: u64,
    ) -> PyResult<bool> {
        let (k, src) = (kind_of(kind)?, Source::parse(source).py()?);
        py.detach(|| self.s.community_add(user, entry, k, src, now))
            .py()
    }

    #[pyo3(signature = (user, entries, kind = "allow", source = "import", now = 0))]
    fn add_many(
        &self,
        py: Python<'_>,
        user: &str,
        entries: &Bound<'_, PyAny>,
        kind: &str,
        source: &str,
        now: u64,
    ) -> PyResult<u64> {
        let (k, src) = (kind_of(kind)?, Source::parse(source).py()?);
        let mut v: Vec<String> = Vec::with_capacity(entries.len().unwrap_or(0));
        for e in entries.try_iter()? {
            v.push(e?.extract::<String>()?);
        }
        py.detach(|| self.s.community_add_many(user, &v, k, src, now))
            .py()
    }

    fn remove(&self, py: Python<'_>, user: &str, entry: &str) -> PyResult<bool> {
        py.detach(|| self.s.community_remove(user, entry)).py()
    }

    /// Remove every entry of `user` in one transaction; the number removed.
    fn clear(&self, py: Python<'_>, user: &str) -> PyResult<u64> {
        py.detach(|| self.s.community_clear(user)).py()
    }

    fn list(&self, user: &str) -> PyResult<Vec<CommunityEntry>> {
        Ok(self
            .s
            .community_list(user)
            .py()?
            .into_iter()
            .map(|e| CommunityEntry { e })
            .collect())
    }

    fn count(&self, user: &str) -> PyResult<u64> {
        self.s.community_count(user).py()
    }

    #[pyo3(signature = (user, sender, list_id = None, org = None))]
    fn member(
        &self,
        user: &str,
        sender: &str,
        list_id: Option<&str>,
        org: Option<&str>,
    ) -> PyResult<Membership> {
        let q = Query::new(user, sender, list_id, org).py()?;
        Ok(Membership {
            m: self.s.member(&q).py()?,
        })
    }

    fn member_many(&self, py: Python<'_>, queries: &Bound<'_, PyAny>) -> PyResult<Vec<Membership>> {
        let mut qs = Vec::with_capacity(queries.len().unwrap_or(0));
        for q in queries.try_iter()? {
            let (u, s, l, o): (String, String, Option<String>, Option<String>) = q?.extract()?;
            qs.push(Query::new(&u, &s, l.as_deref(), o.as_deref()).py()?);
        }
        let out = py.detach(|| self.s.member_many(&qs)).py()?;
        Ok(out.into_iter().map(|m| Membership { m }).collect())
    }
}

#[pyfunction]
fn normalize_address(address: &str) -> PyResult<String> {
    community::normalize_address(address).py()
}

#[pyfunction]
fn normalize_entry(entry: &str) -> PyResult<String> {
    community::normalize_entry(entry).py()
}

// ---------------------------------------------------------------- Core

#[pyclass(frozen, module = "kithmail._core")]
struct Core {
    s: Arc<Store>,
    recon: Py<Recon>,
    reputation: Py<Reputation>,
    community: Py<Community>,
}

fn prefix_arg(name: &str, v: Option<u32>, max: u32) -> PyResult<Option<u8>> {
    match v {
        Some(v) if v == 0 || v > max => Err(err(StoreError::InvalidInput(format!(
            "{name} must be 1..{max}, not {v}"
        )))),
        other => Ok(other.map(|v| v as u8)),
    }
}

#[pymethods]
impl Core {
    #[new]
    #[pyo3(signature = (
        path, *, map_size = 64 << 30, ipv4_prefix = 32, ipv6_prefix = 64, min_delay = 60,
        retry_window = 86400, pass_ttl = 2592000, commit_window_ms = 100,
        ipv6_new_per_48 = 4096, max_readers = 1024
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        map_size: usize,
        ipv4_prefix: Option<u32>,
        ipv6_prefix: Option<u32>,
        min_delay: u64,
        retry_window: u64,
        pass_ttl: u64,
        commit_window_ms: u64,
        ipv6_new_per_48: u32,
        max_readers: u32,
    ) -> PyResult<Core> {
        let opts = Options {
            map_size,
            ipv4_prefix: prefix_arg("ipv4_prefix", ipv4_prefix, 32)?,
            ipv6_prefix: prefix_arg("ipv6_prefix", ipv6_prefix, 128)?,
            min_delay,
            retry_window,
            pass_ttl,
            commit_window: Duration::from_millis(commit_window_ms),
            ipv6_new_per_48,
            max_readers,
        };
        let s = py.detach(|| Store::open(&path, &opts)).py()?;
        Ok(Core {
            recon: Py::new(py, Recon { s: Arc::clone(&s) })?,
            reputation: Py::new(py, Reputation { s: Arc::clone(&s) })?,
            community: Py::new(py, Community { s: Arc::clone(&s) })?,
            s,
        })
    }

    #[getter]
    fn recon(&self, py: Python<'_>) -> Py<Recon> {
        self.recon.clone_ref(py)
    }
    #[getter]
    fn reputation(&self, py: Python<'_>) -> Py<Reputation> {
        self.reputation.clone_ref(py)
    }
    #[getter]
    fn community(&self, py: Python<'_>) -> Py<Community> {
        self.community.clone_ref(py)
    }
    #[getter]
    fn path(&self) -> String {
        self.s.path().display().to_string()
    }

    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.s.flush()).py()
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.s.close()).py()
    }

    /// A consistent copy of the environment into `path`, a new or empty
    /// directory (as `path/data.mdb`), while writers go on; GIL released.
    #[pyo3(signature = (path, *, compact = true))]
    fn copy_to(&self, py: Python<'_>, path: PathBuf, compact: bool) -> PyResult<()> {
        py.detach(|| self.s.copy_to(&path, compact)).py()?;
        Ok(())
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in py.detach(|| self.s.stats()).py()? {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("Core({:?})", self.s.path().display().to_string())
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let exc = exceptions(py)?;
    m.add("CoreError", exc.base.bind(py))?;
    m.add("InvalidInputError", exc.invalid.bind(py))?;
    m.add("MapFullError", exc.map_full.bind(py))?;
    m.add("ConfigMismatchError", exc.mismatch.bind(py))?;
    m.add("StorageError", exc.storage.bind(py))?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Core>()?;
    m.add_class::<Recon>()?;
    m.add_class::<ReconResult>()?;
    m.add_class::<ReconEntry>()?;
    m.add_class::<SweepResult>()?;
    m.add_class::<Reputation>()?;
    m.add_class::<RepMatch>()?;
    m.add_class::<RepList>()?;
    m.add_class::<Community>()?;
    m.add_class::<Membership>()?;
    m.add_class::<CommunityEntry>()?;
    m.add_function(wrap_pyfunction!(normalize_address, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_entry, m)?)?;
    Ok(())
}
