//! The TCP provider: one socket per lane, IPv6 first, optional IPv6 flow label per lane.
//!
//! A lane is either duplex or simplex. Duplex (the default without flow labels): the lower rank
//! connects and both directions share the socket, so each side's data carries the ACKs of the
//! other side's (what makes small messages fast). Simplex (with flow labels): each direction has
//! its own socket, connected by its sender, so the flow label it asks for is the one its data
//! packets carry; the reverse direction then carries nothing but a failure notice.
//! Payloads move straight between the caller's buffers and the socket (`sendmsg`/`readv` with a
//! header and the payload in one call), never through an intermediate copy.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};

use super::{
    Connecting, Header, LaneEnds, LaneError, LaneSetup, Listener, MemoryRegion, Provider, RecvLane, SendLane,
    WaitSource, HEADER_LEN,
};
use crate::addr::{format_socket_addr, parse_socket_addr};
use crate::config::TcpCongestion;
use crate::error::{Error, Result};

const HELLO_MAGIC: u32 = 0x4143_4c31; // "ACL1"
const HELLO_LEN: usize = 32;
/// Leads a failure notice sent in band on a duplex lane, where a data header would be.
const NOTICE_MAGIC: u16 = 0xACCE;
/// Longest notice body read back.
const MAX_NOTICE: usize = 4096;
/// iovecs per system call: enough to batch many small messages.
const MAX_IOV: usize = 64;

/// TCP provider settings.
#[derive(Clone, Debug)]
pub struct TcpProvider {
    /// Address the listener binds (port ignored); its scope also applies to link-local peers.
    pub listen: SocketAddr,
    /// SO_SNDBUF/SO_RCVBUF in bytes; 0 keeps the kernel's autotuning.
    pub socket_buf: usize,
    /// Congestion control of the lanes.
    pub congestion: TcpCongestion,
}

impl TcpProvider {
    /// A provider whose listener binds `listen` (with port 0), with the default
    /// [`TcpCongestion::Auto`].
    pub fn new(listen: SocketAddr, socket_buf: usize) -> TcpProvider {
        let mut listen = listen;
        listen.set_port(0);
        TcpProvider { listen, socket_buf, congestion: TcpCongestion::Auto }
    }

    /// The same provider with the lanes' congestion control set to `congestion`. A named
    /// algorithm is tried on a scratch socket first, so that every rank reports one it cannot
    /// use before any lane connects (instead of its peers waiting for lanes that never come).
    pub fn with_congestion(mut self, congestion: TcpCongestion) -> Result<TcpProvider> {
        if let TcpCongestion::Named(name) = &congestion {
            let probe = Socket::new(Domain::for_address(self.listen), Type::STREAM, Some(Protocol::TCP))
                .map_err(|e| Error::io("TCP socket", e))?;
            probe.set_tcp_congestion(name.as_bytes()).map_err(|e| Error::InvalidConfig {
                name: "ACCL_TCP_CONGESTION".into(),
                value: name.clone(),
                reason: congestion_reason(&e),
            })?;
        }
        self.congestion = congestion;
        Ok(self)
    }

    /// Options set on every lane socket before it connects (or as it is accepted).
    fn tune(&self, sock: &Socket) -> io::Result<()> {
        sock.set_nodelay(true)?;
        if self.socket_buf > 0 {
            sock.set_send_buffer_size(self.socket_buf)?;
            sock.set_recv_buffer_size(self.socket_buf)?;
        }
        if let TcpCongestion::Named(name) = &self.congestion {
            sock.set_tcp_congestion(name.as_bytes()).map_err(|e| congestion_error(name, e))?;
        }
        Ok(())
    }

    /// Options that depend on where the connected socket leads.
    fn tune_connected(&self, sock: &Socket) {
        if self.congestion == TcpCongestion::Auto && same_host(sock) {
            // A failure leaves the system default, which works, only slower.
            let _ = LOCAL_CONGESTION.iter().any(|name| sock.set_tcp_congestion(name.as_bytes()).is_ok());
        }
    }
}

/// What [`TcpCongestion::Auto`] gives same-host lanes, in order of preference: algorithms that
/// do not pace. `reno` is built into every kernel and always permitted.
const LOCAL_CONGESTION: [&str; 2] = ["cubic", "reno"];

/// Whether a connected socket's peer is on this host: a loopback address, or our own address.
fn same_host(sock: &Socket) -> bool {
    let ip = |a: io::Result<socket2::SockAddr>| a.ok().and_then(|a| a.as_socket()).map(|a| a.ip());
    match (ip(sock.local_addr()), ip(sock.peer_addr())) {
        (Some(local), Some(peer)) => peer.is_loopback() || local == peer,
        _ => false,
    }
}

/// The congestion control a socket uses.
fn congestion_of(sock: &Socket) -> Option<String> {
    let name = sock.tcp_congestion().ok()?;
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Why the kernel refused a congestion control.
fn congestion_reason(e: &io::Error) -> String {
    let why = match e.raw_os_error() {
        Some(libc::ENOENT) => "not available here (net.ipv4.tcp_available_congestion_control lists those that are)",
        Some(libc::EPERM) => "not permitted (net.ipv4.tcp_allowed_congestion_control lists those that are)",
        _ => "refused",
    };
    format!("{why}: {e}")
}

fn congestion_error(name: &str, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("TCP congestion control {name:?} (ACCL_TCP_CONGESTION): {}", congestion_reason(&e)),
    )
}

impl Provider for TcpProvider {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn listen(&self) -> Result<Box<dyn Listener>> {
        let (sock, handle) = listen_socket(self.listen, "listen")?;
        Ok(Box::new(TcpListener { sock, handle, provider: self.clone(), pending: Vec::new() }))
    }

    fn connect(&self, handle: &[u8], setup: &LaneSetup) -> Result<Box<dyn Connecting>> {
        let (mut addr, text) = peer_address(handle, &self.listen)?;
        let ctx = |e| {
            Error::io(format!("rank {}: connect lane {} to rank {} at {text}", setup.rank, setup.lane, setup.peer), e)
        };
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(ctx)?;
        self.tune(&sock).map_err(ctx)?;
        if setup.flow_label != 0 {
            if let SocketAddr::V6(v6) = &mut addr {
                flowlabel::lease(&sock, v6.ip(), setup.flow_label).map_err(|e| {
                    Error::io(
                        format!(
                            "rank {}: flow label {:#x} for lane {} to rank {}",
                            setup.rank, setup.flow_label, setup.lane, setup.peer
                        ),
                        e,
                    )
                })?;
                *v6 = SocketAddrV6::new(*v6.ip(), v6.port(), setup.flow_label.to_be(), v6.scope_id());
                // sin6_flowinfo is read in network order by the kernel; SocketAddrV6 stores it as
                // given, so pass it pre-swapped.
            }
        }
        start_connect(&sock, addr).map_err(ctx)?;
        let mut hello = [0u8; HELLO_LEN];
        hello[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        hello[4..12].copy_from_slice(&setup.comm_id.to_le_bytes());
        hello[12..16].copy_from_slice(&(setup.rank as u32).to_le_bytes());
        hello[16..20].copy_from_slice(&(setup.peer as u32).to_le_bytes());
        hello[20..24].copy_from_slice(&(setup.lane as u32).to_le_bytes());
        hello[24..28].copy_from_slice(&setup.flow_label.to_le_bytes());
        hello[28] = u8::from(setup.duplex);
        Ok(Box::new(TcpConnecting {
            sock: Some(sock),
            hello,
            sent: 0,
            setup: *setup,
            target: text,
            provider: self.clone(),
        }))
    }
}

/// A non-blocking listening socket on `addr` and its handle (the bound address as text), for
/// every provider whose handle is a TCP address. `what` names it in errors.
pub(crate) fn listen_socket(addr: SocketAddr, what: &str) -> Result<(Socket, Vec<u8>)> {
    let ctx = |e| Error::io(format!("{what} on {}", format_socket_addr(&addr)), e);
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(ctx)?;
    sock.set_reuse_address(true).map_err(ctx)?;
    sock.bind(&addr.into()).map_err(ctx)?;
    sock.listen(4096).map_err(ctx)?;
    sock.set_nonblocking(true).map_err(ctx)?;
    let local = sock.local_addr().map_err(ctx)?.as_socket().expect("inet socket");
    Ok((sock, format_socket_addr(&local).into_bytes()))
}

/// The address in a peer's listener handle, and the handle as text. A link-local peer is
/// reached through our own interface towards it (scope ids are per host).
pub(crate) fn peer_address(handle: &[u8], own: &SocketAddr) -> Result<(SocketAddr, String)> {
    let text = String::from_utf8_lossy(handle).into_owned();
    let mut addr = parse_socket_addr(&text, "peer handle")?;
    if let (SocketAddr::V6(peer), SocketAddr::V6(own)) = (&mut addr, own) {
        if peer.ip().is_unicast_link_local() && own.scope_id() != 0 {
            peer.set_scope_id(own.scope_id());
        }
    }
    Ok((addr, text))
}

/// Starts a non-blocking connect; it completes (or fails) when the socket turns writable.
pub(crate) fn start_connect(sock: &Socket, addr: SocketAddr) -> io::Result<()> {
    sock.set_nonblocking(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

struct TcpListener {
    sock: Socket,
    handle: Vec<u8>,
    provider: TcpProvider,
    /// Accepted sockets whose hello has not fully arrived.
    pending: Vec<(Socket, [u8; HELLO_LEN], usize)>,
}

impl Listener for TcpListener {
    fn handle(&self) -> Vec<u8> {
        self.handle.clone()
    }

    fn accept(&mut self) -> Result<Option<(LaneSetup, LaneEnds)>> {
        loop {
            match self.sock.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(true).map_err(|e| Error::io("accepted socket", e))?;
                    self.provider.tune(&s).map_err(|e| Error::io("accepted socket", e))?;
                    self.provider.tune_connected(&s);
                    self.pending.push((s, [0; HELLO_LEN], 0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("accept", e)),
            }
        }
        let mut i = 0;
        while i < self.pending.len() {
            let (sock, hello, got) = &mut self.pending[i];
            match read_some(sock, &mut hello[*got..]) {
                Ok(0) if *got < HELLO_LEN => {
                    self.pending.swap_remove(i); // closed before saying hello: not a lane
                    continue;
                }
                Ok(n) => *got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.pending.swap_remove(i);
                    continue;
                }
            }
            if *got == HELLO_LEN {
                let (sock, hello, _) = self.pending.swap_remove(i);
                let word = |at: usize| u32::from_le_bytes(hello[at..at + 4].try_into().expect("4 bytes"));
                if word(0) != HELLO_MAGIC {
                    continue;
                }
                let setup = LaneSetup {
                    comm_id: u64::from_le_bytes(hello[4..12].try_into().expect("8 bytes")),
                    rank: word(12) as usize,
                    peer: word(16) as usize,
                    lane: word(20) as usize,
                    flow_label: word(24),
                    duplex: hello[28] != 0,
                };
                let sock = Arc::new(sock);
                let send = setup.duplex.then(|| Box::new(TcpSendLane::new(sock.clone(), true, 0)) as Box<dyn SendLane>);
                let recv: Box<dyn RecvLane> = Box::new(TcpRecvLane::new(sock, setup.duplex));
                return Ok(Some((setup, LaneEnds { send, recv: Some(recv) })));
            }
            i += 1;
        }
        Ok(None)
    }

    fn wait_sources(&self) -> Vec<WaitSource> {
        let mut v = vec![WaitSource::Fd { fd: self.sock.as_raw_fd(), events: libc::POLLIN }];
        v.extend(self.pending.iter().map(|(s, _, _)| WaitSource::Fd { fd: s.as_raw_fd(), events: libc::POLLIN }));
        v
    }
}

struct TcpConnecting {
    sock: Option<Socket>,
    hello: [u8; HELLO_LEN],
    sent: usize,
    setup: LaneSetup,
    target: String,
    provider: TcpProvider,
}

impl Connecting for TcpConnecting {
    fn poll(&mut self) -> Result<Option<LaneEnds>> {
        let sock = self.sock.as_ref().expect("polled after completion");
        let ctx = |e| {
            Error::io(
                format!(
                    "rank {}: connect lane {} to rank {} at {}",
                    self.setup.rank, self.setup.lane, self.setup.peer, self.target
                ),
                e,
            )
        };
        if let Some(e) = sock.take_error().map_err(ctx)? {
            return Err(ctx(e));
        }
        if sock.peer_addr().is_err() {
            return Ok(None); // handshake still in flight
        }
        if self.sent == 0 {
            self.provider.tune_connected(sock);
        }
        while self.sent < HELLO_LEN {
            match send_some(sock, &self.hello[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(ctx(e)),
            }
        }
        let sock = Arc::new(self.sock.take().expect("checked above"));
        let duplex = self.setup.duplex;
        let recv = duplex.then(|| Box::new(TcpRecvLane::new(sock.clone(), true)) as Box<dyn RecvLane>);
        let send: Box<dyn SendLane> = Box::new(TcpSendLane::new(sock, duplex, self.setup.flow_label));
        Ok(Some(LaneEnds { send: Some(send), recv }))
    }

    fn wait_source(&self) -> Option<WaitSource> {
        self.sock.as_ref().map(|s| WaitSource::Fd { fd: s.as_raw_fd(), events: libc::POLLOUT })
    }
}

struct PendingSend {
    header: Header,
    data: *const u8,
    len: usize,
    /// Bytes of header + payload already written.
    done: usize,
}

// SAFETY: the raw pointer is only dereferenced by the kernel during sendmsg; the caller of
// `post` guarantees it stays valid, and lanes move between threads only with their owner.
unsafe impl Send for PendingSend {}

struct TcpSendLane {
    sock: Arc<Socket>,
    /// The socket also carries the peer's data to our receive end, which owns reading it.
    duplex: bool,
    queue: VecDeque<PendingSend>,
    /// Why the receiver is known to be gone.
    peer_gone: Option<String>,
    /// Bytes of a failure notice read so far.
    notice: Vec<u8>,
    flow_label: u32,
}

impl TcpSendLane {
    fn new(sock: Arc<Socket>, duplex: bool, flow_label: u32) -> TcpSendLane {
        TcpSendLane { sock, duplex, queue: VecDeque::new(), peer_gone: None, notice: Vec::new(), flow_label }
    }
}

impl SendLane for TcpSendLane {
    unsafe fn post(
        &mut self,
        header: &Header,
        data: *const u8,
        len: usize,
        _mr: Option<&MemoryRegion>,
    ) -> Result<(), LaneError> {
        if let Some(why) = &self.peer_gone {
            return Err(LaneError::Closed(why.clone()));
        }
        self.queue.push_back(PendingSend { header: *header, data, len, done: 0 });
        Ok(())
    }

    fn progress(&mut self) -> Result<usize, LaneError> {
        let mut completed = 0;
        while !self.queue.is_empty() {
            let mut iov: [MaybeUninit<libc::iovec>; MAX_IOV] = [MaybeUninit::uninit(); MAX_IOV];
            let mut n_iov = 0;
            let mut want = 0usize;
            for item in self.queue.iter() {
                if n_iov + 2 > MAX_IOV {
                    break;
                }
                if item.done < HEADER_LEN {
                    let part = &item.header[item.done..];
                    iov[n_iov].write(libc::iovec { iov_base: part.as_ptr() as *mut _, iov_len: part.len() });
                    n_iov += 1;
                    want += part.len();
                }
                let data_done = item.done.saturating_sub(HEADER_LEN);
                if item.len > data_done {
                    iov[n_iov].write(libc::iovec {
                        // SAFETY: within the posted buffer.
                        iov_base: unsafe { item.data.add(data_done) } as *mut _,
                        iov_len: item.len - data_done,
                    });
                    n_iov += 1;
                    want += item.len - data_done;
                }
            }
            // SAFETY: iov[..n_iov] is initialized and points at live buffers.
            let msg = libc::msghdr {
                msg_name: std::ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: iov.as_mut_ptr() as *mut libc::iovec,
                msg_iovlen: n_iov,
                msg_control: std::ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            };
            // SAFETY: valid msghdr; MSG_NOSIGNAL turns SIGPIPE into EPIPE.
            let rc = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        let why = format!("send failed: {e}");
                        self.peer_gone = Some(why.clone());
                        return Err(LaneError::Closed(why));
                    }
                }
            }
            let mut wrote = rc as usize;
            while wrote > 0 {
                let item = self.queue.front_mut().expect("wrote bytes for a queued item");
                let left = HEADER_LEN + item.len - item.done;
                if wrote >= left {
                    wrote -= left;
                    self.queue.pop_front();
                    completed += 1;
                } else {
                    item.done += wrote;
                    wrote = 0;
                }
            }
            // Complete zero-length tails that sendmsg reported as part of `want`.
            if (rc as usize) < want {
                break;
            }
        }
        Ok(completed)
    }

    fn queued(&self) -> usize {
        self.queue.len()
    }

    fn check_peer(&mut self) -> Result<(), LaneError> {
        if self.duplex {
            return Ok(()); // the receive end reads this socket and reports
        }
        let mut buf = [0u8; 512];
        loop {
            match read_some(&self.sock, &mut buf) {
                Ok(0) => {
                    if self.peer_gone.is_some() {
                        return Ok(()); // already known
                    }
                    let why = "the receiving rank closed the connection".to_string();
                    self.peer_gone = Some(why.clone());
                    if !self.queue.is_empty() {
                        return Err(LaneError::Closed(why));
                    }
                    return Ok(());
                }
                Ok(n) => {
                    self.notice.extend_from_slice(&buf[..n]);
                    if self.notice.len() >= 4 {
                        let len = u32::from_le_bytes(self.notice[..4].try_into().expect("4 bytes")) as usize;
                        if self.notice.len() >= 4 + len {
                            let body = self.notice[4..4 + len].to_vec();
                            self.peer_gone = Some("the receiving rank failed".into());
                            return Err(LaneError::Notice(body));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = format!("connection lost: {e}");
                    self.peer_gone = Some(why.clone());
                    return Err(LaneError::Closed(why));
                }
            }
        }
    }

    fn send_notice(&mut self, notice: &[u8]) {
        if !self.duplex {
            return;
        }
        if self.queue.front().is_some_and(|m| m.done > 0) {
            // Mid-message: a notice would be read as payload. Hang up instead.
            let _ = self.sock.shutdown(std::net::Shutdown::Write);
            return;
        }
        let body = &notice[..notice.len().min(MAX_NOTICE)];
        let mut frame = vec![0u8; HEADER_LEN];
        frame[0..2].copy_from_slice(&NOTICE_MAGIC.to_le_bytes());
        frame[28..32].copy_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(body);
        if send_some(&self.sock, &frame).map_or(true, |n| n < frame.len()) {
            let _ = self.sock.shutdown(std::net::Shutdown::Write);
        }
    }

    fn wait_source(&self) -> Option<WaitSource> {
        let mut events = 0;
        if self.peer_gone.is_none() && !self.duplex {
            events |= libc::POLLIN;
        }
        if !self.queue.is_empty() {
            events |= libc::POLLOUT;
        }
        (events != 0).then(|| WaitSource::Fd { fd: self.sock.as_raw_fd(), events })
    }

    fn flow_label(&self) -> u32 {
        self.flow_label
    }

    fn congestion(&self) -> Option<String> {
        congestion_of(&self.sock)
    }
}

struct PendingRecv {
    expect: Header,
    header: Header,
    data: *mut u8,
    len: usize,
    /// Bytes of header + payload already read.
    done: usize,
}

// SAFETY: see PendingSend.
unsafe impl Send for PendingRecv {}

struct TcpRecvLane {
    sock: Arc<Socket>,
    duplex: bool,
    queue: VecDeque<PendingRecv>,
    /// The sender hung up (with or without unread data left): stop asking poll about it.
    hangup_seen: bool,
    /// Duplex, idle: data of a later message is waiting, so readable means nothing new.
    data_waiting: bool,
}

impl TcpRecvLane {
    fn new(sock: Arc<Socket>, duplex: bool) -> TcpRecvLane {
        TcpRecvLane { sock, duplex, queue: VecDeque::new(), hangup_seen: false, data_waiting: false }
    }

    /// Reads the rest of an in-band notice whose header arrived and whose first `have` body
    /// bytes are in `prefix`; the sender wrote it in one piece, so the rest is (nearly) here.
    fn finish_notice(&self, header: &Header, prefix: &[u8]) -> LaneError {
        let len = (u32::from_le_bytes(header[28..32].try_into().expect("4 bytes")) as usize).min(MAX_NOTICE);
        let mut body = prefix[..prefix.len().min(len)].to_vec();
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        let mut buf = [0u8; 512];
        while body.len() < len && std::time::Instant::now() < deadline {
            let want = (len - body.len()).min(buf.len());
            match read_some(&self.sock, &mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(_) => break,
            }
        }
        LaneError::Notice(body)
    }
}

fn is_notice(header: &Header) -> bool {
    u16::from_le_bytes([header[0], header[1]]) == NOTICE_MAGIC
}

impl RecvLane for TcpRecvLane {
    unsafe fn post(
        &mut self,
        expect: &Header,
        data: *mut u8,
        len: usize,
        _mr: Option<&MemoryRegion>,
    ) -> Result<(), LaneError> {
        self.queue.push_back(PendingRecv { expect: *expect, header: [0; HEADER_LEN], data, len, done: 0 });
        self.data_waiting = false;
        Ok(())
    }

    fn progress(&mut self) -> Result<usize, LaneError> {
        let mut completed = 0;
        loop {
            // One call reads the headers and payloads of as many posted receives as fit, but
            // stops after the payload of a message whose header it has not checked yet: a
            // wrong header (a mismatch, or an in-band notice) spills into that one buffer only.
            if self.queue.is_empty() {
                break;
            }
            let mut iov: [MaybeUninit<libc::iovec>; MAX_IOV] = [MaybeUninit::uninit(); MAX_IOV];
            let mut n_iov = 0;
            let mut want = 0usize;
            for item in self.queue.iter() {
                if n_iov + 2 > MAX_IOV {
                    break;
                }
                if item.done < HEADER_LEN {
                    let part = &item.header[item.done..];
                    iov[n_iov].write(libc::iovec { iov_base: part.as_ptr() as *mut _, iov_len: part.len() });
                    n_iov += 1;
                    want += part.len();
                }
                let data_done = item.done.saturating_sub(HEADER_LEN);
                if item.len > data_done {
                    iov[n_iov].write(libc::iovec {
                        // SAFETY: within the posted buffer.
                        iov_base: unsafe { item.data.add(data_done) } as *mut _,
                        iov_len: item.len - data_done,
                    });
                    n_iov += 1;
                    want += item.len - data_done;
                }
                if item.done < HEADER_LEN {
                    break;
                }
            }
            if want == 0 {
                // Zero-length payload with its header already checked.
                self.queue.pop_front();
                completed += 1;
                continue;
            }
            // SAFETY: iov[..n_iov] is initialized and points at live buffers.
            let rc = unsafe { libc::readv(self.sock.as_raw_fd(), iov.as_ptr() as *const libc::iovec, n_iov as i32) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(LaneError::Closed(format!("receive failed: {e}"))),
                }
            }
            if rc == 0 {
                return Err(LaneError::Closed("the sending rank closed the connection".into()));
            }
            let mut read = rc as usize;
            let mut idx = 0;
            while read > 0 {
                let item = &mut self.queue[idx];
                let before = item.done;
                let step = read.min(HEADER_LEN + item.len - item.done);
                item.done += step;
                read -= step;
                if before < HEADER_LEN && item.done >= HEADER_LEN && item.header != item.expect {
                    if self.duplex && is_notice(&item.header) {
                        let got = item.done - HEADER_LEN;
                        // SAFETY: `got` payload bytes were just read into the posted buffer.
                        let prefix = unsafe { std::slice::from_raw_parts(item.data, got) };
                        let header = item.header;
                        return Err(self.finish_notice(&header, prefix));
                    }
                    return Err(LaneError::Mismatch { expected: item.expect, got: item.header });
                }
                idx += 1;
            }
            while let Some(item) = self.queue.front() {
                if item.done == HEADER_LEN + item.len {
                    self.queue.pop_front();
                    completed += 1;
                } else {
                    break;
                }
            }
            if (rc as usize) < want {
                break;
            }
        }
        Ok(completed)
    }

    fn queued(&self) -> usize {
        self.queue.len()
    }

    fn check_peer(&mut self) -> Result<(), LaneError> {
        if !self.queue.is_empty() || self.data_waiting {
            return Ok(()); // progress() reads and reports EOF and notices itself
        }
        let mut peek = [0u8; HEADER_LEN];
        match peek_some(&self.sock, &mut peek) {
            Ok(0) => {
                self.hangup_seen = true;
                Err(LaneError::Closed("the sending rank closed the connection".into()))
            }
            Ok(n) if self.duplex && n >= 2 && is_notice(&peek) => match self.take_notice() {
                Some(body) => Err(LaneError::Notice(body)),
                None => Ok(()), // the rest of the notice header is on its way
            },
            Ok(_) => {
                // Data of a later message (later receives also meet any end of stream behind it).
                self.data_waiting = true;
                self.hangup_seen = true;
                Ok(())
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => Ok(()),
            Err(e) => Err(LaneError::Closed(format!("connection lost: {e}"))),
        }
    }

    fn take_notice(&mut self) -> Option<Vec<u8>> {
        if !self.duplex || self.queue.front().is_some_and(|m| m.done > 0) {
            return None;
        }
        let mut header = [0u8; HEADER_LEN];
        if !peek_some(&self.sock, &mut header).is_ok_and(|n| n == HEADER_LEN) || !is_notice(&header) {
            return None;
        }
        let _ = read_some(&self.sock, &mut header);
        match self.finish_notice(&header, &[]) {
            LaneError::Notice(body) => Some(body),
            _ => None,
        }
    }

    fn send_notice(&mut self, notice: &[u8]) {
        if self.duplex {
            return; // the send end carries it in band
        }
        let mut framed = (notice.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(notice);
        let _ = send_some(&self.sock, &framed);
    }

    fn wait_source(&self) -> Option<WaitSource> {
        let mut events = 0;
        // Idle duplex lanes watch for in-band notices too.
        if !self.queue.is_empty() || (self.duplex && !self.data_waiting) {
            events |= libc::POLLIN;
        }
        if !self.hangup_seen {
            events |= libc::POLLRDHUP;
        }
        (events != 0).then(|| WaitSource::Fd { fd: self.sock.as_raw_fd(), events })
    }
}

fn read_some(sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(sock, buf, libc::MSG_DONTWAIT)
}

/// Looks at what is waiting without consuming it.
fn peek_some(sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(sock, buf, libc::MSG_DONTWAIT | libc::MSG_PEEK)
}

fn recv_flags(sock: &Socket, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: valid buffer.
    let rc = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len(), flags) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

fn send_some(sock: &Socket, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: valid buffer.
    let rc = unsafe {
        libc::send(sock.as_raw_fd(), buf.as_ptr() as *const _, buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Per-socket IPv6 flow labels through the kernel's flow label manager.
mod flowlabel {
    use std::io;
    use std::net::Ipv6Addr;
    use std::os::fd::AsRawFd;

    use socket2::Socket;

    const IPV6_FLOWLABEL_MGR: libc::c_int = 32;
    const IPV6_FLOWINFO_SEND: libc::c_int = 33;
    const IPV6_FL_A_GET: u8 = 0;
    const IPV6_FL_S_ANY: u8 = 255;
    const IPV6_FL_F_CREATE: u16 = 1;

    /// `struct in6_flowlabel_req` from `<linux/in6.h>`.
    #[repr(C)]
    struct FlowLabelReq {
        dst: [u8; 16],
        label: u32, // network byte order
        action: u8,
        share: u8,
        flags: u16,
        expires: u16,
        linger: u16,
        pad: u32,
    }

    /// Leases `label` for packets to `dst` and makes the socket send it.
    pub fn lease(sock: &Socket, dst: &Ipv6Addr, label: u32) -> io::Result<()> {
        let req = FlowLabelReq {
            dst: dst.octets(),
            label: (label & 0xF_FFFF).to_be(),
            action: IPV6_FL_A_GET,
            share: IPV6_FL_S_ANY,
            flags: IPV6_FL_F_CREATE,
            expires: 0,
            linger: 0,
            pad: 0,
        };
        let fd = sock.as_raw_fd();
        // SAFETY: fd is a valid IPv6 socket and req matches the kernel's struct layout.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                IPV6_FLOWLABEL_MGR,
                &req as *const _ as *const libc::c_void,
                std::mem::size_of::<FlowLabelReq>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let on: libc::c_int = 1;
        // SAFETY: as above, with an int option.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                IPV6_FLOWINFO_SEND,
                &on as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
