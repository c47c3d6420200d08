//! Local launcher: starts N ranks of a program on this host, like `mpirun` or `torchrun`.
//!
//! Every rank gets `ACCL_RANK`, `ACCL_NRANKS`, `ACCL_ROOT` (`[::1]:PORT`, a free port, unless
//! `ACCL_ROOT` is already set), `ACCL_LOCAL_RANK` and `ACCL_LOCAL_NRANKS`, which is all
//! [`accl_core::Communicator::from_env`] needs.
//!
//! When a rank fails (non-zero exit or a signal), the others normally fail too within
//! `ACCL_TIMEOUT` (their peers tell them, or their waits time out); the launcher waits that long
//! plus [`GRACE`], then kills whatever is left with SIGKILL. SIGINT and SIGTERM received by the
//! launcher are forwarded to every rank; a second one kills them.

use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Extra time, beyond `ACCL_TIMEOUT`, that the launcher gives the surviving ranks after one
/// failed.
pub const GRACE: Duration = Duration::from_secs(10);

/// How often the launcher looks at its children.
const POLL: Duration = Duration::from_millis(10);

/// How one rank ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exited with this status.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl Outcome {
    fn from_status(status: ExitStatus) -> Outcome {
        match (status.code(), status.signal()) {
            (Some(code), _) => Outcome::Exited(code),
            (None, Some(sig)) => Outcome::Signaled(sig),
            // Neither: cannot happen on Unix for a terminated child; call it a failure.
            (None, None) => Outcome::Exited(1),
        }
    }

    /// Exit status 0.
    pub fn success(self) -> bool {
        self == Outcome::Exited(0)
    }

    /// The shell's convention: the exit status, or 128 + signal.
    pub fn code(self) -> i32 {
        match self {
            Outcome::Exited(code) => code,
            Outcome::Signaled(sig) => 128 + sig,
        }
    }
}

/// What a launch ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Outcome of each rank, by rank.
    pub outcomes: Vec<Outcome>,
    /// The first rank seen failing (in time), if any.
    pub first_failure: Option<usize>,
    /// Ranks the launcher killed because they outlived a failure by more than the timeout.
    pub killed: Vec<usize>,
}

impl Report {
    /// 0 when every rank succeeded, else the code of the first rank that failed.
    pub fn code(&self) -> i32 {
        self.first_failure.map_or(0, |r| self.outcomes[r].code().max(1))
    }
}

/// A rendezvous address on loopback with a port that was free a moment ago: `[::1]:PORT`, or
/// `127.0.0.1:PORT` where IPv6 is disabled.
pub fn free_root() -> io::Result<String> {
    match TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) {
        Ok(l) => Ok(format!("[::1]:{}", l.local_addr()?.port())),
        Err(_) => {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            Ok(format!("127.0.0.1:{}", l.local_addr()?.port()))
        }
    }
}

/// How long the launcher waits for the other ranks after one failed: `ACCL_TIMEOUT` (default
/// 60 s) plus [`GRACE`].
pub fn failure_wait() -> Duration {
    let secs = accl_core::config::env_var("ACCL_TIMEOUT")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0 && s.is_finite())
        .unwrap_or(60.0);
    Duration::from_secs_f64(secs) + GRACE
}

/// Starts `n` ranks of `program args…` and waits for them; returns 0 when all succeeded, else
/// the exit code of the first rank that failed (128 + signal when killed by one).
///
/// Prints one line per failed rank to stderr (`accl-run: rank R exited with status S`,
/// `accl-run: rank R killed by signal N`). Fails only when a rank cannot be started (the ranks
/// already started are killed then).
pub fn launch(n: usize, program: &Path, args: &[OsString], extra_env: &[(String, String)]) -> io::Result<i32> {
    launch_report(n, program, args, extra_env).map(|r| r.code())
}

/// [`launch`], returning every rank's outcome.
pub fn launch_report(
    n: usize,
    program: &Path,
    args: &[OsString],
    extra_env: &[(String, String)],
) -> io::Result<Report> {
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the number of ranks must be at least 1"));
    }
    let _signals = SignalGuard::install();
    let children = spawn_all(n, program, args, extra_env)?;
    Ok(wait_all(children, failure_wait()))
}

fn spawn_all(
    n: usize,
    program: &Path,
    args: &[OsString],
    extra_env: &[(String, String)],
) -> io::Result<Vec<Option<Child>>> {
    let root = match accl_core::config::env_var("ACCL_ROOT") {
        Some(root) => root,
        None => free_root()?,
    };
    let mut children: Vec<Option<Child>> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("ACCL_RANK", rank.to_string())
            .env("ACCL_NRANKS", n.to_string())
            .env("ACCL_ROOT", &root)
            .env("ACCL_LOCAL_RANK", rank.to_string())
            .env("ACCL_LOCAL_NRANKS", n.to_string());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        match cmd.spawn() {
            Ok(child) => children.push(Some(child)),
            Err(e) => {
                for child in children.iter_mut().flatten() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(io::Error::new(e.kind(), format!("cannot start rank {rank} ({}): {e}", program.display())));
            }
        }
    }
    Ok(children)
}

fn wait_all(mut children: Vec<Option<Child>>, wait: Duration) -> Report {
    let n = children.len();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    let mut first_failure: Option<(usize, Instant)> = None;
    let mut killed = Vec::new();
    let mut signals = 0;
    loop {
        let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            signals += 1;
            let forward = if signals > 1 { libc::SIGKILL } else { sig };
            for child in children.iter().flatten() {
                // SAFETY: kill(2) on a child we have not reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, forward) };
            }
        }
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            let status = match child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                // Cannot ask: treat it as gone wrong and stop tracking it.
                Err(_) => {
                    let _ = child.kill();
                    child.wait().unwrap_or(ExitStatus::from_raw(libc::SIGKILL))
                }
            };
            let outcome = Outcome::from_status(status);
            outcomes[rank] = Some(outcome);
            *slot = None;
            if !outcome.success() {
                print_failure(rank, outcome, None);
                if first_failure.is_none() {
                    first_failure = Some((rank, Instant::now()));
                }
            }
        }
        if children.iter().all(Option::is_none) {
            break;
        }
        if let Some((failed, since)) = first_failure {
            if since.elapsed() >= wait {
                for (rank, slot) in children.iter_mut().enumerate() {
                    let Some(child) = slot.take() else { continue };
                    let mut child = child;
                    let _ = child.kill();
                    let status = child.wait().unwrap_or(ExitStatus::from_raw(libc::SIGKILL));
                    let outcome = Outcome::from_status(status);
                    outcomes[rank] = Some(outcome);
                    killed.push(rank);
                    print_failure(rank, outcome, Some((failed, wait)));
                }
                break;
            }
        }
        std::thread::sleep(POLL);
    }
    Report {
        outcomes: outcomes.into_iter().map(|o| o.expect("every rank reaped")).collect(),
        first_failure: first_failure.map(|(r, _)| r),
        killed,
    }
}

fn print_failure(rank: usize, outcome: Outcome, killed_after: Option<(usize, Duration)>) {
    let what = match outcome {
        Outcome::Exited(code) => format!("exited with status {code}"),
        Outcome::Signaled(sig) => format!("killed by signal {sig}"),
    };
    match killed_after {
        None => eprintln!("accl-run: rank {rank} {what}"),
        Some((failed, wait)) => eprintln!(
            "accl-run: rank {rank} {what} (still running {:.0} s after rank {failed} failed)",
            wait.as_secs_f64()
        ),
    }
}

static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM while ranks run (to forward them); restores the old handlers on
/// drop.
struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    fn install() -> SignalGuard {
        let mut old = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
            // async-signal-safe.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut sa.sa_mask);
                sa.sa_flags = libc::SA_RESTART;
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &sa, &mut prev) == 0 {
                    old.push((sig, prev));
                }
            }
        }
        SignalGuard { old }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores the action saved by install().
            unsafe { libc::sigaction(*sig, prev, std::ptr::null_mut()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;

    fn sh(script: &str) -> (PathBuf, Vec<OsString>) {
        (PathBuf::from("/bin/sh"), vec!["-c".into(), script.into()])
    }

    #[test]
    fn all_succeed() {
        let (p, a) = sh("test \"$ACCL_NRANKS\" = 3 && test \"$ACCL_LOCAL_RANK\" = \"$ACCL_RANK\" && test -n \"$ACCL_ROOT\" && test \"$X\" = y");
        let r = launch_report(3, &p, &a, &[("X".into(), "y".into())]).unwrap();
        assert_eq!(r.outcomes, vec![Outcome::Exited(0); 3]);
        assert_eq!(r.code(), 0);
    }

    #[test]
    fn failure_code_is_the_failing_rank() {
        let (p, a) = sh("if [ \"$ACCL_RANK\" = 1 ]; then exit 7; fi; exit 0");
        let r = launch_report(3, &p, &a, &[]).unwrap();
        assert_eq!(r.first_failure, Some(1));
        assert_eq!(r.code(), 7);
        let (p, a) = sh("if [ \"$ACCL_RANK\" = 0 ]; then kill -9 $$; fi; exit 0");
        assert_eq!(launch(2, &p, &a, &[]).unwrap(), 128 + 9);
    }

    #[test]
    fn stragglers_are_killed() {
        let (p, a) = sh("if [ \"$ACCL_RANK\" = 0 ]; then exit 3; fi; exec sleep 30");
        let t = Instant::now();
        let children = spawn_all(3, &p, &a, &[]).unwrap();
        let r = wait_all(children, Duration::from_millis(300));
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(r.code(), 3);
        assert_eq!(r.killed, vec![1, 2]);
        assert_eq!(r.outcomes[1], Outcome::Signaled(libc::SIGKILL));
    }

    #[test]
    fn missing_program_is_an_error() {
        assert!(launch(2, Path::new("/nonexistent/accl-prog"), &[], &[]).is_err());
    }
}
