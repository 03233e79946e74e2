//! `troupe device` reports what the GPU path can use on this machine, and `--nccl-lib` makes an
//! NCCL library that the loader would not find by name (pip ships only `libnccl.so.2`) loadable by
//! re-executing troupe with a link to it on LD_LIBRARY_PATH. A stand-in library built with gcc
//! plays NCCL here (the check only loads it).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, ensure};

#[path = "common/scratch.rs"]
mod scratch;
use scratch::Scratch;

fn troupe(args: &[&str]) -> Result<(i32, String, String)> {
    troupe_with(args, &[])
}

/// `troupe args` with extra environment variables.
fn troupe_with(args: &[&str], env: &[(&str, &std::path::Path)]) -> Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(args)
        .env_remove("TROUPE_NCCL_LIB")
        .env(
            "TROUPE_CACHE_DIR",
            // One cache for every run of these tests (keyed by source and architecture).
            std::env::temp_dir().join("troupe-cli-device-cache"),
        )
        .envs(env.iter().copied())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn device_reports_each_part_and_nccl_lib_makes_pips_nccl_loadable() -> Result<()> {
    let (code, out, err) = troupe(&["device"])?;
    ensure!(code == 0, "{err}");
    for part in ["CUDA driver:", "NVRTC:", "cuBLASLt:", "NCCL:", "kernel emulator", "kernel cache:"] {
        ensure!(out.contains(part), "missing {part}: {out}");
    }
    let already = out.contains("NCCL: found");
    let (code, _, err) = troupe(&["device", "--nccl-lib", "/no/such/nccl"])?;
    ensure!(code == 2 && err.contains("no such file or directory"), "{code} {err}");
    if already || Command::new("gcc").arg("--version").output().is_err() {
        eprintln!("SKIPPED the --nccl-lib link check (NCCL already loads here, or no gcc)");
        return Ok(());
    }
    let dir = Scratch::new("fake-nccl");
    std::fs::write(dir.join("stub.c"), "int troupe_stand_in_for_nccl;\n")?;
    let lib: PathBuf = dir.join("libnccl.so.2");
    let built =
        Command::new("gcc").args(["-shared", "-fPIC", "-o"]).arg(&lib).arg(dir.join("stub.c")).status()?;
    ensure!(built.success(), "gcc failed");
    let dir_s = dir.display().to_string();
    let (code, out, err) = troupe(&["device", "--nccl-lib", &dir_s])?;
    ensure!(code == 0 && out.contains("NCCL: found (via --nccl-lib"), "{code} {out} {err}");
    // A directory without the library names what it looked for.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty)?;
    let (code, _, err) = troupe(&["device", "--nccl-lib", &empty.display().to_string()])?;
    ensure!(code == 2 && err.contains("no libnccl.so.2 or libnccl.so"), "{code} {err}");
    Ok(())
}

#[test]
fn device_kernels_prints_what_ptxas_reports_of_each_kernel() -> Result<()> {
    let (code, _, err) = troupe(&["device", "--kernels", "compute_90"])?;
    ensure!(code == 2 && err.contains("real architecture"), "{code} {err}");
    let (code, out, err) = troupe(&["device", "--kernels"])?;
    if err.contains("NVRTC is not available") {
        ensure!(code == 2, "{code} {err}");
        eprintln!("SKIPPED the register report: no libnvrtc here ({err})");
        return Ok(());
    }
    ensure!(code == 0, "{err}");
    ensure!(out.contains("kernels for sm_90 (ptxas -v; ldmatrix on, cp.async on)"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("attention_tc_forward_hs64_bf16 "))
        .ok_or_else(|| anyhow::anyhow!("no tensor-core forward row: {out}"))?;
    let numbers: Vec<u32> = row.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    ensure!(numbers.len() == 4 && numbers[0] > 0 && numbers[0] <= 255, "{row}");
    Ok(())
}

/// `TROUPE_KERNEL_SOURCES=DIR` compiles the kernels from DIR instead of the built-in copies (a
/// kernel added in a copy of `cuda/` shows in ptxas's report, no rebuild of troupe), and a
/// directory without the files is an error naming the missing one, for NVRTC and the emulator.
#[test]
fn kernel_sources_can_come_from_a_directory() -> Result<()> {
    let run = |args: &[&str], dir: &std::path::Path| troupe_with(args, &[("TROUPE_KERNEL_SOURCES", dir)]);
    let empty = Scratch::new("no-sources");
    let emu_args =
        ["train", "--device", "emu", "--train-iters", "1", "--num-layers", "1", "--hidden-size", "32"];
    let (code, _, err) = run(&emu_args, &empty)?;
    if !err.contains("g++") {
        ensure!(
            code != 0 && err.contains("emu/emu.h") && err.contains("TROUPE_KERNEL_SOURCES"),
            "{code} {err}"
        );
    }
    let (code, _, err) = run(&["device", "--kernels"], &empty)?;
    if err.contains("NVRTC is not available") {
        eprintln!("SKIPPED the NVRTC half: no libnvrtc here ({err})");
        return Ok(());
    }
    ensure!(
        code != 0 && err.contains("prelude.cuh") && err.contains("TROUPE_KERNEL_SOURCES"),
        "{code} {err}"
    );
    // A copy of cuda/ with one more kernel.
    let copy = Scratch::new("sources");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    std::fs::create_dir_all(copy.join("emu"))?;
    for entry in std::fs::read_dir(&repo)?.chain(std::fs::read_dir(repo.join("emu"))?) {
        let path = entry?.path();
        let rel = path.strip_prefix(&repo)?;
        if path.is_file() {
            std::fs::copy(&path, copy.join(rel))?;
        }
    }
    let gelu = copy.join("gelu.cu");
    let mut text = std::fs::read_to_string(&gelu)?;
    text.push_str(
        "\nextern \"C\" __global__ void source_directory_probe(float* x) { x[threadIdx.x] = 1.0f; }\n",
    );
    std::fs::write(&gelu, text)?;
    let (code, out, err) = run(&["device", "--kernels"], &copy)?;
    ensure!(code == 0, "{err}");
    ensure!(out.lines().any(|l| l.starts_with("source_directory_probe ")), "{out}");
    Ok(())
}
