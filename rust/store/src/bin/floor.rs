//! kithmail-floor: the same hot calls as bench/core.py, looped in Rust over
//! the same store with no Python, so the cost of the boundary is visible.
//!
//! Usage: kithmail-floor --dir CORE_DIR [--ops N] [--now T] [--ipv4-prefix P] [--ipv6-prefix P]
//! Prints one JSON object of ops/s on stdout.

use kithmail_store::community::Query;
use kithmail_store::{Core, Options, Store, StoreError};
use std::path::PathBuf;
use std::time::{Duration, Instant};

type R<T> = Result<T, StoreError>;

/// A small deterministic generator (xorshift64*): the floor needs no
/// statistical quality, only repeatable spread.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn key_u128(k: &[u8], at: usize) -> u128 {
    let mut a = [0u8; 16];
    if let Some(s) = k.get(at..at + 16) {
        a.copy_from_slice(s);
    }
    u128::from_be_bytes(a)
}

/// Median ops/s over `repeats` runs of `f`, which performs `n` ops.
fn rate(repeats: usize, n: usize, mut f: impl FnMut() -> R<()>) -> R<f64> {
    let mut rates = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        let s = t.elapsed().max(Duration::from_nanos(1)).as_secs_f64();
        rates.push(n as f64 / s);
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    Ok(rates[rates.len() / 2])
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sample(core: &Core, table: &str, want: usize) -> R<Vec<(Vec<u8>, Vec<u8>)>> {
    let len = core.len_of(table)?;
    let every = (len / want.max(1) as u64).max(1);
    core.sample(table, every, want)
}

fn run(dir: PathBuf, ops: usize, opts: Options, at: Option<u64>) -> R<String> {
    let store = Store::open(&dir, &opts)?;
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let repeats = 7;
    let mut out: Vec<(&str, f64)> = Vec::new();

    let recon = sample(&store, "recon", 1_000_000)?;
    // Ask at a time when the sampled sources are known: just after the
    // latest sighting (the bench passed them all), unless --now says.
    let t = at.unwrap_or_else(|| {
        recon
            .iter()
            .map(|(_, v)| {
                u64::from_be_bytes(
                    v.get(8..16)
                        .and_then(|b| b.try_into().ok())
                        .unwrap_or([0; 8]),
                )
            })
            .max()
            .map_or_else(now, |l| l + 1)
    });
    if !recon.is_empty() {
        let keys: Vec<u128> = recon.iter().map(|(k, _)| key_u128(k, 0)).collect();
        let hot: Vec<u128> = keys.iter().take(100_000).copied().collect();
        let hot_q: Vec<u128> = (0..ops).map(|_| hot[rng.below(hot.len())]).collect();
        let rnd_q: Vec<u128> = (0..ops).map(|_| keys[rng.below(keys.len())]).collect();
        out.push((
            "recon_known_hot",
            rate(repeats, ops, || {
                for &a in &hot_q {
                    store.recon_check(a, t)?;
                }
                Ok(())
            })?,
        ));
        out.push((
            "recon_known_random",
            rate(repeats, ops, || {
                for &a in &rnd_q {
                    store.recon_check(a, t)?;
                }
                Ok(())
            })?,
        ));
        out.push((
            "recon_batch_sorted",
            rate(repeats, ops, || {
                for c in rnd_q.chunks(1000) {
                    store.recon_check_many(c, t)?;
                }
                Ok(())
            })?,
        ));
    }

    let ivs = sample(&store, "rep_iv", 1_000_000)?;
    if !ivs.is_empty() {
        // Half the queries inside a listed interval, half anywhere in IPv4.
        let q: Vec<u128> = (0..ops)
            .map(|i| {
                if i % 2 == 0 {
                    let (k, v) = &ivs[rng.below(ivs.len())];
                    let (s, e) = (key_u128(k, 4), key_u128(v, 0));
                    s + (rng.next() as u128) % (e - s).saturating_add(1).max(1)
                } else {
                    0xffff_0000_0000u128 | (rng.next() as u128 & 0xffff_ffff)
                }
            })
            .collect();
        out.push((
            "lpm_single",
            rate(repeats, ops, || {
                for &a in &q {
                    store.rep_lookup(a)?;
                }
                Ok(())
            })?,
        ));
        out.push((
            "lpm_batch",
            rate(repeats, ops, || {
                for c in q.chunks(1000) {
                    store.rep_lookup_many(c)?;
                }
                Ok(())
            })?,
        ));
    }

    let com = sample(&store, "community", 100_000)?;
    if !com.is_empty() {
        let mut qs = Vec::with_capacity(ops.min(200_000));
        for _ in 0..ops.min(200_000) {
            let (k, _) = &com[rng.below(com.len())];
            let text = String::from_utf8_lossy(k);
            let (user, entry) = text.split_once('\0').unwrap_or(("", ""));
            let sender = if let Some(d) = entry.strip_prefix('@') {
                format!("someone@{d}")
            } else if entry.starts_with("list:") {
                "someone@example.net".to_string()
            } else {
                entry.to_string()
            };
            qs.push(Query::new(user, &sender, None, None)?);
        }
        let n = qs.len();
        out.push((
            "community_member_hot",
            rate(repeats, n, || {
                for q in &qs {
                    store.member(q)?;
                }
                Ok(())
            })?,
        ));
    }
    store.close()?;
    let body: Vec<String> = out
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v:.1}"))
        .collect();
    Ok(format!("{{{}}}", body.join(", ")))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut ops = 1_000_000usize;
    let mut opts = Options::default();
    let mut at = None;
    while let Some(a) = args.next() {
        let v = args.next();
        match (a.as_str(), v) {
            ("--dir", Some(v)) => dir = Some(PathBuf::from(v)),
            ("--ops", Some(v)) => ops = v.parse().unwrap_or(ops),
            ("--now", Some(v)) => at = v.parse().ok(),
            ("--ipv4-prefix", Some(v)) => opts.ipv4_prefix = v.parse().ok(),
            ("--ipv6-prefix", Some(v)) => opts.ipv6_prefix = v.parse().ok(),
            _ => {
                eprintln!("usage: kithmail-floor --dir CORE_DIR [--ops N] [--now T] [--ipv4-prefix P] [--ipv6-prefix P]");
                std::process::exit(2);
            }
        }
    }
    let Some(dir) = dir else {
        eprintln!("kithmail-floor: --dir is required");
        std::process::exit(2);
    };
    match run(dir, ops, opts, at) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("kithmail-floor: {e}");
            std::process::exit(1);
        }
    }
}
