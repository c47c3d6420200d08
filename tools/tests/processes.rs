//! Ranks as processes: `accl-run` starts `accl-check` over TCP on [::1], for the whole
//! collective suite and for failure scenarios (a rank killed with SIGKILL, a rank that never
//! starts, a mismatched call).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const TIMEOUT_S: &str = "3";

fn accl_run(n: usize, check_args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_accl-run"));
    cmd.arg("-n").arg(n.to_string()).arg("--").arg(env!("CARGO_BIN_EXE_accl-check")).args(check_args);
    cmd.env_remove("ACCL_ROOT").env("ACCL_TIMEOUT", TIMEOUT_S);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let out = cmd.output().expect("run accl-run");
    (out, t0.elapsed())
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

fn report(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The suite as separate processes: small chunks and segments and 3 lanes so that modest
/// sizes cross every boundary, and streaming-store reductions from 32 KiB.
fn suite(n: usize) {
    let env = [
        ("ACCL_LANES", "3"),
        ("ACCL_CHUNK_SIZE", "16K"),
        ("ACCL_SEGMENT_SIZE", "8K"),
        ("ACCL_STREAM_MIN", "32K"),
        ("ACCL_TIMEOUT", "30"),
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_accl-run"));
    cmd.arg("-n").arg(n.to_string()).arg("--").arg(env!("CARGO_BIN_EXE_accl-check")).env_remove("ACCL_ROOT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run accl-run");
    assert!(out.status.success(), "{}", report(&out));
    let passed = lines(&out).iter().filter(|l| l.contains(": PASS ")).count();
    assert_eq!(passed, n, "{}", report(&out));
}

#[test]
fn suite_2_processes() {
    suite(2);
}

#[test]
fn suite_3_processes() {
    suite(3);
}

#[test]
fn suite_4_processes() {
    suite(4);
}

#[test]
fn killed_rank_is_named_by_every_survivor() {
    let (out, elapsed) = accl_run(4, &["--die", "2"], &[]);
    let survivors: Vec<_> = lines(&out).into_iter().filter(|l| l.contains("expected error")).collect();
    assert_eq!(survivors.len(), 3, "{}", report(&out));
    for l in &survivors {
        assert!(l.contains("naming rank 2"), "{l}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("rank 2"), "accl-run must report the killed rank");
    assert!(!out.status.success());
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
}

/// Runs 3 ranks of `accl-check` with `args` (rank 1 absent): both others must fail naming it.
fn absent_rank_1_is_named_by_both_others(args: &[&str]) {
    let (out, _) = accl_run(3, args, &[]);
    assert!(out.status.success(), "{}", report(&out));
    let named: Vec<_> =
        lines(&out).into_iter().filter(|l| l.contains("expected error") && l.contains("naming rank 1")).collect();
    assert_eq!(named.len(), 2, "{}", report(&out));
}

#[test]
fn rank_that_never_starts_is_named_at_rendezvous() {
    absent_rank_1_is_named_by_both_others(&["--absent", "1"]);
}

/// Rank 2 starts after the rendezvous timed out: the root, kept up for a grace period by
/// rank 0, still tells it that rank 1 never arrived.
#[test]
fn rank_that_arrives_after_the_timeout_is_told_who_never_came() {
    absent_rank_1_is_named_by_both_others(&["--absent", "1", "--late", "2"]);
}

#[test]
fn mismatched_call_fails_everywhere() {
    let (out, _) = accl_run(3, &["--mismatch"], &[]);
    assert!(out.status.success(), "{}", report(&out));
    assert_eq!(lines(&out).iter().filter(|l| l.contains("expected error")).count(), 3, "{}", report(&out));
}
