//! The verbs provider: RoCEv2 over IPv6 through libibverbs (rdma-sys), one RC queue pair per
//! lane. Built with the cargo feature `verbs`.
//!
//! Connection setup follows NCCL's net_ib plugin: the listener handle is the address of a TCP
//! socket; the connecting rank creates its QP and sends its QP number, PSN and GID over that
//! socket; the accepting rank creates its QP, connects it (RTR, RTS) and answers with its own;
//! the connecting rank connects and confirms. The socket then stays open as the lane's side
//! channel (peer liveness and failure notices). Every lane is duplex: RC QPs carry both
//! directions, each with the lane's GRH flow label.

mod ffi;
mod lane;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};

use self::ffi::{Device, PathAttrs, QpEndpoint};
use self::lane::{PendingLane, VerbsRecvLane, VerbsSendLane, SLOT_PAYLOAD};
use super::ib::{self, IbSettings, Selection};
use super::{tcp, Connecting, LaneEnds, LaneSetup, Listener, MemoryRegion, Provider, WaitSource};
use crate::error::{Error, Result};

const HELLO_MAGIC: u32 = 0x4143_5631; // "ACV1"
const REPLY_MAGIC: u32 = 0x4143_5632; // "ACV2"
const MSG_LEN: usize = 64;
const READY: u8 = 0x5a;

/// The verbs provider of one rank.
pub struct VerbsProvider {
    dev: Arc<Device>,
    listen: SocketAddr,
    settings: IbSettings,
}

/// Chooses the device, port and GID for this rank (see [`ib::select`]).
pub fn probe(settings: &IbSettings) -> std::result::Result<Selection, String> {
    ib::select(std::path::Path::new(ib::SYSFS_ROOT), settings)
}

impl VerbsProvider {
    /// Opens the selected device; the side-channel listener binds `listen`.
    pub fn new(sel: &Selection, listen: SocketAddr, settings: IbSettings) -> Result<VerbsProvider> {
        let dev = Device::open(sel).map_err(|why| Error::InvalidConfig {
            name: "ACCL_TRANSPORT".into(),
            value: "verbs".into(),
            reason: why,
        })?;
        let mut listen = listen;
        listen.set_port(0);
        Ok(VerbsProvider { dev, listen, settings })
    }
}

/// A lane's path: its flow label with the traffic class and retry settings of `ACCL_IB_*`.
fn path_attrs(settings: &IbSettings, flow_label: u32) -> PathAttrs {
    PathAttrs {
        flow_label,
        traffic_class: settings.traffic_class,
        timeout: settings.timeout,
        retry_cnt: settings.retry_cnt,
    }
}

fn setup_error(setup: &str, why: impl std::fmt::Display) -> Error {
    Error::io(setup.to_string(), io::Error::other(why.to_string()))
}

impl Provider for VerbsProvider {
    fn name(&self) -> &'static str {
        "verbs"
    }

    fn duplex_only(&self) -> bool {
        true
    }

    fn listen(&self) -> Result<Box<dyn Listener>> {
        let (sock, handle) = tcp::listen_socket(self.listen, "verbs side channel: listen")?;
        Ok(Box::new(VerbsListener {
            sock,
            handle,
            dev: self.dev.clone(),
            settings: self.settings.clone(),
            pending: Vec::new(),
        }))
    }

    fn connect(&self, handle: &[u8], setup: &LaneSetup) -> Result<Box<dyn Connecting>> {
        let (addr, text) = tcp::peer_address(handle, &self.listen)?;
        let what = format!("rank {}: verbs lane {} to rank {} at {text}", setup.rank, setup.lane, setup.peer);
        let ctx = |e| Error::io(what.clone(), e);
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(ctx)?;
        sock.set_nodelay(true).map_err(ctx)?;
        tcp::start_connect(&sock, addr).map_err(ctx)?;
        let pending = PendingLane::new(&self.dev).map_err(|e| setup_error(&what, e))?;
        let mut hello = [0u8; MSG_LEN];
        put32(&mut hello, 0, HELLO_MAGIC);
        hello[4..12].copy_from_slice(&setup.comm_id.to_le_bytes());
        put32(&mut hello, 12, setup.rank as u32);
        put32(&mut hello, 16, setup.peer as u32);
        put32(&mut hello, 20, setup.lane as u32);
        put32(&mut hello, 24, setup.flow_label);
        hello[28] = u8::from(setup.duplex);
        put_endpoint(&mut hello, 32, &pending.local);
        put32(&mut hello, 60, SLOT_PAYLOAD as u32);
        Ok(Box::new(VerbsConnecting {
            sock: Some(sock),
            pending: Some(pending),
            out: hello.to_vec(),
            sent: 0,
            reply: [0; MSG_LEN],
            got: 0,
            setup: *setup,
            path: path_attrs(&self.settings, 0),
            what,
        }))
    }

    /// Cached by address range: the memory must stay allocated until it is deregistered.
    fn register(&self, addr: usize, len: usize) -> Result<MemoryRegion> {
        let mr = self.dev.register(addr, len).map_err(|e| setup_error("verbs register", e))?;
        Ok(MemoryRegion { addr, len, key: mr.lkey() })
    }

    fn deregister(&self, region: &MemoryRegion) {
        self.dev.deregister(region.addr, region.len);
    }
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// QPN, PSN, GID and MTU in 28 bytes.
fn put_endpoint(buf: &mut [u8], at: usize, e: &QpEndpoint) {
    put32(buf, at, e.qpn);
    put32(buf, at + 4, e.psn);
    buf[at + 8..at + 24].copy_from_slice(&e.gid.octets());
    put32(buf, at + 24, e.mtu);
}

fn get_endpoint(buf: &[u8], at: usize) -> QpEndpoint {
    let gid: [u8; 16] = buf[at + 8..at + 24].try_into().expect("16 bytes");
    QpEndpoint { qpn: get32(buf, at), psn: get32(buf, at + 4), gid: gid.into(), mtu: get32(buf, at + 24) }
}

/// The flow label a lane uses: the configured one, else one derived from both QP numbers.
fn lane_label(requested: u32, a: u32, b: u32) -> u32 {
    if requested != 0 {
        requested
    } else {
        ib::flow_label_from_qpns(a, b).max(1)
    }
}

/// Moves bytes between a non-blocking socket and a buffer; Ok(true) when done.
fn pump_io(sock: &Socket, buf: &mut [u8], done: &mut usize, write: bool) -> io::Result<bool> {
    while *done < buf.len() {
        let r = if write { (&*sock).write(&buf[*done..]) } else { (&*sock).read(&mut buf[*done..]) };
        match r {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the connection")),
            Ok(n) => *done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

struct VerbsConnecting {
    sock: Option<Socket>,
    pending: Option<PendingLane>,
    out: Vec<u8>,
    sent: usize,
    reply: [u8; MSG_LEN],
    got: usize,
    setup: LaneSetup,
    path: PathAttrs,
    what: String,
}

impl Connecting for VerbsConnecting {
    fn poll(&mut self) -> Result<Option<LaneEnds>> {
        let Some(sock) = self.sock.as_ref() else { return Ok(None) };
        let what = self.what.clone();
        let err = |e: io::Error| Error::io(what.clone(), e);
        // A connect still in progress shows as ENOTCONN or WouldBlock.
        if self.sent < self.out.len() && !pump_io(sock, &mut self.out, &mut self.sent, true).map_err(err)? {
            return Ok(None);
        }
        if self.got < MSG_LEN {
            if !pump_io(sock, &mut self.reply, &mut self.got, false).map_err(err)? {
                return Ok(None);
            }
            if get32(&self.reply, 0) != REPLY_MAGIC || get32(&self.reply, 4) != 0 {
                return Err(setup_error(&what, "the peer refused the lane (QP setup failed on its side)"));
            }
        }
        let remote = get_endpoint(&self.reply, 8);
        let pending = self.pending.take().expect("pending lane until connected");
        self.path.flow_label = lane_label(self.setup.flow_label, pending.local.qpn, remote.qpn);
        let sock = self.sock.take().expect("socket until connected");
        let side = sock.try_clone().map_err(err)?;
        let lane = pending.connect(remote, &self.path, side).map_err(|e| setup_error(&what, e))?;
        // Our QP is ready to receive: tell the acceptor, which may start sending right away.
        let mut ready = [READY];
        let mut n = 0;
        while !pump_io(&sock, &mut ready, &mut n, true).map_err(err)? {
            std::thread::yield_now();
        }
        Ok(Some(LaneEnds {
            send: Some(Box::new(VerbsSendLane(lane.clone()))),
            recv: Some(Box::new(VerbsRecvLane(lane))),
        }))
    }

    fn wait_source(&self) -> Option<WaitSource> {
        // Writable until the hello is out (a connect in progress shows as writable once done);
        // then the reply is read.
        let events = if self.sent < self.out.len() { libc::POLLOUT } else { libc::POLLIN };
        self.sock.as_ref().map(|s| WaitSource::Fd { fd: s.as_raw_fd(), events })
    }
}

/// An accepted side socket going through the handshake.
struct Incoming {
    sock: Socket,
    hello: [u8; MSG_LEN],
    got: usize,
    reply: [u8; MSG_LEN],
    sent: usize,
    ready: [u8; 1],
    ready_got: usize,
    lane: Option<(LaneSetup, Arc<std::sync::Mutex<lane::QpLane>>)>,
    failed: bool,
}

struct VerbsListener {
    sock: Socket,
    handle: Vec<u8>,
    dev: Arc<Device>,
    settings: IbSettings,
    pending: Vec<Incoming>,
}

impl VerbsListener {
    /// Advances one incoming handshake; Ok(Some) once the lane is ready.
    fn advance(&self, inc: &mut Incoming) -> io::Result<Option<(LaneSetup, LaneEnds)>> {
        if inc.got < MSG_LEN {
            if !pump_io(&inc.sock, &mut inc.hello, &mut inc.got, false)? {
                return Ok(None);
            }
            let h = &inc.hello;
            if get32(h, 0) != HELLO_MAGIC {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "not an accl verbs hello"));
            }
            let setup = LaneSetup {
                comm_id: u64::from_le_bytes(h[4..12].try_into().expect("8 bytes")),
                rank: get32(h, 12) as usize,
                peer: get32(h, 16) as usize,
                lane: get32(h, 20) as usize,
                flow_label: get32(h, 24),
                duplex: h[28] != 0,
            };
            let remote = get_endpoint(h, 32);
            inc.reply[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
            let built = (|| {
                if get32(h, 60) as usize != SLOT_PAYLOAD {
                    return Err(format!("peer slot size {} differs from {SLOT_PAYLOAD}", get32(h, 60)));
                }
                let pending = PendingLane::new(&self.dev)?;
                let local = pending.local;
                let path = path_attrs(&self.settings, lane_label(setup.flow_label, remote.qpn, local.qpn));
                let side = inc.sock.try_clone().map_err(|e| e.to_string())?;
                Ok((local, pending.connect(remote, &path, side)?))
            })();
            match built {
                Ok((local, lane)) => {
                    put_endpoint(&mut inc.reply, 8, &local);
                    inc.lane = Some((setup, lane));
                }
                Err(_) => {
                    put32(&mut inc.reply, 4, 1);
                    inc.failed = true;
                }
            }
        }
        if inc.sent < MSG_LEN && !pump_io(&inc.sock, &mut inc.reply, &mut inc.sent, true)? {
            return Ok(None);
        }
        if inc.failed {
            return Err(io::Error::other("lane setup failed"));
        }
        if !pump_io(&inc.sock, &mut inc.ready, &mut inc.ready_got, false)? {
            return Ok(None);
        }
        let (setup, lane) = inc.lane.take().expect("lane built with the reply");
        Ok(Some((
            setup,
            LaneEnds { send: Some(Box::new(VerbsSendLane(lane.clone()))), recv: Some(Box::new(VerbsRecvLane(lane))) },
        )))
    }
}

impl Listener for VerbsListener {
    fn handle(&self) -> Vec<u8> {
        self.handle.clone()
    }

    fn accept(&mut self) -> Result<Option<(LaneSetup, LaneEnds)>> {
        loop {
            match self.sock.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(true).map_err(|e| Error::io("verbs side channel: accepted socket", e))?;
                    s.set_nodelay(true).map_err(|e| Error::io("verbs side channel: accepted socket", e))?;
                    self.pending.push(Incoming {
                        sock: s,
                        hello: [0; MSG_LEN],
                        got: 0,
                        reply: [0; MSG_LEN],
                        sent: 0,
                        ready: [0],
                        ready_got: 0,
                        lane: None,
                        failed: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("verbs side channel: accept", e)),
            }
        }
        let mut i = 0;
        while i < self.pending.len() {
            let mut inc = self.pending.swap_remove(i);
            match self.advance(&mut inc) {
                Ok(Some(done)) => return Ok(Some(done)),
                Ok(None) => {
                    self.pending.push(inc);
                    let last = self.pending.len() - 1;
                    self.pending.swap(i, last);
                    i += 1;
                }
                // A broken handshake is not a lane; the connecting rank sees its own error.
                Err(_) => {}
            }
        }
        Ok(None)
    }

    fn wait_sources(&self) -> Vec<WaitSource> {
        let mut v = vec![WaitSource::Fd { fd: self.sock.as_raw_fd(), events: libc::POLLIN }];
        v.extend(self.pending.iter().map(|p| WaitSource::Fd { fd: p.sock.as_raw_fd(), events: libc::POLLIN }));
        v
    }
}
