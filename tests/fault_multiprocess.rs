//! Faults in real processes: `troupe launch --max-restarts` restarts every rank from the latest
//! checkpoint after a rank exits or dies in the middle of a checkpoint write, and the resumed
//! curve is bit for bit the uninterrupted one; when restarts run out the launcher exits with code
//! 3 and the root causes; under `mpirun` a failing rank makes the job exit non-zero naming it.
//! No process outlives its launcher.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use troupe::config::Config;
use troupe::runtime::{RunOptions, train_inproc};

const BIN: &str = env!("CARGO_BIN_EXE_troupe");

fn config(dir: &Path) -> (PathBuf, String) {
    let ckpt = dir.join("ckpt").display().to_string();
    let text = format!(
        r#"
[model]
vocab_size = 4096
seq_length = 32
num_layers = 4
hidden_size = 32
num_attention_heads = 4

[train]
micro_batch_size = 2
global_batch_size = 8
train_iters = 4
lr = 1e-3
seed = 9

[parallel]
pipeline_model_parallel_size = 2

[logging]
log_interval = 1
eval_interval = 0

[checkpoint]
save = "{ckpt}"
load = "{ckpt}"
allow_fresh_start = true
save_interval = 2
"#
    );
    let p = dir.join("cfg.toml");
    std::fs::write(&p, &text).unwrap();
    (p, text)
}

#[path = "common/scratch.rs"]
mod scratch_dir;
use scratch_dir::Scratch;

fn scratch(name: &str) -> Scratch {
    Scratch::new(&format!("fmp-{name}"))
}

/// Per-step losses of the uninterrupted in-process run.
fn reference(text: &str) -> Vec<f32> {
    let mut cfg = Config::from_toml_str(text, "test", &[]).unwrap();
    cfg.checkpoint.save.clear();
    cfg.checkpoint.load.clear();
    let data = troupe::train::corpus::open(&cfg).unwrap();
    let r = train_inproc(&cfg, Arc::from(data.train), RunOptions::default(), 2, None, None).unwrap();
    r[0].records.iter().map(|x| x.loss).collect()
}

fn json_losses(path: &Path) -> Vec<(u64, f32)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()? as f32)))
        .collect()
}

/// The steps logged in `log` (by the restarted attempt) are `steps`, with the uninterrupted
/// run's losses bit for bit.
fn assert_continues(log: &Path, text: &str, steps: &[u64], err: &str) {
    let want = reference(text);
    let got = json_losses(log);
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), steps, "{err}");
    for (step, loss) in got {
        assert_eq!(loss.to_bits(), want[step as usize - 1].to_bits(), "step {step}");
    }
}

/// No process still runs with this test's config path on its command line.
fn no_orphans(cfg: &Path) {
    let out = Command::new("pgrep").args(["-f", &cfg.display().to_string()]).output();
    if let Ok(out) = out {
        let pids = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(pids.is_empty(), "processes left behind: {pids}");
    }
}

fn launch(cfg: &Path, log: &Path, restarts: u32, faults: &[&str]) -> std::process::Output {
    launch_with(cfg, log, restarts, faults, &[])
}

/// [`launch`] with `extra` arguments for `troupe train`.
fn launch_with(
    cfg: &Path,
    log: &Path,
    restarts: u32,
    faults: &[&str],
    extra: &[&str],
) -> std::process::Output {
    launcher(&["--nproc-per-node", "2", "--master-port", "0"], cfg, log, restarts, faults, extra)
        .output()
        .unwrap()
}

/// `troupe launch NODE… --grace 1 --max-restarts R -- troupe train …` with the faults and `extra`
/// arguments; `node` says which ranks this launcher starts and where the store is.
fn launcher(
    node: &[&str],
    cfg: &Path,
    log: &Path,
    restarts: u32,
    faults: &[&str],
    extra: &[&str],
) -> Command {
    let mut c = Command::new(BIN);
    c.arg("launch")
        .args(node)
        .args(["--grace", "1", "--max-restarts", &restarts.to_string(), "--"])
        .arg(BIN)
        .args(["train", "--no-progress", "--comm-timeout", "20", "--config"])
        .arg(cfg)
        .arg("--log-json")
        .arg(log)
        .args(extra);
    for f in faults {
        c.args(["--inject", f]);
    }
    c
}

#[test]
fn a_rank_that_exits_is_restarted_and_the_curve_continues_bit_for_bit() {
    let dir = scratch("exit");
    let (cfg, text) = config(&dir);
    let log = dir.join("log.jsonl");
    let out = launch(&cfg, &log, 1, &["exit:rank=1,step=3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("attempt 0: rank 1 failed first (exit code 43)"), "{err}");
    assert_continues(&log, &text, &[3, 4], &err);
    no_orphans(&cfg);
}

#[test]
fn a_checkpoint_killed_mid_write_leaves_the_previous_one_and_the_run_recovers() {
    let dir = scratch("ckpt");
    let (cfg, text) = config(&dir);
    let log = dir.join("log.jsonl");
    let out = launch(&cfg, &log, 1, &["ckpt-kill:rank=0,step=4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("exit code 44") && err.contains("resumed at step 2"), "{err}");
    assert_continues(&log, &text, &[3, 4], &err);
    no_orphans(&cfg);
}

#[test]
fn the_launcher_gives_up_after_its_restarts_with_exit_code_3() {
    let dir = scratch("giveup");
    let (cfg, _) = config(&dir);
    let log = dir.join("log.jsonl");
    let out = launch(&cfg, &log, 1, &["exit:rank=1,step=3", "exit:rank=0,step=3,attempt=1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("gave up after 1 restarts") && err.contains("attempt 1: rank 0 failed first"),
        "{err}"
    );
    no_orphans(&cfg);
}

#[test]
fn under_mpirun_a_failing_rank_fails_the_job_with_its_name() {
    let found =
        Command::new("sh").args(["-c", "command -v mpirun"]).output().is_ok_and(|o| o.status.success());
    if !found {
        println!("SKIPPED under_mpirun_a_failing_rank_fails_the_job_with_its_name: mpirun not found");
        return;
    }
    let dir = scratch("mpirun");
    let (cfg, _) = config(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", BIN])
        .args([
            "train",
            "--no-progress",
            "--comm-timeout",
            "20",
            "--inject",
            "crash:rank=1,step=2",
            "--config",
        ])
        .arg(&cfg)
        .env("MASTER_PORT", port.to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rank 1, step 2") && err.contains("injected failure"), "{err}");
    no_orphans(&cfg);
}

/// Starts `troupe launch` on a longer run, waits until rank 0 has logged `after` steps, then
/// sends `signal` to one rank process (a child of the launcher) from outside.
fn launch_and_signal(
    dir: &Path,
    signal: i32,
    restarts: u32,
    after: u64,
) -> (std::process::Output, PathBuf, String) {
    launch_and_signal_to(dir, signal, restarts, after, false)
}

/// [`launch_and_signal`], the signal going to the launcher itself when `to_launcher`.
/// The process id of the launcher's last-started rank (its newest child).
fn last_rank(launcher: &std::process::Child) -> i32 {
    let kids = Command::new("pgrep").args(["-P", &launcher.id().to_string()]).output().unwrap();
    String::from_utf8_lossy(&kids.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("a rank process")
}

fn launch_and_signal_to(
    dir: &Path,
    signal: i32,
    restarts: u32,
    after: u64,
    to_launcher: bool,
) -> (std::process::Output, PathBuf, String) {
    let (cfg, text) = config(dir);
    let text = text
        .replace("train_iters = 4", "train_iters = 200")
        .replace("save_interval = 2", "save_interval = 1");
    std::fs::write(&cfg, &text).unwrap();
    let log = dir.join("log.jsonl");
    let child = launcher(&["--nproc-per-node", "2", "--master-port", "0"], &cfg, &log, restarts, &[], &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while json_losses(&log).len() < after as usize && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid: i32 = if to_launcher { child.id() as i32 } else { last_rank(&child) };
    // SAFETY: kill(2) on a child process id we just listed; no memory effects.
    unsafe {
        libc::kill(pid, signal);
    }
    (child.wait_with_output().unwrap(), log, text)
}

#[test]
fn sigkill_from_outside_is_survived_by_a_restart() {
    let dir = scratch("sigkill");
    let (out, log, text) = launch_and_signal(&dir, libc::SIGKILL, 1, 3);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("killed by signal 9") && err.contains("restarting all ranks"), "{err}");
    // The restarted attempt's log continues the uninterrupted curve bit for bit, to the end.
    let steps: Vec<u64> = json_losses(&log).iter().map(|x| x.0).collect();
    assert_eq!(steps.last(), Some(&200), "{err}");
    assert_continues(&log, &text, &steps, &err);
    no_orphans(&dir.join("cfg.toml"));
}

#[test]
fn sigterm_to_one_rank_stops_every_rank_after_the_step_with_a_checkpoint() {
    let dir = scratch("sigterm");
    let (out, log, _) = launch_and_signal(&dir, libc::SIGTERM, 0, 3);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_stopped_with_a_checkpoint(&dir, &log, &err);
}

/// The GPU data-parallel loop (on the kernel emulator here) agrees on a stop in its per-step
/// all-reduce: SIGTERM to one rank stops both after the same step, with a checkpoint. (Each rank
/// checking its own flag before a step left the other waiting in that step's reduction.)
#[test]
fn sigterm_to_one_gpu_data_parallel_rank_stops_both_after_the_same_step() {
    let dir = scratch("sigterm-gpu-dp");
    let (cfg, text) = config(&dir);
    let text = text
        .replace("train_iters = 4", "train_iters = 200")
        .replace("save_interval = 2", "save_interval = 1")
        .replace("pipeline_model_parallel_size = 2", "pipeline_model_parallel_size = 1")
        .replace("num_layers = 4", "num_layers = 1");
    std::fs::write(&cfg, &text).unwrap();
    let log = dir.join("log.jsonl");
    let extra = ["--device", "emu", "--dtype", "fp32"];
    let child = launcher(&["--nproc-per-node", "2", "--master-port", "0"], &cfg, &log, 0, &[], &extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while json_losses(&log).len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = last_rank(&child);
    // SAFETY: kill(2) on a child process id just listed; no memory effects.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert_stopped_with_a_checkpoint(&dir, &log, &err);
}

/// The run in `dir` stopped early, after a step it logged, with that step's checkpoint the
/// latest, and left no process behind.
fn assert_stopped_with_a_checkpoint(dir: &Path, log: &Path, err: &str) {
    let steps = json_losses(log).len() as u64;
    assert!((1..200).contains(&steps) && err.contains("interrupted at step"), "{err}");
    let latest = std::fs::read_to_string(dir.join("ckpt").join("latest")).unwrap();
    assert_eq!(latest.trim(), format!("iter_{steps:07}"), "{err}");
    no_orphans(&dir.join("cfg.toml"));
}

/// SIGTERM to the launcher (a scheduler's preemption; Ctrl-C is SIGINT) reaches every rank: they
/// stop after the step with a checkpoint, and the launcher neither dies at once (which would
/// SIGKILL its ranks) nor restarts them.
#[test]
fn sigterm_to_the_launcher_stops_every_rank_after_the_step_with_a_checkpoint() {
    let dir = scratch("sigterm-launcher");
    let (out, log, _) = launch_and_signal_to(&dir, libc::SIGTERM, 1, 3, true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(
        err.contains("asking every rank to stop") && err.contains("every rank stopped after its step"),
        "{err}"
    );
    assert!(!err.contains("restarting"), "{err}");
    assert_stopped_with_a_checkpoint(&dir, &log, &err);
}

/// Ctrl-C twice to the launcher while a rank is hung (its step would never end): the second
/// signal stops every rank at once and the launcher exits with 130.
#[test]
fn a_second_sigint_to_the_launcher_stops_hung_ranks_at_once() {
    let dir = scratch("sigint-twice");
    let (cfg, _) = config(&dir);
    let log = dir.join("log.jsonl");
    let stderr = dir.join("stderr.txt");
    // The hung rank's peer waits up to the launcher's --comm-timeout (20 s) for it.
    let node = ["--nproc-per-node", "2", "--master-port", "0"];
    let mut child = launcher(&node, &cfg, &log, 0, &["hang:rank=1,step=3"], &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&stderr).unwrap_or_default();
    let wait_for = |done: &dyn Fn() -> bool, what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never {what}:\n{}", text());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    wait_for(&|| !json_losses(&log).is_empty(), "trained a step");
    let sigint = || {
        // SAFETY: kill(2) on the child we started; no memory effects.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGINT);
        }
    };
    sigint();
    // The launcher took the first signal (two sent at once may arrive as one).
    wait_for(&|| text().contains("asking every rank to stop"), "passed the first SIGINT on");
    sigint();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the launcher did not stop at once:\n{}", text());
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let err = text();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("SIGINT again: stopped every rank at once"), "{err}");
    assert!(json_losses(&log).len() < 3, "the hung step finished:\n{err}");
    no_orphans(&cfg);
}

/// The fault matrix as processes: each kind in each phase where it applies, under `troupe launch
/// --max-restarts 1`. Every run must end (no hang), recover with the uninterrupted curve bit for
/// bit, name the faulty rank in the launcher's root cause where the fault kills or wedges a rank,
/// and leave no process behind.
#[test]
fn the_fault_matrix_as_processes() {
    let dir = scratch("matrix");
    let (_, text) = config(&dir);
    let want = reference(&text);
    let phases = ["warmup", "steady", "cooldown", "reduce", "optimizer", "checkpoint"];
    let mut cases: Vec<(String, Option<usize>)> = Vec::new();
    for kind in ["crash", "exit", "hang"] {
        for p in phases {
            // Checkpoints are written by rank 0 at steps 2 and 4.
            let (rank, step) = if p == "checkpoint" { (0, 4) } else { (1, 3) };
            cases.push((format!("{kind}:rank={rank},step={step},phase={p}"), Some(rank)));
        }
    }
    for p in ["warmup", "steady"] {
        cases.push((format!("corrupt:rank=0,step=3,phase={p}"), Some(0)));
        cases.push((format!("nan:rank=0,step=3,phase={p},what=act"), None));
        cases.push((format!("delay:rank=0,step=3,phase={p},ms=100"), None));
    }
    cases.push(("ckpt-kill:rank=0,step=4".into(), Some(0)));
    cases.push(("ckpt-fail:rank=0,step=4".into(), Some(0)));
    let mut table = String::from(
        "fault                                      exit  s      root cause names rank  curve bitwise\n",
    );
    let mut bad = Vec::new();
    for (i, (fault, faulty)) in cases.iter().enumerate() {
        let sdir = dir.join(format!("case{i}"));
        std::fs::create_dir_all(&sdir).unwrap();
        let (cfg, _) = config(&sdir);
        let log = sdir.join("log.jsonl");
        let t0 = std::time::Instant::now();
        let out = Command::new(BIN)
            .args([
                "launch",
                "--nproc-per-node",
                "2",
                "--master-port",
                "0",
                "--grace",
                "1",
                "--max-restarts",
                "1",
                "--",
            ])
            .arg(BIN)
            .args(["train", "--no-progress", "--comm-timeout", "2", "--watchdog-timeout", "1", "--config"])
            .arg(&cfg)
            .arg("--log-json")
            .arg(&log)
            .args(["--inject", fault])
            .output()
            .unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let root = err.lines().find(|l| l.starts_with("troupe launch: attempt 0:")).unwrap_or("");
        // A corrupt message is reported by its receiver, naming the sender.
        let named = faulty.map(|r| {
            if fault.starts_with("corrupt") {
                err.contains(&format!("from rank {r}"))
            } else {
                root.contains(&format!("rank {r} failed first"))
            }
        });
        let got = json_losses(&log);
        let bitwise = !got.is_empty()
            && got.last().map(|x| x.0) == Some(4)
            && got.iter().all(|(s, l)| l.to_bits() == want[*s as usize - 1].to_bits());
        let survived_unchanged = !fault.starts_with("nan");
        table += &format!(
            "{fault:<42} {:<5} {secs:<6.2} {:<22} {}\n",
            out.status.code().map_or("sig".into(), |c| c.to_string()),
            named.map_or("-", |b| if b { "yes" } else { "NO" }),
            if bitwise {
                "yes"
            } else if survived_unchanged {
                "NO"
            } else {
                "n/a (step skipped/aborted)"
            }
        );
        if !out.status.success() || named == Some(false) || (survived_unchanged && !bitwise) || secs > 30.0 {
            bad.push(format!("{fault}: {}", err.lines().rev().take(6).collect::<Vec<_>>().join(" | ")));
        }
        no_orphans(&cfg);
    }
    println!("{table}");
    assert!(bad.is_empty(), "{table}\n{}", bad.join("\n"));
}

/// A rank stopped from outside (SIGSTOP: its connections stay open, so no transport notices)
/// is found by the heartbeats through the store within `--heartbeat-timeout`, long before the
/// communication timeout, and the error names it.
#[test]
fn a_stopped_rank_is_found_by_the_store_heartbeat() {
    let dir = scratch("sigstop");
    let (cfg, text) = config(&dir);
    let text = text.replace("train_iters = 4", "train_iters = 200");
    std::fs::write(&cfg, &text).unwrap();
    let log = dir.join("log.jsonl");
    let started = std::time::Instant::now();
    let child = Command::new(BIN)
        .args(["launch", "--nproc-per-node", "2", "--master-port", "0", "--grace", "1", "--"])
        .arg(BIN)
        .args(["train", "--no-progress", "--comm-timeout", "60", "--heartbeat-timeout", "1", "--config"])
        .arg(&cfg)
        .arg("--log-json")
        .arg(&log)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while json_losses(&log).len() < 3 && started.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = last_rank(&child);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let rank = String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|kv| kv.strip_prefix("RANK=").map(str::to_string))
        .expect("RANK in the rank's environment");
    let stopped_at = std::time::Instant::now();
    // SAFETY: kill(2) on a child process id we just listed; no memory effects.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    let out = child.wait_with_output().unwrap();
    let took = stopped_at.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("rank {rank} sent no heartbeat")), "{err}");
    assert!(took < std::time::Duration::from_secs(20), "took {took:?} (the comm timeout is 60 s)");
    no_orphans(&cfg);
}

/// Two processes on the kernel emulator (`--device emu`): pipeline messages travel on device
/// links (through the TCP world here, NCCL on GPUs) with their checksums. A damaged send is
/// reported by its receiver naming the sender, and with restarts the attempt after it (the fault
/// fires in attempt 0 only) resumes and finishes.
#[test]
fn a_message_damaged_on_a_device_link_is_named_and_the_restarted_run_finishes() {
    if troupe::gpu::emu::shared().is_none() {
        println!("SKIPPED a_message_damaged_on_a_device_link…: no kernel emulator");
        return;
    }
    let dir = scratch("devlink");
    let (cfg, _) = config(&dir);
    let log = dir.join("log.jsonl");
    let out = launch_with(&cfg, &log, 1, &["corrupt:rank=0,step=3"], &["--device", "emu", "--dtype", "bf16"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("corrupt activation of microbatch 0 from rank 0 (device checksum")
            && err.contains("the device link from rank 0 damaged it"),
        "{err}"
    );
    let steps: Vec<u64> = json_losses(&log).iter().map(|x| x.0).collect();
    assert_eq!(steps.last(), Some(&4), "{err}");
    no_orphans(&cfg);
}

/// Two launchers on one host as the two nodes of a job (`--nnodes 2`, one rank each; node 0
/// hosts the store): rank 1 exits at step 3, each node's launcher sees its own rank fail (the
/// cause on node 1, a consequence on node 0), both restart into the next attempt's rendezvous,
/// and the resumed curve is the uninterrupted one bit for bit.
#[test]
fn two_nodes_restart_together_after_a_rank_exits() {
    let dir = scratch("nodes");
    let (cfg, text) = config(&dir);
    let log = dir.join("log.jsonl");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (port, faults) = (port.to_string(), ["exit:rank=1,step=3"]);
    let node = |n: &str| {
        let args = ["--nnodes", "2", "--node-rank", n, "--nproc-per-node", "1", "--master-port", &port];
        launcher(&args, &cfg, &log, 1, &faults, &[])
    };
    // Node 1 may start first: its ranks wait for the store (bounded by the timeout).
    let second = node("1").stderr(std::process::Stdio::piped()).spawn().unwrap();
    let first = node("0").output().unwrap();
    let second = second.wait_with_output().unwrap();
    let (err0, err1) = (String::from_utf8_lossy(&first.stderr), String::from_utf8_lossy(&second.stderr));
    assert!(first.status.success() && second.status.success(), "node 0:\n{err0}\nnode 1:\n{err1}");
    assert!(err1.contains("attempt 0: rank 1 failed first (exit code 43)"), "{err1}");
    assert!(err0.contains("attempt 0: rank 0 failed first (exit code 4)"), "{err0}");
    assert!(err0.contains("restarting all ranks (attempt 1 of 1)"), "{err0}");
    assert_continues(&log, &text, &[3, 4], &format!("{err0}\n{err1}"));
    no_orphans(&cfg);
}
