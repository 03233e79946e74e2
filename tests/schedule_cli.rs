//! The `troupe schedule` and `troupe trace` commands end to end: output that feeds back into
//! `check`, exit codes for bad input, files in every format, and replay of a written trace.

use std::process::{Command, Output};

#[path = "common/scratch.rs"]
mod scratch;
use scratch::Scratch;

fn troupe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_troupe")).args(args).output().expect("run troupe")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn shown_text_checks_back_with_the_same_stats() {
    let dir = Scratch::new("schedule-cli");
    let out = troupe(&["schedule", "show", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    assert!(text.contains("bubble 0.3750"), "(p-1)/m = 3/8 expected in:\n{text}");
    let file = dir.join("1f1b.txt");
    std::fs::write(&file, &text).unwrap();
    let check = troupe(&["schedule", "check", file.to_str().unwrap()]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(stdout(&check).contains("bubble 0.3750"));
}

#[test]
fn broken_program_exits_2_and_names_the_spot() {
    let dir = Scratch::new("schedule-cli");
    let file = dir.join("broken.txt");
    std::fs::write(&file, "pp=1 vpp=1 microbatches=2\n0: 0F0 0B0 0B1 0F1\n").unwrap();
    let out = troupe(&["schedule", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank 0, instruction 2") && err.contains("(mb 1, chunk 0)"), "{err}");
}

#[test]
fn bad_flags_exit_2_with_advice() {
    let out = troupe(&["schedule", "show", "--schedule", "interleaved", "--pp", "4", "--microbatches", "6"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("group sizes that work"));
    let out = troupe(&[
        "schedule",
        "show",
        "--schedule",
        "1f1b",
        "--pp",
        "2",
        "--microbatches",
        "2",
        "--costs",
        "f=-1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = troupe(&[
        "schedule",
        "show",
        "--schedule",
        "1f1b",
        "--pp",
        "2",
        "--microbatches",
        "2",
        "--format",
        "png",
    ]);
    assert_eq!(out.status.code(), Some(2), "PNG to a terminal is refused");
    // Files that cannot be read or written are bad input too, named with the error.
    let dir = Scratch::new("schedule-cli");
    let missing = dir.join("missing.txt");
    let nowhere = dir.join("no/such/dir/t.svg");
    let (missing, nowhere, here) =
        (missing.to_str().unwrap(), nowhere.to_str().unwrap(), dir.to_str().unwrap());
    let show = ["schedule", "show", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["schedule", "check", missing], "No such file"),
        (vec!["trace", "replay", missing], "No such file"),
        (vec!["trace", "replay", here], "Is a directory"),
        ([&show[..], &["--format", "svg", "--out", nowhere]].concat(), "cannot write there"),
    ];
    for (args, needle) in cases {
        let out = troupe(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: no {needle:?} in {err}");
    }
}

#[test]
fn every_format_writes_a_file_and_traces_replay() {
    let dir = Scratch::new("schedule-cli");
    for (format, magic) in [
        ("svg", &b"<svg"[..]),
        ("png", b"\x89PNG"),
        ("chrome", b"{"),
        ("json", b"{"),
        ("trace", b"troupe-trace"),
    ] {
        let file = dir.join(format!("zbh1.{format}"));
        let out = troupe(&[
            "schedule",
            "show",
            "--schedule",
            "zb-h1",
            "--pp",
            "4",
            "--microbatches",
            "8",
            "--format",
            format,
            "--out",
            file.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{format}: {}", String::from_utf8_lossy(&out.stderr));
        let bytes = std::fs::read(&file).unwrap();
        assert!(bytes.starts_with(magic), "{format} output starts wrong");
    }
    for recorded in ["zbh1.chrome", "zbh1.trace"] {
        let file = dir.join(recorded);
        let out = troupe(&["trace", "replay", file.to_str().unwrap(), "--schedule", "1f1b,interleaved"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = stdout(&out);
        // the recorded zb-h1 order replays to its own bubble (p-1)/(3m) = 1/8
        assert!(text.contains("zb-h1 (recorded order)") && text.contains("0.1250"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("1f1b ") && l.contains("0.3750")), "{text}");
    }
}

#[test]
fn compute_only_order_is_lowered_and_printed() {
    let dir = Scratch::new("schedule-cli");
    // hand-written 1F1B compute order for 2 ranks; check inserts the sends and receives
    let file = dir.join("compute.txt");
    std::fs::write(&file, "pp=2 vpp=1 microbatches=2\n0: 0F0 0F1 0B0 0B1\n1: 0F0 0B0 0F1 0B1\n").unwrap();
    let out = troupe(&["schedule", "check", "--print", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    let program = troupe::schedule::parse_program(&text).expect("printed program parses");
    troupe::schedule::validate(&program).expect("and validates");
    assert!(program.ranks[0].iter().any(|op| op.to_string() == "0SA1:1"), "{text}");
}

/// Without `--format`, the format follows `--out`'s extension (a `.png` holding SVG text was
/// what `trace render --out t.png` wrote); an explicit `--format` still wins.
#[test]
fn formats_follow_the_out_extension() {
    let dir = Scratch::new("schedule-cli");
    let show = ["schedule", "show", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4"];
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = troupe(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    for (name, magic) in [
        ("s.png", &b"\x89PNG"[..]),
        ("s.svg", b"<svg"),
        ("s.json", b"{"),
        ("s.txt", b"pp=2"),
        ("s.PNG", b"\x89PNG"),
    ] {
        run(&[&show[..], &["--out", &path(name)]].concat());
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert!(bytes.starts_with(magic), "{name} starts with {:?}", String::from_utf8_lossy(&bytes[..8]));
    }
    run(&[&show[..], &["--format", "trace", "--out", &path("s.trace")]].concat());
    for (name, magic) in [("r.png", &b"\x89PNG"[..]), ("r.svg", b"<svg"), ("r.json", b"{\"displayTimeUnit\"")]
    {
        let out = run(&["trace", "render", &path("s.trace"), "--out", &path(name)]);
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert!(bytes.starts_with(magic), "{name} starts with {:?}", String::from_utf8_lossy(&bytes[..8]));
        assert!(String::from_utf8_lossy(&out.stderr).contains("wrote"), "{name}: no 'wrote' line");
    }
    run(&["trace", "render", &path("s.trace"), "--format", "svg", "--out", &path("forced.png")]);
    assert!(
        std::fs::read(dir.join("forced.png")).unwrap().starts_with(b"<svg"),
        "--format lost to the extension"
    );
}

/// `trace replay` without `--schedule` compares every schedule that fits the trace, and names
/// the ones that do not (interleaved with 6 microbatches on 4 ranks) instead of failing.
#[test]
fn replay_compares_every_schedule_that_fits_by_default() {
    let dir = Scratch::new("schedule-cli");
    let file = dir.join("m6.trace");
    let file = file.to_str().unwrap();
    let show = ["schedule", "show", "--schedule", "1f1b", "--pp", "4", "--microbatches", "6"];
    assert!(troupe(&[&show[..], &["--format", "trace", "--out", file]].concat()).status.success());
    let out = troupe(&["trace", "replay", file]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    for kind in ["gpipe", "1f1b", "zb-h1", "zb-h2", "zb-v"] {
        assert!(text.lines().any(|l| l.starts_with(&format!("{kind} "))), "no {kind} row: {text}");
    }
    assert!(!text.contains("interleaved"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not compared: interleaved"), "{err}");
    // Named, it is an error as before.
    let out = troupe(&["trace", "replay", file, "--schedule", "interleaved"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}
