//! Rendezvous: how ranks find each other before any lane exists.
//!
//! A root service (a thread in the process that created the [`UniqueId`], or in rank 0 when
//! started from the environment) accepts one TCP connection per rank, checks that every rank
//! arrived exactly once, and then relays all-gather rounds: each rank sends a blob, every rank
//! gets all blobs back in rank order. The communicator uses a round to exchange the transports'
//! listener handles.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::time::{Duration, Instant};
use std::{fmt, thread};

use crate::addr::{format_socket_addr, parse_socket_addr};
use crate::error::{Error, Result};

const MAGIC: u32 = 0x4143_4342; // "ACCB"
const VERSION: u32 = 1;
const STATUS_OK: u8 = 0;
const STATUS_MISSING: u8 = 1;
const STATUS_REFUSED: u8 = 2;
/// Largest blob a rank may publish in one round.
const MAX_BLOB: usize = 1 << 20;

/// The address of a rendezvous root: printable as `[addr]:port` and parsable back, handed from
/// rank 0 to the others out of band (the NCCL `ncclUniqueId` model).
///
/// ```no_run
/// use accl_core::UniqueId;
/// let id = UniqueId::new().unwrap(); // on rank 0: starts the root service
/// let text = id.to_string();         // e.g. "[::1]:41234", send to the other ranks
/// let same: UniqueId = text.parse().unwrap();
/// assert_eq!(id, same);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UniqueId {
    addr: SocketAddr,
}

impl UniqueId {
    /// Starts a root service on `ACCL_LISTEN_ADDR`, or `[::1]` when unset, on a free port. The
    /// service serves one communicator and ends when its ranks disconnect, or a few seconds
    /// after its rendezvous timed out (it keeps telling late ranks who never arrived).
    pub fn new() -> Result<UniqueId> {
        let ip = match crate::config::env_var("ACCL_LISTEN_ADDR") {
            Some(v) => v.trim_matches(['[', ']']).parse().map_err(|_| Error::InvalidConfig {
                name: "ACCL_LISTEN_ADDR".into(),
                value: v.clone(),
                reason: "expected an IP address".into(),
            })?,
            None => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        UniqueId::serve(SocketAddr::new(ip, 0))
    }

    /// Starts a root service bound to `addr` (port 0 picks a free port).
    pub fn serve(addr: SocketAddr) -> Result<UniqueId> {
        UniqueId::serve_in_thread(addr).map(|(id, _)| id)
    }

    /// [`UniqueId::serve`], also returning the service thread: a process that hosts the root
    /// and fails its own rendezvous joins it, so that ranks arriving late still get an answer.
    pub(crate) fn serve_in_thread(addr: SocketAddr) -> Result<(UniqueId, thread::JoinHandle<()>)> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::io(format!("bind rendezvous root on {}", format_socket_addr(&addr)), e))?;
        let bound = listener.local_addr().map_err(|e| Error::io("rendezvous root address", e))?;
        let service = thread::Builder::new()
            .name("accl-root".into())
            .spawn(move || RootService::new(listener).run())
            .map_err(|e| Error::io("spawn rendezvous root thread", e))?;
        Ok((UniqueId { addr: bound }, service))
    }

    /// An id naming an existing root (`ACCL_ROOT`); starts nothing.
    pub fn from_addr(addr: SocketAddr) -> UniqueId {
        UniqueId { addr }
    }

    /// The root's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl fmt::Display for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_socket_addr(&self.addr))
    }
}

impl FromStr for UniqueId {
    type Err = Error;
    fn from_str(s: &str) -> Result<UniqueId> {
        parse_socket_addr(s, "unique id").map(UniqueId::from_addr)
    }
}

/// A rank's connection to the root service.
pub struct Bootstrap {
    stream: TcpStream,
    rank: usize,
    nranks: usize,
    comm_id: u64,
    timeout: Duration,
}

impl Bootstrap {
    /// Joins the rendezvous at `id` as `rank` of `nranks`, retrying the connection until
    /// `timeout`. Fails with [`Error::RendezvousTimeout`] naming the ranks that never arrived.
    pub fn join(id: &UniqueId, rank: usize, nranks: usize, timeout: Duration) -> Result<Bootstrap> {
        if nranks == 0 {
            return Err(Error::InvalidArgument("nranks must be at least 1".into()));
        }
        if rank >= nranks {
            return Err(Error::InvalidRank { what: "own", rank, nranks });
        }
        let deadline = Instant::now() + timeout;
        let root = id.to_string();
        let unreachable =
            |missing: Vec<usize>| Error::RendezvousTimeout { missing, nranks, root: root.clone(), timeout };
        let mut stream = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(unreachable(vec![0]));
            }
            match TcpStream::connect_timeout(&id.addr, left.min(Duration::from_secs(1))) {
                Ok(s) => break s,
                Err(_) => thread::sleep(Duration::from_millis(20).min(left)),
            }
        };
        stream.set_nodelay(true).ok();
        let mut hello = Vec::with_capacity(16);
        hello.extend_from_slice(&MAGIC.to_le_bytes());
        hello.extend_from_slice(&VERSION.to_le_bytes());
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(nranks as u32).to_le_bytes());
        hello.extend_from_slice(&(timeout.as_millis().min(u32::MAX as u128) as u32).to_le_bytes());
        let io_err = |e: io::Error| Error::io(format!("rendezvous with root {root}"), e);
        write_frame(&mut stream, &hello).map_err(io_err)?;
        // The root answers once every rank arrived or its own timeout passed; allow it a margin.
        let reply = read_frame_until(&mut stream, deadline + Duration::from_secs(2)).map_err(|e| {
            if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock {
                unreachable(vec![])
            } else {
                io_err(e)
            }
        })?;
        match reply.first() {
            Some(&STATUS_OK) if reply.len() == 9 => Ok(Bootstrap {
                stream,
                rank,
                nranks,
                comm_id: u64::from_le_bytes(reply[1..9].try_into().expect("8 bytes")),
                timeout,
            }),
            Some(&STATUS_MISSING) => {
                let missing = reply[1..]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize)
                    .collect();
                Err(unreachable(missing))
            }
            Some(&STATUS_REFUSED) => Err(Error::InvalidArgument(format!(
                "rendezvous root {root} refused rank {rank}: {}",
                String::from_utf8_lossy(&reply[1..])
            ))),
            _ => Err(Error::InvalidArgument(format!("malformed rendezvous reply from {root}"))),
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn nranks(&self) -> usize {
        self.nranks
    }

    /// An identifier shared by all ranks of this communicator.
    pub fn comm_id(&self) -> u64 {
        self.comm_id
    }

    /// The local address of the connection to the root: the interface peers can reach us on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.stream.local_addr().ok()
    }

    /// Sends `blob` and returns every rank's blob, in rank order. All ranks must call it.
    pub fn allgather(&mut self, blob: &[u8]) -> Result<Vec<Vec<u8>>> {
        let ctx = |e: io::Error| Error::io(format!("rank {}: bootstrap all-gather", self.rank), e);
        write_frame(&mut self.stream, blob).map_err(ctx)?;
        let reply = read_frame_until(&mut self.stream, Instant::now() + self.timeout).map_err(ctx)?;
        let blobs = split_blobs(&reply)
            .filter(|b| b.len() == self.nranks)
            .ok_or_else(|| Error::InvalidArgument("malformed bootstrap all-gather reply".into()))?;
        Ok(blobs)
    }

    /// Waits until every rank reached this point.
    pub fn barrier(&mut self) -> Result<()> {
        self.allgather(&[]).map(drop)
    }
}

fn split_blobs(mut data: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
        out.push(data.get(4..4 + len)?.to_vec());
        data = &data[4 + len..];
    }
    Some(out)
}

fn write_frame(stream: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4 + data.len());
    buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
    buf.extend_from_slice(data);
    stream.write_all(&buf)
}

fn read_frame_until(stream: &mut TcpStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut read_exact = |buf: &mut [u8]| -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "rendezvous timed out"));
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut buf[got..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "root closed the connection")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    let mut len = [0u8; 4];
    read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_BLOB * 1024 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "oversized bootstrap frame"));
    }
    let mut data = vec![0u8; len];
    read_exact(&mut data)?;
    Ok(data)
}

/// How long the root keeps answering ranks that arrive after its rendezvous timed out. A rank
/// started late (a loaded machine, a slow launcher) then learns which ranks never arrived instead
/// of finding the root gone; the process hosting the root waits this long before it reports.
const LATE_JOIN_GRACE: Duration = Duration::from_secs(3);

/// How often the root looks for new connections while none is waiting.
const ACCEPT_POLL: Duration = Duration::from_millis(2);

/// A rank's first frame to the root.
struct Hello {
    magic: u32,
    version: u32,
    rank: usize,
    nranks: usize,
    timeout: Duration,
}

impl Hello {
    /// Reads the hello from a freshly accepted connection; `None` if it is not one of ours (a
    /// port scan, a stray connection) or it does not come in time.
    fn read(stream: &mut TcpStream, deadline: Instant) -> Option<Hello> {
        stream.set_nonblocking(false).ok();
        stream.set_nodelay(true).ok();
        let hello = read_frame_until(stream, deadline).ok().filter(|h| h.len() == 20)?;
        let word = |i: usize| u32::from_le_bytes(hello[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        Some(Hello {
            magic: word(0),
            version: word(1),
            rank: word(2) as usize,
            nranks: word(3) as usize,
            timeout: Duration::from_millis(word(4) as u64),
        })
    }
}

/// The reply telling a rank that the rendezvous failed because `missing` never arrived.
fn missing_reply(missing: &[usize]) -> Vec<u8> {
    let mut reply = vec![STATUS_MISSING];
    reply.extend(missing.iter().flat_map(|&r| (r as u32).to_le_bytes()));
    reply
}

/// The root side of the rendezvous.
struct RootService {
    listener: TcpListener,
    /// Tests only: a pause after each answer but the last, to widen the window in which a
    /// rank already answered could run ahead of those still waiting.
    pause_between_answers: Option<Duration>,
}

impl RootService {
    fn new(listener: TcpListener) -> RootService {
        RootService { listener, pause_between_answers: None }
    }

    /// The next pending connection, if one is waiting (the listener does not block).
    fn accept(&self) -> Option<TcpStream> {
        self.listener.accept().ok().map(|(stream, _)| stream)
    }

    /// After a timed-out rendezvous: tells ranks that arrive within [`LATE_JOIN_GRACE`] which
    /// ranks never arrived at all (a late rank is late, not missing).
    fn answer_late_joiners(&self, mut never_arrived: Vec<usize>) {
        let end = Instant::now() + LATE_JOIN_GRACE;
        while Instant::now() < end {
            let Some(mut stream) = self.accept() else {
                thread::sleep(ACCEPT_POLL);
                continue;
            };
            let Some(hello) = Hello::read(&mut stream, end) else { continue };
            never_arrived.retain(|&r| r != hello.rank);
            let _ = write_frame(&mut stream, &missing_reply(&never_arrived));
        }
    }

    fn run(self) {
        let mut ranks: BTreeMap<usize, TcpStream> = BTreeMap::new();
        let mut nranks: Option<usize> = None;
        let mut deadline: Option<Instant> = None;
        self.listener.set_nonblocking(true).ok();
        loop {
            if let Some(n) = nranks {
                if ranks.len() == n {
                    break;
                }
            }
            // Connections already waiting are taken before the deadline is checked: a rank
            // that connected in time arrived in time, however late this thread got to run.
            let pending = self.accept();
            if pending.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
                let never_arrived: Vec<usize> = (0..nranks.unwrap_or(0)).filter(|r| !ranks.contains_key(r)).collect();
                let reply = missing_reply(&never_arrived);
                for stream in ranks.values_mut() {
                    let _ = write_frame(stream, &reply);
                }
                self.answer_late_joiners(never_arrived);
                return;
            }
            let Some(mut stream) = pending else {
                thread::sleep(ACCEPT_POLL);
                continue;
            };
            let Some(hello) = Hello::read(&mut stream, Instant::now() + Duration::from_secs(5)) else { continue };
            let refuse = |stream: &mut TcpStream, why: String| {
                let mut reply = vec![STATUS_REFUSED];
                reply.extend_from_slice(why.as_bytes());
                let _ = write_frame(stream, &reply);
            };
            let (rank, n) = (hello.rank, hello.nranks);
            if hello.magic != MAGIC || hello.version != VERSION {
                refuse(&mut stream, "protocol version mismatch".into());
                continue;
            }
            if *nranks.get_or_insert(n) != n {
                refuse(&mut stream, format!("nranks {n} differs from {} given by other ranks", nranks.unwrap_or(0)));
                continue;
            }
            if rank >= n || ranks.contains_key(&rank) {
                refuse(&mut stream, format!("rank {rank} is out of range or joined twice"));
                continue;
            }
            // The first rank to arrive starts the clock with its own timeout.
            deadline.get_or_insert(Instant::now() + hello.timeout);
            ranks.insert(rank, stream);
        }
        let comm_id = comm_id();
        let mut ok = vec![STATUS_OK];
        ok.extend_from_slice(&comm_id.to_le_bytes());
        let mut streams: Vec<TcpStream> = ranks.into_values().collect();
        if !self.answer_all(&mut streams, &ok) {
            return;
        }
        // Relay all-gather rounds until the ranks hang up.
        loop {
            let mut out = Vec::new();
            for s in &mut streams {
                match read_frame_until(s, Instant::now() + Duration::from_secs(24 * 3600)) {
                    Ok(blob) => {
                        out.extend_from_slice(&(blob.len() as u32).to_le_bytes());
                        out.extend_from_slice(&blob);
                    }
                    Err(_) => return,
                }
            }
            if !self.answer_all(&mut streams, &out) {
                return;
            }
        }
    }

    /// Sends `frame` to every rank, highest rank first; false if a rank has hung up.
    ///
    /// Rank 0 is answered last because its process usually hosts this thread
    /// ([`Communicator::from_env`](crate::Communicator::from_env) does so, and NCCL-style
    /// programs make the [`UniqueId`] on rank 0). Answered first, it could finish init, end its
    /// process and with it this thread before a later rank had its reply: that rank would then
    /// read "root closed the connection" instead of the barrier it was waiting for. Once a
    /// frame is written, the kernel delivers it even if the process exits.
    fn answer_all(&self, streams: &mut [TcpStream], frame: &[u8]) -> bool {
        let mut all_written = true;
        for (rank, s) in streams.iter_mut().enumerate().rev() {
            all_written &= write_frame(s, frame).is_ok();
            if let (Some(pause), true) = (self.pause_between_answers, rank > 0) {
                thread::sleep(pause);
            }
        }
        all_written
    }
}

fn comm_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_round_trips_and_gathers() {
        let id = UniqueId::new().unwrap();
        let parsed: UniqueId = id.to_string().parse().unwrap();
        assert_eq!(parsed, id);
        let handles: Vec<_> = (0..3)
            .map(|r| {
                thread::spawn(move || {
                    let mut b = Bootstrap::join(&id, r, 3, Duration::from_secs(10)).unwrap();
                    let all = b.allgather(&[r as u8; 3]).unwrap();
                    b.barrier().unwrap();
                    (b.comm_id(), all)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (id, all) in &results {
            assert_eq!(*id, results[0].0);
            assert_eq!(all, &vec![vec![0u8; 3], vec![1; 3], vec![2; 3]]);
        }
    }

    #[test]
    fn missing_rank_is_named() {
        let id = UniqueId::new().unwrap();
        let t0 = Instant::now();
        let err = Bootstrap::join(&id, 0, 2, Duration::from_millis(300)).err().unwrap();
        match err {
            Error::RendezvousTimeout { missing, .. } => assert_eq!(missing, vec![1]),
            other => panic!("unexpected {other}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    /// A root whose answers come `pause` apart.
    fn serve_pausing(pause: Duration) -> UniqueId {
        let listener = TcpListener::bind("[::1]:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || RootService { listener, pause_between_answers: Some(pause) }.run());
        UniqueId::from_addr(addr)
    }

    /// The CI failure this guards against: rank 0 hosts the root, gets its barrier reply first,
    /// finishes and exits, and the root thread dies with its process before rank 2 is answered.
    /// So when rank 0's barrier returns, every other rank's reply must already be on its way.
    #[test]
    fn rank_0_is_answered_last() {
        let pause = Duration::from_millis(300);
        let id = serve_pausing(pause);
        let joins: Vec<_> = (0..3)
            .map(|r| thread::spawn(move || Bootstrap::join(&id, r, 3, Duration::from_secs(10)).unwrap()))
            .collect();
        let mut ranks: Vec<Bootstrap> = joins.into_iter().map(|h| h.join().unwrap()).collect();
        for b in &mut ranks[1..] {
            write_frame(&mut b.stream, &[]).unwrap();
        }
        let t0 = Instant::now();
        ranks[0].barrier().unwrap();
        assert!(t0.elapsed() >= pause * 2, "rank 0 was answered before the others");
        for b in &mut ranks[1..] {
            b.stream.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            let waiting = b.stream.peek(&mut byte);
            assert!(matches!(waiting, Ok(1)), "rank {} has no reply yet when rank 0 has: {waiting:?}", b.rank);
            b.stream.set_nonblocking(false).unwrap();
            let reply = read_frame_until(&mut b.stream, Instant::now() + Duration::from_secs(5)).unwrap();
            assert_eq!(split_blobs(&reply).unwrap(), vec![Vec::<u8>::new(); 3]);
        }
    }

    #[test]
    fn rank_arriving_after_the_timeout_learns_who_never_came() {
        let id = UniqueId::new().unwrap();
        let early = thread::spawn(move || Bootstrap::join(&id, 0, 3, Duration::from_millis(200)).err().unwrap());
        let early = early.join().unwrap();
        assert!(matches!(&early, Error::RendezvousTimeout { missing, .. } if *missing == [1, 2]), "{early}");
        // The root timed out already; rank 2 is late, rank 1 never comes.
        let t0 = Instant::now();
        let late = Bootstrap::join(&id, 2, 3, Duration::from_secs(10)).err().unwrap();
        assert!(matches!(&late, Error::RendezvousTimeout { missing, .. } if *missing == [1]), "{late}");
        assert!(t0.elapsed() < LATE_JOIN_GRACE, "the late rank waited {:?}", t0.elapsed());
    }
}
