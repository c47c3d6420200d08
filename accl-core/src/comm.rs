//! The communicator: a group of ranks that run collectives together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::algo::{choose, default_segment, Algorithm, Collective, Plan, Schedule};
use crate::bootstrap::{Bootstrap, UniqueId};
use crate::config::{env_var, Config, TransportKind};
use crate::dtype::{DataType, Element, ReduceOp};
use crate::error::{Error, Result};
use crate::exec::{encode_notice, execute, AbortState, Buffers, CallInfo, Context, ExecState, PeerLanes};
use crate::reduce::Reducer;
use crate::transport::mem::MemProvider;
use crate::transport::tcp::TcpProvider;
use crate::transport::{Connecting, LaneSetup, Listener, MemoryRegion, Provider, WaitSource};

/// Schedules kept per communicator (training loops repeat a handful of shapes).
const SCHEDULE_CACHE: usize = 64;

/// Aborts a communicator from any thread: a collective in progress returns
/// [`Error::Aborted`] within about 50 ms, and the communicator stays failed.
#[derive(Clone)]
pub struct AbortHandle {
    state: Arc<AbortState>,
}

impl AbortHandle {
    /// Requests the abort.
    pub fn abort(&self) {
        self.state.flag.store(true, Ordering::SeqCst);
    }
}

/// Arguments of one call of the raw API ([`Communicator::run_raw`]); the typed methods build
/// them for you.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CollArgs {
    pub coll: Collective,
    /// Elements per rank: the allreduce/reduce/broadcast length, the per-rank block of
    /// allgather/reduce_scatter/all2all, the message length of send/recv.
    pub count: usize,
    pub dtype: DataType,
    pub op: ReduceOp,
    /// Root of reduce and broadcast.
    pub root: usize,
    /// Point-to-point: rank to send to.
    pub send_to: Option<usize>,
    /// Point-to-point: rank to receive from.
    pub recv_from: Option<usize>,
}

impl CollArgs {
    /// Arguments for `coll` with `count` elements of `dtype`; op sum, root 0, no peers.
    pub fn new(coll: Collective, count: usize, dtype: DataType) -> CollArgs {
        CollArgs { coll, count, dtype, op: ReduceOp::Sum, root: 0, send_to: None, recv_from: None }
    }

    /// Sets the reduction op.
    pub fn op(mut self, op: ReduceOp) -> CollArgs {
        self.op = op;
        self
    }

    /// Sets the root.
    pub fn root(mut self, root: usize) -> CollArgs {
        self.root = root;
        self
    }

    /// Sets point-to-point peers.
    pub fn peers(mut self, send_to: Option<usize>, recv_from: Option<usize>) -> CollArgs {
        self.send_to = send_to;
        self.recv_from = recv_from;
        self
    }

    /// Bytes this rank's send and receive buffers need: (input, output).
    pub fn buffer_bytes(&self, rank: usize, nranks: usize) -> Result<(usize, usize)> {
        let overflow = || Error::CountOverflow { count: self.count, dtype: self.dtype };
        let one =
            self.count.checked_mul(self.dtype.size()).filter(|b| *b <= isize::MAX as usize).ok_or_else(overflow)?;
        let all = one.checked_mul(nranks).filter(|b| *b <= isize::MAX as usize).ok_or_else(overflow)?;
        let is_root = rank == self.root;
        Ok(match self.coll {
            Collective::AllReduce => (one, one),
            Collective::Reduce => (one, if is_root { one } else { 0 }),
            Collective::Broadcast => (if is_root { one } else { 0 }, one),
            Collective::AllGather => (one, all),
            Collective::ReduceScatter => (all, one),
            Collective::AllToAll => (all, all),
            Collective::Barrier => (0, 0),
            Collective::SendRecv => {
                (if self.send_to.is_some() { one } else { 0 }, if self.recv_from.is_some() { one } else { 0 })
            }
        })
    }
}

/// One lane of the communicator, as `accl-perf -v` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneInfo {
    pub peer: usize,
    pub lane: usize,
    pub flow_label: u32,
    /// The RoCEv2 UDP source port of the lane's packets (verbs only).
    pub udp_sport: Option<u16>,
    /// The TCP congestion control of the lane's socket (TCP only; see `ACCL_TCP_CONGESTION`).
    pub congestion: Option<String>,
}

/// The transport a communicator uses, and why.
struct TransportChoice {
    kind: TransportKind,
    reason: String,
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    selection: Option<crate::transport::ib::Selection>,
}

/// This rank's RoCE GID, or why it has none.
fn probe_verbs(
    settings: &crate::transport::ib::IbSettings,
) -> std::result::Result<crate::transport::ib::Selection, String> {
    #[cfg(feature = "verbs")]
    {
        crate::transport::verbs::probe(settings)
    }
    #[cfg(not(feature = "verbs"))]
    {
        let _ = settings;
        Err("accl was built without the `verbs` feature".into())
    }
}

/// Resolves `ACCL_TRANSPORT`: `auto` and `verbs` ask every rank for a usable RoCE v2 GID
/// (one bootstrap round); auto takes verbs only when all have one.
fn choose_transport(config: &Config, bootstrap: &mut Bootstrap) -> Result<TransportChoice> {
    let fixed = |kind: TransportKind| TransportChoice {
        kind,
        reason: format!("ACCL_TRANSPORT={}", kind.name()),
        selection: None,
    };
    match config.transport {
        TransportKind::Tcp | TransportKind::Mem => return Ok(fixed(config.transport)),
        TransportKind::Auto | TransportKind::Verbs => {}
    }
    let probe = probe_verbs(&config.ib);
    let mut blob = vec![u8::from(probe.is_ok())];
    blob.extend_from_slice(
        match &probe {
            Ok(sel) => sel.to_string(),
            Err(why) => why.clone(),
        }
        .as_bytes(),
    );
    let all = bootstrap.allgather(&blob)?;
    let lacking = all.iter().enumerate().find(|(_, b)| b.first() != Some(&1));
    match (lacking, probe) {
        (None, Ok(sel)) => Ok(TransportChoice {
            kind: TransportKind::Verbs,
            reason: format!(
                "{}every rank has a RoCE v2 GID; this rank uses {sel}",
                if config.transport == TransportKind::Auto { "auto: " } else { "" }
            ),
            selection: Some(sel),
        }),
        (Some((r, b)), _) => {
            let why = String::from_utf8_lossy(b.get(1..).unwrap_or_default()).into_owned();
            if config.transport == TransportKind::Verbs {
                return Err(Error::InvalidConfig {
                    name: "ACCL_TRANSPORT".into(),
                    value: "verbs".into(),
                    reason: format!("rank {r} has no usable RoCE v2 GID: {why}"),
                });
            }
            Ok(TransportChoice {
                kind: TransportKind::Tcp,
                reason: format!("auto: rank {r} has no usable RoCE v2 GID ({why})"),
                selection: None,
            })
        }
        (None, Err(_)) => unreachable!("this rank's own entry says it has a GID"),
    }
}

/// A group of `nranks` ranks that run collectives together.
///
/// Create one per process with [`Communicator::init`] (NCCL style, with a [`UniqueId`] from
/// rank 0) or [`Communicator::from_env`] (launcher style: `ACCL_RANK`, `ACCL_NRANKS`,
/// `ACCL_ROOT`). Every rank must call the same collectives in the same order with matching
/// arguments; a mismatch is reported as [`Error::Mismatch`] rather than corrupting data.
///
/// After any error returned by a collective the communicator is failed: every later call
/// returns [`Error::Failed`], and the other ranks were told (they fail too instead of waiting).
///
/// ```no_run
/// use accl_core::{Communicator, ReduceOp};
/// let mut comm = Communicator::from_env()?; // started by `accl-run -n 4 -- prog`
/// let mut grads = vec![comm.rank() as f32; 1024];
/// comm.all_reduce_in_place(&mut grads, ReduceOp::Avg)?;
/// # Ok::<(), accl_core::Error>(())
/// ```
pub struct Communicator {
    rank: usize,
    nranks: usize,
    config: Config,
    comm_id: u64,
    provider_name: &'static str,
    transport_reason: String,
    peers: Vec<PeerLanes>,
    /// Kept for memory registration; dropped after the lanes.
    provider: Box<dyn Provider>,
    registered: Vec<MemoryRegion>,
    // Dropped after the lanes: the listener and bootstrap outlive every connection.
    _listener: Box<dyn Listener>,
    _bootstrap: Bootstrap,
    seq: u64,
    scratch: Vec<u64>,
    abort: Arc<AbortState>,
    failed: Option<String>,
    reducer: Reducer,
    /// `config.stream_min`, resolved for this machine and rank count.
    stream_min: usize,
    /// `config.yield_cpu`, resolved for this host.
    yield_cpu: bool,
    schedules: HashMap<Plan, Arc<Schedule>>,
    /// The schedule of the previous call: loops repeat one shape, so look there first.
    last_schedule: Option<(Plan, Arc<Schedule>)>,
    exec_state: ExecState,
}

impl Communicator {
    /// Joins the communicator whose rendezvous root is `id` as `rank` of `nranks`.
    pub fn init(id: &UniqueId, rank: usize, nranks: usize, config: Config) -> Result<Communicator> {
        let deadline = Instant::now() + config.timeout;
        let mut bootstrap = Bootstrap::join(id, rank, nranks, config.timeout)?;
        let local = match (config.listen_addr, bootstrap.local_addr()) {
            (Some(ip), _) => Some(SocketAddr::new(ip, 0)),
            (None, addr) => addr,
        };
        let need_local =
            || local.ok_or_else(|| Error::InvalidArgument("cannot tell the local address towards the root".into()));
        let choice = choose_transport(&config, &mut bootstrap)?;
        let provider: Box<dyn Provider> = match choice.kind {
            TransportKind::Tcp | TransportKind::Auto => Box::new(
                TcpProvider::new(need_local()?, config.socket_buf).with_congestion(config.tcp_congestion.clone())?,
            ),
            TransportKind::Mem => Box::new(MemProvider::new()),
            #[cfg(feature = "verbs")]
            TransportKind::Verbs => {
                let sel = choice.selection.as_ref().expect("verbs is chosen with a GID");
                Box::new(crate::transport::verbs::VerbsProvider::new(sel, need_local()?, config.ib.clone())?)
            }
            #[cfg(not(feature = "verbs"))]
            TransportKind::Verbs => unreachable!("verbs is never chosen without the feature"),
        };
        let mut listener = provider.listen()?;
        let mut blob = (config.lanes as u32).to_le_bytes().to_vec();
        blob.push(config.transport as u8);
        blob.extend_from_slice(&listener.handle());
        let all = bootstrap.allgather(&blob)?;
        for (r, b) in all.iter().enumerate() {
            let lanes = b.get(..4).map(|l| u32::from_le_bytes(l.try_into().expect("4 bytes")) as usize);
            if lanes != Some(config.lanes) || b.get(4) != Some(&(config.transport as u8)) {
                return Err(Error::InvalidConfig {
                    name: "ACCL_LANES/ACCL_TRANSPORT".into(),
                    value: format!("{} lanes, {:?}", config.lanes, config.transport),
                    reason: format!("rank {r} uses different settings; every rank must use the same"),
                });
            }
        }
        let comm_id = bootstrap.comm_id();
        let lanes = config.lanes;
        let label = |lane: usize| {
            if config.flow_label == 0 {
                0
            } else {
                (config.flow_label + lane as u32) & 0xF_FFFF
            }
        };
        // Duplex lanes (one socket both ways, connected by the lower rank) unless flow labels
        // are asked for: then every direction gets its own connection from its sender, which
        // is what lets the sender choose the label its data carries.
        let duplex = provider.duplex_only() || config.flow_label == 0;
        let connects_to = |peer: usize| peer != rank && (!duplex || rank < peer);
        let mut connecting: Vec<(usize, usize, Box<dyn Connecting>)> = Vec::new();
        for peer in (0..nranks).filter(|&p| connects_to(p)) {
            for lane in 0..lanes {
                let setup = LaneSetup { comm_id, rank, peer, lane, flow_label: label(lane), duplex };
                connecting.push((peer, lane, provider.connect(&all[peer][5..], &setup)?));
            }
        }
        let mut send: Vec<Vec<Option<Box<dyn crate::transport::SendLane>>>> =
            (0..nranks).map(|_| (0..lanes).map(|_| None).collect()).collect();
        let mut recv: Vec<Vec<Option<Box<dyn crate::transport::RecvLane>>>> =
            (0..nranks).map(|_| (0..lanes).map(|_| None).collect()).collect();
        let expected_accepts = (0..nranks).filter(|&p| p != rank && (!duplex || p < rank)).count() * lanes;
        let mut accepted = 0;
        let mut bell_seen = None;
        let complete = |send: &[Vec<Option<_>>], recv: &[Vec<Option<_>>]| {
            (0..nranks)
                .filter(|&p| p != rank)
                .all(|p| send[p].iter().all(Option::is_some) && recv[p].iter().all(Option::is_some))
        };
        loop {
            let mut i = 0;
            while i < connecting.len() {
                let (peer, lane, c) = &mut connecting[i];
                if let Some(ends) = c.poll()? {
                    send[*peer][*lane] = ends.send;
                    if ends.recv.is_some() {
                        recv[*peer][*lane] = ends.recv;
                    }
                    connecting.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            while let Some((setup, ends)) = listener.accept()? {
                let fits = setup.comm_id == comm_id
                    && setup.peer == rank
                    && setup.rank < nranks
                    && setup.rank != rank
                    && setup.lane < lanes
                    && setup.duplex == duplex;
                if fits && recv[setup.rank][setup.lane].is_none() {
                    recv[setup.rank][setup.lane] = ends.recv;
                    if ends.send.is_some() {
                        send[setup.rank][setup.lane] = ends.send;
                    }
                    accepted += 1;
                }
            }
            if connecting.is_empty() && accepted == expected_accepts && complete(&send, &recv) {
                break;
            }
            if Instant::now() >= deadline {
                let mut missing: Vec<usize> = connecting.iter().map(|(p, _, _)| *p).collect();
                missing.extend((0..nranks).filter(|&p| p != rank && recv[p].iter().any(Option::is_none)));
                missing.sort_unstable();
                missing.dedup();
                return Err(Error::Timeout {
                    rank,
                    collective: "connect",
                    seq: 0,
                    waiting_for: missing,
                    timeout: config.timeout,
                });
            }
            wait_for_setup(listener.as_ref(), &connecting, deadline, &mut bell_seen);
        }
        let peers = send
            .into_iter()
            .zip(recv)
            .map(|(s, r)| PeerLanes::new(s.into_iter().flatten().collect(), r.into_iter().flatten().collect()))
            .collect();
        bootstrap.barrier()?;
        let stream_min = config.stream_min.unwrap_or_else(|| crate::config::default_stream_min(nranks));
        let yield_cpu = config.yield_cpu.unwrap_or_else(crate::config::oversubscribed);
        if config.debug {
            eprintln!(
                "accl: rank {rank}/{nranks} ready: transport={} ({}) lanes={lanes} flow_label={:#x} \
                 tcp_congestion={} stream_min={stream_min} yield={} comm={comm_id:016x}",
                provider.name(),
                choice.reason,
                config.flow_label,
                config.tcp_congestion,
                u8::from(yield_cpu)
            );
        }
        Ok(Communicator {
            rank,
            nranks,
            comm_id,
            provider_name: provider.name(),
            transport_reason: choice.reason,
            peers,
            provider,
            registered: Vec::new(),
            _listener: listener,
            _bootstrap: bootstrap,
            seq: 0,
            scratch: Vec::new(),
            abort: Arc::new(AbortState::default()),
            failed: None,
            reducer: Reducer::new(config.reduce_threads),
            stream_min,
            yield_cpu,
            schedules: HashMap::new(),
            last_schedule: None,
            exec_state: ExecState::default(),
            config,
        })
    }

    /// Launcher style: reads `ACCL_RANK`, `ACCL_NRANKS` and `ACCL_ROOT` (`[addr]:port`), plus
    /// the other `ACCL_*` settings. Rank 0 serves the rendezvous on `ACCL_ROOT`.
    pub fn from_env() -> Result<Communicator> {
        let config = Config::from_env()?;
        let get = |name: &str| {
            env_var(name).ok_or_else(|| Error::InvalidConfig {
                name: name.into(),
                value: String::new(),
                reason: "not set (use accl-run, or set ACCL_RANK, ACCL_NRANKS and ACCL_ROOT)".into(),
            })
        };
        let num = |name: &str| -> Result<usize> {
            let v = get(name)?;
            v.trim().parse().map_err(|_| Error::InvalidConfig {
                name: name.into(),
                value: v,
                reason: "expected a non-negative integer".into(),
            })
        };
        let (rank, nranks) = (num("ACCL_RANK")?, num("ACCL_NRANKS")?);
        if nranks == 0 || rank >= nranks {
            return Err(Error::InvalidConfig {
                name: "ACCL_RANK".into(),
                value: rank.to_string(),
                reason: format!("must be below ACCL_NRANKS={nranks}"),
            });
        }
        let root = crate::addr::parse_socket_addr(&get("ACCL_ROOT")?, "ACCL_ROOT")?;
        if rank != 0 {
            return Communicator::init(&UniqueId::from_addr(root), rank, nranks, config);
        }
        let (id, root_service) = UniqueId::serve_in_thread(root)?;
        let result = Communicator::init(&id, rank, nranks, config);
        if let Err(Error::RendezvousTimeout { .. }) = result {
            // Keep the root up while it answers ranks that arrive late (a bounded grace).
            let _ = root_service.join();
        }
        result
    }

    /// This rank, in `0..nranks`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn nranks(&self) -> usize {
        self.nranks
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Why this transport was chosen (`ACCL_TRANSPORT`, or what `auto` found).
    pub fn transport_reason(&self) -> &str {
        &self.transport_reason
    }

    /// Registers `len` bytes at `addr` with the transport, so that collectives send from that
    /// memory without copying it first (verbs: one memory region, made once; TCP and the
    /// in-process transport: nothing to do). Like `ncclCommRegister`: register buffers that
    /// are used again and again, such as gradient buckets. Memory inside a range registered
    /// before is not registered again.
    ///
    /// # Safety
    /// The memory must stay allocated until [`Communicator::deregister_memory`] or until the
    /// communicator is dropped. A registration pins the pages there now: memory freed and
    /// allocated again at the same address would send what the old pages held.
    pub unsafe fn register_memory(&mut self, addr: *const u8, len: usize) -> Result<()> {
        if addr.is_null() || len == 0 {
            return Err(Error::InvalidArgument(format!(
                "rank {}: cannot register {len} bytes at {addr:p}: need a non-null address and a length",
                self.rank
            )));
        }
        if self.registered.iter().any(|m| m.covers(addr as usize, len)) {
            return Ok(());
        }
        self.registered.push(self.provider.register(addr as usize, len)?);
        Ok(())
    }

    /// Releases the registration [`Communicator::register_memory`] made at `addr`.
    pub fn deregister_memory(&mut self, addr: *const u8) -> Result<()> {
        let Some(i) = self.registered.iter().position(|m| m.addr == addr as usize) else {
            return Err(Error::InvalidArgument(format!(
                "rank {}: no memory registered at {addr:p} (deregister with the address given to register_memory)",
                self.rank
            )));
        };
        let region = self.registered.swap_remove(i);
        self.provider.deregister(&region);
        Ok(())
    }

    /// The memory registered with [`Communicator::register_memory`], with the transport's keys.
    pub fn registered_memory(&self) -> &[MemoryRegion] {
        &self.registered
    }

    /// The transport provider's name (`tcp`, `verbs`, `mem`).
    pub fn transport_name(&self) -> &'static str {
        self.provider_name
    }

    /// An identifier shared by all ranks of this communicator.
    pub fn comm_id(&self) -> u64 {
        self.comm_id
    }

    /// Lanes per peer connection.
    pub fn lanes(&self) -> usize {
        self.config.lanes
    }

    /// Every send lane with its flow label.
    pub fn lane_info(&self) -> Vec<LaneInfo> {
        self.peers
            .iter()
            .enumerate()
            .flat_map(|(peer, p)| {
                p.send.iter().enumerate().map(move |(lane, l)| LaneInfo {
                    peer,
                    lane,
                    flow_label: l.flow_label(),
                    udp_sport: l.udp_sport(),
                    congestion: l.congestion(),
                })
            })
            .collect()
    }

    /// The algorithm a call with these arguments would use.
    pub fn algorithm(&self, args: &CollArgs) -> Algorithm {
        choose(args.coll, args.count.saturating_mul(args.dtype.size()), self.nranks, &self.config.algo)
    }

    /// Replaces the algorithm overrides (`ACCL_ALGO`) for later calls. Every rank must make
    /// the same change before its next call (a difference is reported as a mismatch).
    pub fn set_algorithms(&mut self, choice: crate::algo::AlgoChoice) {
        self.config.algo = choice;
    }

    /// A handle that aborts this communicator from another thread.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle { state: self.abort.clone() }
    }

    /// Whether an earlier error left the communicator unusable.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Runs one call on raw buffers. In place when `send == recv` (allgather: `send` is block
    /// `rank` of `recv`; reduce_scatter: `recv` is block `rank` of `send`), as in NCCL.
    ///
    /// # Safety
    /// `send` must be readable and `recv` writable for the sizes
    /// [`CollArgs::buffer_bytes`] gives, for the whole call, and not be used by others meanwhile.
    pub unsafe fn run_raw(&mut self, args: &CollArgs, send: *const u8, recv: *mut u8) -> Result<()> {
        let (_, out_bytes) = args.buffer_bytes(self.rank, self.nranks)?;
        let blk = args.count * args.dtype.size();
        let in_place = match args.coll {
            Collective::AllGather => std::ptr::eq(send, recv.wrapping_add(self.rank * blk)),
            Collective::ReduceScatter => std::ptr::eq(recv, send.wrapping_add(self.rank * blk)),
            _ => std::ptr::eq(send, recv) && out_bytes > 0,
        };
        let base = if in_place && args.coll == Collective::ReduceScatter { send as *mut u8 } else { recv };
        // SAFETY: forwarded from the caller.
        unsafe { self.call(args, send, base, in_place) }
    }

    fn check_args(&self, args: &CollArgs, have_in: usize, have_out: usize) -> Result<()> {
        let (need_in, need_out) = args.buffer_bytes(self.rank, self.nranks)?;
        let small =
            |buffer, needed, got| Error::BufferTooSmall { buffer, needed, got, count: args.count, dtype: args.dtype };
        if have_in < need_in {
            return Err(small("send", need_in, have_in));
        }
        if have_out < need_out {
            return Err(small("receive", need_out, have_out));
        }
        Ok(())
    }

    fn validate(&self, args: &CollArgs) -> Result<()> {
        let n = self.nranks;
        if matches!(args.coll, Collective::Reduce | Collective::Broadcast) && args.root >= n {
            return Err(Error::InvalidRank { what: "root", rank: args.root, nranks: n });
        }
        if args.coll == Collective::SendRecv {
            for (what, peer) in [("send peer", args.send_to), ("receive peer", args.recv_from)] {
                match peer {
                    Some(p) if p >= n => return Err(Error::InvalidRank { what, rank: p, nranks: n }),
                    Some(p) if p == self.rank && args.send_to != args.recv_from => {
                        return Err(Error::InvalidArgument(format!(
                            "rank {p}: a send to or receive from oneself needs both in one send_recv call"
                        )));
                    }
                    _ => {}
                }
            }
            if args.send_to.is_none() && args.recv_from.is_none() {
                return Err(Error::InvalidArgument("send_recv without a peer".into()));
            }
        }
        Ok(())
    }

    /// Validates, plans and executes one call; every error fails the communicator.
    unsafe fn call(&mut self, args: &CollArgs, input: *const u8, output: *mut u8, in_place: bool) -> Result<()> {
        if let Some(why) = &self.failed {
            return Err(Error::Failed(why.clone()));
        }
        let result = self.validate(args).and_then(|()| {
            // SAFETY: forwarded from the caller.
            unsafe { self.execute(args, input, output, in_place) }
        });
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    unsafe fn execute(&mut self, args: &CollArgs, input: *const u8, output: *mut u8, in_place: bool) -> Result<()> {
        let elem = args.dtype.size();
        if args.coll == Collective::SendRecv && args.send_to == Some(self.rank) {
            // A message to oneself: a copy.
            if args.count > 0 && !std::ptr::eq(input, output) {
                // SAFETY: caller-validated buffers of count elements.
                unsafe { std::ptr::copy(input, output, args.count * elem) };
            }
            return Ok(());
        }
        let algo = self.algorithm(args);
        let plan = Plan {
            coll: args.coll,
            algo,
            rank: self.rank,
            nranks: self.nranks,
            count: args.count,
            elem,
            op: args.op,
            root: if args.coll == Collective::SendRecv { args.send_to.unwrap_or(0) } else { args.root },
            src: args.recv_from.unwrap_or(0),
            in_place,
            segment: self.config.segment_size.unwrap_or_else(|| default_segment(args.coll, algo)),
            window: self.config.a2a_window,
            stream_min: self.stream_min,
            p2p_send: args.send_to.is_some(),
            p2p_recv: args.recv_from.is_some(),
        };
        let sched = match &self.last_schedule {
            Some((p, s)) if *p == plan => s.clone(),
            _ => {
                if self.schedules.len() >= SCHEDULE_CACHE {
                    self.schedules.clear();
                }
                let s = self.schedules.entry(plan).or_insert_with(|| Arc::new(plan.schedule())).clone();
                self.last_schedule = Some((plan, s.clone()));
                s
            }
        };
        let words = sched.scratch_len.div_ceil(8);
        if self.scratch.len() < words {
            self.scratch.resize(words, 0);
        }
        let p2p = args.coll == Collective::SendRecv;
        if !p2p {
            self.seq += 1;
        }
        let info = CallInfo {
            coll: args.coll,
            algo: algo as u8,
            dtype: args.dtype,
            op: args.op,
            // Point-to-point messages are matched by their order on the connection alone.
            seq: if p2p { 0 } else { self.seq },
            count: args.count as u64,
            root: if matches!(args.coll, Collective::Reduce | Collective::Broadcast) { args.root as u32 } else { 0 },
        };
        let bufs = Buffers {
            input: if in_place { output as *const u8 } else { input },
            output,
            scratch: self.scratch.as_mut_ptr() as *mut u8,
        };
        let mut ctx = Context {
            rank: self.rank,
            peers: &mut self.peers,
            chunk_size: self.config.chunk_size,
            spin: self.config.spin,
            yield_cpu: self.yield_cpu,
            timeout: self.config.timeout,
            abort: &self.abort,
            reducer: &self.reducer,
            registered: &self.registered,
        };
        // SAFETY: buffers validated by the caller; scratch sized for the schedule.
        unsafe { execute(&mut ctx, &sched, bufs, info, &mut self.exec_state) }
    }

    /// Marks the communicator failed and tells every peer why, so none waits for its timeout.
    fn fail(&mut self, err: &Error) {
        if matches!(err, Error::Failed(_)) {
            return;
        }
        let notice = encode_notice(self.rank, err.blamed_rank(), &err.to_string());
        // On every lane, both ends (a transport sends it on whichever end carries notices): a
        // peer reads the lanes in its own order, and a lane in the middle of a message cannot
        // carry one, so each lane that can says why. Then cancel: the caller gets its buffers
        // back with the error, so no peer may read them after this.
        for peer in &mut self.peers {
            for lane in &mut peer.recv {
                lane.send_notice(&notice);
                lane.cancel();
            }
            for lane in &mut peer.send {
                lane.send_notice(&notice);
                lane.cancel();
            }
        }
        self.failed = Some(err.to_string());
    }

    fn typed<T: Element>(&mut self, args: CollArgs, send: Option<&[T]>, recv: Option<&mut [T]>) -> Result<()> {
        if let Some(why) = &self.failed {
            return Err(Error::Failed(why.clone()));
        }
        let have_in = send.map_or(0, std::mem::size_of_val);
        let in_place = send.is_none();
        let (out_ptr, have_out) = match recv {
            Some(r) => (r.as_mut_ptr() as *mut u8, std::mem::size_of_val(r)),
            None => (std::ptr::null_mut(), 0),
        };
        // In place, the input lives in the one buffer too.
        let check = self.check_args(&args, if in_place { have_out } else { have_in }, have_out);
        if let Err(e) = check {
            self.fail(&e);
            return Err(e);
        }
        let in_ptr = send.map_or(out_ptr as *const u8, |s| s.as_ptr() as *const u8);
        // SAFETY: lengths checked above; the borrows keep both slices alive and exclusive.
        unsafe { self.call(&args, in_ptr, out_ptr, in_place) }
    }

    fn blocks(&self, len: usize, what: &str) -> Result<usize> {
        if !len.is_multiple_of(self.nranks) {
            return Err(Error::InvalidArgument(format!(
                "{what} length {len} is not a multiple of nranks {}",
                self.nranks
            )));
        }
        Ok(len / self.nranks)
    }

    /// `recv = op(send of every rank)`, element-wise.
    pub fn all_reduce<T: Element>(&mut self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        self.typed(CollArgs::new(Collective::AllReduce, send.len(), T::DTYPE).op(op), Some(send), Some(recv))
    }

    /// In-place allreduce.
    pub fn all_reduce_in_place<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.typed(CollArgs::new(Collective::AllReduce, buf.len(), T::DTYPE).op(op), None, Some(buf))
    }

    /// Reduces every rank's `send` into `recv` on `root`; other ranks may pass an empty `recv`.
    pub fn reduce<T: Element>(&mut self, send: &[T], recv: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.typed(CollArgs::new(Collective::Reduce, send.len(), T::DTYPE).op(op).root(root), Some(send), Some(recv))
    }

    /// In-place reduce: the result lands in `buf` on `root`; other ranks' `buf` is not changed.
    pub fn reduce_in_place<T: Element>(&mut self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.typed(CollArgs::new(Collective::Reduce, buf.len(), T::DTYPE).op(op).root(root), None, Some(buf))
    }

    /// Copies `send` of `root` into every rank's `recv` (`send` is ignored, and may be empty,
    /// elsewhere).
    pub fn broadcast<T: Element>(&mut self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.typed(CollArgs::new(Collective::Broadcast, recv.len(), T::DTYPE).root(root), Some(send), Some(recv))
    }

    /// In-place broadcast from `root`.
    pub fn broadcast_in_place<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        self.typed(CollArgs::new(Collective::Broadcast, buf.len(), T::DTYPE).root(root), None, Some(buf))
    }

    /// Gathers every rank's `send` into `recv`, block r holding rank r's data.
    pub fn all_gather<T: Element>(&mut self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.typed(CollArgs::new(Collective::AllGather, send.len(), T::DTYPE), Some(send), Some(recv))
    }

    /// In-place allgather: this rank's data is already in block `rank` of `buf`.
    pub fn all_gather_in_place<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        let count = self.blocks(buf.len(), "allgather buffer")?;
        self.typed(CollArgs::new(Collective::AllGather, count, T::DTYPE), None, Some(buf))
    }

    /// Reduces `send` (nranks blocks of `recv.len()`) across ranks; rank r gets block r.
    pub fn reduce_scatter<T: Element>(&mut self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        self.typed(CollArgs::new(Collective::ReduceScatter, recv.len(), T::DTYPE).op(op), Some(send), Some(recv))
    }

    /// In-place reduce_scatter: the result is block `rank` of `buf`.
    pub fn reduce_scatter_in_place<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let count = self.blocks(buf.len(), "reduce_scatter buffer")?;
        self.typed(CollArgs::new(Collective::ReduceScatter, count, T::DTYPE).op(op), None, Some(buf))
    }

    /// All-to-all with equal blocks: block j of `send` goes to rank j, block i of `recv` comes
    /// from rank i. `send.len()` must be a multiple of nranks.
    pub fn all_to_all<T: Element>(&mut self, send: &[T], recv: &mut [T]) -> Result<()> {
        let count = self.blocks(send.len(), "all2all send buffer")?;
        self.typed(CollArgs::new(Collective::AllToAll, count, T::DTYPE), Some(send), Some(recv))
    }

    /// In-place all-to-all.
    pub fn all_to_all_in_place<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        let count = self.blocks(buf.len(), "all2all buffer")?;
        self.typed(CollArgs::new(Collective::AllToAll, count, T::DTYPE), None, Some(buf))
    }

    /// Returns once every rank called it.
    pub fn barrier(&mut self) -> Result<()> {
        self.typed::<u8>(CollArgs::new(Collective::Barrier, 0, DataType::U8), Some(&[]), Some(&mut []))
    }

    /// Sends `buf` to `peer`, which must call [`Communicator::recv`] with the same length.
    pub fn send<T: Element>(&mut self, buf: &[T], peer: usize) -> Result<()> {
        self.typed::<T>(
            CollArgs::new(Collective::SendRecv, buf.len(), T::DTYPE).peers(Some(peer), None),
            Some(buf),
            None,
        )
    }

    /// Receives `buf.len()` elements from `peer`.
    pub fn recv<T: Element>(&mut self, buf: &mut [T], peer: usize) -> Result<()> {
        self.typed::<T>(
            CollArgs::new(Collective::SendRecv, buf.len(), T::DTYPE).peers(None, Some(peer)),
            Some(&[]),
            Some(buf),
        )
    }

    /// Sends `send` to `to` while receiving `recv` from `from`, without deadlock (a ring shift
    /// when every rank calls it with its neighbours). Both buffers have the same length.
    pub fn send_recv<T: Element>(&mut self, send: &[T], to: usize, recv: &mut [T], from: usize) -> Result<()> {
        if send.len() != recv.len() {
            return Err(Error::InvalidArgument(format!(
                "send_recv lengths differ: send {} vs receive {}",
                send.len(),
                recv.len()
            )));
        }
        self.typed(
            CollArgs::new(Collective::SendRecv, send.len(), T::DTYPE).peers(Some(to), Some(from)),
            Some(send),
            Some(recv),
        )
    }
}

/// Sleeps until the listener or a connection in progress may move on (or until `deadline`, at
/// most 50 ms at a time). In-process transports ring a doorbell instead (`bell_seen`: see
/// [`crate::transport::Doorbell::wait_for_change`]).
fn wait_for_setup(
    listener: &dyn Listener,
    connecting: &[(usize, usize, Box<dyn Connecting>)],
    deadline: Instant,
    bell_seen: &mut Option<u64>,
) {
    let max = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(50));
    let sources = listener.wait_sources().into_iter().chain(connecting.iter().filter_map(|(_, _, c)| c.wait_source()));
    let mut fds = Vec::new();
    let mut bell = None;
    for source in sources {
        match source {
            WaitSource::Fd { fd, events } => fds.push(libc::pollfd { fd, events, revents: 0 }),
            WaitSource::Bell(b) => bell = Some(b),
        }
    }
    if let Some(bell) = bell {
        bell.wait_for_change(bell_seen, max);
    } else {
        // SAFETY: fds is a valid array of pollfd; errors (EINTR) just end the wait early.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, max.as_millis().max(1) as i32) };
    }
}
