//! End-to-end tests of the accl-run and accl-perf binaries (small sizes, 2-3 local ranks).

use std::process::{Command, Output};

const PERF: &str = env!("CARGO_BIN_EXE_accl-perf");
const RUN: &str = env!("CARGO_BIN_EXE_accl-run");

fn run(cmd: &str, args: &[&str]) -> Output {
    run_with_env(cmd, args, &[])
}

/// `run` with extra environment variables.
fn run_with_env(cmd: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(cmd)
        .args(args)
        .env_remove("ACCL_ROOT")
        .env_remove("ACCL_RANK")
        .env_remove("ACCL_NRANKS")
        .env("ACCL_TIMEOUT", "20")
        .envs(env.iter().copied())
        .output()
        .expect("binary runs")
}

/// accl-perf with `var=value` fails, and its error names the variable.
fn assert_setting_rejected(var: &str, value: &str) {
    let out = run_with_env(PERF, &["allreduce", "--ranks", "2", "-b", "8", "-e", "8"], &[(var, value)]);
    assert!(!out.status.success(), "{var}={value}\n{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains(var), "{var}={value}\n{}", text(&out));
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Data rows of the table (lines not starting with '#').
fn rows(out: &Output) -> Vec<Vec<String>> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn perf_ok(args: &[&str]) -> Output {
    let out = run(PERF, args);
    assert!(out.status.success(), "accl-perf {args:?}\n{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("# Out of bounds values : 0 OK"), "{}", text(&out));
    for row in rows(&out) {
        assert_eq!(row.len(), 13, "row {row:?}\n{}", text(&out));
        assert_eq!(row[8], "0", "out-of-place #wrong in {row:?}");
        assert_eq!(row[12], "0", "in-place #wrong in {row:?}");
    }
    out
}

const SMALL: [&str; 10] = ["-b", "8", "-e", "64K", "-f", "8", "-w", "1", "-n", "2"];

fn small_run(coll: &str, ranks: &str, extra: &[&str]) -> Output {
    let mut args = vec![coll, "--ranks", ranks];
    args.extend_from_slice(&SMALL);
    args.extend_from_slice(&["-c", "1"]);
    args.extend_from_slice(extra);
    perf_ok(&args)
}

#[test]
fn allreduce() {
    let out = small_run("allreduce", "2", &[]);
    let r = rows(&out);
    let sizes: Vec<&str> = r.iter().map(|row| row[0].as_str()).collect();
    assert_eq!(sizes, ["8", "64", "512", "4096", "32768"]);
    assert_eq!(r[0][1], "2"); // count
    assert_eq!(r[0][2], "float");
    assert_eq!(r[0][3], "sum");
    assert_eq!(r[0][4], "-1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("# accl-perf: allreduce, 2 ranks, transport tcp, lanes 1"));
}

#[test]
fn reduce() {
    let out = small_run("reduce", "3", &["-r", "2", "-o", "max", "-d", "int8"]);
    let r = rows(&out);
    assert_eq!(r[0][3], "max");
    assert_eq!(r[0][4], "2");
}

#[test]
fn broadcast() {
    let out = small_run("broadcast", "2", &["-r", "1", "-d", "half"]);
    let r = rows(&out);
    assert_eq!(r[0][3], "none");
    assert_eq!(r[0][4], "1");
}

#[test]
fn allgather() {
    let out = small_run("allgather", "2", &["-d", "bfloat16"]);
    // size is the gathered total, count the per-rank block: 64 B of bf16 over 2 ranks.
    let r = rows(&out);
    assert_eq!((r[1][0].as_str(), r[1][1].as_str()), ("64", "16"));
}

#[test]
fn reduce_scatter() {
    small_run("reduce_scatter", "3", &["-o", "avg", "-d", "half"]);
}

#[test]
fn alltoall() {
    small_run("all2all", "3", &["-d", "double"]);
}

#[test]
fn sendrecv() {
    small_run("sendrecv", "3", &["-d", "uint8"]);
}

#[test]
fn reductions_across_types() {
    for (d, o) in [("half", "prod"), ("bfloat16", "avg"), ("int32", "min"), ("double", "sum")] {
        perf_ok(&[
            "allreduce",
            "--ranks",
            "3",
            "-b",
            "1K",
            "-e",
            "1M",
            "-f",
            "32",
            "-w",
            "0",
            "-n",
            "1",
            "-d",
            d,
            "-o",
            o,
        ]);
    }
}

#[test]
fn json_rows_parse() {
    let mut args = vec!["reduce_scatter", "--ranks", "2", "--json"];
    args.extend_from_slice(&SMALL);
    let out = run(PERF, &args);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", text(&out));
    for (line, size) in lines.iter().zip([8u64, 64, 512, 4096, 32768]) {
        let v: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
        assert_eq!(v["coll"], "reduce_scatter");
        assert_eq!(v["size"], size);
        assert_eq!(v["count"], size / 4 / 2);
        assert_eq!(v["dtype"], "float");
        assert_eq!(v["op"], "sum");
        assert_eq!(v["nranks"], 2);
        assert_eq!(v["transport"], "tcp");
        assert_eq!(v["algo"], "ring");
        assert_eq!(v["lanes"], 1);
        assert_eq!(v["wrong"], 0);
        assert_eq!(v["in_place_wrong"], 0);
        for k in ["time_us", "algbw", "busbw", "in_place_time_us", "in_place_busbw"] {
            assert!(v[k].as_f64().is_some_and(|x| x >= 0.0), "{k} in {line}");
        }
    }
}

#[test]
fn perf_under_accl_run() {
    let out = run(
        RUN,
        &["-n", "3", "--", PERF, "broadcast", "-b", "1K", "-e", "64K", "-f", "8", "-r", "2", "-w", "1", "-n", "2"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("# accl-perf: broadcast, 3 ranks"), "{}", text(&out));
    assert_eq!(rows(&out).len(), 3);
}

#[test]
fn single_rank_without_launcher() {
    let mut args = vec!["allgather"];
    args.extend_from_slice(&SMALL);
    let out = perf_ok(&args);
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 ranks"));
}

#[test]
fn bad_arguments_are_rejected() {
    for args in [
        &["allfoo"][..],
        &["allreduce", "-d", "complex"],
        &["allreduce", "-o", "xor"],
        &["allreduce", "-b", "1M", "-e", "1K"],
    ] {
        let out = run(PERF, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}\n{}", text(&out));
    }
}

/// A checked 3-rank allreduce (8 B to `max`, four sizes) with `var=value` and `ACCL_DEBUG=1`:
/// asserts that it succeeds with no wrong element in either mode, and returns its stderr (the
/// init lines).
fn checked_allreduce_with(var: &str, value: &str, max: &str) -> String {
    let out = run_with_env(
        PERF,
        &["allreduce", "--ranks", "3", "-b", "8", "-e", max, "-f", "32", "-w", "1", "-n", "2", "-c", "1"],
        &[(var, value), ("ACCL_DEBUG", "1")],
    );
    assert!(out.status.success(), "{var}={value}\n{}", text(&out));
    let rows = rows(&out);
    assert_eq!(rows.len(), 4, "{}", text(&out));
    assert!(rows.iter().all(|r| r[8] == "0" && r[12] == "0"), "{}", text(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn stream_min_setting() {
    // A bad value is an error naming the variable; auto and sizes are accepted and reported.
    assert_setting_rejected("ACCL_STREAM_MIN", "lots");
    for (value, want) in [("auto", None), ("64K", Some("stream_min=65536 ")), ("0", Some("stream_min=0 "))] {
        let stderr = checked_allreduce_with("ACCL_STREAM_MIN", value, "256K");
        assert!(stderr.contains("stream_min="), "{stderr}");
        if let Some(want) = want {
            assert!(stderr.contains(want), "ACCL_STREAM_MIN={value}\n{stderr}");
        }
    }
}

#[test]
fn yield_setting() {
    // A bad value is an error naming the variable. `auto` yields when the ranks outnumber the
    // cores; 0 and 1 force it. Results are checked either way.
    assert_setting_rejected("ACCL_YIELD", "sometimes");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (value, want) in [("auto", 3 > cores), ("0", false), ("1", true)] {
        let stderr = checked_allreduce_with("ACCL_YIELD", value, "4M");
        assert!(stderr.contains(&format!(" yield={} ", u8::from(want))), "ACCL_YIELD={value}\n{stderr}");
    }
}

#[test]
fn tcp_congestion_setting() {
    // A malformed name is an error naming the variable; a valid one shows in the header.
    assert_setting_rejected("ACCL_TCP_CONGESTION", "not a name");
    let out = run_with_env(
        PERF,
        &["allreduce", "--ranks", "2", "-b", "64K", "-e", "64K", "-w", "1", "-n", "2"],
        &[("ACCL_TRANSPORT", "tcp"), ("ACCL_TCP_CONGESTION", "reno")],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("# tcp congestion control of rank 0's lanes: reno (ACCL_TCP_CONGESTION=reno)"),
        "{}",
        text(&out)
    );
}

#[test]
fn bad_root_is_reported() {
    let out = run(PERF, &["broadcast", "--ranks", "2", "-r", "5", "-b", "8", "-e", "8"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("accl-perf: rank 0: invalid root rank 5"), "{}", text(&out));
}

#[test]
fn run_sets_environment() {
    let out = run(
        RUN,
        &[
            "-n",
            "3",
            "/bin/sh",
            "-c",
            "test \"$ACCL_NRANKS\" = 3 && test \"$ACCL_LOCAL_NRANKS\" = 3 && \
             test \"$ACCL_LOCAL_RANK\" = \"$ACCL_RANK\" && test \"$ACCL_RANK\" -lt 3 && \
             case \"$ACCL_ROOT\" in *:*) ;; *) exit 9;; esac",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn run_reports_failed_rank() {
    let out = run(RUN, &["-n", "3", "--", "/bin/sh", "-c", "[ \"$ACCL_RANK\" = 1 ] && exit 5; exit 0"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("accl-run: rank 1 exited with status 5"), "{}", text(&out));
    assert!(!stderr.contains("rank 0"), "{}", text(&out));
}

#[test]
fn run_reports_signals() {
    let out = run(RUN, &["-n", "2", "--", "/bin/sh", "-c", "[ \"$ACCL_RANK\" = 0 ] && kill -TERM $$; exit 0"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("accl-run: rank 0 killed by signal 15"), "{}", text(&out));
}

#[test]
fn run_missing_program() {
    let out = run(RUN, &["-n", "2", "/nonexistent/accl-program"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out));
}
