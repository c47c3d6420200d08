//! RoCE device and GID selection, and the per-lane path identifiers (flow label, UDP source
//! port) that RoCEv2 packets carry.
//!
//! Everything here reads sysfs (`/sys/class/infiniband`) or is plain arithmetic, so it is
//! compiled and tested without rdma-core; the verbs provider (cargo feature `verbs`) builds on it.
//!
//! The GID rule: per device and port, take the first GID whose type is "RoCE v2" and whose
//! address is a global or unique-local IPv6 address, never link-local and never IPv4-mapped,
//! unless `ACCL_IB_ADDR_FAMILY=AF_INET` asks for IPv4-mapped ones instead. `ACCL_IB_ADDR_RANGE`
//! narrows the choice to a CIDR, `ACCL_IB_GID_INDEX` forces an index.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

use crate::config::env_var;
use crate::error::{Error, Result};

/// Where the kernel lists RDMA devices.
pub const SYSFS_ROOT: &str = "/sys/class/infiniband";

/// Address family of the GIDs to use (`ACCL_IB_ADDR_FAMILY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AddrFamily {
    /// Global or unique-local IPv6 GIDs (the default).
    #[default]
    Inet6,
    /// IPv4-mapped GIDs (`::ffff:a.b.c.d`).
    Inet,
}

/// An address range in CIDR notation (`ACCL_IB_ADDR_RANGE`); IPv4 ranges match IPv4-mapped GIDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: Ipv6Addr,
    prefix: u8,
}

impl Cidr {
    /// Parses `fd00::/8` or `10.0.0.0/8`.
    ///
    /// ```
    /// use accl_core::transport::ib::Cidr;
    /// let ula = Cidr::parse("fd00::/8").unwrap();
    /// assert!(ula.contains(&"fd02::1".parse().unwrap()));
    /// assert!(!ula.contains(&"2001:db8::1".parse().unwrap()));
    /// assert!(Cidr::parse("10.0.0.0/8").unwrap().contains(&"::ffff:10.1.2.3".parse().unwrap()));
    /// assert!(Cidr::parse("fd00::/129").is_none());
    /// ```
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = text.trim().split_once('/')?;
        let prefix: u8 = prefix.parse().ok()?;
        match addr.trim_matches(['[', ']']).parse::<IpAddr>().ok()? {
            IpAddr::V6(a) if prefix <= 128 => Some(Cidr { net: a, prefix }),
            IpAddr::V4(a) if prefix <= 32 => Some(Cidr { net: a.to_ipv6_mapped(), prefix: prefix + 96 }),
            _ => None,
        }
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: &Ipv6Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
        u128::from(*addr) & mask == u128::from(self.net) & mask
    }
}

/// One entry of `ACCL_IB_HCA`: a device, optionally restricted to one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HcaSpec {
    pub device: String,
    pub port: Option<u8>,
}

/// The `ACCL_IB_*` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IbSettings {
    /// Devices (and ports) to consider, in order; empty: every device (`ACCL_IB_HCA`).
    pub hca: Vec<HcaSpec>,
    /// Forces this GID index (`ACCL_IB_GID_INDEX`).
    pub gid_index: Option<u32>,
    /// `AF_INET6` (default) or `AF_INET` (`ACCL_IB_ADDR_FAMILY`).
    pub family: AddrFamily,
    /// Only GIDs in this range (`ACCL_IB_ADDR_RANGE`).
    pub range: Option<Cidr>,
    /// IPv6 traffic class of the packets (`ACCL_IB_TC`).
    pub traffic_class: u8,
    /// Local ACK timeout exponent: 4.096 us * 2^n (`ACCL_IB_TIMEOUT`).
    pub timeout: u8,
    /// Retransmissions before a QP fails (`ACCL_IB_RETRY_CNT`).
    pub retry_cnt: u8,
}

impl Default for IbSettings {
    fn default() -> IbSettings {
        IbSettings {
            hca: Vec::new(),
            gid_index: None,
            family: AddrFamily::Inet6,
            range: None,
            traffic_class: 0,
            timeout: 14,
            retry_cnt: 7,
        }
    }
}

fn invalid(name: &str, value: &str, reason: &str) -> Error {
    Error::InvalidConfig { name: name.into(), value: value.into(), reason: reason.into() }
}

/// Parses an `ACCL_IB_HCA` list: `mlx5_0:1,rxe0`.
pub fn parse_hca_list(text: &str) -> Option<Vec<HcaSpec>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once(':') {
            Some((dev, port)) => Some(HcaSpec { device: dev.to_string(), port: Some(port.parse().ok()?) }),
            None => Some(HcaSpec { device: item.to_string(), port: None }),
        })
        .collect()
}

impl IbSettings {
    /// The defaults with the `ACCL_IB_*` variables that are set applied.
    pub fn from_env() -> Result<IbSettings> {
        let mut s = IbSettings::default();
        if let Some(v) = env_var("ACCL_IB_HCA") {
            s.hca = parse_hca_list(&v).ok_or_else(|| invalid("ACCL_IB_HCA", &v, "expected device[:port],..."))?;
        }
        if let Some(v) = env_var("ACCL_IB_GID_INDEX") {
            s.gid_index = Some(v.trim().parse().map_err(|_| invalid("ACCL_IB_GID_INDEX", &v, "expected an index"))?);
        }
        if let Some(v) = env_var("ACCL_IB_ADDR_FAMILY") {
            s.family = match v.trim().to_ascii_uppercase().as_str() {
                "AF_INET6" | "INET6" | "IPV6" => AddrFamily::Inet6,
                "AF_INET" | "INET" | "IPV4" => AddrFamily::Inet,
                _ => return Err(invalid("ACCL_IB_ADDR_FAMILY", &v, "expected AF_INET6 or AF_INET")),
            };
        }
        if let Some(v) = env_var("ACCL_IB_ADDR_RANGE") {
            s.range = Some(Cidr::parse(&v).ok_or_else(|| invalid("ACCL_IB_ADDR_RANGE", &v, "expected a CIDR"))?);
        }
        let small = |name: &str, max: u8| -> Result<Option<u8>> {
            match env_var(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|n| *n <= max)
                    .map(Some)
                    .ok_or_else(|| invalid(name, &v, &format!("expected 0..={max}"))),
            }
        };
        s.traffic_class = small("ACCL_IB_TC", 255)?.unwrap_or(s.traffic_class);
        s.timeout = small("ACCL_IB_TIMEOUT", 31)?.unwrap_or(s.timeout);
        s.retry_cnt = small("ACCL_IB_RETRY_CNT", 7)?.unwrap_or(s.retry_cnt);
        Ok(s)
    }
}

/// The type of a GID table entry, as sysfs names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GidType {
    RoceV2,
    RoceV1,
    Other,
}

/// One GID of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gid {
    pub index: u32,
    pub addr: Ipv6Addr,
    pub kind: GidType,
}

/// Whether a GID of this address may be used under `family`.
pub fn usable_address(addr: &Ipv6Addr, family: AddrFamily) -> bool {
    let mapped = addr.to_ipv4_mapped().is_some();
    match family {
        AddrFamily::Inet => mapped,
        AddrFamily::Inet6 => {
            !mapped && !addr.is_unspecified() && !addr.is_loopback() && !addr.is_unicast_link_local()
            // fe80::/10 is link-local whatever the interface id; anything else that is
            // unicast (global or unique-local fc00::/7) is routable.
            && !addr.is_multicast()
        }
    }
}

/// Picks the GID to use from a port's table, or says why none fits.
pub fn pick_gid(gids: &[Gid], s: &IbSettings) -> std::result::Result<Gid, String> {
    if let Some(index) = s.gid_index {
        return gids.iter().find(|g| g.index == index).copied().ok_or_else(|| format!("no GID at index {index}"));
    }
    let mut seen = Vec::new();
    for g in gids {
        seen.push(format!("[{}] {} {:?}", g.index, g.addr, g.kind));
        if g.kind == GidType::RoceV2 && usable_address(&g.addr, s.family) && s.range.is_none_or(|r| r.contains(&g.addr))
        {
            return Ok(*g);
        }
    }
    let want = match s.family {
        AddrFamily::Inet6 => "a RoCE v2 GID with a global or unique-local IPv6 address",
        AddrFamily::Inet => "a RoCE v2 GID with an IPv4-mapped address",
    };
    let range = s.range.map(|r| format!(" in {}/{}", r.net, r.prefix)).unwrap_or_default();
    Err(format!("no {want}{range} (have: {})", if seen.is_empty() { "none".into() } else { seen.join(", ") }))
}

/// Parses a sysfs GID (`fe80:0000:0000:0000:5054:00ff:fe12:3456`).
pub fn parse_sysfs_gid(text: &str) -> Option<Ipv6Addr> {
    let groups: Vec<u16> = text.trim().split(':').map(|g| u16::from_str_radix(g, 16).ok()).collect::<Option<_>>()?;
    let g: [u16; 8] = groups.try_into().ok()?;
    Some(Ipv6Addr::new(g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]))
}

/// A device port as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub device: String,
    pub port: u8,
    pub active: bool,
    pub ethernet: bool,
    pub gids: Vec<Gid>,
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Reads one port's state and GID table under `root` (normally [`SYSFS_ROOT`]).
pub fn read_port(root: &Path, device: &str, port: u8) -> Option<PortInfo> {
    let dir: PathBuf = root.join(device).join("ports").join(port.to_string());
    let state = read_trimmed(&dir.join("state"))?;
    let link = read_trimmed(&dir.join("link_layer")).unwrap_or_default();
    let mut gids = Vec::new();
    let mut entries: Vec<u32> = std::fs::read_dir(dir.join("gids"))
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    entries.sort_unstable();
    for index in entries {
        let Some(addr) = read_trimmed(&dir.join("gids").join(index.to_string())).and_then(|t| parse_sysfs_gid(&t))
        else {
            continue;
        };
        if addr.is_unspecified() {
            continue;
        }
        // Unused entries fail to read (EINVAL); they have no type.
        let kind = match read_trimmed(&dir.join("gid_attrs").join("types").join(index.to_string())).as_deref() {
            Some("RoCE v2") => GidType::RoceV2,
            Some(t) if t.contains("RoCE v1") => GidType::RoceV1,
            _ => GidType::Other,
        };
        gids.push(Gid { index, addr, kind });
    }
    Some(PortInfo {
        device: device.to_string(),
        port,
        active: state.ends_with("ACTIVE"),
        ethernet: link.eq_ignore_ascii_case("ethernet"),
        gids,
    })
}

/// The port and GID chosen for a rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub device: String,
    pub port: u8,
    pub gid: Gid,
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} gid[{}] {}", self.device, self.port, self.gid.index, self.gid.addr)
    }
}

/// Picks the first device port (in `ACCL_IB_HCA` order, else name order) that is active,
/// Ethernet and has a usable GID; the error lists why each candidate was refused.
pub fn select(root: &Path, s: &IbSettings) -> std::result::Result<Selection, String> {
    let mut devices: Vec<String> = std::fs::read_dir(root)
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    devices.sort();
    if devices.is_empty() {
        return Err(format!("no RDMA devices ({} is empty or missing)", root.display()));
    }
    let candidates: Vec<(String, Option<u8>)> = if s.hca.is_empty() {
        devices.iter().map(|d| (d.clone(), None)).collect()
    } else {
        s.hca.iter().map(|h| (h.device.clone(), h.port)).collect()
    };
    let mut refused = Vec::new();
    for (device, port) in candidates {
        if !devices.contains(&device) {
            refused.push(format!("{device}: no such device"));
            continue;
        }
        let ports: Vec<u8> = match port {
            Some(p) => vec![p],
            None => {
                let mut v: Vec<u8> = std::fs::read_dir(root.join(&device).join("ports"))
                    .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
                    .unwrap_or_default();
                v.sort_unstable();
                v
            }
        };
        for p in ports {
            match read_port(root, &device, p) {
                None => refused.push(format!("{device}:{p}: no such port")),
                Some(info) if !info.active => refused.push(format!("{device}:{p}: port not active")),
                Some(info) if !info.ethernet => refused.push(format!("{device}:{p}: not RoCE (link layer)")),
                Some(info) => match pick_gid(&info.gids, s) {
                    Ok(gid) => return Ok(Selection { device, port: p, gid }),
                    Err(why) => refused.push(format!("{device}:{p}: {why}")),
                },
            }
        }
    }
    Err(refused.join("; "))
}

/// The UDP source port of a QP's RoCEv2 packets, as the kernel's `rdma_get_udp_sport` computes
/// it (mlx5, and rdma_rxe since Linux 5.17): the 20-bit flow label folded into 14 bits above
/// 0xC000; a QP without a label gets the label [`flow_label_from_qpns`] derives from its QP
/// numbers first. accl always sets a label, so the port follows the label.
///
/// ```
/// use accl_core::transport::ib::udp_sport;
/// assert_eq!(udp_sport(0x12345, 1, 2), 0xC000 | ((0x12345 & 0x3fff) ^ (0x12345 >> 14)) as u16);
/// assert_eq!(udp_sport(0, 0x11, 0x12), udp_sport(accl_core::transport::ib::flow_label_from_qpns(0x11, 0x12), 0, 0));
/// ```
pub fn udp_sport(flow_label: u32, local_qpn: u32, remote_qpn: u32) -> u16 {
    let label = if flow_label == 0 { flow_label_from_qpns(local_qpn, remote_qpn) } else { flow_label };
    let low = label & 0x3fff;
    let high = (label & 0xfc000) >> 14;
    0xC000 | ((low ^ high) as u16)
}

/// The flow label both ends of a QP pair compute from their QP numbers when none was configured
/// (as the kernel's `rdma_calc_flow_label`): symmetric, so both directions carry the same label.
pub fn flow_label_from_qpns(a: u32, b: u32) -> u32 {
    let mut v = u64::from(a) * u64::from(b);
    v ^= v >> 20;
    v ^= v >> 40;
    (v & 0xF_FFFF) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gid(index: u32, addr: &str, kind: GidType) -> Gid {
        Gid { index, addr: addr.parse().unwrap(), kind }
    }

    #[test]
    fn picks_ula_roce_v2_and_skips_link_local_and_v1() {
        let gids = [
            gid(0, "fe80::5054:ff:fe12:3456", GidType::RoceV2),
            gid(1, "fd02::1", GidType::RoceV1),
            gid(2, "::ffff:10.0.0.1", GidType::RoceV2),
            gid(3, "fd02::1", GidType::RoceV2),
            gid(4, "2001:db8::1", GidType::RoceV2),
        ];
        let s = IbSettings::default();
        assert_eq!(pick_gid(&gids, &s).unwrap().index, 3);
        let v4 = IbSettings { family: AddrFamily::Inet, ..IbSettings::default() };
        assert_eq!(pick_gid(&gids, &v4).unwrap().index, 2);
        let ranged = IbSettings { range: Cidr::parse("2001:db8::/32"), ..IbSettings::default() };
        assert_eq!(pick_gid(&gids, &ranged).unwrap().index, 4);
        let forced = IbSettings { gid_index: Some(0), ..IbSettings::default() };
        assert_eq!(pick_gid(&gids, &forced).unwrap().index, 0);
        let why = pick_gid(&gids[..3], &s).unwrap_err();
        assert!(why.contains("no a RoCE v2 GID") || why.contains("RoCE v2"), "{why}");
        assert!(why.contains("fe80::5054:ff:fe12:3456"), "{why}");
    }

    #[test]
    fn parses_hca_lists() {
        assert_eq!(
            parse_hca_list("mlx5_0:1, rxe0").unwrap(),
            vec![HcaSpec { device: "mlx5_0".into(), port: Some(1) }, HcaSpec { device: "rxe0".into(), port: None }]
        );
        assert!(parse_hca_list("mlx5_0:x").is_none());
    }

    #[test]
    fn reads_a_sysfs_tree() {
        let root = std::env::temp_dir().join(format!("accl-ib-sysfs-{}", std::process::id()));
        let port = root.join("rxe0/ports/1");
        std::fs::create_dir_all(port.join("gids")).unwrap();
        std::fs::create_dir_all(port.join("gid_attrs/types")).unwrap();
        std::fs::write(port.join("state"), "4: ACTIVE\n").unwrap();
        std::fs::write(port.join("link_layer"), "Ethernet\n").unwrap();
        std::fs::write(port.join("gids/0"), "fe80:0000:0000:0000:5054:00ff:fe12:3456\n").unwrap();
        std::fs::write(port.join("gid_attrs/types/0"), "RoCE v2\n").unwrap();
        std::fs::write(port.join("gids/1"), "fd02:0000:0000:0000:0000:0000:0000:0001\n").unwrap();
        std::fs::write(port.join("gid_attrs/types/1"), "RoCE v2\n").unwrap();
        std::fs::write(port.join("gids/2"), "0000:0000:0000:0000:0000:0000:0000:0000\n").unwrap();
        let sel = select(&root, &IbSettings::default()).unwrap();
        assert_eq!(sel.to_string(), "rxe0:1 gid[1] fd02::1");
        let only_missing = IbSettings { hca: parse_hca_list("mlx5_0").unwrap(), ..IbSettings::default() };
        assert_eq!(select(&root, &only_missing).unwrap_err(), "mlx5_0: no such device");
        std::fs::write(port.join("state"), "1: DOWN\n").unwrap();
        assert!(select(&root, &IbSettings::default()).unwrap_err().contains("not active"));
        std::fs::remove_dir_all(&root).unwrap();
        assert!(select(&root, &IbSettings::default()).unwrap_err().contains("no RDMA devices"));
    }

    #[test]
    fn path_identifiers() {
        assert_eq!(flow_label_from_qpns(17, 18), flow_label_from_qpns(18, 17));
        assert!(flow_label_from_qpns(0x1234, 0x5678) < (1 << 20));
        // rdma_flow_label_to_udp_sport(0xfffff) = 0xc000 | (0x3fff ^ 0x3f)
        assert_eq!(udp_sport(0xF_FFFF, 0, 0), 0xC000 | (0x3fff ^ 0x3f));
        let ports: std::collections::HashSet<u16> = (17..49).map(|q| udp_sport(0, q, 0x40)).collect();
        assert!(ports.len() > 28, "QPN-derived labels spread ports: {ports:?}");
    }
}
