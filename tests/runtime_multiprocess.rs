//! The actor runtime as real processes over TCP: `troupe train` started by `troupe launch`, by
//! Open MPI's `mpirun` and by `torchrun --no-python` (each skipped with a message when the
//! launcher is not installed) trains exactly like the in-process run of the same layout: the
//! per-step losses are bitwise equal (both backends fold reductions in the same order).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use troupe::config::Config;
use troupe::runtime::{RunOptions, train_inproc};

const BIN: &str = env!("CARGO_BIN_EXE_troupe");

const CONFIG: &str = r#"
[model]
vocab_size = 4096
seq_length = 32
num_layers = 4
hidden_size = 32
num_attention_heads = 4

[train]
micro_batch_size = 2
global_batch_size = 8
train_iters = 3
lr = 1e-3
seed = 9

[parallel]
pipeline_model_parallel_size = 2
pipeline_schedule = "1f1b"

[logging]
log_interval = 1
eval_interval = 0

[checkpoint]
save = ""
"#;

#[path = "common/scratch.rs"]
mod scratch_dir;
use scratch_dir::Scratch;

fn scratch(name: &str) -> Scratch {
    Scratch::new(&format!("mp-{name}"))
}

fn found(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().is_ok_and(|o| o.status.success())
}

/// Losses of the in-process run with data-parallel size `dp`.
fn inproc_losses(dp: usize) -> Vec<f32> {
    let cfg = Config::from_toml_str(CONFIG, "test", &[format!("parallel.data_parallel_size={dp}")]).unwrap();
    let data = troupe::train::corpus::open(&cfg).unwrap();
    let results = train_inproc(&cfg, Arc::from(data.train), RunOptions::default(), 2, None, None).unwrap();
    results[0].records.iter().map(|r| r.loss).collect()
}

fn json_losses(path: &Path) -> Vec<f32> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(serde_json::Value::as_f64))
        .map(|x| x as f32)
        .collect()
}

fn check(out: std::process::Output, log: &Path, dp: usize) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", String::from_utf8_lossy(&out.stdout));
    let got = json_losses(log);
    let want = inproc_losses(dp);
    assert_eq!(got.len(), 3, "{err}");
    for (a, b) in got.iter().zip(&want) {
        assert_eq!(a.to_bits(), b.to_bits(), "over TCP {got:?} vs in-process {want:?}");
    }
}

fn write_config(dir: &Path) -> PathBuf {
    let p = dir.join("cfg.toml");
    std::fs::write(&p, CONFIG).unwrap();
    p
}

#[test]
fn troupe_launch_runs_pipeline_and_data_parallel_ranks_as_processes() {
    let dir = scratch("launch");
    let cfg = write_config(&dir);
    let log = dir.join("log.jsonl");
    let out = Command::new(BIN)
        .args(["launch", "--nproc-per-node", "4", "--master-port", "0", "--"])
        .arg(BIN)
        .args(["train", "--no-progress", "--comm-timeout", "60", "--config"])
        .arg(&cfg)
        .arg("--log-json")
        .arg(&log)
        .output()
        .unwrap();
    check(out, &log, 2);
}

/// A checkpoint of launched PP 2 × DP 2 ranks under the distributed optimizer (each rank's
/// moment shards sent to its data-parallel rank 0, the pipeline ranks' chunks to world rank 0)
/// resumes over TCP to the in-process uninterrupted run's bits (the moments first matter to the
/// loss two steps after the save).
#[test]
fn launched_distributed_optimizer_checkpoints_resume_exactly() {
    let dir = scratch("dist-ckpt");
    let cfg_path = write_config(&dir);
    let ckpt = dir.join("ckpt");
    // The LR schedule must not depend on where a run stops.
    let sets = [
        "parallel.data_parallel_size=2",
        "parallel.use_distributed_optimizer=true",
        "train.lr_decay_iters=4",
    ];
    let launch = |iters: &str, load: bool, log: &Path| {
        let mut cmd = Command::new(BIN);
        cmd.args(["launch", "--nproc-per-node", "4", "--master-port", "0", "--"]).arg(BIN);
        cmd.args(["train", "--no-progress", "--comm-timeout", "60", "--train-iters", iters, "--config"]);
        cmd.arg(&cfg_path).arg("--save").arg(&ckpt).arg("--log-json").arg(log);
        for s in sets {
            cmd.args(["--set", s]);
        }
        if load {
            cmd.arg("--load").arg(&ckpt);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{iters} steps (load {load}):\n{err}");
        err
    };
    let (first, second) = (dir.join("first.jsonl"), dir.join("second.jsonl"));
    launch("2", false, &first);
    let err = launch("4", true, &second);
    assert!(err.contains("resumed at step 2"), "{err}");
    let sets: Vec<String> =
        sets.iter().map(|s| s.to_string()).chain(["train.train_iters=4".into()]).collect();
    let cfg = Config::from_toml_str(CONFIG, "test", &sets).unwrap();
    let data = troupe::train::corpus::open(&cfg).unwrap();
    let results = train_inproc(&cfg, Arc::from(data.train), RunOptions::default(), 2, None, None).unwrap();
    let want: Vec<f32> = results[0].records.iter().map(|r| r.loss).collect();
    let got: Vec<f32> = json_losses(&first).into_iter().chain(json_losses(&second)).collect();
    assert_eq!(got.len(), 4, "{got:?}");
    for (a, b) in got.iter().zip(&want) {
        assert_eq!(a.to_bits(), b.to_bits(), "launched with a resume {got:?} vs in-process {want:?}");
    }
}

#[test]
fn mpirun_runs_a_pipeline() {
    if !found("mpirun") {
        println!("SKIPPED mpirun_runs_a_pipeline: mpirun not found (apt-get install openmpi-bin)");
        return;
    }
    let dir = scratch("mpirun");
    let cfg = write_config(&dir);
    let log = dir.join("log.jsonl");
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", BIN])
        .args(["train", "--no-progress", "--comm-timeout", "60", "--config"])
        .arg(&cfg)
        .arg("--log-json")
        .arg(&log)
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .unwrap();
    check(out, &log, 1);
}

#[test]
fn torchrun_runs_a_pipeline() {
    if !found("torchrun") {
        println!("SKIPPED torchrun_runs_a_pipeline: torchrun not found (pip install torch)");
        return;
    }
    let dir = scratch("torchrun");
    let cfg = write_config(&dir);
    let log = dir.join("log.jsonl");
    let out = Command::new("torchrun")
        .args(["--nproc-per-node", "2", "--master-port", &free_port().to_string(), "--no-python", BIN])
        .args(["train", "--no-progress", "--comm-timeout", "60", "--config"])
        .arg(&cfg)
        .arg("--log-json")
        .arg(&log)
        .output()
        .unwrap();
    check(out, &log, 1);
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `troupe train --trace` on the actor runtime writes a trace that `troupe trace replay` reads,
/// and `--replay-order` re-runs the same training with the recorded message order.
#[test]
fn cli_traces_replay_and_replay_order() {
    let dir = scratch("trace");
    let cfg = write_config(&dir);
    let run = |extra: &[&str], log: &Path| {
        let out = Command::new(BIN)
            .args(["train", "--no-progress", "--config"])
            .arg(&cfg)
            .arg("--log-json")
            .arg(log)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    let trace = dir.join("step.trace");
    let t = trace.to_str().unwrap();
    let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    let err = run(&["--trace", t, "--trace-step", "2"], &a);
    assert!(err.contains("bubble measured") && err.contains("simulated"), "{err}");
    let out = Command::new(BIN).args(["trace", "replay", t, "--schedule", "gpipe,zb-h1"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("recorded order") && text.contains("zb-h1"), "{text}");
    run(&["--replay-order", t], &b);
    assert_eq!(json_losses(&a), json_losses(&b));
    let bad = Command::new(BIN).args(["train", "--replay-order", "/nonexistent.trace"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// Ranks started with different settings (a wrapper that adds flags or environment on rank 1
/// only) stop before the first step, each naming the settings that differ with both values.
/// Without the agreement a different learning rate trains silently (stage 1 learns at its own
/// rate) and a checksum on one end of a link only fails as a malformed message. GPU ranks also
/// compare their storage type and the hash of their kernel sources, before any kernel is built
/// (the emulator's build of the changed sources would take a minute), on the actor runtime and
/// on the GPU data-parallel loop alike.
#[test]
fn ranks_started_with_different_settings_stop_before_training_naming_each_difference() {
    let dir = scratch("disagree");
    let cfg = write_config(&dir);
    // A copy of the kernel sources with one comment more.
    let kernels = dir.join("kernels");
    let copy = Command::new("cp")
        .arg("-r")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/cuda"))
        .arg(&kernels)
        .status()
        .unwrap();
    assert!(copy.success());
    let gelu = kernels.join("gelu.cu");
    let text = std::fs::read_to_string(&gelu).unwrap();
    std::fs::write(&gelu, text + "// edited on one host\n").unwrap();
    let env1 = format!("TROUPE_KERNEL_SOURCES={}", kernels.display());
    let gpu_loop = "--device emu --set parallel.pipeline_model_parallel_size=1";
    // Each split's own data, the validation set at another path and with other text on rank 1:
    // paths may differ between hosts, the tokens may not.
    let tokenizer = concat!(env!("CARGO_MANIFEST_DIR"), "/data/shakespeare/tokenizer.json");
    let dataset = |name: &str, text: &str| {
        let input = dir.join(format!("{name}.jsonl"));
        let docs: String = (0..40).map(|i| format!("{{\"text\": \"{text} {i}\"}}\n")).collect();
        std::fs::write(&input, docs).unwrap();
        let prefix = dir.join(name);
        let out = Command::new(BIN)
            .args(["preprocess", "--quiet", "--append-eod", "--tokenizer", tokenizer, "--input"])
            .arg(&input)
            .arg("--output-prefix")
            .arg(&prefix)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        format!("{}_text_document", prefix.display())
    };
    let (train, valid) =
        (dataset("train", "To be, or not to be"), dataset("valid", "All the world's a stage"));
    let other_valid = dataset("valid_b", "Now is the winter of our discontent");
    let per_split = format!(
        "--train-data-path {train} --valid-data-path {valid} --tokenizer {tokenizer} --eval-interval 2 \
         --eval-iters 1"
    );
    let other_valid = format!("--valid-data-path {other_valid}");
    let cases: [(&str, &str, &str, &[&str]); 6] = [
        (&per_split, &other_valid, "", &["1 setting of rank 1 differs", "validation data: "]),
        (
            "",
            "--set train.lr=0.002",
            "",
            &["train.lr: 0.002 on rank 1", "train.lr: 0.001 on rank 0, 0.002 on rank 1"],
        ),
        (
            "",
            "--no-checksums",
            "",
            &["--no-checksums: true on rank 1, false on rank 0", "--no-checksums: false on rank 0"],
        ),
        (
            "--device emu",
            "--dtype fp32",
            &env1,
            &[
                "2 settings of rank 1 differ",
                "--dtype: fp32 on rank 1, bf16 on rank 0",
                "kernel sources hash: ",
            ],
        ),
        // Data parallelism on GPUs without pipeline stages runs the GPU loop, which agrees too;
        // and a rank sent to the actor runtime by a flag disagrees with one on the loop.
        (gpu_loop, "--set train.lr=0.002", "", &["train.lr: 0.002 on rank 1, 0.001 on rank 0"]),
        (
            gpu_loop,
            "--actors",
            "",
            // The one difference: both loops record the world's data-parallel size.
            &[
                "1 setting of rank 1 differs",
                "training loop: actor runtime on rank 1, GPU data-parallel loop on rank 0",
            ],
        ),
    ];
    for (common, extra, env, want) in cases {
        let script = format!(
            "if [ \"$RANK\" = 1 ]; then x='{extra}'; e='{env}'; else x=; e=; fi; \
             exec env $e '{BIN}' train --no-progress --comm-timeout 60 --config '{}' {common} $x",
            cfg.display()
        );
        let out = Command::new(BIN)
            .args(["launch", "--nproc-per-node", "2", "--master-port", "0", "--max-restarts", "2", "--"])
            .args(["sh", "-c", &script])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra}: the run went through:\n{err}");
        assert!(
            err.contains("[rank 1] error: rank 1: the ranks run with different settings"),
            "{extra}:\n{err}"
        );
        for w in want {
            assert!(err.contains(w), "{extra}: no {w:?} in\n{err}");
        }
        // A usage error: the launcher does not restart it, and passes its exit code on.
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("(exit code 2): a usage error; stopped the other ranks and did not restart them"),
            "{err}"
        );
        assert!(!err.contains("restarting all ranks"), "{err}");
        assert!(!err.contains("step      1"), "{extra}: a step ran:\n{err}");
    }
}
