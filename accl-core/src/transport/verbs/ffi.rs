//! Owned wrappers around the libibverbs objects the verbs provider uses (through rdma-sys):
//! each frees its object on drop, and every failure says which call failed and why.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::net::Ipv6Addr;
use std::ptr;
use std::sync::{Arc, Mutex};

use rdma_sys::*;

use crate::transport::ib::Selection;

/// `IBV_LINK_LAYER_ETHERNET` (an anonymous enum in verbs.h).
const LINK_LAYER_ETHERNET: u8 = 2;

fn os_error(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn rc_error(what: &str, rc: i32) -> String {
    // Verbs calls return an errno value (or -1 with errno set).
    let code = if rc > 0 { rc } else { io::Error::last_os_error().raw_os_error().unwrap_or(0) };
    format!("{what}: {}", io::Error::from_raw_os_error(code))
}

/// An open device port with its protection domain and the GID accl uses on it.
pub struct Device {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    pub name: String,
    pub port: u8,
    pub gid_index: u8,
    pub gid: Ipv6Addr,
    /// `ibv_mtu` value of the port's active MTU.
    pub active_mtu: u32,
    mrs: Mutex<MrCache>,
}

// SAFETY: libibverbs objects may be used from any thread; the provider serializes each QP's use
// through its lane's mutex, and the context and PD are only read after creation.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Device {
    /// Opens the device and port that [`crate::transport::ib::select`] chose.
    pub fn open(sel: &Selection) -> Result<Arc<Device>, String> {
        // SAFETY: plain libibverbs calls; every pointer is checked before use and the device
        // list is freed on every path.
        unsafe {
            let mut n = 0;
            let list = ibv_get_device_list(&mut n);
            if list.is_null() {
                return Err(os_error("ibv_get_device_list"));
            }
            let mut ctx = ptr::null_mut();
            for i in 0..n.max(0) as usize {
                let dev = *list.add(i);
                let name = CStr::from_ptr(ibv_get_device_name(dev)).to_string_lossy();
                if name == sel.device {
                    ctx = ibv_open_device(dev);
                    break;
                }
            }
            ibv_free_device_list(list);
            if ctx.is_null() {
                return Err(format!(
                    "{}: cannot open the device (not listed by libibverbs, or its provider library is missing: {})",
                    sel.device,
                    io::Error::last_os_error()
                ));
            }
            let mut attr: ibv_port_attr = std::mem::zeroed();
            let rc = ___ibv_query_port(ctx, sel.port, &mut attr);
            if rc != 0 {
                ibv_close_device(ctx);
                return Err(rc_error(&format!("{}:{}: ibv_query_port", sel.device, sel.port), rc));
            }
            if attr.link_layer != LINK_LAYER_ETHERNET {
                ibv_close_device(ctx);
                return Err(format!("{}:{}: link layer is not Ethernet (not RoCE)", sel.device, sel.port));
            }
            let pd = ibv_alloc_pd(ctx);
            if pd.is_null() {
                let e = os_error(&format!("{}: ibv_alloc_pd", sel.device));
                ibv_close_device(ctx);
                return Err(e);
            }
            Ok(Arc::new(Device {
                ctx,
                pd,
                name: sel.device.clone(),
                port: sel.port,
                gid_index: sel.gid.index as u8,
                gid: sel.gid.addr,
                active_mtu: attr.active_mtu,
                mrs: Mutex::new(MrCache::default()),
            }))
        }
    }

    /// Registers `len` bytes at `addr` for local access, or returns the registration that
    /// already covers them. Only for memory that stays allocated as long as the device is open.
    pub fn register(&self, addr: usize, len: usize) -> Result<Arc<Mr>, String> {
        let mut cache = self.mrs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mr) = cache.lookup(addr, len) {
            return Ok(mr);
        }
        let mr = Arc::new(self.register_owned(addr, len)?);
        cache.insert(mr.clone());
        Ok(mr)
    }

    /// Drops the cached registration covering `len` bytes at `addr`; the region itself goes
    /// when its last user lets go of it.
    pub fn deregister(&self, addr: usize, len: usize) {
        let mut cache = self.mrs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mr) = cache.lookup(addr, len) {
            cache.by_start.remove(&mr.addr);
        }
    }

    /// Registers memory whose owner keeps the returned region and drops it before freeing the
    /// memory (not cached: nothing else may find it after the memory is gone).
    pub fn register_owned(&self, addr: usize, len: usize) -> Result<Mr, String> {
        // SAFETY: registering memory the caller owns; the MR is dropped before the PD.
        let mr = unsafe { ibv_reg_mr(self.pd, addr as *mut _, len, ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32) };
        if mr.is_null() {
            return Err(os_error(&format!("{}: ibv_reg_mr of {len} bytes", self.name)));
        }
        Ok(Mr { mr, addr, len })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.mrs.get_mut().unwrap_or_else(|e| e.into_inner()).by_start.clear();
        // SAFETY: every QP, CQ and MR holds an Arc of the device, so none is left.
        unsafe {
            ibv_dealloc_pd(self.pd);
            ibv_close_device(self.ctx);
        }
    }
}

/// A registered memory region.
pub struct Mr {
    mr: *mut ibv_mr,
    pub addr: usize,
    pub len: usize,
}

// SAFETY: an MR is an immutable handle after registration.
unsafe impl Send for Mr {}
unsafe impl Sync for Mr {}

impl Mr {
    pub fn lkey(&self) -> u32 {
        // SAFETY: mr is valid for self's lifetime.
        unsafe { (*self.mr).lkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered by Device::register and deregistered once.
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

/// Registrations by start address, so that a buffer used again is not registered again.
#[derive(Default)]
struct MrCache {
    by_start: BTreeMap<usize, Arc<Mr>>,
}

impl MrCache {
    fn lookup(&self, addr: usize, len: usize) -> Option<Arc<Mr>> {
        let (_, mr) = self.by_start.range(..=addr).next_back()?;
        (addr + len <= mr.addr + mr.len).then(|| mr.clone())
    }

    fn insert(&mut self, mr: Arc<Mr>) {
        self.by_start.insert(mr.addr, mr);
    }
}

/// A completion queue with its own completion channel (a pollable fd).
pub struct Cq {
    pub cq: *mut ibv_cq,
    channel: *mut ibv_comp_channel,
    _dev: Arc<Device>,
}

// SAFETY: used under the owning lane's mutex.
unsafe impl Send for Cq {}

impl Cq {
    pub fn new(dev: &Arc<Device>, entries: i32) -> Result<Cq, String> {
        // SAFETY: context valid; objects destroyed in Drop in reverse order.
        unsafe {
            let channel = ibv_create_comp_channel(dev.ctx);
            if channel.is_null() {
                return Err(os_error(&format!("{}: ibv_create_comp_channel", dev.name)));
            }
            let flags = libc::fcntl((*channel).fd, libc::F_GETFL);
            libc::fcntl((*channel).fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            let cq = ibv_create_cq(dev.ctx, entries, ptr::null_mut(), channel, 0);
            if cq.is_null() {
                let e = os_error(&format!("{}: ibv_create_cq", dev.name));
                ibv_destroy_comp_channel(channel);
                return Err(e);
            }
            Ok(Cq { cq, channel, _dev: dev.clone() })
        }
    }

    /// The completion channel's fd: readable when an armed CQ got a completion.
    pub fn fd(&self) -> i32 {
        // SAFETY: channel valid for self's lifetime.
        unsafe { (*self.channel).fd }
    }

    /// Consumes pending completion events without blocking; true if there were any.
    pub fn drain_events(&mut self) -> bool {
        let mut any = false;
        loop {
            let mut cq = ptr::null_mut();
            let mut ctx = ptr::null_mut();
            // SAFETY: the channel fd is non-blocking, so this returns -1 when empty.
            if unsafe { ibv_get_cq_event(self.channel, &mut cq, &mut ctx) } != 0 {
                return any;
            }
            // SAFETY: acknowledging the event just taken.
            unsafe { ibv_ack_cq_events(cq, 1) };
            any = true;
        }
    }

    /// Asks for an event on the next completion.
    pub fn arm(&mut self) -> Result<(), String> {
        // SAFETY: cq valid.
        let rc = unsafe { ibv_req_notify_cq(self.cq, 0) };
        if rc != 0 {
            return Err(rc_error("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    /// Polls up to `out.len()` completions.
    pub fn poll(&mut self, out: &mut [ibv_wc]) -> Result<usize, String> {
        // SAFETY: out is a valid array of ibv_wc.
        let n = unsafe { ibv_poll_cq(self.cq, out.len() as i32, out.as_mut_ptr()) };
        if n < 0 {
            return Err(rc_error("ibv_poll_cq", n));
        }
        Ok(n as usize)
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        self.drain_events();
        // SAFETY: the QP using this CQ was destroyed first (field order in the lane).
        unsafe {
            ibv_destroy_cq(self.cq);
            ibv_destroy_comp_channel(self.channel);
        }
    }
}

/// What one end of an RC connection tells the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpEndpoint {
    pub qpn: u32,
    pub psn: u32,
    pub gid: Ipv6Addr,
    pub mtu: u32,
}

/// Attributes of the path to the remote end.
pub struct PathAttrs {
    pub flow_label: u32,
    pub traffic_class: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
}

/// A reliable-connected queue pair.
pub struct Qp {
    pub qp: *mut ibv_qp,
    dev: Arc<Device>,
}

// SAFETY: used under the owning lane's mutex.
unsafe impl Send for Qp {}

impl Qp {
    pub fn new(dev: &Arc<Device>, cq: &Cq, send_wr: u32, recv_wr: u32) -> Result<Qp, String> {
        // SAFETY: pd and cq valid; init attributes fully initialized.
        unsafe {
            let mut init: ibv_qp_init_attr = std::mem::zeroed();
            init.send_cq = cq.cq;
            init.recv_cq = cq.cq;
            init.qp_type = ibv_qp_type::IBV_QPT_RC;
            init.sq_sig_all = 1;
            init.cap = ibv_qp_cap {
                max_send_wr: send_wr,
                max_recv_wr: recv_wr,
                max_send_sge: 2,
                max_recv_sge: 1,
                max_inline_data: 0,
            };
            let qp = ibv_create_qp(dev.pd, &mut init);
            if qp.is_null() {
                return Err(os_error(&format!("{}: ibv_create_qp", dev.name)));
            }
            let qp = Qp { qp, dev: dev.clone() };
            let mut attr: ibv_qp_attr = std::mem::zeroed();
            attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
            attr.pkey_index = 0;
            attr.port_num = dev.port;
            attr.qp_access_flags = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ibv_qp_attr_mask::IBV_QP_PORT
                | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
            qp.modify(&mut attr, mask, "INIT")?;
            Ok(qp)
        }
    }

    pub fn qpn(&self) -> u32 {
        // SAFETY: qp valid.
        unsafe { (*self.qp).qp_num }
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: ibv_qp_attr_mask, state: &str) -> Result<(), String> {
        // SAFETY: attr initialized for the fields in mask.
        let rc = unsafe { ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(rc_error(&format!("{}: QP {} to {state}", self.dev.name, self.qpn()), rc));
        }
        Ok(())
    }

    /// Moves the QP through RTR to RTS, connected to `remote`.
    pub fn connect(&self, local_psn: u32, remote: &QpEndpoint, path: &PathAttrs) -> Result<(), String> {
        // SAFETY: zeroed ibv_qp_attr is a valid starting point; only masked fields are read.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = self.dev.active_mtu.min(remote.mtu);
        attr.dest_qp_num = remote.qpn;
        attr.rq_psn = remote.psn;
        attr.max_dest_rd_atomic = 1;
        attr.min_rnr_timer = 1; // 0.01 ms: a receiver short of buffers catches up fast
        attr.ah_attr.is_global = 1;
        attr.ah_attr.port_num = self.dev.port;
        attr.ah_attr.grh.dgid.raw = remote.gid.octets();
        attr.ah_attr.grh.flow_label = path.flow_label;
        attr.ah_attr.grh.sgid_index = self.dev.gid_index;
        attr.ah_attr.grh.hop_limit = 64;
        attr.ah_attr.grh.traffic_class = path.traffic_class;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut attr, mask, "RTR")?;
        // SAFETY: as above.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = path.timeout;
        attr.retry_cnt = path.retry_cnt;
        attr.rnr_retry = 7; // infinite: a slow receiver is not an error, ACCL_TIMEOUT bounds it
        attr.sq_psn = local_psn;
        attr.max_rd_atomic = 1;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut attr, mask, "RTS")
    }

    /// Posts one signaled SEND of the given scatter list, with immediate data when `imm` is set.
    pub fn post_send(&mut self, wr_id: u64, sges: &mut [ibv_sge], imm: Option<u32>) -> Result<(), String> {
        // SAFETY: a zeroed send WR with the fields set below is valid; sges outlive the call
        // (the verbs library copies them into the WQE).
        unsafe {
            let mut wr: ibv_send_wr = std::mem::zeroed();
            wr.wr_id = wr_id;
            wr.sg_list = sges.as_mut_ptr();
            wr.num_sge = sges.len() as i32;
            wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
            if let Some(imm) = imm {
                wr.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
                wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
            }
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            let mut bad = ptr::null_mut();
            let rc = ibv_post_send(self.qp, &mut wr, &mut bad);
            if rc != 0 {
                return Err(rc_error("ibv_post_send", rc));
            }
        }
        Ok(())
    }

    /// Posts one receive into `sge`.
    pub fn post_recv(&mut self, wr_id: u64, sge: &mut ibv_sge) -> Result<(), String> {
        // SAFETY: as for post_send.
        unsafe {
            let mut wr = ibv_recv_wr { wr_id, next: ptr::null_mut(), sg_list: sge, num_sge: 1 };
            let mut bad = ptr::null_mut();
            let rc = ibv_post_recv(self.qp, &mut wr, &mut bad);
            if rc != 0 {
                return Err(rc_error("ibv_post_recv", rc));
            }
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp, destroyed once, before its CQ.
        unsafe { ibv_destroy_qp(self.qp) };
    }
}

/// A readable name of a completion status.
pub fn status_name(status: u32) -> String {
    // SAFETY: ibv_wc_status_str returns a static string for any value.
    unsafe { CStr::from_ptr(ibv_wc_status_str(status)).to_string_lossy().into_owned() }
}

pub use rdma_sys::{ibv_sge, ibv_wc};
pub const WC_SUCCESS: u32 = ibv_wc_status::IBV_WC_SUCCESS;

/// The immediate data of a completion, if it carried any.
pub fn wc_imm(wc: &ibv_wc) -> Option<u32> {
    // SAFETY: the union holds the immediate when IBV_WC_WITH_IMM is set.
    (wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0)
        .then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data }))
}
