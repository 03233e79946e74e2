//! `--tensorboard-dir`: a run's scalars in TensorBoard event files under Megatron-LM's tag names,
//! equal to what the `--log-json` records of the same run say, and readable by TensorBoard itself
//! (checked with its Python package where one can be imported: CI installs it).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use troupe::tensorboard::{Scalar, event_files, read_scalars};

#[path = "common/scratch.rs"]
mod scratch;
use scratch::Scratch;

const TINY: &[&str] = &[
    "--num-layers",
    "1",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--eval-iters",
    "1",
    "--threads",
    "1",
    "--no-progress",
];

fn troupe(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_troupe")).args(args).current_dir(cwd).output().expect("run troupe")
}

fn ok(o: &Output, what: &str) -> Result<()> {
    ensure!(o.status.success(), "{what} failed: {}", String::from_utf8_lossy(&o.stderr));
    Ok(())
}

/// `key` of each `--log-json` record holding it, by step.
fn json_values(log: &Path, key: &str) -> Result<BTreeMap<i64, f32>> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(log)?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if let (Some(step), Some(x)) = (v["step"].as_i64(), v[key].as_f64()) {
            out.insert(step, x as f32);
        }
    }
    Ok(out)
}

/// The scalars of `tag` in `file`, by step.
fn tagged(scalars: &[Scalar], tag: &str) -> BTreeMap<i64, f32> {
    scalars.iter().filter(|s| s.tag == tag).map(|s| (s.step, s.value)).collect()
}

#[test]
fn a_run_writes_megatrons_scalars_and_a_resume_adds_a_file() -> Result<()> {
    let dir = Scratch::new("tb-run");
    let mut args = TINY.to_vec();
    args.extend(["--train-iters", "4", "--eval-interval", "2", "--save", "ckpt", "--save-interval", "4"]);
    args.extend(["--tensorboard-dir", "tb", "--log-json", "run.jsonl"]);
    let o = troupe(&[&["train"], &args[..]].concat(), &dir);
    ok(&o, "the first run")?;
    let files = event_files(&dir.join("tb"))?;
    ensure!(files.len() == 1, "one event file expected: {files:?}");
    let s = read_scalars(&files[0])?;
    let log = dir.join("run.jsonl");
    // Every step's loss, learning rate and gradient norm, bit for bit the JSON log's values.
    for (tag, key) in [("lm loss", "loss"), ("learning-rate", "lr"), ("grad-norm", "grad_norm")] {
        let want = json_values(&log, key)?;
        ensure!(want.keys().copied().eq(1..=4), "{key}: {want:?}");
        ensure!(tagged(&s, tag) == want, "{tag}: {:?} vs the JSON log's {want:?}", tagged(&s, tag));
        // The same values against consumed samples: 4 sequences a step.
        let by_samples: BTreeMap<i64, f32> = want.iter().map(|(k, v)| (k * 4, *v)).collect();
        ensure!(tagged(&s, &format!("{tag} vs samples")) == by_samples, "{tag} vs samples");
    }
    ensure!(tagged(&s, "batch-size").values().all(|&b| b == 4.0), "batch-size");
    // The timing scalars are per step only, as Megatron writes them.
    for tag in ["iteration-time", "throughput", "tokens-per-second"] {
        let v = tagged(&s, tag);
        ensure!(v.len() == 4 && v.values().all(|x| x.is_finite() && *x > 0.0), "{tag}: {v:?}");
        ensure!(tagged(&s, &format!("{tag} vs samples")).is_empty(), "{tag} vs samples written");
    }
    // Evaluations at steps 2 and 4, as the JSON log's, with the perplexity beside.
    let val = json_values(&log, "val_loss")?;
    ensure!(val.keys().copied().eq([2, 4]), "val_loss: {val:?}");
    ensure!(
        tagged(&s, "lm loss validation") == val,
        "lm loss validation: {:?}",
        tagged(&s, "lm loss validation")
    );
    let ppl = tagged(&s, "lm loss validation ppl");
    ensure!(ppl.iter().all(|(k, p)| (p - val[k].exp()).abs() <= 1e-4 * p), "ppl {ppl:?} vs {val:?}");
    let vs: Vec<i64> = tagged(&s, "lm loss validation vs samples").into_keys().collect();
    ensure!(vs == [8, 16], "lm loss validation vs samples at {vs:?}");

    // A resume to step 8 writing every other step: a second file beside the first, steps 6 and 8.
    let mut more = TINY.to_vec();
    more.extend(["--train-iters", "8", "--eval-interval", "0", "--load", "ckpt", "--save", "ckpt"]);
    more.extend(["--tensorboard-dir", "tb", "--tensorboard-log-interval", "2", "--log-json", "more.jsonl"]);
    ok(&troupe(&[&["train"], &more[..]].concat(), &dir), "the resumed run")?;
    let files = event_files(&dir.join("tb"))?;
    ensure!(files.len() == 2, "a second event file expected: {files:?}");
    let second: Vec<_> = files.iter().map(|f| read_scalars(f)).collect::<Result<_, _>>()?;
    let new =
        second.iter().find(|s| tagged(s, "lm loss").keys().all(|&k| k > 4)).context("the resume's file")?;
    let want: BTreeMap<i64, f32> =
        json_values(&dir.join("more.jsonl"), "loss")?.into_iter().filter(|(k, _)| k % 2 == 0).collect();
    ensure!(want.keys().copied().eq([6, 8]), "resumed steps {want:?}");
    ensure!(tagged(new, "lm loss") == want, "resumed lm loss {:?} vs {want:?}", tagged(new, "lm loss"));

    // TensorBoard's own reader sees the directory as one run with both files' steps.
    if let Some(seen) = tensorboard_reads(&dir.join("tb"), "lm loss")? {
        let ours: BTreeMap<i64, f32> = second.iter().flat_map(|s| tagged(s, "lm loss")).collect();
        ensure!(seen == ours, "TensorBoard read {seen:?}, troupe wrote {ours:?}");
    }

    // `troupe plot` draws the TensorBoard directory (both files) beside the first JSON log.
    let o = troupe(&["plot", "tb", "run.jsonl", "--out", "both.svg"], &dir);
    ok(&o, "plot")?;
    let said = String::from_utf8_lossy(&o.stderr);
    ensure!(
        said.contains("wrote both.svg (tb: 6 steps, 2 evaluations; run: 4 steps, 2 evaluations)"),
        "{said}"
    );
    let svg = std::fs::read_to_string(dir.join("both.svg"))?;
    ensure!(svg.contains(">tb<") && svg.contains(">run<"), "no legend in the figure");
    std::fs::create_dir(dir.join("empty"))?;
    let o = troupe(&["plot", "empty", "--out", "x.svg"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.code() == Some(2) && err.contains("without TensorBoard event files"), "{err}");
    Ok(())
}

/// The scalars of `tag` as TensorBoard's `EventAccumulator` reads the directory, or `None` (said)
/// without a Python that imports `tensorboard` (`TROUPE_TENSORBOARD_PYTHONPATH` may add the place
/// it is installed at).
fn tensorboard_reads(dir: &Path, tag: &str) -> Result<Option<BTreeMap<i64, f32>>> {
    const READ: &str = "import json, sys\n\
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
        ea = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0})\n\
        ea.Reload()\n\
        print(json.dumps([[e.step, e.value] for e in ea.Scalars(sys.argv[2])]))\n";
    let Some(mut py) = python_with_tensorboard("the check with TensorBoard's own reader") else {
        return Ok(None);
    };
    let o = py.arg("-c").arg(READ).arg(dir).arg(tag).output()?;
    ensure!(o.status.success(), "TensorBoard's reader failed: {}", String::from_utf8_lossy(&o.stderr));
    let pairs: Vec<(i64, f64)> = serde_json::from_slice(&o.stdout)?;
    Ok(Some(pairs.into_iter().map(|(k, v)| (k, v as f32)).collect()))
}

/// A Python that imports `tensorboard` (with `TROUPE_TENSORBOARD_PYTHONPATH` on its path), or
/// `None` after saying why the check that needs it is skipped.
fn python_with_tensorboard(check: &str) -> Option<Command> {
    let py = || {
        let mut c = Command::new("python3");
        if let Ok(p) = std::env::var("TROUPE_TENSORBOARD_PYTHONPATH") {
            c.env("PYTHONPATH", p);
        }
        c
    };
    match py().args(["-c", "import tensorboard"]).output() {
        Ok(o) if o.status.success() => Some(py()),
        _ => {
            eprintln!(
                "SKIPPED {check}: python3 cannot import tensorboard \
                 (pip install tensorboard, or set TROUPE_TENSORBOARD_PYTHONPATH)"
            );
            None
        }
    }
}

/// Event files written by TensorBoard's own writer, as Megatron's `SummaryWriter` leaves them (a
/// text summary of the arguments first, one scalar per event), read back and drawn.
#[test]
fn tensorboards_own_files_are_read_and_drawn() -> Result<()> {
    const WRITE: &str = "import sys\n\
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2\n\
        from tensorboard.summary.writer.event_file_writer import EventFileWriter\n\
        w = EventFileWriter(sys.argv[1])\n\
        def ev(step, value): w.add_event(event_pb2.Event(wall_time=1.0, step=step, summary=summary_pb2.Summary(value=[value])))\n\
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='text'))\n\
        ev(0, summary_pb2.Summary.Value(tag='args/text_summary', metadata=meta, tensor=tensor_pb2.TensorProto(dtype=7, string_val=[b'--lr 3e-4'])))\n\
        for step in (1, 2, 3):\n\
        \x20   ev(step, summary_pb2.Summary.Value(tag='lm loss', simple_value=10.0 - step))\n\
        \x20   ev(step, summary_pb2.Summary.Value(tag='learning-rate', simple_value=1e-4 * step))\n\
        ev(3, summary_pb2.Summary.Value(tag='lm loss validation', simple_value=7.25))\n\
        w.close()\n";
    let Some(mut py) = python_with_tensorboard("reading TensorBoard's own event files") else {
        return Ok(());
    };
    let dir = Scratch::new("tb-theirs");
    let o = py.arg("-c").arg(WRITE).arg(dir.join("megatron-tb")).output()?;
    ok(&o, "TensorBoard's writer")?;
    let files = event_files(&dir.join("megatron-tb"))?;
    ensure!(files.len() == 1, "{files:?}");
    let s = read_scalars(&files[0])?;
    ensure!(tagged(&s, "lm loss") == BTreeMap::from([(1, 9.0), (2, 8.0), (3, 7.0)]), "{s:?}");
    ensure!(tagged(&s, "lm loss validation") == BTreeMap::from([(3, 7.25)]), "{s:?}");
    ensure!(!s.iter().any(|x| x.tag.starts_with("args")), "the text summary read as a scalar");
    let o = troupe(&["plot", "megatron-tb", "--out", "theirs.png"], &dir);
    ok(&o, "plot")?;
    let said = String::from_utf8_lossy(&o.stderr);
    ensure!(said.contains("wrote theirs.png (3 steps, 1 evaluation)"), "{said}");
    Ok(())
}

#[test]
fn pipeline_ranks_write_the_same_tags_once() -> Result<()> {
    let dir = Scratch::new("tb-pipe");
    let mut args = TINY.to_vec();
    args.extend(["--num-layers", "2", "--pipeline-model-parallel-size", "2", "--train-iters", "3"]);
    args.extend(["--eval-interval", "3", "--tensorboard-dir", "tb", "--log-json", "run.jsonl"]);
    ok(&troupe(&[&["train"], &args[..]].concat(), &dir), "the pipeline run")?;
    let files = event_files(&dir.join("tb"))?;
    ensure!(files.len() == 1, "one event file for the run, not one per rank: {files:?}");
    let s = read_scalars(&files[0])?;
    let want = json_values(&dir.join("run.jsonl"), "loss")?;
    ensure!(want.len() == 3 && tagged(&s, "lm loss") == want, "{:?} vs {want:?}", tagged(&s, "lm loss"));
    let val = json_values(&dir.join("run.jsonl"), "val_loss")?;
    ensure!(val.len() == 1 && tagged(&s, "lm loss validation") == val, "validation {val:?}");
    Ok(())
}

#[test]
fn bad_tensorboard_settings_exit_2_naming_them() -> Result<()> {
    let dir = Scratch::new("tb-bad");
    std::fs::write(dir.join("a-file"), "")?;
    let o = troupe(&["train", "--tensorboard-dir", "a-file/tb", "--train-iters", "1"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.code() == Some(2) && err.contains("--tensorboard-dir a-file/tb"), "{err}");
    let o = troupe(&["train", "--tensorboard-dir", "tb", "--tensorboard-log-interval", "0"], &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.code() == Some(2) && err.contains("logging.tensorboard_log_interval"), "{err}");
    ensure!(!dir.join("tb").exists(), "a refused run created its TensorBoard directory");
    Ok(())
}
