//! One verbs lane: an RC queue pair carrying both directions between two ranks.
//!
//! Messages travel as SENDs through registered slots: the sender copies a header and up to
//! [`SLOT_PAYLOAD`] bytes of payload into a free send slot and posts it; the receiver keeps all
//! its receive slots posted, so a message never waits for the application to post a receive,
//! and copies each arrival out when the matching receive is posted. A message longer than a slot
//! travels as several fragments, each led by the same header. Copying through slots keeps the
//! application's buffers unregistered: a registration cache keyed by address alone cannot tell
//! when freed memory comes back at the same address, and that would send stale data.
//!
//! Flow control is by credits, so that a SEND never finds the receiver without a posted
//! receive (an RNR retry costs milliseconds): the sender may have [`RECV_SLOTS`] fragments
//! unconsumed at the receiver; the receiver returns credits as it reposts slots, in a zero-byte
//! SEND whose immediate data carries the count. Control messages (credits, failure notices) use
//! receives kept apart for them. Outstanding work requests are bounded by the slot counts. The QP's completion queue has a
//! completion channel whose fd the executor polls after arming it in `prepare_wait`. A TCP
//! side socket, left open after the handshake, tells at once when the peer process is gone and
//! carries failure notices; notices also travel in band when the QP still works.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use socket2::Socket;

use super::ffi::{self, ibv_sge, ibv_wc, Cq, Device, Mr, PathAttrs, Qp, QpEndpoint};
use crate::transport::{Header, LaneError, MemoryRegion, RecvLane, SendLane, WaitSource, HEADER_LEN};

/// Payload bytes per slot; longer messages are cut into fragments.
pub const SLOT_PAYLOAD: usize = 256 << 10;
/// Send slots per lane: the bound on outstanding data SENDs.
pub const SEND_SLOTS: usize = 8;
/// Data receive slots per lane, all kept posted: the sender's credits.
pub const RECV_SLOTS: usize = 8;
/// Further receives for control messages (at most two credit returns and a notice in flight).
const CTRL_RECVS: usize = 4;
const ALL_RECVS: usize = RECV_SLOTS + CTRL_RECVS;
const SLOT_BYTES: usize = HEADER_LEN + SLOT_PAYLOAD;
const RECV_FLAG: u64 = 1 << 32;
/// Send slot kept for the in-band failure notice.
const NOTICE_SLOT: usize = SEND_SLOTS;
/// Work request id of credit returns (they carry no payload).
const CREDIT_WR: u64 = 0xFFFF;
/// Credit returns in flight at most.
const MAX_CREDIT_MSGS: usize = 2;
/// Immediate data: kind in the top byte, a value below.
const IMM_CREDIT: u32 = 1 << 24;
const IMM_NOTICE: u32 = 2 << 24;

/// Who is at the other end, for error messages and `accl-perf -v`.
#[derive(Clone, Debug)]
pub struct LaneIdentity {
    pub local: QpEndpoint,
    pub remote: QpEndpoint,
    pub flow_label: u32,
    pub udp_sport: u16,
}

struct OutMsg {
    header: Header,
    data: *const u8,
    len: usize,
    /// The lkey of registered memory holding `data`: fragments then go out from there, with
    /// only the header copied into the slot.
    lkey: Option<u32>,
    frags: usize,
    posted: usize,
    done: usize,
}

struct InMsg {
    expect: Header,
    data: *mut u8,
    len: usize,
    frags: usize,
    done: usize,
}

/// State shared by the send and receive ends.
pub struct QpLane {
    // Drop order matters: the QP goes before its CQ, both before the slot memory and device.
    qp: Qp,
    cq: Cq,
    slots_mr: Mr,
    slots: Box<[u8]>,
    dev: Arc<Device>,
    side: Socket,
    side_closed: bool,
    side_buf: Vec<u8>,
    notices: VecDeque<Vec<u8>>,
    id: LaneIdentity,
    armed: bool,
    failed: Option<String>,
    free_send: Vec<usize>,
    out: VecDeque<OutMsg>,
    sends_done: usize,
    posted_in: VecDeque<InMsg>,
    arrived: VecDeque<(usize, usize)>,
    recvs_done: usize,
    /// Data fragments the peer can take now.
    credits: usize,
    /// Data slots reposted here and not yet returned to the peer as credits.
    credits_owed: usize,
    credit_msgs: usize,
}

// SAFETY: the raw pointers in OutMsg/InMsg point into buffers whose owners guarantee validity
// until completion (the SendLane/RecvLane post contracts); all access is under the mutex.
unsafe impl Send for QpLane {}

/// What the handshake builds before the QP is connected.
pub struct PendingLane {
    qp: Qp,
    cq: Cq,
    slots_mr: Mr,
    slots: Box<[u8]>,
    dev: Arc<Device>,
    pub local: QpEndpoint,
}

impl PendingLane {
    /// Creates the QP with all receive slots posted.
    pub fn new(dev: &Arc<Device>) -> Result<PendingLane, String> {
        let send_wrs = SEND_SLOTS + 1 + MAX_CREDIT_MSGS;
        let cq = Cq::new(dev, (send_wrs + ALL_RECVS) as i32 * 2)?;
        let mut qp = Qp::new(dev, &cq, send_wrs as u32, ALL_RECVS as u32)?;
        let slots = vec![0u8; (SEND_SLOTS + 1 + ALL_RECVS) * SLOT_BYTES].into_boxed_slice();
        let slots_mr = dev.register_owned(slots.as_ptr() as usize, slots.len())?;
        for r in 0..ALL_RECVS {
            let at = (SEND_SLOTS + 1 + r) * SLOT_BYTES;
            let mut sge =
                ibv_sge { addr: slots.as_ptr() as u64 + at as u64, length: SLOT_BYTES as u32, lkey: slots_mr.lkey() };
            qp.post_recv(RECV_FLAG | r as u64, &mut sge)?;
        }
        let qpn = qp.qpn();
        let psn = (qpn.wrapping_mul(0x9E37_79B9) ^ std::process::id()) & 0xFF_FFFF;
        let local = QpEndpoint { qpn, psn, gid: dev.gid, mtu: dev.active_mtu };
        Ok(PendingLane { qp, cq, slots_mr, slots, dev: dev.clone(), local })
    }

    /// Connects the QP to `remote` and wraps it as a lane.
    pub fn connect(self, remote: QpEndpoint, path: &PathAttrs, side: Socket) -> Result<Arc<Mutex<QpLane>>, String> {
        self.qp.connect(self.local.psn, &remote, path)?;
        let id = LaneIdentity {
            local: self.local,
            remote,
            flow_label: path.flow_label,
            udp_sport: crate::transport::ib::udp_sport(path.flow_label, self.local.qpn, remote.qpn),
        };
        let dev = self.dev;
        Ok(Arc::new(Mutex::new(QpLane {
            qp: self.qp,
            cq: self.cq,
            slots_mr: self.slots_mr,
            slots: self.slots,
            dev,
            side,
            side_closed: false,
            side_buf: Vec::new(),
            notices: VecDeque::new(),
            id,
            armed: false,
            failed: None,
            free_send: (0..SEND_SLOTS).rev().collect(),
            out: VecDeque::new(),
            sends_done: 0,
            posted_in: VecDeque::new(),
            arrived: VecDeque::new(),
            recvs_done: 0,
            credits: RECV_SLOTS,
            credits_owed: 0,
            credit_msgs: 0,
        })))
    }
}

fn lock(lane: &Mutex<QpLane>) -> MutexGuard<'_, QpLane> {
    lane.lock().unwrap_or_else(|e| e.into_inner())
}

impl QpLane {
    fn slot_ptr(&mut self, index: usize) -> *mut u8 {
        // SAFETY: index < slot count by construction.
        unsafe { self.slots.as_mut_ptr().add(index * SLOT_BYTES) }
    }

    fn recv_slot(&self, r: usize) -> usize {
        SEND_SLOTS + 1 + r
    }

    fn completion_error(&self, what: &str, wc: &ibv_wc) -> LaneError {
        LaneError::Completion {
            device: self.dev.name.clone(),
            gid: self.id.local.gid.to_string(),
            qpn: self.id.local.qpn,
            status: format!(
                "{what} failed: {} (status {}, vendor error {:#x}; remote QPN {}, GID {})",
                ffi::status_name(wc.status),
                wc.status,
                wc.vendor_err,
                self.id.remote.qpn,
                self.id.remote.gid
            ),
        }
    }

    fn fail(&mut self, e: LaneError) -> LaneError {
        if self.failed.is_none() {
            self.failed = Some(e.to_string());
        }
        e
    }

    fn check_failed(&self) -> Result<(), LaneError> {
        match &self.failed {
            Some(why) => Err(LaneError::Closed(why.clone())),
            None => Ok(()),
        }
    }

    /// Takes completions off the CQ.
    fn poll_cq(&mut self) -> Result<(), LaneError> {
        self.check_failed()?;
        let mut wcs: [ibv_wc; 16] = unsafe { std::mem::zeroed() };
        loop {
            let n = self.cq.poll(&mut wcs).map_err(|e| self.fail(LaneError::Closed(e)))?;
            for wc in &wcs[..n] {
                let recv = wc.wr_id & RECV_FLAG != 0;
                if wc.status != ffi::WC_SUCCESS {
                    let e = self.completion_error(if recv { "receive" } else { "send" }, wc);
                    return Err(self.fail(e));
                }
                if recv {
                    let r = (wc.wr_id & 0xFFFF_FFFF) as usize;
                    match ffi::wc_imm(wc) {
                        None => self.arrived.push_back((r, wc.byte_len as usize)),
                        Some(imm) if imm & 0xFF00_0000 == IMM_CREDIT => {
                            self.credits += (imm & 0xFF_FFFF) as usize;
                            self.repost(r)?;
                        }
                        Some(_) => {
                            let slot = self.slot_ptr(self.recv_slot(r));
                            let len = (wc.byte_len as usize).min(SLOT_BYTES);
                            // SAFETY: the notice was written into this slot.
                            self.notices.push_back(unsafe { std::slice::from_raw_parts(slot, len) }.to_vec());
                            self.repost(r)?;
                        }
                    }
                } else if wc.wr_id == CREDIT_WR {
                    self.credit_msgs -= 1;
                } else if wc.wr_id as usize != NOTICE_SLOT {
                    self.free_send.push(wc.wr_id as usize);
                    // Completions come in posting order: they belong to the oldest message
                    // with fragments in flight.
                    if let Some(m) = self.out.iter_mut().find(|m| m.done < m.posted) {
                        m.done += 1;
                    }
                    while self.out.front().is_some_and(|m| m.done == m.frags) {
                        self.out.pop_front();
                        self.sends_done += 1;
                    }
                }
            }
            if n < wcs.len() {
                return Ok(());
            }
        }
    }

    /// Copies fragments of queued messages into free slots and posts them, in order.
    fn push_sends(&mut self) -> Result<bool, LaneError> {
        let mut pushed = false;
        let lkey = self.slots_mr.lkey();
        for i in 0..self.out.len() {
            while self.out[i].posted < self.out[i].frags {
                if self.credits == 0 {
                    return Ok(pushed);
                }
                let Some(slot) = self.free_send.pop() else { return Ok(pushed) };
                self.credits -= 1;
                let m = &self.out[i];
                let off = m.posted * SLOT_PAYLOAD;
                let piece = SLOT_PAYLOAD.min(m.len - off);
                let (header, src, user_lkey) = (m.header, m.data, m.lkey);
                let dst = self.slot_ptr(slot);
                // SAFETY: the slot holds SLOT_BYTES; the source stays valid until the send
                // completes (SendLane::post contract).
                unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), dst, HEADER_LEN) };
                let mut sges = [ibv_sge { addr: dst as u64, length: HEADER_LEN as u32, lkey }; 2];
                let sges = match user_lkey {
                    // Zero-copy: the payload goes straight from the registered memory.
                    Some(user) if piece > 0 => {
                        // SAFETY: `off + piece <= len`: inside the posted message.
                        let at = unsafe { src.add(off) } as u64;
                        sges[1] = ibv_sge { addr: at, length: piece as u32, lkey: user };
                        &mut sges[..]
                    }
                    _ => {
                        // SAFETY: as above; the slot has room for a header and SLOT_PAYLOAD.
                        unsafe { std::ptr::copy_nonoverlapping(src.add(off), dst.add(HEADER_LEN), piece) };
                        sges[0].length = (HEADER_LEN + piece) as u32;
                        &mut sges[..1]
                    }
                };
                if let Err(e) = self.qp.post_send(slot as u64, sges, None) {
                    return Err(self.fail(LaneError::Closed(e)));
                }
                self.out[i].posted += 1;
                pushed = true;
            }
        }
        Ok(pushed)
    }

    /// Matches arrivals with posted receives, copying payloads out and reposting slots.
    fn deliver(&mut self) -> Result<bool, LaneError> {
        let mut delivered = false;
        while let Some(&(r, bytes)) = self.arrived.front() {
            let slot = self.slot_ptr(self.recv_slot(r));
            // SAFETY: the slot is SLOT_BYTES long and the arrival wrote `bytes` of it.
            let head: Header = unsafe { std::slice::from_raw_parts(slot, HEADER_LEN) }.try_into().unwrap_or([0; 32]);
            let Some(m) = self.posted_in.front_mut() else { break };
            if head != m.expect {
                return Err(LaneError::Mismatch { expected: m.expect, got: head });
            }
            let off = m.done * SLOT_PAYLOAD;
            let piece = SLOT_PAYLOAD.min(m.len - off);
            if bytes != HEADER_LEN + piece {
                let e = LaneError::Closed(format!(
                    "fragment of {} payload bytes where {piece} were expected",
                    bytes.saturating_sub(HEADER_LEN)
                ));
                return Err(self.fail(e));
            }
            // SAFETY: the destination is the posted receive's buffer (RecvLane::post contract).
            unsafe { std::ptr::copy_nonoverlapping(slot.add(HEADER_LEN), m.data.add(off), piece) };
            m.done += 1;
            if m.done == m.frags {
                self.posted_in.pop_front();
                self.recvs_done += 1;
            }
            self.arrived.pop_front();
            self.repost(r)?;
            self.credits_owed += 1;
            delivered = true;
        }
        self.return_credits()?;
        Ok(delivered)
    }

    /// Gives reposted data slots back to the sender once half of them are free again.
    fn return_credits(&mut self) -> Result<(), LaneError> {
        if self.credits_owed >= RECV_SLOTS / 2 && self.credit_msgs < MAX_CREDIT_MSGS {
            let imm = IMM_CREDIT | self.credits_owed as u32;
            self.qp.post_send(CREDIT_WR, &mut [], Some(imm)).map_err(|e| self.fail(LaneError::Closed(e)))?;
            self.credits_owed = 0;
            self.credit_msgs += 1;
        }
        Ok(())
    }

    fn repost(&mut self, r: usize) -> Result<(), LaneError> {
        let addr = self.slot_ptr(self.recv_slot(r)) as u64;
        let mut sge = ibv_sge { addr, length: SLOT_BYTES as u32, lkey: self.slots_mr.lkey() };
        self.qp.post_recv(RECV_FLAG | r as u64, &mut sge).map_err(|e| self.fail(LaneError::Closed(e)))
    }

    fn pump(&mut self) -> Result<bool, LaneError> {
        self.poll_cq()?;
        self.return_credits()?;
        let a = self.push_sends()?;
        let b = self.deliver()?;
        Ok(a || b)
    }

    /// Reads what the side socket holds: notices, or the end of the stream.
    fn read_side(&mut self) {
        let mut buf = [0u8; 4096];
        while !self.side_closed {
            match (&self.side).read(&mut buf) {
                Ok(0) => self.side_closed = true,
                Ok(n) => self.side_buf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.side_closed = true,
            }
        }
        while self.side_buf.len() >= 4 {
            let len = u32::from_le_bytes(self.side_buf[..4].try_into().expect("4 bytes")) as usize;
            if self.side_buf.len() < 4 + len {
                break;
            }
            let body = self.side_buf[4..4 + len].to_vec();
            self.side_buf.drain(..4 + len);
            self.notices.push_back(body);
        }
    }

    /// Reads the side socket, then moves what the CQ holds; a notice from the peer is an error.
    /// The socket goes first: whatever the peer sent before it closed the socket is on the CQ
    /// by the time the close shows here.
    fn poll_peer(&mut self) -> Result<(), LaneError> {
        self.read_side();
        self.pump()?;
        match self.notices.pop_front() {
            Some(n) => Err(LaneError::Notice(n)),
            None => Ok(()),
        }
    }

    /// True when the peer has left while a posted receive still waits for data from it. A peer
    /// that finished and left is no error by itself: its last sends completed, so their data
    /// is on the CQ (the socket is read before the CQ is polled once more).
    fn receive_orphaned(&mut self) -> Result<bool, LaneError> {
        self.read_side();
        if !self.side_closed || self.posted_in.is_empty() {
            return Ok(false);
        }
        self.pump()?;
        Ok(!self.posted_in.is_empty())
    }

    fn closed_error(&self) -> LaneError {
        LaneError::Closed(format!(
            "connection closed (device {}, GID {}, QPN {} to QPN {})",
            self.dev.name, self.id.local.gid, self.id.local.qpn, self.id.remote.qpn
        ))
    }

    /// Arms the completion channel; true when progress is possible right away.
    fn prepare_wait(&mut self) -> bool {
        if self.cq.drain_events() {
            self.armed = false;
        }
        if !self.armed {
            if self.cq.arm().is_err() {
                return true; // let progress report the failure
            }
            self.armed = true;
        }
        self.read_side();
        let waiting = !self.out.is_empty() || !self.posted_in.is_empty();
        if self.failed.is_some() || !self.notices.is_empty() {
            // Progress reports these, but only for a lane with work posted.
            return waiting;
        }
        // Completions that landed before arming raise no event: look once more.
        let before = (self.sends_done, self.recvs_done, self.arrived.len(), self.free_send.len());
        if self.poll_cq().is_err() {
            return true;
        }
        let ready_send = self.credits > 0 && !self.free_send.is_empty() && self.out.iter().any(|m| m.posted < m.frags);
        let ready_recv = !self.arrived.is_empty() && !self.posted_in.is_empty();
        ready_send
            || ready_recv
            || before != (self.sends_done, self.recvs_done, self.arrived.len(), self.free_send.len())
    }
}

/// The sending end of a verbs lane.
pub struct VerbsSendLane(pub Arc<Mutex<QpLane>>);
/// The receiving end of a verbs lane.
pub struct VerbsRecvLane(pub Arc<Mutex<QpLane>>);

impl SendLane for VerbsSendLane {
    unsafe fn post(
        &mut self,
        header: &Header,
        data: *const u8,
        len: usize,
        mr: Option<&MemoryRegion>,
    ) -> Result<(), LaneError> {
        let mut l = lock(&self.0);
        l.check_failed()?;
        let frags = len.div_ceil(SLOT_PAYLOAD).max(1);
        let lkey = mr.map(|m| m.key).filter(|&key| key != 0);
        l.out.push_back(OutMsg { header: *header, data, len, lkey, frags, posted: 0, done: 0 });
        l.push_sends()?;
        Ok(())
    }

    fn progress(&mut self) -> Result<usize, LaneError> {
        let mut l = lock(&self.0);
        if let Some(n) = l.notices.pop_front() {
            return Err(LaneError::Notice(n));
        }
        l.pump()?;
        Ok(std::mem::take(&mut l.sends_done))
    }

    fn queued(&self) -> usize {
        // Completions the other end's progress took off the shared CQ count until reported.
        let l = lock(&self.0);
        l.out.len() + l.sends_done
    }

    fn check_peer(&mut self) -> Result<(), LaneError> {
        let mut l = lock(&self.0);
        l.poll_peer()?;
        l.check_failed()?;
        // Fragments already posted complete or fail by themselves (the peer's HCA acknowledged
        // them before it could leave, or the retries run out); a peer that is gone cannot take
        // the ones not posted yet.
        if l.side_closed && l.out.iter().any(|m| m.posted < m.frags) {
            return Err(l.closed_error());
        }
        Ok(())
    }

    fn wait_source(&self) -> Option<WaitSource> {
        Some(WaitSource::Fd { fd: lock(&self.0).cq.fd(), events: libc::POLLIN })
    }

    fn prepare_wait(&mut self) -> bool {
        lock(&self.0).prepare_wait()
    }

    fn send_notice(&mut self, notice: &[u8]) {
        let mut l = lock(&self.0);
        let mut framed = (notice.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(notice);
        let _ = (&l.side).write(&framed);
        if l.failed.is_none() {
            let body = &notice[..notice.len().min(SLOT_BYTES)];
            let dst = l.slot_ptr(NOTICE_SLOT);
            // SAFETY: the notice slot is SLOT_BYTES long and used for nothing else.
            unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), dst, body.len()) };
            let lkey = l.slots_mr.lkey();
            let mut sge = [ibv_sge { addr: dst as u64, length: body.len() as u32, lkey }];
            let _ = l.qp.post_send(NOTICE_SLOT as u64, &mut sge, Some(IMM_NOTICE));
        }
    }

    fn flow_label(&self) -> u32 {
        lock(&self.0).id.flow_label
    }

    fn udp_sport(&self) -> Option<u16> {
        Some(lock(&self.0).id.udp_sport)
    }
}

impl RecvLane for VerbsRecvLane {
    unsafe fn post(
        &mut self,
        expect: &Header,
        data: *mut u8,
        len: usize,
        _mr: Option<&MemoryRegion>,
    ) -> Result<(), LaneError> {
        let mut l = lock(&self.0);
        l.check_failed()?;
        let frags = len.div_ceil(SLOT_PAYLOAD).max(1);
        l.posted_in.push_back(InMsg { expect: *expect, data, len, frags, done: 0 });
        l.deliver()?;
        Ok(())
    }

    fn progress(&mut self) -> Result<usize, LaneError> {
        let mut l = lock(&self.0);
        l.pump()?;
        if let Some(n) = l.notices.pop_front() {
            return Err(LaneError::Notice(n));
        }
        if l.recvs_done == 0 && l.receive_orphaned()? {
            return Err(l.closed_error());
        }
        Ok(std::mem::take(&mut l.recvs_done))
    }

    fn queued(&self) -> usize {
        let l = lock(&self.0);
        l.posted_in.len() + l.recvs_done
    }

    fn check_peer(&mut self) -> Result<(), LaneError> {
        let mut l = lock(&self.0);
        l.poll_peer()?;
        if l.receive_orphaned()? {
            return Err(l.closed_error());
        }
        Ok(())
    }

    fn take_notice(&mut self) -> Option<Vec<u8>> {
        let mut l = lock(&self.0);
        match l.poll_peer() {
            Err(LaneError::Notice(n)) => Some(n),
            _ => l.notices.pop_front(),
        }
    }

    fn wait_source(&self) -> Option<WaitSource> {
        let l = lock(&self.0);
        (!l.side_closed).then(|| WaitSource::Fd { fd: l.side.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP })
    }

    fn prepare_wait(&mut self) -> bool {
        lock(&self.0).prepare_wait()
    }
}
