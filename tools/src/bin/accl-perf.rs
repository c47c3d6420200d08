//! accl-perf: an nccl-tests style benchmark of one accl collective.
//!
//! ```text
//! accl-perf allreduce --ranks 4 -b 8 -e 128M -f 2          # 4 local ranks, started by itself
//! accl-run -n 4 -- accl-perf allreduce -b 8 -e 128M -f 2   # same, through any launcher
//! ```
//!
//! Sizes, columns and bandwidths follow nccl-tests (`doc/PERFORMANCE.md`): `size` is the total
//! bytes of the operation (allgather, reduce_scatter: the gathered/scattered total; alltoall:
//! the bytes each rank sends), `count` the elements per rank (per block for allgather,
//! reduce_scatter and alltoall), `algbw = size / time`, and `busbw = algbw * factor` with factor
//! 2(n-1)/n for allreduce, (n-1)/n for allgather, reduce_scatter and alltoall, 1 otherwise.
//! Time is the mean of `-n` timed iterations after `-w` warmups, the maximum over ranks.

use std::ffi::OsString;
use std::time::Instant;

use accl_core::config::{env_var, parse_size};
use accl_core::{Algorithm, CollArgs, Collective, Communicator, Config, DataType, Error, ReduceOp, UniqueId};
use accl_tools::launch;
use accl_tools::verify::{poison, Case};
use clap::Parser;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "accl-perf",
    version,
    about = "Benchmark an accl collective, nccl-tests style",
    after_help = "Without --ranks, the rank comes from ACCL_RANK/ACCL_NRANKS/ACCL_ROOT (e.g. \
                  `accl-run -n 4 -- accl-perf allreduce`); with neither, it runs one rank. \
                  ACCL_* variables (ACCL_ALGO, ACCL_LANES, ACCL_TIMEOUT, ...) apply as usual."
)]
struct Args {
    /// Collective: allreduce, reduce, broadcast, allgather, reduce_scatter, alltoall, sendrecv
    #[arg(value_parser = parse_coll)]
    coll: Collective,
    /// Start this many local ranks (re-runs accl-perf through the launcher)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    ranks: Option<u64>,
    /// Smallest size in bytes (K/M/G suffixes)
    #[arg(short = 'b', long = "minbytes", default_value = "32M", value_parser = parse_bytes)]
    minbytes: usize,
    /// Largest size in bytes (K/M/G suffixes)
    #[arg(short = 'e', long = "maxbytes", default_value = "32M", value_parser = parse_bytes)]
    maxbytes: usize,
    /// Multiply the size by this between steps
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..))]
    stepfactor: u64,
    /// Data type: int8 uint8 int32 uint32 int64 uint64 half bfloat16 float double
    #[arg(short = 'd', long = "datatype", default_value = "float", value_parser = parse_dtype)]
    datatype: DataType,
    /// Reduction: sum prod min max avg
    #[arg(short = 'o', long = "op", default_value = "sum", value_parser = parse_op)]
    op: ReduceOp,
    /// Root of reduce and broadcast
    #[arg(short = 'r', long = "root", default_value_t = 0)]
    root: usize,
    /// Untimed iterations before each measurement
    #[arg(short = 'w', long = "warmup_iters", visible_alias = "warmup-iters", default_value_t = 5)]
    warmup_iters: usize,
    /// Timed iterations per measurement
    #[arg(short = 'n', long = "iters", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    iters: u64,
    /// Check results (number of check iterations, 0 = off)
    #[arg(short = 'c', long = "check", default_value_t = 1)]
    check: u32,
    /// One JSON object per size instead of the table
    #[arg(long)]
    json: bool,
    /// Also print every lane (peer, lane, flow label)
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Register the send and receive buffers with the communicator (as nccl-tests' -R 1):
    /// over verbs, sends then go out of them without a copy
    #[arg(short = 'R', long = "local_register", visible_alias = "local-register", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=1))]
    local_register: u8,
}

fn parse_coll(s: &str) -> Result<Collective, String> {
    match Collective::parse(s) {
        Some(Collective::Barrier) | None => Err(format!(
            "unknown collective {s:?}; expected allreduce, reduce, broadcast, allgather, \
             reduce_scatter, alltoall or sendrecv"
        )),
        Some(c) => Ok(c),
    }
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    parse_size(s).ok_or_else(|| format!("invalid size {s:?}; expected e.g. 8, 64K, 32M, 1G"))
}

fn parse_dtype(s: &str) -> Result<DataType, String> {
    DataType::parse(s).ok_or_else(|| {
        format!("unknown data type {s:?}; expected one of {}", DataType::ALL.map(|d| d.name()).join(" "))
    })
}

fn parse_op(s: &str) -> Result<ReduceOp, String> {
    ReduceOp::parse(s).ok_or_else(|| format!("unknown op {s:?}; expected sum prod min max avg"))
}

fn main() {
    let args = Args::parse();
    if args.minbytes > args.maxbytes {
        eprintln!("accl-perf: invalid sizes: minbytes {} > maxbytes {}", args.minbytes, args.maxbytes);
        std::process::exit(2);
    }
    if let Some(n) = args.ranks {
        std::process::exit(relaunch(n as usize));
    }
    let rank_hint = env_var("ACCL_RANK").unwrap_or_else(|| "0".into());
    match run(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err((rank, e)) => {
            let rank = rank.map_or(rank_hint, |r| r.to_string());
            // accl's messages often start with the rank already.
            let msg = e.to_string();
            let msg = msg.strip_prefix(&format!("rank {rank}: ")).unwrap_or(&msg);
            // One write, so that lines of ranks failing together do not interleave.
            let line = format!("accl-perf: rank {rank}: {msg}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            std::process::exit(1);
        }
    }
}

/// `--ranks N`: runs N copies of this program, without `--ranks`, through the launcher.
fn relaunch(n: usize) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("accl-perf: cannot find my own executable: {e}");
            return 1;
        }
    };
    let rest = strip_ranks(std::env::args_os().skip(1));
    match launch::launch(n, &exe, &rest, &[]) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("accl-perf: {e}");
            1
        }
    }
}

/// The arguments minus `--ranks N` / `--ranks=N`.
fn strip_ranks(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        if a == "--" {
            out.push(a);
            continue;
        }
        if a == "--ranks" {
            skip_next = true;
        } else if !a.to_string_lossy().starts_with("--ranks=") {
            out.push(a);
        }
    }
    out
}

/// Elements per rank (per block for allgather, reduce_scatter, alltoall) for `size` bytes.
fn count_for(coll: Collective, size: usize, elem: usize, n: usize) -> usize {
    match coll {
        Collective::AllGather | Collective::ReduceScatter | Collective::AllToAll => size / elem / n,
        _ => size / elem,
    }
}

/// The size nccl-tests reports for `count`: the largest of the send and receive totals.
fn size_of(coll: Collective, count: usize, elem: usize, n: usize) -> usize {
    match coll {
        Collective::AllGather | Collective::ReduceScatter | Collective::AllToAll => count * elem * n,
        _ => count * elem,
    }
}

/// nccl-tests' bus bandwidth factor.
fn bus_factor(coll: Collective, n: usize) -> f64 {
    let n = n as f64;
    match coll {
        Collective::AllReduce => 2.0 * (n - 1.0) / n,
        Collective::AllGather | Collective::ReduceScatter | Collective::AllToAll => (n - 1.0) / n,
        _ => 1.0,
    }
}

/// Sizes from min to max, multiplying by factor.
fn sizes(min: usize, max: usize, factor: u64) -> Vec<usize> {
    let mut out = Vec::new();
    let mut s = min;
    loop {
        out.push(s);
        if factor <= 1 {
            break;
        }
        let next = if s == 0 {
            1
        } else {
            match s.checked_mul(factor as usize) {
                Some(x) => x,
                None => break,
            }
        };
        if next > max {
            break;
        }
        s = next;
    }
    out
}

/// One measurement (out-of-place or in-place).
#[derive(Clone, Copy, Debug)]
struct Measure {
    time_us: f64,
    algbw: f64,
    busbw: f64,
    wrong: Option<u64>,
}

#[derive(Serialize)]
struct JsonRow<'a> {
    coll: &'a str,
    size: usize,
    count: usize,
    dtype: &'a str,
    op: &'a str,
    root: i64,
    nranks: usize,
    transport: &'a str,
    algo: &'a str,
    lanes: usize,
    time_us: f64,
    algbw: f64,
    busbw: f64,
    wrong: Option<u64>,
    in_place_time_us: f64,
    in_place_algbw: f64,
    in_place_busbw: f64,
    in_place_wrong: Option<u64>,
}

type RunError = (Option<usize>, Error);

/// 8-byte aligned buffer.
struct Buf {
    words: Vec<u64>,
}

impl Buf {
    fn new(bytes: usize) -> Buf {
        Buf { words: vec![0u64; bytes.div_ceil(8).max(1)] }
    }
    fn ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr() as *mut u8
    }
}

/// Where one call reads and writes, in bytes from the start of `send` or `recv`.
struct Layout {
    send: *const u8,
    recv: *mut u8,
    input: *mut u8,
    output: *const u8,
}

fn layout(coll: Collective, in_place: bool, rank: usize, blk: usize, send: &mut Buf, recv: &mut Buf) -> Layout {
    let (s, r) = (send.ptr(), recv.ptr());
    if !in_place {
        return Layout { send: s, recv: r, input: s, output: r };
    }
    // In place: everything lives in `recv`.
    // SAFETY (offsets): rank * blk is inside the buffer sized for nranks blocks.
    let own = unsafe { r.add(rank * blk) };
    match coll {
        Collective::AllGather => Layout { send: own, recv: r, input: own, output: r },
        Collective::ReduceScatter => Layout { send: r, recv: own, input: r, output: own },
        _ => Layout { send: r, recv: r, input: r, output: r },
    }
}

/// Makes the communicator: from the launcher's environment, or a lone rank without one.
fn make_comm() -> Result<Communicator, Error> {
    if env_var("ACCL_RANK").is_none() && env_var("ACCL_NRANKS").is_none() {
        let id = UniqueId::new()?;
        Communicator::init(&id, 0, 1, Config::from_env()?)
    } else {
        Communicator::from_env()
    }
}

/// Runs the benchmark; Ok(false) when some values were wrong.
fn run(a: &Args) -> Result<bool, RunError> {
    // Declared before the communicator, so dropped after it: with -R it holds them registered.
    let mut send: Buf;
    let mut recv: Buf;
    let mut comm = make_comm().map_err(|e| (None, e))?;
    let rank = comm.rank();
    let err = |e: Error| (Some(rank), e);
    let n = comm.nranks();
    let coll = a.coll;
    let dtype = a.datatype;
    let elem = dtype.size();
    let reduces = matches!(coll, Collective::AllReduce | Collective::Reduce | Collective::ReduceScatter);
    let rooted = matches!(coll, Collective::Reduce | Collective::Broadcast);
    let redop = if reduces { a.op.name() } else { "none" };
    let root_col: i64 = if rooted { a.root as i64 } else { -1 };
    let next = (rank + 1) % n;
    let prev = (rank + n - 1) % n;
    let call_args = |count: usize| {
        let mut c = CollArgs::new(coll, count, dtype).op(a.op).root(a.root);
        if coll == Collective::SendRecv {
            c = c.peers(Some(next), Some(prev));
        }
        c
    };
    let sizes = sizes(a.minbytes, a.maxbytes, a.stepfactor);
    let counts: Vec<usize> = sizes.iter().map(|&s| count_for(coll, s, elem, n)).collect();
    let max_count = counts.iter().copied().max().unwrap_or(0);
    let (in_b, out_b) = call_args(max_count).buffer_bytes(rank, n).map_err(err)?;
    let bytes = in_b.max(out_b);
    send = Buf::new(bytes);
    recv = Buf::new(bytes);
    if a.local_register == 1 {
        for buf in [&mut send, &mut recv] {
            // SAFETY: the buffers are dropped after the communicator.
            unsafe { comm.register_memory(buf.ptr(), bytes.max(1)) }.map_err(err)?;
        }
    }

    let algos: Vec<Algorithm> = counts.iter().map(|&c| comm.algorithm(&call_args(c))).collect();
    let forced = comm.config().algo.forced(coll).is_some();
    let transport = comm.transport_name();
    let lanes = comm.lanes();

    // Who is where, and (with -v) every lane's flow label.
    let ranks_info = gather_rank_info(&mut comm).map_err(err)?;
    let lanes_info = if a.verbose { Some(gather_lanes(&mut comm).map_err(err)?) } else { None };
    let print = rank == 0;
    if print && !a.json {
        print_header(a, n, transport, lanes, &sizes, &algos, forced, &ranks_info);
        println!("# transport {transport}: {}", comm.transport_reason());
        let mut congestion: Vec<String> = comm.lane_info().into_iter().filter_map(|l| l.congestion).collect();
        congestion.sort();
        congestion.dedup();
        if !congestion.is_empty() {
            let setting = &comm.config().tcp_congestion;
            println!(
                "# tcp congestion control of rank 0's lanes: {} (ACCL_TCP_CONGESTION={setting})",
                congestion.join(", ")
            );
        }
        if let Some(l) = &lanes_info {
            print_lanes(l, n, lanes);
        }
        print_columns();
    }

    let mut bw_sum = 0.0;
    let mut bw_count = 0usize;
    let mut bad_steps = 0usize;
    let mut wrong_total = 0u64;
    for (&count, algo) in counts.iter().zip(&algos) {
        let args = call_args(count);
        let case = Case { coll, dtype, op: a.op, rank, nranks: n, count, root: a.root };
        let size = size_of(coll, count, elem, n);
        let mut results = [None; 2];
        for (slot, in_place) in [false, true].into_iter().enumerate() {
            let m = measure(&mut comm, a, &args, &case, in_place, size, &mut send, &mut recv).map_err(err)?;
            bw_sum += m.busbw;
            bw_count += 1;
            if let Some(w) = m.wrong {
                wrong_total += w;
                bad_steps += usize::from(w > 0);
            }
            results[slot] = Some(m);
        }
        let [Some(op), Some(ip)] = results else { unreachable!() };
        if !print {
            continue;
        }
        if a.json {
            let row = JsonRow {
                coll: coll.name(),
                size,
                count,
                dtype: dtype.name(),
                op: redop,
                root: root_col,
                nranks: n,
                transport,
                algo: algo.name(),
                lanes,
                time_us: op.time_us,
                algbw: op.algbw,
                busbw: op.busbw,
                wrong: op.wrong,
                in_place_time_us: ip.time_us,
                in_place_algbw: ip.algbw,
                in_place_busbw: ip.busbw,
                in_place_wrong: ip.wrong,
            };
            println!("{}", serde_json::to_string(&row).expect("serializable row"));
        } else {
            let mut line = format!("{:>12}  {:>12}  {:>8}  {:>6}  {:>6}", size, count, dtype.name(), redop, root_col);
            for m in [op, ip] {
                let wrong = m.wrong.map_or("N/A".to_string(), |w| w.to_string());
                line += &format!("  {:>7}  {:>6.2}  {:>6.2}  {:>5}", fmt_time(m.time_us), m.algbw, m.busbw, wrong);
            }
            println!("{line}");
        }
    }
    if print && !a.json {
        let avg = if bw_count > 0 { bw_sum / bw_count as f64 } else { 0.0 };
        println!("# Out of bounds values : {bad_steps} {}", if bad_steps > 0 { "FAILED" } else { "OK" });
        println!("# Avg bus bandwidth    : {}", fmt_g(avg));
        println!("#");
    }
    Ok(wrong_total == 0)
}

/// Times one size in one mode, then checks it.
#[allow(clippy::too_many_arguments)]
fn measure(
    comm: &mut Communicator,
    a: &Args,
    args: &CollArgs,
    case: &Case,
    in_place: bool,
    size: usize,
    send: &mut Buf,
    recv: &mut Buf,
) -> Result<Measure, Error> {
    let rank = comm.rank();
    let n = comm.nranks();
    let blk = args.count * args.dtype.size();
    let l = layout(args.coll, in_place, rank, blk, send, recv);
    let in_bytes = case.input_len() * args.dtype.size();
    let out_bytes = case.output_len() * args.dtype.size();
    // SAFETY: input/output regions lie inside the buffers, which are sized for the largest
    // count; nothing else touches them while these slices live.
    let fill = || unsafe {
        if out_bytes > 0 {
            poison(std::slice::from_raw_parts_mut(l.output as *mut u8, out_bytes));
        }
        case.fill_input(std::slice::from_raw_parts_mut(l.input, in_bytes));
    };
    // SAFETY: buffers sized by CollArgs::buffer_bytes for the largest count, laid out as
    // run_raw documents for in-place calls.
    let call = |comm: &mut Communicator| unsafe { comm.run_raw(args, l.send, l.recv) };

    // Filled even without checks: an input never written is the kernel's shared zero page, which
    // stays in cache and would make every read of it (the first sends above all) look faster
    // than reads of real data.
    fill();
    for _ in 0..a.warmup_iters {
        call(comm)?;
    }
    comm.barrier()?;
    let t = Instant::now();
    for _ in 0..a.iters {
        call(comm)?;
    }
    let mine = t.elapsed().as_secs_f64() / a.iters as f64;
    let mut time = [0.0f64];
    comm.all_reduce(&[mine], &mut time, ReduceOp::Max)?;
    let secs = time[0];
    let algbw = if secs > 0.0 { size as f64 / secs / 1e9 } else { 0.0 };
    let busbw = algbw * bus_factor(args.coll, n);

    let mut wrong = None;
    for _ in 0..a.check {
        fill();
        call(comm)?;
        // SAFETY: as in fill.
        let mine = case.check_output(unsafe { std::slice::from_raw_parts(l.output, out_bytes) });
        let mut total = [0u64];
        comm.all_reduce(&[mine], &mut total, ReduceOp::Sum)?;
        wrong = Some(total[0]);
        if total[0] > 0 {
            break;
        }
    }
    Ok(Measure { time_us: secs * 1e6, algbw, busbw, wrong })
}

/// Every rank's pid and host name.
fn gather_rank_info(comm: &mut Communicator) -> Result<Vec<(u32, String)>, Error> {
    const REC: usize = 64;
    let mut rec = [0u8; REC];
    rec[..4].copy_from_slice(&std::process::id().to_le_bytes());
    let host = hostname();
    let hb = host.as_bytes();
    let len = hb.len().min(REC - 4);
    rec[4..4 + len].copy_from_slice(&hb[..len]);
    let mut all = vec![0u8; REC * comm.nranks()];
    comm.all_gather(&rec, &mut all)?;
    Ok(all
        .chunks_exact(REC)
        .map(|r| {
            let pid = u32::from_le_bytes(r[..4].try_into().expect("4 bytes"));
            let name = r[4..].split(|b| *b == 0).next().unwrap_or(&[]);
            (pid, String::from_utf8_lossy(name).into_owned())
        })
        .collect())
}

/// Flow label and UDP source port of every (rank, peer, lane), two words each; u32::MAX where
/// there is no such lane or port.
fn gather_lanes(comm: &mut Communicator) -> Result<Vec<u32>, Error> {
    let n = comm.nranks();
    let lanes = comm.lanes();
    let mut mine = vec![u32::MAX; n * lanes * 2];
    for l in comm.lane_info() {
        if l.peer < n && l.lane < lanes {
            mine[(l.peer * lanes + l.lane) * 2] = l.flow_label;
            mine[(l.peer * lanes + l.lane) * 2 + 1] = l.udp_sport.map_or(u32::MAX, u32::from);
        }
    }
    let mut all = vec![0u32; n * n * lanes * 2];
    comm.all_gather(&mine, &mut all)?;
    Ok(all)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[allow(clippy::too_many_arguments)]
fn print_header(
    a: &Args,
    n: usize,
    transport: &str,
    lanes: usize,
    sizes: &[usize],
    algos: &[Algorithm],
    forced: bool,
    ranks: &[(u32, String)],
) {
    let last = algos.last().map_or("-", |a| a.name());
    println!(
        "# accl-perf: {}, {n} ranks, transport {transport}, lanes {lanes}, algorithm {last} ({})",
        a.coll.name(),
        if forced { "ACCL_ALGO" } else { "auto" }
    );
    // When the choice changes with the size, say which sizes used what.
    let mut groups: Vec<(Algorithm, usize, usize)> = Vec::new();
    for (&s, &al) in sizes.iter().zip(algos) {
        match groups.last_mut() {
            Some((g, _, hi)) if *g == al => *hi = s,
            _ => groups.push((al, s, s)),
        }
    }
    if groups.len() > 1 {
        let parts: Vec<String> = groups.iter().map(|(al, lo, hi)| format!("{} {lo}-{hi}", al.name())).collect();
        println!("# algorithm by size (B): {}", parts.join(", "));
    }
    println!(
        "# nThread 1 nGpus 1 minBytes {} maxBytes {} step: {}(factor) warmup iters: {} iters: {} agg iters: 1 validation: {} graph: 0",
        a.minbytes, a.maxbytes, a.stepfactor, a.warmup_iters, a.iters, a.check
    );
    println!("#");
    println!("# Using ranks");
    for (r, (pid, host)) in ranks.iter().enumerate() {
        println!("#  Rank {r:>2} Pid {pid:>6} on {host:>10}");
    }
}

fn print_lanes(all: &[u32], n: usize, lanes: usize) {
    println!("#");
    println!("# Lanes (rank -> peer, lane, flow label, UDP source port)");
    for r in 0..n {
        for p in 0..n {
            for l in 0..lanes {
                let at = ((r * n + p) * lanes + l) * 2;
                let (label, sport) = (all[at], all[at + 1]);
                if label != u32::MAX {
                    let sport = if sport == u32::MAX { "-".to_string() } else { sport.to_string() };
                    println!("#  Rank {r:>2} -> peer {p:>2} lane {l:>2} flow label {label:#07x} udp sport {sport}");
                }
            }
        }
    }
}

fn print_columns() {
    println!("#");
    let top = format!(
        "# {:>10}  {:>12}  {:>8}  {:>6}  {:>6}           out-of-place                       in-place",
        "", "", "", "", ""
    );
    println!("{top}");
    println!(
        "# {:>10}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6} {:>6}  {:>7}  {:>6}  {:>6} {:>6}",
        "size",
        "count",
        "type",
        "redop",
        "root",
        "time",
        "algbw",
        "busbw",
        "#wrong",
        "time",
        "algbw",
        "busbw",
        "#wrong"
    );
    let units = format!(
        "# {:>10}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>5}  {:>7}  {:>6}  {:>6}  {:>5}",
        "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", ""
    );
    println!("{}", units.trim_end());
}

/// nccl-tests' time column: 2 decimals below 100 us, 1 below 10 ms, none above.
fn fmt_time(us: f64) -> String {
    if us >= 10000.0 {
        format!("{us:7.0}")
    } else if us >= 100.0 {
        format!("{us:7.1}")
    } else {
        format!("{us:7.2}")
    }
}

/// C's `%g`: 6 significant digits, trailing zeros dropped, exponent form outside 1e-4..1e6.
fn fmt_g(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    if !x.is_finite() {
        return if x.is_nan() {
            "nan".into()
        } else if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let sci = format!("{x:.5e}");
    let (mant, exp) = sci.split_once('e').expect("exponent");
    let exp: i32 = exp.parse().expect("exponent digits");
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mant), exp.abs())
    } else {
        trim(&format!("{x:.*}", (5 - exp) as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g_format() {
        assert_eq!(fmt_g(0.812345678), "0.812346");
        assert_eq!(fmt_g(12.5), "12.5");
        assert_eq!(fmt_g(0.0), "0");
        assert_eq!(fmt_g(1234567.0), "1.23457e+06");
        assert_eq!(fmt_g(0.00001234), "1.234e-05");
        assert_eq!(fmt_g(100000.0), "100000");
    }

    #[test]
    fn size_steps() {
        assert_eq!(sizes(8, 64, 2), vec![8, 16, 32, 64]);
        assert_eq!(sizes(8, 100, 4), vec![8, 32]);
        assert_eq!(sizes(32, 32, 2), vec![32]);
        assert_eq!(sizes(0, 4, 2), vec![0, 1, 2, 4]);
        assert_eq!(sizes(8, 64, 1), vec![8]);
    }

    #[test]
    fn ranks_stripped() {
        let v = |s: &[&str]| s.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(strip_ranks(v(&["allreduce", "--ranks", "4", "-b", "8"]).into_iter()), v(&["allreduce", "-b", "8"]));
        assert_eq!(strip_ranks(v(&["--ranks=2", "broadcast"]).into_iter()), v(&["broadcast"]));
    }

    #[test]
    fn time_format() {
        assert_eq!(fmt_time(12.345), "  12.35");
        assert_eq!(fmt_time(1234.56), " 1234.6");
        assert_eq!(fmt_time(123456.7), " 123457");
    }
}
