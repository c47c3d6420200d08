//! Settings read from `ACCL_*` environment variables (the README lists them all).

use std::time::Duration;

use crate::algo::AlgoChoice;
use crate::error::{Error, Result};

/// Which transport provider a communicator uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// Verbs when every rank has a usable RoCE v2 IPv6 GID, else TCP.
    Auto,
    /// IPv6 (or IPv4) TCP sockets, one per lane.
    Tcp,
    /// RoCEv2 queue pairs through libibverbs (cargo feature `verbs`).
    Verbs,
    /// In-process queues: ranks are threads of one process.
    Mem,
}

impl TransportKind {
    /// Parses `auto`, `tcp`, `verbs` or `mem`.
    pub fn parse(text: &str) -> Option<TransportKind> {
        match text.to_ascii_lowercase().as_str() {
            "auto" | "" => Some(TransportKind::Auto),
            "tcp" => Some(TransportKind::Tcp),
            "verbs" | "ib" | "roce" => Some(TransportKind::Verbs),
            "mem" => Some(TransportKind::Mem),
            _ => None,
        }
    }

    /// The name `ACCL_TRANSPORT` takes.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Auto => "auto",
            TransportKind::Tcp => "tcp",
            TransportKind::Verbs => "verbs",
            TransportKind::Mem => "mem",
        }
    }
}

/// Which TCP congestion control the lanes' sockets use (`ACCL_TCP_CONGESTION`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TcpCongestion {
    /// Lanes between ranks on the same host (loopback) use `cubic`, or `reno` where the system
    /// does not permit `cubic`; lanes to other hosts keep the system default. Loopback has no
    /// bottleneck queue for a pacing algorithm such as `bbr` to protect, and pacing costs a
    /// timer per burst: on the development VM, whose default is `bbr`, `cubic` moved 20 % more
    /// with 4 ranks and twice as much with 2 (docs/performance.md).
    #[default]
    Auto,
    /// Every lane keeps the system default (`net.ipv4.tcp_congestion_control`).
    System,
    /// Every lane uses this algorithm; a lane that cannot get it fails to connect.
    Named(String),
}

impl TcpCongestion {
    /// Parses `auto`, `system` or an algorithm name such as `cubic`.
    ///
    /// ```
    /// use accl_core::config::TcpCongestion;
    /// assert_eq!(TcpCongestion::parse("auto"), Some(TcpCongestion::Auto));
    /// assert_eq!(TcpCongestion::parse("reno"), Some(TcpCongestion::Named("reno".into())));
    /// assert_eq!(TcpCongestion::parse("no such"), None);
    /// ```
    pub fn parse(text: &str) -> Option<TcpCongestion> {
        let t = text.trim();
        match t.to_ascii_lowercase().as_str() {
            "auto" => Some(TcpCongestion::Auto),
            "system" | "default" => Some(TcpCongestion::System),
            // The kernel's names are at most 15 bytes (TCP_CA_NAME_MAX with its NUL).
            _ if (1..16).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
                Some(TcpCongestion::Named(t.to_string()))
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for TcpCongestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TcpCongestion::Auto => f.write_str("auto"),
            TcpCongestion::System => f.write_str("system"),
            TcpCongestion::Named(n) => f.write_str(n),
        }
    }
}

/// Communicator settings. `Config::default()` is the built-in default; [`Config::from_env`]
/// applies `ACCL_*` overrides on top of it.
#[derive(Clone, Debug)]
pub struct Config {
    /// Bound on every wait, rendezvous included (`ACCL_TIMEOUT`, seconds).
    pub timeout: Duration,
    /// Lanes per peer connection (`ACCL_LANES`).
    pub lanes: usize,
    /// Transport provider (`ACCL_TRANSPORT`).
    pub transport: TransportKind,
    /// Algorithm overrides (`ACCL_ALGO`).
    pub algo: AlgoChoice,
    /// Bytes per lane chunk: messages are cut into chunks of this size spread over the lanes
    /// (`ACCL_CHUNK_SIZE`).
    pub chunk_size: usize,
    /// Bytes per pipeline segment: schedules cut blocks into segments so that reduction of one
    /// overlaps transfer of the next (`ACCL_SEGMENT_SIZE`). `None`: each algorithm's own
    /// default ([`crate::algo::default_segment`]).
    pub segment_size: Option<usize>,
    /// How long a wait polls before it sleeps (`ACCL_SPIN_US`).
    pub spin: Duration,
    /// First IPv6 flow label of the lanes; lane `i` uses `base + i`. 0 disables labels
    /// (`ACCL_FLOW_LABEL`).
    pub flow_label: u32,
    /// Address the data listener binds; default: the local address that routes to the root
    /// (`ACCL_LISTEN_ADDR`).
    pub listen_addr: Option<std::net::IpAddr>,
    /// Threads a rank may use to reduce large segments (`ACCL_REDUCE_THREADS`).
    pub reduce_threads: usize,
    /// Peers an all2all exchanges with at once (`ACCL_A2A_WINDOW`).
    pub a2a_window: usize,
    /// Message size (bytes per rank) from which the ring allreduce and reduce_scatter write
    /// their partial and final sums with streaming stores; 0 never does; `None` picks it at
    /// init with [`auto_stream_min`] (`ACCL_STREAM_MIN`, `auto` by default).
    pub stream_min: Option<usize>,
    /// Whether a rank gives up its core after each large reduction (`ACCL_YIELD`); `None`
    /// (`auto`): when this host's ranks outnumber its cores ([`oversubscribed`]).
    pub yield_cpu: Option<bool>,
    /// Socket send/receive buffer size in bytes; 0 keeps the kernel's autotuning
    /// (`ACCL_SOCKET_BUF`).
    pub socket_buf: usize,
    /// TCP congestion control of the lanes (`ACCL_TCP_CONGESTION`).
    pub tcp_congestion: TcpCongestion,
    /// Print init and algorithm choices to stderr (`ACCL_DEBUG=1`).
    pub debug: bool,
    /// RoCE device, GID and QP settings (`ACCL_IB_*`).
    pub ib: crate::transport::ib::IbSettings,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            timeout: Duration::from_secs(60),
            lanes: 1,
            transport: TransportKind::Auto,
            algo: AlgoChoice::default(),
            chunk_size: 1 << 20,
            segment_size: None,
            spin: Duration::from_micros(50),
            flow_label: 0,
            listen_addr: None,
            reduce_threads: 1,
            a2a_window: 4,
            stream_min: None,
            yield_cpu: None,
            socket_buf: 0,
            tcp_congestion: TcpCongestion::Auto,
            debug: false,
            ib: crate::transport::ib::IbSettings::default(),
        }
    }
}

/// Reads an environment variable, treating unset and empty alike.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Parses a byte size with an optional K/M/G suffix (powers of 1024): `512K`, `4M`, `1G`, `100`.
///
/// ```
/// assert_eq!(accl_core::config::parse_size("4M"), Some(4 << 20));
/// assert_eq!(accl_core::config::parse_size("1g"), Some(1 << 30));
/// assert_eq!(accl_core::config::parse_size("12"), Some(12));
/// assert_eq!(accl_core::config::parse_size("x"), None);
/// ```
pub fn parse_size(text: &str) -> Option<usize> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last()?.to_ascii_uppercase() {
        'K' => (&t[..t.len() - 1], 10),
        'M' => (&t[..t.len() - 1], 20),
        'G' => (&t[..t.len() - 1], 30),
        'B' => return parse_size(&t[..t.len() - 1]),
        _ => (t, 0),
    };
    let n: usize = digits.trim().parse().ok()?;
    n.checked_mul(1usize << shift)
}

fn invalid(name: &str, value: &str, reason: &str) -> Error {
    Error::InvalidConfig { name: name.to_string(), value: value.to_string(), reason: reason.to_string() }
}

fn env_parsed<T>(name: &str, parse: impl Fn(&str) -> Option<T>, reason: &str) -> Result<Option<T>> {
    match env_var(name) {
        None => Ok(None),
        Some(v) => parse(&v).map(Some).ok_or_else(|| invalid(name, &v, reason)),
    }
}

impl Config {
    /// The defaults with every `ACCL_*` variable that is set applied.
    pub fn from_env() -> Result<Config> {
        let mut c = Config::default();
        if let Some(secs) = env_parsed(
            "ACCL_TIMEOUT",
            |v| v.parse::<f64>().ok().filter(|s| *s > 0.0 && s.is_finite()),
            "expected a positive number of seconds",
        )? {
            c.timeout = Duration::from_secs_f64(secs);
        }
        if let Some(n) = env_parsed(
            "ACCL_LANES",
            |v| v.parse::<usize>().ok().filter(|n| (1..=64).contains(n)),
            "expected a lane count in 1..=64",
        )? {
            c.lanes = n;
        }
        if let Some(t) = env_parsed("ACCL_TRANSPORT", TransportKind::parse, "expected auto, tcp, verbs or mem")? {
            c.transport = t;
        }
        if let Some(v) = env_var("ACCL_ALGO") {
            c.algo = AlgoChoice::parse(&v).map_err(|reason| invalid("ACCL_ALGO", &v, &reason))?;
        }
        let size = |v: &str| parse_size(v).filter(|n| *n >= 4096);
        if let Some(n) = env_parsed("ACCL_CHUNK_SIZE", size, "expected a size >= 4K, e.g. 1M")? {
            c.chunk_size = n;
        }
        if let Some(n) = env_parsed("ACCL_SEGMENT_SIZE", size, "expected a size >= 4K, e.g. 256K")? {
            c.segment_size = Some(n);
        }
        if let Some(us) = env_parsed("ACCL_SPIN_US", |v| v.parse::<u64>().ok(), "expected microseconds")? {
            c.spin = Duration::from_micros(us);
        }
        if let Some(label) = env_parsed(
            "ACCL_FLOW_LABEL",
            |v| parse_u32_auto(v).filter(|l| *l < (1 << 20)),
            "expected a 20-bit flow label (decimal or 0x hex)",
        )? {
            c.flow_label = label;
        }
        if let Some(ip) =
            env_parsed("ACCL_LISTEN_ADDR", |v| v.trim_matches(['[', ']']).parse().ok(), "expected an IP address")?
        {
            c.listen_addr = Some(ip);
        }
        let threads = env_parsed(
            "ACCL_REDUCE_THREADS",
            |v| v.parse::<usize>().ok().filter(|n| *n >= 1),
            "expected a thread count >= 1",
        )?;
        c.reduce_threads = threads.unwrap_or_else(default_reduce_threads);
        if let Some(n) = env_parsed(
            "ACCL_A2A_WINDOW",
            |v| v.parse::<usize>().ok().filter(|n| *n >= 1),
            "expected a peer count >= 1",
        )? {
            c.a2a_window = n;
        }
        if let Some(n) = env_parsed(
            "ACCL_STREAM_MIN",
            |v| if v.trim().eq_ignore_ascii_case("auto") { Some(None) } else { parse_size(v).map(Some) },
            "expected auto, a size such as 16M, or 0",
        )? {
            c.stream_min = n;
        }
        if let Some(y) = env_parsed(
            "ACCL_YIELD",
            |v| match v.trim().to_ascii_lowercase().as_str() {
                "auto" => Some(None),
                "1" => Some(Some(true)),
                "0" => Some(Some(false)),
                _ => None,
            },
            "expected auto, 1 or 0",
        )? {
            c.yield_cpu = y;
        }
        if let Some(n) = env_parsed("ACCL_SOCKET_BUF", parse_size, "expected a size, e.g. 4M, or 0")? {
            c.socket_buf = n;
        }
        if let Some(cc) = env_parsed(
            "ACCL_TCP_CONGESTION",
            TcpCongestion::parse,
            "expected auto, system or an algorithm name such as cubic",
        )? {
            c.tcp_congestion = cc;
        }
        c.debug = env_var("ACCL_DEBUG").is_some_and(|v| v != "0");
        c.ib = crate::transport::ib::IbSettings::from_env()?;
        Ok(c)
    }
}

fn parse_u32_auto(v: &str) -> Option<u32> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Ranks sharing this host, if known (`ACCL_LOCAL_NRANKS`, set by `accl-run`).
fn local_nranks() -> Option<usize> {
    env_var("ACCL_LOCAL_NRANKS").and_then(|v| v.parse::<usize>().ok()).filter(|n| *n >= 1)
}

/// Whether the ranks on this host (`ACCL_LOCAL_NRANKS`; unknown counts as one) outnumber its
/// cores.
pub fn oversubscribed() -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    local_nranks().unwrap_or(1) > cores
}

/// Cores divided by the ranks sharing this host, so that reduction threads never
/// oversubscribe the machine.
fn default_reduce_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / local_nranks().unwrap_or(cores)).max(1)
}

/// The size of the largest CPU cache (on Linux, from sysfs); 32 MiB where it cannot be read.
pub fn last_level_cache_bytes() -> usize {
    let sizes =
        std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").into_iter().flatten().flatten().filter_map(|entry| {
            let text = std::fs::read_to_string(entry.path().join("size")).ok()?;
            parse_size(text.trim())
        });
    sizes.max().filter(|&n| n > 0).unwrap_or(32 << 20)
}

/// The default `stream_min` for `nranks` ranks: the message size from which a ring sum has left
/// the last-level cache by the time it is read again.
///
/// A ring reduce-scatter sum is sent on a block (1/`nranks` of the message) after it is
/// written; meanwhile each rank on the host reads a block of input and writes a block of sums,
/// so 2 × local ranks × message / `nranks` bytes go through the shared cache. Streaming stores
/// pay off once that exceeds the cache: from cache × `nranks` / (2 × local ranks). On the 2-core
/// development VM (32 MiB of L3, 4 local ranks) that is 16 MiB, where they began to gain in
/// measurements (docs/performance.md). Unknown local ranks count as one.
///
/// ```
/// use accl_core::config::auto_stream_min;
/// assert_eq!(auto_stream_min(32 << 20, 4, 4), 16 << 20);
/// assert_eq!(auto_stream_min(32 << 20, 8, 1), 128 << 20);
/// ```
pub fn auto_stream_min(cache_bytes: usize, nranks: usize, local_nranks: usize) -> usize {
    (cache_bytes.saturating_mul(nranks.max(1)) / (2 * local_nranks.max(1))).max(1)
}

/// [`auto_stream_min`] for this machine and `nranks` ranks, with `ACCL_LOCAL_NRANKS` ranks on
/// this host.
pub fn default_stream_min(nranks: usize) -> usize {
    auto_stream_min(last_level_cache_bytes(), nranks, local_nranks().unwrap_or(1).min(nranks.max(1)))
}
