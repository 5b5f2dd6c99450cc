//! Community: each user's allowed and blocked senders (DESIGN.md, layer 5).
//!
//! Key: folded user, NUL, folded entry. An entry is an address, `@domain`
//! or `list:<List-Id>`. Addresses fold case-insensitively, local part
//! included, and IDN domains compare in their A-label form. Which identity
//! is checked, and whether it is authenticated, is the layer's business.

use crate::error::{shown, Result, StoreError};
use crate::store::{be_u64, Core};
use heed::RoTxn;
use std::borrow::Cow;
use std::ops::Bound;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Outbound,
    Sav,
    Manual,
    Import,
    Admin,
    Journal,
}

const SOURCES: [(Source, &str); 6] = [
    (Source::Outbound, "outbound"),
    (Source::Sav, "sav"),
    (Source::Manual, "manual"),
    (Source::Import, "import"),
    (Source::Admin, "admin"),
    (Source::Journal, "journal"),
];

impl Source {
    pub fn parse(s: &str) -> Result<Source> {
        SOURCES
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(v, _)| *v)
            .ok_or_else(|| {
                StoreError::invalid(format!(
                    "invalid source {} (want outbound, sav, manual, import, admin or journal)",
                    shown(s)
                ))
            })
    }
    pub fn as_str(self) -> &'static str {
        SOURCES
            .iter()
            .find(|(v, _)| *v == self)
            .map(|(_, n)| *n)
            .unwrap_or("manual")
    }
    fn code(self) -> u8 {
        SOURCES.iter().position(|(v, _)| *v == self).unwrap_or(2) as u8
    }
    fn from_code(c: u8) -> Source {
        SOURCES
            .get(c as usize)
            .map(|(v, _)| *v)
            .unwrap_or(Source::Manual)
    }
}

pub use crate::reputation::Kind;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub entry: String,
    pub kind: Kind,
    pub source: Source,
    pub added: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Allowed,
    Blocked,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Allowed => "allowed",
            Status::Blocked => "blocked",
            Status::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    User,
    Org,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub status: Status,
    /// The matching entry, folded, with its scope and source.
    pub matched: Option<(String, Scope, Source)>,
}

/// LMDB keys are at most 511 octets: user (254) + NUL + entry (254) fits.
const MAX_PART: usize = 254;
const MAX_LOCAL: usize = 64;
const MAX_DOMAIN: usize = 253;

fn bad(what: &str, s: &str, why: &str) -> StoreError {
    StoreError::invalid(format!("invalid {what} {}: {why}", shown(s)))
}

fn clean(what: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(bad(what, s, "empty"));
    }
    if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad(what, s, "control characters or white space"));
    }
    Ok(())
}

/// Fold a domain: lower case, A-labels, no trailing dot.
pub fn normalize_domain(d: &str) -> Result<Cow<'_, str>> {
    let d = d.strip_suffix('.').unwrap_or(d);
    clean("domain", d)?;
    let plain = d.bytes().all(|c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-' || c == b'_'
    });
    let out: Cow<'_, str> = if plain {
        Cow::Borrowed(d)
    } else if d.is_ascii() && !d.bytes().any(|c| c == b'[' || c == b']') {
        Cow::Owned(d.to_ascii_lowercase())
    } else {
        Cow::Owned(
            idna::domain_to_ascii(d).map_err(|_| bad("domain", d, "not a valid domain name"))?,
        )
    };
    if out.is_empty() || out.len() > MAX_DOMAIN {
        return Err(bad("domain", d, "too long or empty"));
    }
    // Letters, digits, hyphens inside labels (and `_`, which real DNS names
    // carry); no address literals, no empty labels.
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
    };
    if !out.split('.').all(label_ok) {
        return Err(bad("domain", d, "not a domain name"));
    }
    Ok(out)
}

/// Fold an address: `Local@Domain` → `local@domain` (A-label domain).
pub fn normalize_address(a: &str) -> Result<String> {
    let t = a
        .strip_prefix('<')
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or(a);
    clean("address", t)?;
    let Some((local, domain)) = t.rsplit_once('@') else {
        return Err(bad("address", a, "no @"));
    };
    if local.is_empty() || local.len() > MAX_LOCAL {
        return Err(bad("address", a, "empty or over-long local part"));
    }
    // A local part holding `@` or quotes is a quoted local part: a classic
    // relay trick, and no sender anyone means to allow.
    if local.contains(['@', '"', '\\']) {
        return Err(bad("address", a, "quoted or @ in the local part"));
    }
    let domain = normalize_domain(domain).map_err(|_| bad("address", a, "bad domain"))?;
    let local: Cow<'_, str> = if local.bytes().any(|c| c.is_ascii_uppercase()) || !local.is_ascii()
    {
        Cow::Owned(local.to_lowercase())
    } else {
        Cow::Borrowed(local)
    };
    let out = format!("{local}@{domain}");
    if out.len() > MAX_PART {
        return Err(bad("address", a, "over 254 octets"));
    }
    Ok(out)
}

fn normalize_list_id(id: &str) -> Result<String> {
    let t = id.trim();
    let inner = match (t.rfind('<'), t.rfind('>')) {
        // "Display name <list.example.com>" or "<list.example.com>"
        (Some(s), Some(e)) if s < e => &t[s + 1..e],
        _ => t,
    };
    clean("List-Id", inner)?;
    let out = format!("list:{}", inner.to_lowercase());
    if out.len() > MAX_PART {
        return Err(bad("List-Id", id, "over-long"));
    }
    Ok(out)
}

/// Fold an entry: an address, `@domain`, or `list:<List-Id>`.
pub fn normalize_entry(e: &str) -> Result<String> {
    let is_list = e.len() >= 5 && e.is_char_boundary(5) && e[..5].eq_ignore_ascii_case("list:");
    if is_list {
        normalize_list_id(&e[5..])
    } else if let Some(d) = e.strip_prefix('@') {
        Ok(format!("@{}", normalize_domain(d)?))
    } else {
        normalize_address(e)
    }
}

/// Fold a user (an address, or a tenant's pseudo-user such as `*@acme`).
pub fn normalize_user(u: &str) -> Result<String> {
    clean("user", u)?;
    if u.contains('@') {
        normalize_address(u).map_err(|_| bad("user", u, "not an address"))
    } else if u.len() > MAX_PART {
        Err(bad("user", u, "over 254 octets"))
    } else {
        Ok(u.to_lowercase())
    }
}

fn key(user: &str, entry: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + entry.len() + 1);
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k.extend_from_slice(entry.as_bytes());
    k
}

fn value(kind: Kind, source: Source, now: u64) -> [u8; 10] {
    let mut v = [0u8; 10];
    v[0] = matches!(kind, Kind::Block) as u8;
    v[1] = source.code();
    v[2..].copy_from_slice(&now.to_be_bytes());
    v
}

fn decode(entry: &[u8], v: &[u8]) -> Entry {
    Entry {
        entry: String::from_utf8_lossy(entry).into_owned(),
        kind: if v.first() == Some(&1) {
            Kind::Block
        } else {
            Kind::Allow
        },
        source: Source::from_code(v.get(1).copied().unwrap_or(2)),
        added: be_u64(v, 2),
    }
}

/// One member question, folded once.
pub struct Query {
    user: String,
    addr: String,
    at_domain: String,
    list: Option<String>,
    org: Option<String>,
}

impl Query {
    pub fn new(
        user: &str,
        sender: &str,
        list_id: Option<&str>,
        org: Option<&str>,
    ) -> Result<Query> {
        let addr = normalize_address(sender)?;
        let at_domain = match addr.rsplit_once('@') {
            Some((_, d)) => format!("@{d}"),
            None => return Err(bad("address", sender, "no @")),
        };
        Ok(Query {
            user: normalize_user(user)?,
            addr,
            at_domain,
            list: list_id.map(normalize_list_id).transpose()?,
            org: org.map(normalize_user).transpose()?,
        })
    }
}

impl Core {
    fn member_in(&self, txn: &RoTxn, q: &Query) -> Result<Membership> {
        let err = self.lmdb_err("community lookup");
        let mut k = Vec::with_capacity(512);
        let scopes = [(Some(&q.user), Scope::User), (q.org.as_ref(), Scope::Org)];
        for (who, scope) in scopes {
            let Some(who) = who else { continue };
            for entry in [Some(&q.addr), Some(&q.at_domain), q.list.as_ref()]
                .into_iter()
                .flatten()
            {
                k.clear();
                k.extend_from_slice(who.as_bytes());
                k.push(0);
                k.extend_from_slice(entry.as_bytes());
                if let Some(v) = self.community.get(txn, &k).map_err(&err)? {
                    let e = decode(entry.as_bytes(), v);
                    let status = match e.kind {
                        Kind::Allow => Status::Allowed,
                        Kind::Block => Status::Blocked,
                    };
                    return Ok(Membership {
                        status,
                        matched: Some((e.entry, scope, e.source)),
                    });
                }
            }
        }
        Ok(Membership {
            status: Status::Unknown,
            matched: None,
        })
    }

    /// The first match in the order: user address, user domain, user list,
    /// then the organisation's address, domain, list.
    pub fn member(&self, q: &Query) -> Result<Membership> {
        self.read(|txn| self.member_in(txn, q))
    }

    pub fn member_many(&self, qs: &[Query]) -> Result<Vec<Membership>> {
        self.read(|txn| qs.iter().map(|q| self.member_in(txn, q)).collect())
    }

    /// Add or update one entry; true when something changed.
    pub fn community_add(
        &self,
        user: &str,
        entry: &str,
        kind: Kind,
        source: Source,
        now: u64,
    ) -> Result<bool> {
        Ok(self.community_add_many(user, &[entry], kind, source, now)? > 0)
    }

    /// Add many entries to one user in one transaction; the number changed.
    /// A bad entry refuses the whole import, naming it.
    pub fn community_add_many<S: AsRef<str>>(
        &self,
        user: &str,
        entries: &[S],
        kind: Kind,
        source: Source,
        now: u64,
    ) -> Result<u64> {
        let user = normalize_user(user)?;
        let mut keys = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                normalize_entry(e.as_ref())
                    .map(|n| key(&user, &n))
                    .map_err(|err| {
                        if entries.len() > 1 {
                            StoreError::invalid(format!("entry {}: {err}", i + 1))
                        } else {
                            err
                        }
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        keys.sort_unstable();
        keys.dedup();
        let err = self.lmdb_err("cannot write the community");
        self.write(|txn| {
            let mut changed = 0;
            for k in &keys {
                let old = self.community.get(txn, k).map_err(&err)?;
                // Same kind already there: keep the older record and source.
                if let Some(v) = old {
                    if v.first() == Some(&(matches!(kind, Kind::Block) as u8)) {
                        continue;
                    }
                }
                self.community
                    .put(txn, k, &value(kind, source, now))
                    .map_err(&err)?;
                changed += 1;
            }
            Ok(changed)
        })
    }

    pub fn community_remove(&self, user: &str, entry: &str) -> Result<bool> {
        let k = key(&normalize_user(user)?, &normalize_entry(entry)?);
        self.write(|txn| {
            self.community
                .delete(txn, &k)
                .map_err(self.lmdb_err("cannot write the community"))
        })
    }

    /// Remove every entry of `user` in one transaction (a user who leaves);
    /// the number removed. Another user whose name starts the same is
    /// untouched: the key's NUL ends the user.
    pub fn community_clear(&self, user: &str) -> Result<u64> {
        let mut lo = normalize_user(user)?.into_bytes();
        lo.push(0);
        let mut hi = lo.clone();
        if let Some(last) = hi.last_mut() {
            *last = 1;
        }
        let range = (Bound::Included(&lo[..]), Bound::Excluded(&hi[..]));
        let err = self.lmdb_err("cannot write the community");
        self.write(|txn| {
            let n = self.community.delete_range(txn, &range).map_err(&err)?;
            Ok(n as u64)
        })
    }

    pub fn community_list(&self, user: &str) -> Result<Vec<Entry>> {
        let mut p = normalize_user(user)?.into_bytes();
        p.push(0);
        let err = self.lmdb_err("community listing");
        self.read(|txn| {
            let mut out = Vec::new();
            for kv in self.community.prefix_iter(txn, &p).map_err(&err)? {
                let (k, v) = kv.map_err(&err)?;
                out.push(decode(k.get(p.len()..).unwrap_or_default(), v));
            }
            Ok(out)
        })
    }

    pub fn community_count(&self, user: &str) -> Result<u64> {
        let mut p = normalize_user(user)?.into_bytes();
        p.push(0);
        let err = self.lmdb_err("community count");
        self.read(|txn| {
            let mut n = 0;
            for kv in self.community.prefix_iter(txn, &p).map_err(&err)? {
                kv.map_err(&err)?;
                n += 1;
            }
            Ok(n)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_removes_one_users_entries_and_no_one_elses() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
        let s = crate::Store::open(&dir.path().join("core"), &Default::default())?;
        let ann = [
            "bob@remote.example",
            "@lists.example",
            "list:news.example.org",
        ];
        s.community_add_many("Ann@Example.test", &ann, Kind::Allow, Source::Manual, 1)?;
        s.community_add(
            "ann@example.test",
            "spam@bad.example",
            Kind::Block,
            Source::Manual,
            1,
        )?;
        // A user whose address begins with ann's, and one just after it.
        s.community_add(
            "ann@example.testing",
            "bob@remote.example",
            Kind::Allow,
            Source::Manual,
            1,
        )?;
        s.community_add(
            "ann@example.tesu",
            "bob@remote.example",
            Kind::Allow,
            Source::Manual,
            1,
        )?;
        s.community_add("*@acme", "@partner.example", Kind::Allow, Source::Admin, 1)?;
        assert_eq!(s.community_clear("ANN@example.test")?, 4);
        assert_eq!(s.community_list("ann@example.test")?, vec![]);
        assert_eq!(s.community_count("ann@example.testing")?, 1);
        assert_eq!(s.community_count("ann@example.tesu")?, 1);
        assert_eq!(s.community_count("*@acme")?, 1);
        assert_eq!(s.community_clear("ann@example.test")?, 0);
        assert!(s.community_clear("not a user\0").is_err());
        Ok(())
    }

    #[test]
    fn folding() -> Result<()> {
        assert_eq!(
            normalize_address("Ann.Smith@Example.COM")?,
            "ann.smith@example.com"
        );
        assert_eq!(normalize_address("<ann@example.com>")?, "ann@example.com");
        assert_eq!(
            normalize_address("ann@bücher.example")?,
            "ann@xn--bcher-kva.example"
        );
        assert_eq!(normalize_address("ann@example.com.")?, "ann@example.com");
        assert!(normalize_entry("@@x.example").is_err());
        assert_eq!(
            normalize_entry("LIST:News.Example.org")?,
            "list:news.example.org"
        );
        assert_eq!(
            normalize_entry("@BÜCHER.example")?,
            "@xn--bcher-kva.example"
        );
        assert_eq!(
            normalize_entry("list:Announce <ANNOUNCE.lists.example.org>")?,
            "list:announce.lists.example.org"
        );
        for bad in [
            "",
            "ann",
            "@",
            "ann@",
            "@example.com x",
            "a\0b@example.com",
            "ann@exa mple.com",
            "ann@[192.0.2.1]",
            "x@@y",
            "\"a@b\"@example.com",
            "bob@-bad-.example",
            "bob@a..example",
        ] {
            assert!(normalize_address(bad).is_err(), "{bad:?}");
        }
        assert!(normalize_address(&format!("{}@example.com", "a".repeat(65))).is_err());
        assert!(normalize_user("").is_err());
        Ok(())
    }
}
