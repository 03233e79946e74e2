//! Multi-process runs: `troupe launch` (environment, output prefixes, teardown on failure with no
//! orphans, a real TCP world across processes) and a real Open MPI `mpirun` when installed.

use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_troupe");

#[path = "common/scratch.rs"]
mod scratch_dir;
use scratch_dir::Scratch;

fn scratch(name: &str) -> Scratch {
    Scratch::new(name)
}

/// True when `pid` no longer runs (gone, or a zombie nobody has reaped yet).
fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn launch_sets_torchrun_env_and_prefixes_lines() {
    let out = Command::new(BIN)
        .args(["launch", "--nproc-per-node", "3", "--master-port", "0", "--", "sh", "-c"])
        .arg("echo env $RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR $TORCHELASTIC_USE_AGENT_STORE ${local_rank}")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for r in 0..3 {
        let want = format!("[rank {r}] env {r} {r} 3 3 127.0.0.1 True {r}");
        assert!(text.lines().any(|l| l == want), "missing {want:?} in:\n{text}");
    }
}

/// A first failure that is only a consequence (exit code 4: a peer was lost) while a rank is
/// still running names that rank as the likely culprit; a failure of its own names no one else.
#[test]
fn a_consequence_names_the_ranks_still_running() {
    let run = |script: &str| {
        let out = Command::new(BIN)
            .args([
                "launch",
                "--nproc-per-node",
                "3",
                "--master-port",
                "0",
                "--grace",
                "1",
                "sh",
                "-c",
                script,
            ])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) =
        run("if [ $RANK = 0 ]; then sleep 0.2; exit 4; elif [ $RANK = 2 ]; then exec sleep 30; fi");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("rank 0 failed first (exit code 4) because a peer did; still running then, so likely hung or stopped: rank 2"), "{err}");
    let (_, err) =
        run("if [ $RANK = 0 ]; then sleep 0.2; exit 1; elif [ $RANK = 2 ]; then exec sleep 30; fi");
    assert!(err.contains("rank 0 failed first (exit code 1)") && !err.contains("still running"), "{err}");
}

/// torchrun's spellings work: `--standalone`, underscores (`--nproc_per_node=2`), the program
/// without `--`, `--rdzv-endpoint HOST:PORT` as node 0's store, and Slurm's node index; several
/// nodes without a node index, and a rendezvous backend other than c10d, are usage errors.
#[test]
fn launch_takes_torchrun_spellings() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(BIN);
        c.arg("launch").args(args).env_remove("SLURM_NODEID");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let show = "echo env $RANK $WORLD_SIZE $GROUP_RANK $MASTER_ADDR:$MASTER_PORT";
    let out = run(&["--standalone", "--nproc_per_node=2", "sh", "-c", show], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let port =
        text.lines().next().and_then(|l| l.rsplit_once(':')).map(|(_, p)| p.to_string()).unwrap_or_default();
    assert!(port != "29500" && port.parse::<u16>().is_ok(), "--standalone picks a free port: {text}");
    for r in 0..2 {
        let want = format!("[rank {r}] env {r} 2 0 127.0.0.1:{port}");
        assert!(text.lines().any(|l| l == want), "missing {want:?} in:\n{text}");
    }
    let port = free_port().to_string();
    let endpoint = format!("127.0.0.1:{port}");
    let out = run(
        &["--rdzv-backend=c10d", "--rdzv-id", "7", "--rdzv-endpoint", &endpoint, "--", "sh", "-c", show],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("[rank 0] env 0 1 0 {endpoint}")), "{text}");
    // Node 1 of two under Slurm: its ranks follow node 0's (node 0's store is not needed by `sh`).
    let out = run(&["--nnodes", "2", "--nproc-per-node", "2", "sh", "-c", show], &[("SLURM_NODEID", "1")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[rank 2] env 2 4 1 ") && text.contains("[rank 3] env 3 4 1 "), "{text}");
    for (args, says) in [
        (&["--nnodes", "2", "sh", "-c", "true"][..], "give this node's --node-rank"),
        (&["--rdzv-backend", "etcd", "sh", "-c", "true"][..], "--rdzv-backend etcd"),
        (&["--standalone", "--nnodes", "2", "sh", "-c", "true"][..], "--standalone is one node"),
    ] {
        let out = run(args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// A troupe subcommand as the program runs this troupe binary with it, as does `troupe` when
/// none is on PATH; a program that is neither
/// a path, on PATH, nor a subcommand is a usage error before any rank starts.
#[test]
fn launch_runs_troupe_subcommands_and_refuses_unknown_programs() {
    let out = Command::new(BIN)
        .args(["launch", "--nproc-per-node", "2", "--master-port", "0", "--"])
        .args(["config", "show", "--num-layers", "1${local_rank}"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for r in 0..2 {
        let want = format!("[rank {r}] num_layers = 1{r}");
        assert!(text.lines().any(|l| l == want), "missing {want:?} in:\n{text}");
    }
    // `troupe` itself, when no troupe is on PATH, is this binary too.
    let out = Command::new(BIN)
        .args(["launch", "--master-port", "0", "--", "troupe", "config", "show", "--seed", "9"])
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("[rank 0] seed = 9"), "{text}");
    let out =
        Command::new(BIN).args(["launch", "--master-port", "0", "--", "trian", "--x"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`trian` is neither a path, nor a program on PATH, nor a troupe subcommand"),
        "{err}"
    );
    assert!(!err.contains("[rank 0]"), "a rank started:\n{err}");
}

#[test]
fn failing_rank_stops_the_others_and_leaves_no_orphans() {
    let dir = scratch("orphans");
    let script = format!(
        "if [ $RANK != 1 ]; then trap '' TERM; fi; sleep 60 & echo $! > {d}/child.$RANK; \
         echo $$ > {d}/rank.$RANK; if [ $RANK = 1 ]; then sleep 0.3; exit 3; fi; wait",
        d = dir.display()
    );
    let t = Instant::now();
    let out = Command::new(BIN)
        .args([
            "launch",
            "--nproc-per-node",
            "3",
            "--master-port",
            "0",
            "--grace",
            "1",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("rank 1 failed first (exit code 3)"), "{err}");
    // Ranks 0 and 2 ignore SIGTERM, so this also proves the SIGKILL escalation is bounded.
    assert!(took < Duration::from_secs(10), "teardown took {took:?}");
    assert!(took >= Duration::from_secs(1), "the grace period before SIGKILL was skipped");
    let mut pids = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let pid: i32 = std::fs::read_to_string(e.unwrap().path()).unwrap().trim().parse().unwrap();
        pids += 1;
        // Killed processes are reaped asynchronously by init: poll with a deadline.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_dead(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(is_dead(pid), "process {pid} outlived troupe launch");
    }
    assert_eq!(pids, 6, "every rank and grandchild wrote its pid");
}

#[test]
fn tcp_world_across_processes_under_troupe_launch() {
    for op in ["all_reduce", "reduce_scatter", "all_gather", "p2p"] {
        let out = Command::new(BIN)
            .args(["launch", "--nproc-per-node", "3", "--master-port", "0", "--", BIN])
            .args([
                "bench",
                "comm",
                "--backend",
                "tcp",
                "--op",
                op,
                "--size",
                "4004",
                "100000",
                "--iters",
                "1",
                "--check",
                "--timeout",
                "10",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{op}: {}\n{text}", String::from_utf8_lossy(&out.stderr));
        assert!(
            text.contains("[rank 0] # troupe bench comm: backend tcp") && text.contains("3 ranks"),
            "{text}"
        );
    }
}

/// Ranks of `troupe bench comm` started with different sizes, operations or counts stop at once
/// with a usage error naming the difference (without the agreement they fail on a malformed
/// message, or wait out the timeout when one rank times more iterations).
#[test]
fn bench_comm_ranks_with_different_arguments_stop_naming_the_difference() {
    let cases = [
        ("--size 4096", "--size 8192", "--size: [8192] on rank 1, [4096] on rank 0"),
        ("--iters 1", "--iters 3", "--iters: 3 on rank 1, 1 on rank 0"),
        ("--op all_reduce", "--op all-gather", "--op: all_gather on rank 1, all_reduce on rank 0"),
    ];
    for (common, other, want) in cases {
        let script = format!(
            "if [ \"$RANK\" = 1 ]; then x='{other}'; else x='{common}'; fi; \
             exec '{BIN}' bench comm --backend tcp --timeout 30 $x"
        );
        let out = Command::new(BIN)
            .args(["launch", "--nproc-per-node", "2", "--master-port", "0", "--", "sh", "-c", &script])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{other}: not a usage error:\n{err}");
        assert!(err.contains("the ranks run with different settings") && err.contains(want), "{err}");
    }
}

#[test]
fn tcp_world_under_mpirun() {
    let found =
        Command::new("sh").args(["-c", "command -v mpirun"]).output().is_ok_and(|o| o.status.success());
    if !found {
        println!("SKIPPED tcp_world_under_mpirun: mpirun not found (apt-get install openmpi-bin)");
        return;
    }
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "3", BIN])
        .args([
            "bench",
            "comm",
            "--backend",
            "tcp",
            "--op",
            "all_reduce",
            "--size",
            "4004",
            "--iters",
            "1",
            "--check",
            "--timeout",
            "20",
        ])
        // A fixed port could collide with a parallel test: let the environment pick one.
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{text}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("backend tcp") && text.contains("3 ranks"), "{text}");
}

/// Under a real `torchrun --no-python` (PyTorch's elastic agent hosts the c10d store; our client
/// must speak its wire protocol). Skipped with a message where torchrun is not installed (CI).
#[test]
fn tcp_world_under_torchrun() {
    let found =
        Command::new("sh").args(["-c", "command -v torchrun"]).output().is_ok_and(|o| o.status.success());
    if !found {
        println!("SKIPPED tcp_world_under_torchrun: torchrun not found (pip install torch)");
        return;
    }
    let port = free_port().to_string();
    let out = Command::new("torchrun")
        .args(["--nproc-per-node", "2", "--master-port", &port, "--no-python", BIN])
        .args(["bench", "comm", "--backend", "tcp", "--op", "all_reduce", "--size", "4004", "--iters", "1"])
        .args(["--check", "--timeout", "30"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{text}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("backend tcp") && text.contains("2 ranks"), "{text}");
}

#[test]
fn bench_comm_sizes_that_are_not_byte_counts_are_usage_errors() {
    let fp32 = "must be a positive multiple of 4 bytes";
    for (size, says) in
        [("12Q", "is not a byte count"), ("99999999999999G", "is too large"), ("0", fp32), ("6", fp32)]
    {
        let out = Command::new(BIN).args(["bench", "comm", "--size", size, "--iters", "1"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--size {size}: {err}");
        assert!(err.contains(says), "--size {size}: {err}");
    }
    for (flag, says) in
        [("--iters", "at least 1"), ("--timeout", "at least 1 second"), ("--segment", "positive")]
    {
        let out = Command::new(BIN).args(["bench", "comm", flag, "0"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} 0: {err}");
        assert!(err.contains(says), "{flag} 0: {err}");
    }
    // One rank, one iteration: the header counts them as such.
    let out = Command::new(BIN)
        .args(["bench", "comm", "--nproc", "1", "--iters", "1", "--size", "4K"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("op all_reduce, 1 rank, best of 1 iteration\n"), "{text}");
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Launched ranks on one machine share its memory: each adds up what the node's ranks will hold
/// and a world that cannot fit stops as a usage error before allocating, saying so.
#[test]
fn launched_ranks_too_large_for_the_machine_together_are_refused() {
    let dir = scratch("huge-launch");
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["launch", "--nproc-per-node", "2", "--master-port", "0", "--", BIN, "train"])
        .args(["--hidden-size", "65536", "--num-attention-heads", "64", "--num-layers", "64"])
        .args(["--pipeline-model-parallel-size", "2", "--global-batch-size", "32", "--train-iters", "1"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "not a usage error:\n{err}");
    assert!(err.contains("the 2 ranks on this machine need about"), "{err}");
    assert!(err.contains("--skip-memory-check") && !err.contains("memory allocation of"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}
