//! Addresses as 128-bit integers in one family: IPv4 lives in the
//! IPv4-mapped range (`::ffff:a.b.c.d`), so an IPv4 /n is a /(96+n).
//! Keys are these integers big-endian, so LMDB's byte order is numeric order.

use crate::error::{shown, Result, StoreError};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const V4_BASE: u128 = 0xffff_0000_0000;
pub const V4_MASK: u128 = !0xffff_ffffu128;

#[inline]
pub fn is_v4(a: u128) -> bool {
    a & V4_MASK == V4_BASE
}

pub fn from_ip(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => V4_BASE | u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// A dotted quad, exactly as `Ipv4Addr::from_str` accepts it (four decimal
/// octets, no leading zeros, nothing else), in a third of its time: it runs
/// on every address that crosses the Python boundary.
#[inline]
fn parse_v4(s: &[u8]) -> Option<u32> {
    if s.len() < 7 || s.len() > 15 {
        return None;
    }
    let (mut acc, mut octet, mut digits, mut dots) = (0u32, 0u32, 0u8, 0u8);
    for &c in s {
        match c {
            b'0'..=b'9' => {
                if digits > 0 && octet == 0 {
                    return None; // a leading zero
                }
                octet = octet * 10 + (c - b'0') as u32;
                digits += 1;
                if octet > 255 {
                    return None;
                }
            }
            b'.' => {
                if digits == 0 || dots == 3 {
                    return None;
                }
                acc = acc << 8 | octet;
                (octet, digits, dots) = (0, 0, dots + 1);
            }
            _ => return None,
        }
    }
    (dots == 3 && digits > 0).then_some(acc << 8 | octet)
}

/// Parse an address given as text.
pub fn parse_ip(s: &str) -> Result<u128> {
    if let Some(v4) = parse_v4(s.as_bytes()) {
        return Ok(V4_BASE | v4 as u128);
    }
    s.parse::<IpAddr>()
        .map(from_ip)
        .map_err(|_| StoreError::invalid(format!("invalid IP address {}", shown(s))))
}

/// Parse an address given packed: 4 octets (IPv4) or 16 (IPv6).
pub fn parse_packed(b: &[u8]) -> Result<u128> {
    match b.len() {
        4 => Ok(V4_BASE | u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u128),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Ok(u128::from_be_bytes(a))
        }
        n => Err(StoreError::invalid(format!(
            "invalid packed IP address: {n} octets (want 4 or 16)"
        ))),
    }
}

/// The network mask for a prefix length in the 128-bit space.
#[inline]
pub fn mask(plen: u8) -> u128 {
    if plen == 0 {
        0
    } else {
        u128::MAX << (128 - plen as u32)
    }
}

/// Mask an address to the configured prefix of its family.
#[inline]
pub fn mask_source(a: u128, v4_prefix: u8, v6_prefix: u8) -> u128 {
    if is_v4(a) {
        a & mask(96 + v4_prefix)
    } else {
        a & mask(v6_prefix)
    }
}

/// A CIDR in the 128-bit space: (network, prefix length 0..=128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub net: u128,
    pub len: u8,
}

/// The last address of the IPv4-mapped range.
pub const V4_LAST: u128 = V4_BASE | 0xffff_ffff;

impl Prefix {
    /// The ranges this prefix covers as a source network. An IPv6 prefix
    /// shorter than /96 that spans the IPv4-mapped range does not cover IPv4
    /// sources (as `ipaddress` has it: `192.0.2.1 not in ::/0`), so that
    /// range is cut out of it.
    pub fn ranges(&self) -> Vec<(u128, u128)> {
        let (s, e) = (self.net, self.last());
        if self.len >= 96 || e < V4_BASE || s > V4_LAST {
            return vec![(s, e)];
        }
        let mut out = Vec::with_capacity(2);
        if s < V4_BASE {
            out.push((s, V4_BASE - 1));
        }
        if e > V4_LAST {
            out.push((V4_LAST + 1, e));
        }
        out
    }

    pub fn last(&self) -> u128 {
        self.net | !mask(self.len)
    }
    pub fn contains(&self, a: u128) -> bool {
        a & mask(self.len) == self.net
    }
}

/// Parse "192.0.2.0/24", "2001:db8::/32", or a bare address (a /32 or /128).
/// Host bits set are refused: "10.0.0.1/8" is more likely a typo than intent.
pub fn parse_cidr(s: &str) -> Result<Prefix> {
    let bad = |why: &str| StoreError::invalid(format!("invalid CIDR {}: {why}", shown(s)));
    let t = s.trim();
    let (ip_s, len_s) = match t.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (t, None),
    };
    let ip: IpAddr = ip_s.parse().map_err(|_| bad("not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = match len_s {
        None => max,
        Some(l) => {
            if l.is_empty() || l.len() > 3 || !l.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad("bad prefix length"));
            }
            let n: u32 = l.parse().map_err(|_| bad("bad prefix length"))?;
            if n > max as u32 {
                return Err(bad(&format!("prefix length over {max}")));
            }
            n as u8
        }
    };
    let (a, len) = match ip {
        IpAddr::V4(_) => (from_ip(ip), 96 + len),
        IpAddr::V6(_) => (from_ip(ip), len),
    };
    if a & !mask(len) != 0 {
        return Err(bad("host bits set"));
    }
    Ok(Prefix { net: a, len })
}

/// Text form: IPv4-mapped addresses print as IPv4.
pub fn fmt_ip(a: u128) -> String {
    if is_v4(a) {
        Ipv4Addr::from((a & 0xffff_ffff) as u32).to_string()
    } else {
        Ipv6Addr::from(a).to_string()
    }
}

pub fn fmt_prefix(p: Prefix) -> String {
    if is_v4(p.net) && p.len >= 96 {
        format!("{}/{}", fmt_ip(p.net), p.len - 96)
    } else {
        format!("{}/{}", Ipv6Addr::from(p.net), p.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_mapped_are_one_address() -> Result<()> {
        assert_eq!(parse_ip("192.0.2.1")?, parse_ip("::ffff:192.0.2.1")?);
        assert_eq!(parse_packed(&[192, 0, 2, 1])?, parse_ip("192.0.2.1")?);
        assert!(is_v4(parse_ip("192.0.2.1")?));
        assert!(!is_v4(parse_ip("2001:db8::1")?));
        Ok(())
    }

    #[test]
    fn fast_ipv4_parser_agrees_with_std() {
        let mut cases: Vec<String> = [
            "0.0.0.0",
            "255.255.255.255",
            "1.2.3.4",
            "01.2.3.4",
            "1.2.3.04",
            "1.2.3",
            "1.2.3.4.5",
            "256.1.1.1",
            "1..2.3",
            ".1.2.3",
            "1.2.3.",
            "1.2.3.4 ",
            " 1.2.3.4",
            "1.2.3.4/8",
            "10.0.0.00",
            "10.0.0.0",
            "999.999.999.999",
            "1.2.3.-4",
            "1.2.3.+4",
            "١.٢.٣.٤",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let alphabet = b"0123456789.0123456789.";
            let len = (x % 17) as usize;
            let s: String = (0..len)
                .map(|i| alphabet[((x >> (i * 3)) as usize + i) % alphabet.len()] as char)
                .collect();
            cases.push(s);
            cases.push(format!(
                "{}.{}.{}.{}",
                x & 0x1ff,
                (x >> 9) & 0xff,
                (x >> 17) & 0xff,
                (x >> 25) & 0x1ff
            ));
        }
        for c in cases {
            let ours = parse_v4(c.as_bytes());
            let std = c.parse::<Ipv4Addr>().ok().map(u32::from);
            assert_eq!(ours, std, "{c:?}");
        }
    }

    #[test]
    fn masking_by_family() -> Result<()> {
        let a = parse_ip("192.0.2.77")?;
        assert_eq!(fmt_ip(mask_source(a, 24, 64)), "192.0.2.0");
        assert_eq!(fmt_ip(mask_source(a, 32, 64)), "192.0.2.77");
        let b = parse_ip("2001:db8:1:2:3:4:5:6")?;
        assert_eq!(fmt_ip(mask_source(b, 24, 64)), "2001:db8:1:2::");
        assert_eq!(fmt_ip(mask_source(b, 24, 48)), "2001:db8:1::");
        Ok(())
    }

    #[test]
    fn cidrs() -> Result<()> {
        let p = parse_cidr("10.0.0.0/8")?;
        assert_eq!((fmt_prefix(p), p.len), ("10.0.0.0/8".to_string(), 104));
        assert!(p.contains(parse_ip("10.255.255.255")?));
        assert!(!p.contains(parse_ip("11.0.0.0")?));
        assert_eq!(fmt_prefix(parse_cidr("2001:db8::/32")?), "2001:db8::/32");
        assert_eq!(fmt_prefix(parse_cidr("0.0.0.0/0")?), "0.0.0.0/0");
        assert_eq!(fmt_prefix(parse_cidr("::/0")?), "::/0");
        assert_eq!(parse_cidr("192.0.2.1")?.len, 128);
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "::/129",
            "x/8",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        Ok(())
    }
}
