//! The tables through a real LMDB environment in a temporary directory.

#![allow(clippy::panic)] // a test fails by panicking

use kithmail_store::addr::{parse_cidr, parse_ip, Prefix};
use kithmail_store::community::{Query, Scope, Source, Status as Member};
use kithmail_store::recon::Status;
use kithmail_store::reputation::Kind;
use kithmail_store::{Options, Result, Store, StoreError};
use std::time::Duration;

fn opts() -> Options {
    Options {
        map_size: 64 << 20,
        min_delay: 60,
        retry_window: 3600,
        pass_ttl: 86_400 * 30,
        commit_window: Duration::from_secs(3600),
        ..Options::default()
    }
}

fn ip(s: &str) -> u128 {
    parse_ip(s).unwrap_or_default()
}

fn cidrs(v: &[&str]) -> Result<Vec<Prefix>> {
    v.iter().map(|s| parse_cidr(s)).collect()
}

#[test]
fn recon_cycle_survives_reopen_after_flush() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
    {
        let s = Store::open(dir.path(), &opts())?;
        assert_eq!(s.recon_check(ip("198.51.100.7"), 1000)?.status, Status::New);
        // Buffered, not committed, yet visible.
        assert_eq!(
            s.recon_check(ip("198.51.100.7"), 1010)?.status,
            Status::TooEarly
        );
        let o = s.recon_check(ip("::ffff:198.51.100.7"), 1060)?;
        assert_eq!((o.status, o.first_seen), (Status::Passed, 1000));
        s.flush()?;
        assert_eq!(s.recon_len()?, 1);
    }
    let s = Store::open(dir.path(), &opts())?;
    assert_eq!(
        s.recon_check(ip("198.51.100.7"), 2000)?.status,
        Status::Known
    );
    Ok(())
}

#[test]
fn unflushed_sightings_are_committed_when_the_last_handle_drops() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
    {
        let s = Store::open(dir.path(), &opts())?;
        s.recon_check(ip("2001:db8:1:2::1"), 5)?;
    }
    let s = Store::open(dir.path(), &opts())?;
    let e = s.recon_show(ip("2001:db8:1:2:ffff::9"))?;
    assert_eq!(
        e.map(|e| e.row.first_seen),
        Some(5),
        "same /64, committed at drop"
    );
    Ok(())
}

#[test]
fn prefix_lengths_are_fixed_at_creation() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
    drop(Store::open(dir.path(), &opts())?);
    let other = Options {
        ipv4_prefix: Some(24),
        ..opts()
    };
    match Store::open(dir.path(), &other) {
        Err(StoreError::ConfigMismatch(m)) => assert!(m.contains("ipv4_prefix = 32"), "{m}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("opened with other prefix lengths"),
    }
    // Asking for none adopts what is stored.
    let adopt = Options {
        ipv4_prefix: None,
        ipv6_prefix: None,
        ..opts()
    };
    assert_eq!(Store::open(dir.path(), &adopt)?.prefixes(), (32, 64));
    Ok(())
}

#[test]
fn ipv6_new_sources_are_capped_per_48() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
    let s = Store::open(
        dir.path(),
        &Options {
            ipv6_new_per_48: 3,
            ..opts()
        },
    )?;
    let outcomes: Vec<bool> = (0..5)
        .map(|i| {
            s.recon_check(ip(&format!("2001:db8:7:{i}::1")), 100)
                .map(|o| o.recorded)
        })
        .collect::<Result<_>>()?;
    assert_eq!(outcomes, [true, true, true, false, false]);
    // Another /48 is not affected; IPv4 never is.
    assert!(s.recon_check(ip("2001:db8:8::1"), 100)?.recorded);
    assert!(s.recon_check(ip("192.0.2.1"), 100)?.recorded);
    // After the window the /48 may add sources again.
    assert!(s.recon_check(ip("2001:db8:7:9::1"), 100 + 3601)?.recorded);
    Ok(())
}

#[test]
fn a_full_map_refuses_new_sources_and_keeps_answering_known_ones() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
    let s = Store::open(
        dir.path(),
        &Options {
            map_size: 1 << 20,
            ..opts()
        },
    )?;
    s.recon_check(ip("192.0.2.1"), 0)?;
    s.recon_check(ip("192.0.2.1"), 60)?;
    s.flush()?;
    let many: Vec<u128> = (0..100_000u32)
        .map(|i| 0xffff_0000_0000u128 | (0x0a00_0000 + i) as u128)
        .collect();
    s.recon_check_many(&many, 100)?;
    match s.flush() {
        Err(StoreError::MapFull { .. }) => {}
        other => panic!("expected a full map, got {other:?}"),
    }
    let o = s.recon_check(ip("203.0.113.5"), 101)?;
    assert_eq!((o.status, o.recorded), (Status::New, false));
    assert_eq!(s.recon_check(ip("192.0.2.1"), 102)?.status, Status::Known);
    let err = s.rep_load(
        "big",
        Kind::Block,
        "reject",
        0,
        (0..100_000u32)
            .map(|i| Prefix {
                net: 0xffff_0000_0000u128 | (i as u128) << 8,
                len: 120,
            })
            .collect(),
        0,
    );
    match err {
        Err(e @ StoreError::MapFull { .. }) => assert!(e.to_string().contains("core_map_size")),
        other => panic!("expected a full map, got {other:?}"),
    }
    Ok(())
}

#[test]
fn lpm_across_lists_and_atomic_replace() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
    let s = Store::open(dir.path(), &opts())?;
    s.rep_load(
        "feed",
        Kind::Block,
        "reject",
        10,
        cidrs(&["10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32"])?,
        1,
    )?;
    s.rep_load(
        "local",
        Kind::Block,
        "defer",
        5,
        cidrs(&["10.1.2.0/24", "10.0.0.0/8"])?,
        1,
    )?;
    s.rep_load(
        "friends",
        Kind::Allow,
        "accept",
        0,
        cidrs(&["10.1.2.128/25"])?,
        1,
    )?;
    let m = |a: &str| -> Result<Option<(Kind, String, String)>> {
        Ok(s.rep_lookup(ip(a))?.map(|m| {
            let name = m.info().map(|l| l.name.clone()).unwrap_or_default();
            (m.kind, name, kithmail_store::addr::fmt_prefix(m.prefix))
        }))
    };
    assert_eq!(
        m("10.9.9.9")?,
        Some((Kind::Block, "feed".into(), "10.0.0.0/8".into()))
    );
    assert_eq!(
        m("10.1.9.9")?,
        Some((Kind::Block, "feed".into(), "10.1.0.0/16".into()))
    );
    assert_eq!(
        m("10.1.2.1")?,
        Some((Kind::Block, "local".into(), "10.1.2.0/24".into()))
    );
    assert_eq!(
        m("10.1.2.200")?,
        Some((Kind::Allow, "friends".into(), "10.1.2.128/25".into()))
    );
    assert_eq!(
        m("2001:db8:ffff::1")?,
        Some((Kind::Block, "feed".into(), "2001:db8::/32".into()))
    );
    assert_eq!(m("11.0.0.0")?, None);
    // Replacing a list drops every old prefix of that list only.
    s.rep_load(
        "feed",
        Kind::Block,
        "reject",
        10,
        cidrs(&["192.0.2.0/24"])?,
        2,
    )?;
    assert_eq!(
        m("10.1.9.9")?,
        Some((Kind::Block, "local".into(), "10.0.0.0/8".into()))
    );
    assert_eq!(m("2001:db8::1")?, None);
    assert_eq!(
        m("192.0.2.1")?,
        Some((Kind::Block, "feed".into(), "192.0.2.0/24".into()))
    );
    assert!(s.rep_drop("local")?);
    assert_eq!(m("10.1.9.9")?, None);
    let batch = s.rep_lookup_many(&[ip("192.0.2.9"), ip("10.0.0.1")])?;
    assert!(batch[0].is_some() && batch[1].is_none());
    Ok(())
}

#[test]
fn community_first_match_decides_in_design_order() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
    let s = Store::open(dir.path(), &opts())?;
    let (ann, org) = ("ann@example.test", "*@acme");
    s.community_add(ann, "@example.org", Kind::Block, Source::Manual, 1)?;
    s.community_add(ann, "Bob@Example.ORG", Kind::Allow, Source::Outbound, 2)?;
    s.community_add(org, "@example.org", Kind::Allow, Source::Admin, 3)?;
    s.community_add(org, "eve@evil.example", Kind::Block, Source::Admin, 3)?;
    s.community_add(
        ann,
        "list:<news.lists.example.net>",
        Kind::Allow,
        Source::Manual,
        4,
    )?;
    let q = |sender: &str, list: Option<&str>| -> Result<(Member, Option<Scope>)> {
        let m = s.member(&Query::new(ann, sender, list, Some(org))?)?;
        Ok((m.status, m.matched.map(|(_, sc, _)| sc)))
    };
    // The user's address entry comes before the user's domain entry.
    assert_eq!(
        q("bob@example.org", None)?,
        (Member::Allowed, Some(Scope::User))
    );
    // The user's domain block beats the organisation's domain allow.
    assert_eq!(
        q("carol@example.org", None)?,
        (Member::Blocked, Some(Scope::User))
    );
    assert_eq!(
        q("eve@evil.example", None)?,
        (Member::Blocked, Some(Scope::Org))
    );
    assert_eq!(
        q("x@lists.example.net", Some("News <NEWS.lists.example.net>"))?,
        (Member::Allowed, Some(Scope::User))
    );
    assert_eq!(q("x@lists.example.net", None)?, (Member::Unknown, None));
    assert_eq!(s.community_count(ann)?, 3);
    assert!(s.community_remove(ann, "bob@example.org")?);
    assert_eq!(
        q("bob@example.org", None)?,
        (Member::Blocked, Some(Scope::User))
    );
    Ok(())
}

#[test]
fn a_copy_holds_everything_committed_before_it_and_nothing_after() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
    let live = dir.path().join("core");
    let copy = dir.path().join("backup").join("core");
    std::fs::create_dir(dir.path().join("backup"))
        .map_err(|e| StoreError::Storage(e.to_string()))?;
    let ann = "ann@example.test";
    let s = Store::open(
        &live,
        &Options {
            ipv4_prefix: Some(24),
            ..opts()
        },
    )?;
    s.community_add(ann, "friend@remote.test", Kind::Allow, Source::Manual, 1)?;
    // A Recon cycle (one /24), committed: the group-commit buffer is not
    // in a copy, so a source only buffered is new to it.
    s.recon_check(ip("198.51.100.7"), 1000)?;
    assert_eq!(
        s.recon_check(ip("198.51.100.8"), 1060)?.status,
        Status::Passed
    );
    s.flush()?;
    s.recon_check(ip("203.0.113.1"), 1000)?;
    // Many rows, then most of them deleted: the compacted copy leaves the
    // free pages out.
    let junk: Vec<String> = (0..5000).map(|i| format!("u{i}@junk.example")).collect();
    s.community_add_many("junk@example.test", &junk, Kind::Block, Source::Import, 2)?;
    for e in &junk[100..] {
        s.community_remove("junk@example.test", e)?;
    }

    let bytes = s.copy_to(&copy, true)?;
    s.community_add(ann, "late@remote.test", Kind::Allow, Source::Manual, 3)?;

    let files: Vec<String> = std::fs::read_dir(&copy)
        .map_err(|e| StoreError::Storage(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(files, vec![kithmail_store::store::COPY_FILE.to_string()]);
    let live_size = std::fs::metadata(live.join("data.mdb"))
        .map_err(|e| StoreError::Storage(e.to_string()))?
        .len();
    assert!(
        bytes < live_size,
        "compacted {bytes} bytes, live file {live_size}"
    );

    // The copy is an environment of its own: prefixes as stored, same rows.
    let c = Store::open(
        &copy,
        &Options {
            ipv4_prefix: None,
            ipv6_prefix: None,
            ..opts()
        },
    )?;
    assert_eq!(c.prefixes(), (24, 64));
    let member = |sender: &str| -> Result<Member> {
        Ok(c.member(&Query::new(ann, sender, None, None)?)?.status)
    };
    assert_eq!(member("friend@remote.test")?, Member::Allowed);
    assert_eq!(member("late@remote.test")?, Member::Unknown);
    assert_eq!(c.community_count("junk@example.test")?, 100);
    assert_eq!(
        c.recon_check(ip("198.51.100.99"), 2000)?.status,
        Status::Known
    );
    assert_eq!(c.recon_check(ip("203.0.113.1"), 2000)?.status, Status::New);
    Ok(())
}

#[test]
fn a_copy_goes_only_into_a_new_or_empty_directory() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
    let io = |e: std::io::Error| StoreError::Storage(e.to_string());
    let s = Store::open(&dir.path().join("core"), &opts())?;
    let full = dir.path().join("full");
    std::fs::create_dir(&full).map_err(io)?;
    std::fs::write(full.join("data.mdb"), b"someone else's").map_err(io)?;
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").map_err(io)?;
    for target in [&full, &file, &dir.path().join("core")] {
        match s.copy_to(target, true) {
            Err(StoreError::InvalidInput(m)) => {
                assert!(m.contains("new or empty directory"), "{m}")
            }
            other => panic!("{}: {other:?}", target.display()),
        }
    }
    assert_eq!(
        std::fs::read(full.join("data.mdb")).map_err(io)?,
        b"someone else's"
    );
    match s.copy_to(&dir.path().join("no").join("such"), true) {
        Err(StoreError::Storage(m)) => assert!(m.contains("cannot create"), "{m}"),
        other => panic!("{other:?}"),
    }
    // An empty directory is fine, and so is an uncompacted copy.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).map_err(io)?;
    assert!(s.copy_to(&empty, false)? > 0);
    Ok(())
}
