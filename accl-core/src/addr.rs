//! Socket address parsing: IPv6 first (`[2001:db8::1]:5000`, `[fe80::1%eth0]:5000`), IPv4 and host
//! names accepted.

use std::ffi::CString;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, ToSocketAddrs, UdpSocket};

use crate::error::{Error, Result};

/// Parses `[v6]:port`, `[v6%scope]:port`, `v4:port` or `host:port` (a host name resolves to
/// its IPv6 addresses first).
///
/// ```
/// use accl_core::addr::parse_socket_addr;
/// let a = parse_socket_addr("[::1]:4000", "ACCL_ROOT").unwrap();
/// assert!(a.is_ipv6() && a.port() == 4000);
/// assert!(parse_socket_addr("127.0.0.1:4000", "ACCL_ROOT").unwrap().is_ipv4());
/// assert!(parse_socket_addr("[::1]", "ACCL_ROOT").is_err());
/// ```
pub fn parse_socket_addr(text: &str, what: &str) -> Result<SocketAddr> {
    let bad = |reason: &str| Error::InvalidConfig {
        name: what.to_string(),
        value: text.to_string(),
        reason: reason.to_string(),
    };
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(|| bad("expected [ipv6-address]:port"))?;
        let port: u16 = port.parse().map_err(|_| bad("port is not a number in 0..65535"))?;
        let (ip, scope) = match host.split_once('%') {
            Some((ip, scope)) => (ip, scope_id(scope).ok_or_else(|| bad("unknown interface in %scope"))?),
            None => (host, 0),
        };
        let ip: Ipv6Addr = ip.parse().map_err(|_| bad("not an IPv6 address"))?;
        return Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !text.contains(':') {
        return Err(bad("expected address:port"));
    }
    let mut addrs: Vec<SocketAddr> =
        text.to_socket_addrs().map_err(|e| bad(&format!("cannot resolve: {e}")))?.collect();
    addrs.sort_by_key(|a| !a.is_ipv6());
    addrs.into_iter().next().ok_or_else(|| bad("name resolves to no address"))
}

/// Interface index of a `%scope` suffix: a number or an interface name.
fn scope_id(scope: &str) -> Option<u32> {
    if let Ok(n) = scope.parse() {
        return Some(n);
    }
    let name = CString::new(scope).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Formats an address the way [`parse_socket_addr`] reads it (IPv6 bracketed, with `%scope`).
pub fn format_socket_addr(addr: &SocketAddr) -> String {
    match addr {
        SocketAddr::V6(v6) if v6.scope_id() != 0 => {
            format!("[{}%{}]:{}", v6.ip(), v6.scope_id(), v6.port())
        }
        other => other.to_string(),
    }
}

/// The local address the kernel would use to reach `remote`: the address this rank's data
/// listener binds, so that peers reach it over the same network as the root.
pub fn local_addr_towards(remote: &SocketAddr) -> Result<IpAddr> {
    let bind: SocketAddr = match remote {
        SocketAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, v6.scope_id())),
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
    };
    let probe = UdpSocket::bind(bind).map_err(|e| Error::io("bind route probe socket", e))?;
    probe.connect(remote).map_err(|e| Error::io(format!("no route to {remote}"), e))?;
    Ok(probe.local_addr().map_err(|e| Error::io("route probe address", e))?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scoped_and_plain() {
        let a = parse_socket_addr("[fe80::1%1]:9", "x").unwrap();
        match a {
            SocketAddr::V6(v6) => assert_eq!(v6.scope_id(), 1),
            _ => panic!("not v6"),
        }
        let lo = parse_socket_addr("[fe80::1%lo]:9", "x").unwrap();
        assert_eq!(format_socket_addr(&lo), format!("[fe80::1%{}]:9", scope_id("lo").unwrap()));
        assert!(parse_socket_addr("[fe80::1%nosuchif0]:9", "x").is_err());
        assert!(parse_socket_addr("[::1]:99999", "x").is_err());
        assert!(parse_socket_addr("garbage", "x").is_err());
    }

    #[test]
    fn route_probe_on_loopback() {
        let ip = local_addr_towards(&"[::1]:1".parse().unwrap()).unwrap();
        assert_eq!(ip, IpAddr::V6(Ipv6Addr::LOCALHOST));
    }
}
