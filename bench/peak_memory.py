#!/usr/bin/env python3
"""Peak resident memory of `troupe train` runs, beside the estimate troupe prints.

Runs a fixed set of CPU layouts (the single-rank trainer, the actor runtime with PP 1, PP 2 and
DP 2 with the distributed optimizer; with and without saving; a resume) with each binary given,
measures each run's peak RSS from the kernel (`wait4`'s ru_maxrss, not troupe's own report) and
prints one table. Give two binaries to compare builds in the same run:

    bench/peak_memory.py target/release/troupe /tmp/old/target/release/troupe
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

MODEL = [
    "--hidden-size", "768", "--num-attention-heads", "4", "--num-layers", "4", "--seq-length", "128",
    "--micro-batch-size", "4", "--global-batch-size", "8", "--eval-interval", "0", "--threads", "2",
    "--no-progress", "--skip-memory-check",
]

CASES = [
    ("single, no save", [], False, None),
    ("single, save", [], True, None),
    ("single, resume + save", [], True, "single, save"),
    ("actors PP1, save", ["--actors"], True, None),
    ("actors PP2, save", ["--actors", "--pipeline-model-parallel-size", "2"], True, None),
    ("actors DP2 dist-opt, save",
     ["--actors", "--data-parallel-size", "2", "--set", "parallel.use_distributed_optimizer=true"], True, None),
    ("actors DP2 dist-opt, resume + save",
     ["--actors", "--data-parallel-size", "2", "--set", "parallel.use_distributed_optimizer=true"], True,
     "actors DP2 dist-opt, save"),
]


def run(binary, args):
    """(peak RSS in GiB from the kernel, troupe's estimate in GiB or None, exit code)."""
    proc = subprocess.Popen([binary, "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    est = re.search(r"estimated ([0-9.]+) GiB", err)
    if proc.returncode != 0:
        sys.stderr.write(err)
    return usage.ru_maxrss / 2**20, float(est.group(1)) if est else None, proc.returncode


def main():
    binaries = sys.argv[1:] or ["target/release/troupe"]
    results = {}
    for binary in binaries:
        help_text = subprocess.run([binary, "train", "--help"], capture_output=True, text=True).stdout
        # A build from before the memory check does not know its flag.
        model = [a for a in MODEL if a != "--skip-memory-check" or "--skip-memory-check" in help_text]
        work = tempfile.mkdtemp(prefix="troupe-peak-")
        saved = {}
        for name, extra, save, resume_from in CASES:
            ckpt = os.path.join(work, name.replace(" ", "_").replace(",", ""))
            args = [*model, *extra, "--train-iters", "3" if resume_from else "2"]
            args += ["--save", ckpt] if save else ["--set", 'checkpoint.save=""']
            if resume_from:
                shutil.copytree(saved[resume_from], ckpt)
                args += ["--load", ckpt]
            results[(binary, name)] = run(binary, args)
            saved[name] = ckpt
        shutil.rmtree(work, ignore_errors=True)
    head = "| run | " + " | ".join(f"peak RSS, {b} (GiB)" for b in binaries) + " | estimate (GiB) |"
    print(head)
    print("|---|" + "---:|" * (len(binaries) + 1))
    for name, *_ in CASES:
        cells = []
        est = None
        for b in binaries:
            peak, e, code = results[(b, name)]
            cells.append(f"{peak:.2f}" if code == 0 else f"exit {code}")
            est = est if est is not None else e
        shown = f"{est:.2f}" if est is not None else "—"
        print(f"| {name} | " + " | ".join(cells) + f" | {shown} |")


if __name__ == "__main__":
    main()
