//! Who the client is on the network: the TCP peer, unless that peer is a trusted proxy, in
//! which case `X-Forwarded-For` is walked from the right, skipping trusted hops, and the
//! first untrusted address is the client.
//!
//! Only proxies the operator lists (`--trusted-proxy CIDR`) are believed: anybody else can
//! write any `X-Forwarded-For` they like, so it is ignored.
//!
//! A hop that is not a bare IP address (`203.0.113.9:4444`, `[::1]`, `unknown`, garbage)
//! makes the client [`UNKNOWN_CLIENT`]: never the proxy's own address (a proxy on loopback
//! would otherwise lend its clients the loopback's rights), and never a real client's.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use http::HeaderMap;

/// An address range, e.g. `10.0.0.0/8` or `fd00::/8`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(raw: &str) -> Result<Cidr, String> {
        let raw = raw.trim();
        let (addr, prefix) = match raw.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (raw, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{raw}` is not an IP address or CIDR range"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{raw}`: prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The client of a request whose `X-Forwarded-For` could not be read: `100::`, from the
/// discard-only prefix `100::/64` (RFC 6666), which no real client sends from. It is not
/// loopback, so it gets no local rights, and rate limits key on it like on any address, so
/// all such requests share one bucket that no real client's address can name: a hop inside
/// `100::/64` is itself taken as unknown.
pub const UNKNOWN_CLIENT: IpAddr = IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0));

/// Whether `ip` is in `100::/64`, the prefix [`UNKNOWN_CLIENT`] stands for.
fn is_discard_only(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6.segments()[..4] == [0x100, 0, 0, 0],
        IpAddr::V4(_) => false,
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client address of a request that arrived from `peer`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    // Every X-Forwarded-For header, in order, is one comma-separated list.
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.trim().parse::<IpAddr>().map(canonical) {
            Ok(ip) if is_discard_only(ip) => return UNKNOWN_CLIENT,
            Ok(ip) => {
                client = ip;
                if !is_trusted(client) {
                    return client;
                }
            }
            // A garbled hop: the client is somewhere beyond it, and nothing there can be
            // believed. Not the last trusted hop: that is a proxy, not the client.
            Err(_) => return UNKNOWN_CLIENT,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn cidrs() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.0.9")), "mapped IPv4");
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten/8").is_err());
    }

    #[test]
    fn untrusted_peers_cannot_choose_their_address() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let forged = headers(&["1.2.3.4"]);
        assert_eq!(
            client_ip(ip("203.0.113.9"), &forged, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(ip("203.0.113.9"), &forged, &[]),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn trusted_hops_are_skipped_from_the_right() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        // The client forged the leftmost entry; the proxies appended the real ones.
        let h = headers(&["6.6.6.6, 198.51.100.7", "10.0.0.5"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("198.51.100.7"));
        // Only trusted hops: the leftmost is the best we know.
        let h = headers(&["10.0.0.9"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.9"));
        // Garbage makes the client unknown, never the proxy before it.
        let h = headers(&["1.1.1.1, garbage, 10.0.0.7"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), UNKNOWN_CLIENT);
        // No header: the proxy itself.
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn unparsable_hops_are_unknown_clients_never_the_proxy() {
        // A proxy on loopback: taking a bad hop as the proxy itself would make the client
        // local (and let it read /metrics).
        let trusted = [Cidr::parse("127.0.0.0/8").unwrap()];
        for hop in [
            "203.0.113.9:4444",
            "[::1]",
            "[::1]:80",
            "unknown",
            "",
            "127.0.0.1 extra",
            "100::1",
            "100::",
        ] {
            let client = client_ip(ip("127.0.0.1"), &headers(&[hop]), &trusted);
            assert_eq!(client, UNKNOWN_CLIENT, "{hop:?}");
            assert!(!client.is_loopback());
        }
        // Nothing a client can name shares the unknown key: 100::/64 is unknown itself.
        assert!(is_discard_only(UNKNOWN_CLIENT));
        assert!(!is_discard_only(ip("100:0:0:1::1")));
    }
}
