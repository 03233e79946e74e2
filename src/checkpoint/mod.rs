//! Checkpoints: atomic, checksummed, verified on load.
//!
//! Layout: `DIR/iter_0000100/{model.safetensors, optimizer.safetensors, state.json}` and
//! `DIR/latest` holding the name of the newest complete checkpoint. Commit protocol (see
//! `../shared/reference/reliability.md` §4): write every file into a temporary sibling directory,
//! fsync each file, write `state.json` (step, consumed samples, RNG state, config, CRC32 and size
//! of every file) last, fsync the directory, rename it into place, fsync `DIR`, then replace
//! `latest` atomically (temp file + fsync + rename + fsync). A crash at any point leaves `latest`
//! naming a complete, verifiable checkpoint (or nothing).
//!
//! Loading verifies sizes and checksums of every file before using any byte, and refuses a
//! checkpoint whose model shape differs from the configured one, naming the field.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::Config;
use crate::models::gpt::Gpt;
use crate::models::params::ParamTable;
use crate::optim::AdamW;

pub mod hf;

const SCHEMA_VERSION: u32 = 1;
const MODEL_FILE: &str = "model.safetensors";
const OPTIM_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
const LATEST: &str = "latest";

/// Errors of saving and loading checkpoints; each names the path involved.
#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("checkpoint I/O: {op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("no checkpoint at {path}: {reason}")]
    Missing { path: PathBuf, reason: String },
    #[error("damaged checkpoint file {path}: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error(
        "checkpoint {path} does not fit the configured model: {field} is {saved} in the checkpoint but {configured} in the config"
    )]
    ShapeMismatch { path: PathBuf, field: String, saved: String, configured: String },
    #[error(
        "{dir} is in use by another run ({holder}); two runs saving into one directory would replace each other's checkpoints"
    )]
    Busy { dir: PathBuf, holder: String },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io { op, path: path.to_path_buf(), source }
}

/// The parsed `state.json` of the checkpoint directory `dir`, of this build's schema.
fn state_file(dir: &Path) -> Result<StateFile, CheckpointError> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.is_file() {
        return Err(CheckpointError::Missing { path: dir.to_path_buf(), reason: format!("no {STATE_FILE}") });
    }
    let text = fs::read(&state_path).map_err(io("read", &state_path))?;
    let sf: StateFile = serde_json::from_slice(&text)
        .map_err(|e| CheckpointError::Damaged { path: state_path.clone(), reason: e.to_string() })?;
    if sf.schema_version != SCHEMA_VERSION {
        return Err(CheckpointError::Damaged {
            path: state_path,
            reason: format!("schema version {} (this build reads {SCHEMA_VERSION})", sf.schema_version),
        });
    }
    Ok(sf)
}

/// The training state saved in the checkpoint directory `dir` (its `state.json` alone: the
/// tensor files are neither read nor verified; [`load`] does that).
///
/// # Errors
/// [`CheckpointError::Missing`] or [`CheckpointError::Damaged`] naming the file.
pub fn read_state(dir: &Path) -> Result<TrainState, CheckpointError> {
    Ok(state_file(dir)?.state)
}

/// Size and CRC32 of one file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub crc32: u32,
}

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Completed optimizer steps.
    pub step: u64,
    /// Samples consumed by training so far (the data cursor).
    pub consumed_samples: u64,
    /// Steps skipped by the NaN policy.
    pub skipped_steps: u64,
    /// State of the run's random stream (sampling at evaluation).
    pub rng_state: u64,
    /// The configuration the run was started with.
    pub config: Config,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    schema_version: u32,
    state: TrainState,
    files: HashMap<String, FileDigest>,
    /// Written by [`save_weights`]: no optimizer file; a resume starts with zero moments.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    weights_only: bool,
}

struct F32View<'a> {
    data: &'a [f32],
    shape: Vec<usize>,
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        // Safetensors stores little-endian: on such a machine the arena's bytes are the file's.
        if cfg!(target_endian = "little") {
            std::borrow::Cow::Borrowed(bytemuck::cast_slice(self.data))
        } else {
            std::borrow::Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Name of the checkpoint directory for a step (Megatron's `iter_{step:07}`).
pub fn iter_dir_name(step: u64) -> String {
    format!("iter_{step:07}")
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<FileDigest, CheckpointError> {
    let mut f = File::create(path).map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("fsync", path))?;
    Ok(FileDigest { bytes: bytes.len() as u64, crc32: crc32fast::hash(bytes) })
}

fn sync_dir(path: &Path) -> Result<(), CheckpointError> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io("fsync directory", path))
}

/// Writes `tensors` (name, shape, data) as one safetensors file, streamed tensor by tensor, so
/// that saving never holds a second copy of the model in memory. The file is then read back for
/// its size and CRC32 (what is on disk, not what was meant to be) and synced.
fn write_tensors(path: &Path, tensors: Vec<(String, F32View<'_>)>) -> Result<FileDigest, CheckpointError> {
    safetensors::serialize_to_file(tensors, None, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => {
            CheckpointError::Io { op: "write", path: path.to_path_buf(), source }
        }
        other => CheckpointError::Damaged { path: path.to_path_buf(), reason: other.to_string() },
    })?;
    let mut f = File::open(path).map_err(io("open", path))?;
    let (mut hasher, mut bytes) = (crc32fast::Hasher::new(), 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io("read back", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    f.sync_all().map_err(io("fsync", path))?;
    Ok(FileDigest { bytes, crc32: hasher.finalize() })
}

/// Checks that `dir` can be created and written (so a bad `--save` fails before training).
///
/// # Errors
/// [`CheckpointError::Io`] naming the directory.
pub fn check_writable(dir: &Path) -> Result<(), CheckpointError> {
    fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    let probe = dir.join(format!(".troupe-write-probe-{}", std::process::id()));
    fs::write(&probe, b"ok").map_err(io("write", &probe))?;
    fs::remove_file(&probe).map_err(io("remove", &probe))
}

/// The file a run holds locked in its save directory for as long as it runs.
pub const LOCK_FILE: &str = ".troupe.lock";

/// A run's exclusive claim on its save directory: an advisory lock (`flock`) on [`LOCK_FILE`],
/// released when this is dropped or the process ends however it ends (so a crashed run, or a rank
/// a launcher restarts, never leaves a stale claim). The file holds who claimed it, for the
/// message the next claimant gets.
///
/// Dropped, it removes the lock file while still holding the lock, and the directory too when
/// this claim created it and nothing else was written there (a run that failed before its first
/// save leaves no empty `--save` directory behind). A claimant checks after locking that the file
/// it locked is still the one at the path, and starts over when it is not, so removing it cannot
/// let two runs hold the directory.
#[derive(Debug)]
pub struct SaveLock {
    file: File,
    path: PathBuf,
    dir: PathBuf,
    /// The highest directory of `dir`'s path that this claim created (`runs` for `runs/default`
    /// when neither existed), if it created any.
    created: Option<PathBuf>,
}

impl Drop for SaveLock {
    fn drop(&mut self) {
        if is_linked_at(&self.file, &self.path) {
            let _ = fs::remove_file(&self.path);
        }
        if let Some(top) = &self.created {
            // Each removal succeeds only when nothing else was written there.
            for d in self.dir.ancestors() {
                if fs::remove_dir(d).is_err() || d == top.as_path() {
                    break;
                }
            }
        }
    }
}

/// Whether `file` is the file at `path` now (not one removed, or replaced, since it was opened).
fn is_linked_at(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        false
    }
}

/// Claims `dir` (created if missing) for this process's run, so a second run pointed at the same
/// directory fails at its start instead of interleaving its checkpoints with this one's (and its
/// save cleaning up this run's in-progress files, whose writer it cannot see from another host).
/// `holder` describes this run for the error a later claimant gets. One process per run claims:
/// the one that writes checkpoints. Returns `None`, after a warning, where the filesystem does
/// not support locks.
///
/// # Errors
/// [`CheckpointError::Busy`] naming the holder when another process holds `dir`;
/// [`CheckpointError::Io`] when the lock file cannot be opened or written.
pub fn lock_save_dir(dir: &Path, holder: &str) -> Result<Option<SaveLock>, CheckpointError> {
    let created = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .last()
        .map(Path::to_path_buf);
    let path = dir.join(LOCK_FILE);
    // A holder that lets go removes the file; one opened just before that is not the claim any
    // more, so a claimant that locked such a file starts over (a few times at most: each start
    // over means another run came and went meanwhile).
    for _ in 0..16 {
        fs::create_dir_all(dir).map_err(io("create directory", dir))?;
        // Not truncated on open: the holder's description must survive until the lock is ours.
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("open", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut held = String::new();
                // Best effort: a holder that has not written its line yet is still a holder.
                let _ = file.read_to_string(&mut held);
                let holder = match held.trim() {
                    "" => "a process that has not said who it is".to_string(),
                    h => h.to_string(),
                };
                return Err(CheckpointError::Busy { dir: dir.to_path_buf(), holder });
            }
            Err(fs::TryLockError::Error(e)) => {
                tracing::warn!(
                    "cannot lock {} ({e}): a second run saving into {} would not be detected",
                    path.display(),
                    dir.display()
                );
                return Ok(None);
            }
        }
        if !is_linked_at(&file, &path) {
            continue;
        }
        file.set_len(0).map_err(io("truncate", &path))?;
        file.write_all(format!("{holder}\n").as_bytes()).map_err(io("write", &path))?;
        return Ok(Some(SaveLock { file, path, dir: dir.to_path_buf(), created: created.clone() }));
    }
    Err(CheckpointError::Busy {
        dir: dir.to_path_buf(),
        holder: "other runs claiming and releasing it faster than this one could claim it".into(),
    })
}

/// `pid N on host H: ARGS`, this process as [`lock_save_dir`] records it.
pub fn this_process() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string());
    let args: Vec<String> = std::env::args().collect();
    format!("pid {} on host {host}: {}", std::process::id(), args.join(" "))
}

/// Saves a checkpoint of `model` and `opt` at `state.step` under `dir` and points `latest` at it.
/// Returns the checkpoint directory.
///
/// # Errors
/// [`CheckpointError::Io`] naming the path; on error `latest` still names the previous checkpoint.
pub fn save(dir: &Path, state: &TrainState, model: &Gpt, opt: &AdamW) -> Result<PathBuf, CheckpointError> {
    let parts = [Part::of(model, opt)];
    save_with_fault(dir, state, Arenas { full: model.table(), parts: &parts }, None)
}

/// Parameters and AdamW moments of some of the model's tensors: a whole model with its
/// optimizer, or one pipeline stage's chunk (arenas in the layout of `table`).
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    pub table: &'a ParamTable,
    pub params: &'a [f32],
    pub m: &'a [f32],
    pub v: &'a [f32],
}

impl<'a> Part<'a> {
    pub fn of(model: &'a Gpt, opt: &'a AdamW) -> Self {
        Part { table: model.table(), params: model.params(), m: &opt.m, v: &opt.v }
    }
}

/// What a checkpoint holds: every tensor of `full` (the whole model's table), each taken from
/// the last of `parts` that holds it. Pipeline stages' chunks are written as they are, never
/// assembled into a copy of the whole model.
#[derive(Debug, Clone, Copy)]
pub struct Arenas<'a> {
    pub full: &'a ParamTable,
    pub parts: &'a [Part<'a>],
}

/// What a failed save leaves: said after its error wherever a save is reported.
pub const KEPT_LATEST: &str = "the previous checkpoint, if any, stays `latest`";

/// A failure injected into [`save_with_fault`] after the model file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveFault {
    /// The optimizer file cannot be written: no space left on the device.
    DiskFull,
    /// The process dies (exit code 44) in the middle of the write.
    Kill,
}

/// [`save`] with an optional injected failure half-way (fault-injection tests).
///
/// # Errors
/// As [`save`]; with [`SaveFault::DiskFull`] an I/O error (ENOSPC) naming the file.
pub fn save_with_fault(
    dir: &Path,
    state: &TrainState,
    arenas: Arenas<'_>,
    fault: Option<SaveFault>,
) -> Result<PathBuf, CheckpointError> {
    save_files(dir, state, arenas, fault, true)
}

/// Saves a checkpoint of weights alone (`params` in the layout of `table`, the whole model):
/// the model file and `state.json`, no optimizer file. Loading it restores the weights; a resume
/// from it starts with zero AdamW moments (what a step-0 checkpoint has anyway), so an imported
/// model costs a third of the disk of a training checkpoint.
///
/// # Errors
/// As [`save`].
pub fn save_weights(
    dir: &Path,
    state: &TrainState,
    table: &ParamTable,
    params: &[f32],
) -> Result<PathBuf, CheckpointError> {
    let parts = [Part { table, params, m: &[], v: &[] }];
    save_files(dir, state, Arenas { full: table, parts: &parts }, None, false)
}

fn save_files(
    dir: &Path,
    state: &TrainState,
    arenas: Arenas<'_>,
    fault: Option<SaveFault>,
    moments: bool,
) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    remove_abandoned(dir);
    let name = iter_dir_name(state.step);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io("remove stale", &tmp))?;
    }
    fs::create_dir(&tmp).map_err(io("create directory", &tmp))?;
    let written = write_checkpoint(dir, &name, &tmp, state, arenas, fault, moments);
    if written.is_err() {
        // A failed save (a full disk, say) leaves nothing behind; `latest` still names the
        // previous checkpoint.
        let _ = fs::remove_dir_all(&tmp);
    }
    written
}

/// Removes what the saves of processes no longer running left in `dir` when they died half way:
/// `.iter_*.tmp-PID` directories and `.latest.tmp-PID` files (partial files of up to a whole
/// checkpoint), and `.iter_N.old-PID` directories once `iter_N` exists again (until then the old
/// one is the only copy of that step and stays). A process that is still running (another job
/// saving here) keeps its own. Needs `/proc` to tell; elsewhere nothing is removed.
fn remove_abandoned(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else { return };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix('.') else { continue };
        let (pid, ours) = if let Some((what, pid)) = rest.rsplit_once(".tmp-") {
            (pid, what == LATEST || what.starts_with("iter_"))
        } else if let Some((what, pid)) = rest.rsplit_once(".old-") {
            (pid, what.starts_with("iter_") && dir.join(what).join(STATE_FILE).is_file())
        } else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !ours || pid == me || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        match removed {
            Ok(()) => tracing::info!("removed {} left by an interrupted save", path.display()),
            Err(e) => tracing::warn!("could not remove {} left by an interrupted save: {e}", path.display()),
        }
    }
}

/// The body of [`save_with_fault`]: writes the files into `tmp`, then renames it into place and
/// points `latest` at it.
fn write_checkpoint(
    dir: &Path,
    name: &str,
    tmp: &Path,
    state: &TrainState,
    arenas: Arenas<'_>,
    fault: Option<SaveFault>,
    moments: bool,
) -> Result<PathBuf, CheckpointError> {
    // Each tensor's part and its range there.
    let mut sources = Vec::with_capacity(arenas.full.specs().len());
    for spec in arenas.full.specs() {
        let found = arenas.parts.iter().rev().find_map(|p| {
            let s = p.table.get(&spec.name).filter(|s| s.shape == spec.shape)?;
            let r = s.span.range();
            let held = |a: &[f32]| r.end <= a.len();
            (held(p.params) && (!moments || (held(p.m) && held(p.v)))).then_some((p, r))
        });
        let (part, r) = found.ok_or_else(|| CheckpointError::Damaged {
            path: tmp.to_path_buf(),
            reason: format!("no part of the model to save holds {} {:?}", spec.name, spec.shape),
        })?;
        sources.push((spec, *part, r));
    }
    let mut files = HashMap::new();
    let model_views = sources
        .iter()
        .map(|(spec, p, r)| {
            (spec.name.clone(), F32View { data: &p.params[r.clone()], shape: spec.shape.clone() })
        })
        .collect();
    files.insert(MODEL_FILE.to_string(), write_tensors(&tmp.join(MODEL_FILE), model_views)?);
    match fault {
        Some(SaveFault::DiskFull) => {
            let path = tmp.join(OPTIM_FILE);
            let _ = fs::write(&path, b"partial");
            return Err(CheckpointError::Io {
                op: "write",
                path,
                source: std::io::Error::from_raw_os_error(28),
            });
        }
        Some(SaveFault::Kill) => {
            eprintln!("troupe: injected fault: killed while writing {}", tmp.display());
            std::process::exit(44);
        }
        None => {}
    }
    if !moments {
        return commit(dir, name, tmp, state, files, true);
    }
    let optim_views = sources
        .iter()
        .flat_map(|(spec, p, r)| {
            [("m", &p.m[r.clone()]), ("v", &p.v[r.clone()])].map(|(prefix, data)| {
                (format!("{prefix}.{}", spec.name), F32View { data, shape: spec.shape.clone() })
            })
        })
        .collect();
    let optim = write_tensors(&tmp.join(OPTIM_FILE), optim_views)?;
    files.insert(OPTIM_FILE.to_string(), optim);
    commit(dir, name, tmp, state, files, false)
}

/// Writes `state.json` into `tmp` last, renames `tmp` into place as `dir/name` and points
/// `latest` at it, each step synced.
fn commit(
    dir: &Path,
    name: &str,
    tmp: &Path,
    state: &TrainState,
    files: HashMap<String, FileDigest>,
    weights_only: bool,
) -> Result<PathBuf, CheckpointError> {
    let final_dir = dir.join(name);
    let sf = StateFile { schema_version: SCHEMA_VERSION, state: state.clone(), files, weights_only };
    let json = serde_json::to_vec_pretty(&sf)
        .map_err(|e| CheckpointError::Damaged { path: tmp.join(STATE_FILE), reason: e.to_string() })?;
    write_synced(&tmp.join(STATE_FILE), &json)?;
    sync_dir(tmp)?;
    if final_dir.exists() {
        // Re-saving the same step (e.g. after a resume): move the old one aside first.
        let old = dir.join(format!(".{name}.old-{}", std::process::id()));
        fs::rename(&final_dir, &old).map_err(io("rename", &final_dir))?;
        fs::rename(tmp, &final_dir).map_err(io("rename", tmp))?;
        fs::remove_dir_all(&old).map_err(io("remove", &old))?;
    } else {
        fs::rename(tmp, &final_dir).map_err(io("rename", tmp))?;
    }
    sync_dir(dir)?;
    let latest_tmp = dir.join(format!(".{LATEST}.tmp-{}", std::process::id()));
    write_synced(&latest_tmp, format!("{name}\n").as_bytes())?;
    fs::rename(&latest_tmp, dir.join(LATEST)).map_err(io("rename", &latest_tmp))?;
    sync_dir(dir)?;
    Ok(final_dir)
}

/// Finds the checkpoint to load from `path`: a directory with a `latest` file (resolved), or a
/// checkpoint directory itself. `Ok(None)` when `path` holds no checkpoint at all.
///
/// # Errors
/// [`CheckpointError::Damaged`] when `latest` exists but names nothing valid.
pub fn resolve(path: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    if path.join(STATE_FILE).is_file() {
        return Ok(Some(path.to_path_buf()));
    }
    let latest = path.join(LATEST);
    if !latest.exists() {
        if hf::is_model_dir(path) {
            return Err(CheckpointError::Missing {
                path: path.to_path_buf(),
                reason: format!(
                    "it is a Hugging Face model, not a troupe checkpoint; import it first: troupe import --hf {} --save DIR",
                    path.display()
                ),
            });
        }
        return Ok(None);
    }
    let text = fs::read_to_string(&latest).map_err(io("read", &latest))?;
    let name = text.trim();
    if name.is_empty() || name.contains('/') || name.contains("..") {
        return Err(CheckpointError::Damaged { path: latest, reason: format!("names {name:?}") });
    }
    let dir = path.join(name);
    if !dir.join(STATE_FILE).is_file() {
        if let Some(restored) = restore_moved_aside(path, name) {
            return Ok(Some(restored));
        }
        return Err(CheckpointError::Damaged {
            path: latest,
            reason: format!("names {name}, which has no {STATE_FILE}"),
        });
    }
    Ok(Some(dir))
}

/// A save of a step already saved moves the old directory aside (`.iter_N.old-PID`) before
/// renaming the new one into place; a process that died between the two renames left `latest`
/// naming a directory that is not there. The old copy, complete, is moved back (or used where it
/// is, should the rename fail).
fn restore_moved_aside(dir: &Path, name: &str) -> Option<PathBuf> {
    let prefix = format!(".{name}.old-");
    let aside = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)))
        .find(|p| p.join(STATE_FILE).is_file())?;
    let back = dir.join(name);
    match fs::rename(&aside, &back) {
        Ok(()) => {
            tracing::warn!("{} was moved aside by a save that died; moved it back", back.display());
            Some(back)
        }
        Err(e) => {
            tracing::warn!(
                "using {} (a save that died moved it aside; moving it back: {e})",
                aside.display()
            );
            Some(aside)
        }
    }
}

/// A verified checkpoint, ready to restore.
#[derive(Debug)]
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainState,
    /// The verified files, mapped: restoring copies from the page cache, so a resume never holds
    /// a second in-memory copy of the model and its moments.
    model: memmap2::Mmap,
    /// `None` when loaded by [`load_model`], or for a checkpoint of weights alone.
    optim: Option<memmap2::Mmap>,
    /// A checkpoint of weights alone ([`save_weights`]): restoring AdamW state gives zero moments.
    weights_only: bool,
}

/// Reads a checkpoint directory and verifies every file's size and CRC32.
///
/// # Errors
/// [`CheckpointError`] naming the missing or damaged file.
pub fn load(dir: &Path) -> Result<Loaded, CheckpointError> {
    load_files(dir, true)
}

/// [`load`] without the optimizer state, which is neither read nor verified: for what needs the
/// weights only (sampling, export), at a third of the reading. [`Loaded::restore`] of it restores
/// no AdamW state.
///
/// # Errors
/// As [`load`], for `state.json` and the model file.
pub fn load_model(dir: &Path) -> Result<Loaded, CheckpointError> {
    load_files(dir, false)
}

fn load_files(dir: &Path, with_optimizer: bool) -> Result<Loaded, CheckpointError> {
    let state_path = dir.join(STATE_FILE);
    let sf = state_file(dir)?;
    let read_verified = |file: &str| -> Result<memmap2::Mmap, CheckpointError> {
        let path = dir.join(file);
        let digest = sf.files.get(file).ok_or_else(|| CheckpointError::Damaged {
            path: state_path.clone(),
            reason: format!("lists no digest for {file}"),
        })?;
        let f = File::open(&path).map_err(io("open", &path))?;
        let len = f.metadata().map_err(io("stat", &path))?.len();
        if len != digest.bytes || len == 0 {
            let reason = format!("size {len} bytes, expected {}", digest.bytes);
            return Err(CheckpointError::Damaged { path, reason });
        }
        // SAFETY: a read-only private mapping; checkpoint directories are never written in place
        // (a save writes a new directory and renames it), and the CRC32 below is checked over
        // exactly the bytes that are then parsed.
        let bytes = unsafe { memmap2::Mmap::map(&f) }.map_err(io("map", &path))?;
        let crc = crc32fast::hash(&bytes);
        if crc != digest.crc32 {
            let reason = format!("CRC32 {crc:08x}, expected {:08x}", digest.crc32);
            return Err(CheckpointError::Damaged { path, reason });
        }
        Ok(bytes)
    };
    let model = read_verified(MODEL_FILE)?;
    let optim = if with_optimizer && !sf.weights_only { Some(read_verified(OPTIM_FILE)?) } else { None };
    Ok(Loaded { dir: dir.to_path_buf(), state: sf.state, model, optim, weights_only: sf.weights_only })
}

impl Loaded {
    /// Checks that the saved model has the configured shape.
    ///
    /// # Errors
    /// [`CheckpointError::ShapeMismatch`] naming the first differing field.
    pub fn check_shape(&self, cfg: &Config) -> Result<(), CheckpointError> {
        let (a, b) = (&self.state.config.model, &cfg.model);
        let fields = [
            ("model.vocab_size", a.vocab_size, b.vocab_size),
            ("model.padded_vocab_size", a.padded_vocab_size(), b.padded_vocab_size()),
            ("model.seq_length", a.seq_length, b.seq_length),
            ("model.num_layers", a.num_layers, b.num_layers),
            ("model.hidden_size", a.hidden_size, b.hidden_size),
            ("model.num_attention_heads", a.num_attention_heads, b.num_attention_heads),
        ];
        match fields.iter().find(|(_, x, y)| x != y) {
            Some((field, saved, configured)) => Err(CheckpointError::ShapeMismatch {
                path: self.dir.clone(),
                field: field.to_string(),
                saved: saved.to_string(),
                configured: configured.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// The model file's tensors (troupe's names and layout), parsed from the verified mapping.
    ///
    /// # Errors
    /// [`CheckpointError::Damaged`] when the file does not parse as safetensors.
    pub fn model_tensors(&self) -> Result<SafeTensors<'_>, CheckpointError> {
        parse(&self.dir.join(MODEL_FILE), &self.model)
    }

    /// Copies parameters (and, with `opt`, AdamW moments and step) into place.
    ///
    /// # Errors
    /// [`CheckpointError::Damaged`] when a tensor is missing or has another shape.
    pub fn restore(&self, model: &mut Gpt, opt: Option<&mut AdamW>) -> Result<(), CheckpointError> {
        let specs = model.table().specs().to_vec();
        let m = parse(&self.dir.join(MODEL_FILE), &self.model)?;
        let (params, _) = model.params_and_grads_mut();
        for spec in &specs {
            copy_tensor(
                &m,
                &spec.name,
                &spec.shape,
                &mut params[spec.span.range()],
                &self.dir.join(MODEL_FILE),
            )?;
        }
        if let Some(opt) = opt {
            if self.weights_only {
                // Fresh AdamW state: the update count follows the saved step, as on any resume.
                opt.m.fill(0.0);
                opt.v.fill(0.0);
                opt.step = self.state.step - self.state.skipped_steps;
                return Ok(());
            }
            let Some(optim) = &self.optim else {
                return Err(CheckpointError::Missing {
                    path: self.dir.join(OPTIM_FILE),
                    reason: "the checkpoint was loaded without its optimizer state".into(),
                });
            };
            let o = parse(&self.dir.join(OPTIM_FILE), optim)?;
            let path = self.dir.join(OPTIM_FILE);
            for spec in &specs {
                let r = spec.span.range();
                copy_tensor(&o, &format!("m.{}", spec.name), &spec.shape, &mut opt.m[r.clone()], &path)?;
                copy_tensor(&o, &format!("v.{}", spec.name), &spec.shape, &mut opt.v[r], &path)?;
            }
            opt.step = self.state.step - self.state.skipped_steps;
        }
        Ok(())
    }
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, CheckpointError> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| CheckpointError::Damaged { path: path.to_path_buf(), reason: e.to_string() })
}

fn copy_tensor(
    st: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
    dst: &mut [f32],
    path: &Path,
) -> Result<(), CheckpointError> {
    let damaged = |reason: String| CheckpointError::Damaged { path: path.to_path_buf(), reason };
    let view = st.tensor(name).map_err(|_| damaged(format!("tensor {name} is missing")))?;
    if view.dtype() != Dtype::F32 || view.shape() != shape {
        return Err(damaged(format!(
            "tensor {name} is {:?} {:?}, expected F32 {shape:?}",
            view.dtype(),
            view.shape()
        )));
    }
    for (d, b) in dst.iter_mut().zip(view.data().chunks_exact(4)) {
        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::gpt::{GptConfig, LayerRange, param_table};

    fn state(cfg: &GptConfig) -> TrainState {
        let toml = format!(
            "[model]\nvocab_size = {}\nmake_vocab_size_divisible_by = {}\nseq_length = {}\nnum_layers = {}\n\
             hidden_size = {}\nnum_attention_heads = {}\n",
            cfg.vocab_size,
            cfg.make_vocab_size_divisible_by,
            cfg.seq_length,
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_attention_heads
        );
        let config = Config::from_toml_str(&toml, "t", &[]).unwrap();
        TrainState { step: 3, consumed_samples: 12, skipped_steps: 0, rng_state: 1, config }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("troupe-ckpt-unit-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    /// A checkpoint of weights alone has no optimizer file and says so in `state.json` (a training
    /// checkpoint's has no such key); restoring it gives the weights, and AdamW state with zero
    /// moments and the update count of its step.
    #[test]
    fn a_checkpoint_of_weights_alone_restores_them_with_fresh_moments() {
        let cfg = GptConfig::tiny();
        let model = Gpt::new(&cfg, 7).unwrap();
        let dir = save_weights(&tempdir("weights"), &state(&cfg), model.table(), model.params()).unwrap();
        assert!(!dir.join(OPTIM_FILE).exists());
        let json = fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(json.contains("\"weights_only\": true"), "{json}");
        let loaded = load(&dir).unwrap();
        let mut back = Gpt::new(&cfg, 8).unwrap();
        let mut opt = AdamW::new(crate::optim::AdamWConfig::default(), model.table().len());
        opt.m.fill(1.0);
        opt.v.fill(1.0);
        loaded.restore(&mut back, Some(&mut opt)).unwrap();
        assert!(back.params() == model.params());
        assert!(opt.m.iter().chain(&opt.v).all(|&x| x == 0.0));
        assert_eq!(opt.step, loaded.state.step - loaded.state.skipped_steps);
        let full = AdamW::new(crate::optim::AdamWConfig::default(), model.table().len());
        let dir = save(&tempdir("weights-full"), &state(&cfg), &model, &full).unwrap();
        assert!(!fs::read_to_string(dir.join(STATE_FILE)).unwrap().contains("weights_only"));
        let _ = fs::remove_dir_all(tempdir("weights"));
        let _ = fs::remove_dir_all(tempdir("weights-full"));
    }

    /// A weights-only load reads and verifies the model file alone: a damaged optimizer file
    /// fails [`load`] but not [`load_model`], whose restore gives the weights and refuses moments.
    #[test]
    fn a_weights_only_load_skips_the_optimizer_file() {
        let cfg = GptConfig::tiny();
        let model = Gpt::new(&cfg, 7).unwrap();
        let opt = AdamW::new(crate::optim::AdamWConfig::default(), model.table().len());
        let dir = save(&tempdir("model-only"), &state(&cfg), &model, &opt).unwrap();
        let optim = dir.join(OPTIM_FILE);
        let mut bytes = fs::read(&optim).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&optim, &bytes).unwrap();
        assert!(load(&dir).unwrap_err().to_string().contains("CRC32"));
        let loaded = load_model(&dir).unwrap();
        let mut back = Gpt::new(&cfg, 8).unwrap();
        loaded.restore(&mut back, None).unwrap();
        assert!(back.params() == model.params());
        let mut opt2 = AdamW::new(crate::optim::AdamWConfig::default(), model.table().len());
        let err = loaded.restore(&mut back, Some(&mut opt2)).unwrap_err().to_string();
        assert!(err.contains("loaded without its optimizer state"), "{err}");
        let _ = fs::remove_dir_all(dir.parent().unwrap());
    }

    /// The streamed files are what an in-memory safetensors serialisation gives, their recorded
    /// sizes and CRC32s are those of the files, and a checkpoint written from pipeline stages'
    /// chunks (two of them holding the tied `wte`) is byte for byte the whole model's.
    #[test]
    fn streamed_files_and_stage_parts_give_the_whole_models_bytes() {
        let cfg = GptConfig { num_layers: 3, ..GptConfig::tiny() };
        let model = Gpt::new(&cfg, 7).unwrap();
        let mut opt = AdamW::new(crate::optim::AdamWConfig::default(), model.table().len());
        for (i, (m, v)) in opt.m.iter_mut().zip(opt.v.iter_mut()).enumerate() {
            (*m, *v) = (i as f32 * 1e-3, 1.0 / (1.0 + i as f32));
        }
        let st = state(&cfg);
        let whole = save(&tempdir("whole"), &st, &model, &opt).unwrap();

        let views: Vec<(String, F32View<'_>)> = model
            .table()
            .specs()
            .iter()
            .map(|s| {
                (s.name.clone(), F32View { data: &model.params()[s.span.range()], shape: s.shape.clone() })
            })
            .collect();
        let in_memory = safetensors::serialize(views, None).unwrap();
        let file = fs::read(whole.join(MODEL_FILE)).unwrap();
        assert!(file == in_memory, "the streamed model file differs from the in-memory serialisation");
        let recorded: StateFile = serde_json::from_slice(&fs::read(whole.join(STATE_FILE)).unwrap()).unwrap();
        for name in [MODEL_FILE, OPTIM_FILE] {
            let bytes = fs::read(whole.join(name)).unwrap();
            let want = FileDigest { bytes: bytes.len() as u64, crc32: crc32fast::hash(&bytes) };
            assert_eq!(recorded.files[name], want, "{name}");
        }

        // Two stages: embedding + layer 0, layers 1–2 + head; both hold `wte`.
        let full = model.table();
        let ranges = [
            LayerRange { first: 0, last: 1, embedding: true, head: false },
            LayerRange { first: 1, last: 3, embedding: false, head: true },
        ];
        let tables: Vec<ParamTable> = ranges.iter().map(|r| param_table(&cfg, *r)).collect();
        let arenas: Vec<[Vec<f32>; 3]> = tables
            .iter()
            .map(|t| {
                let mut a = [vec![0.0; t.len()], vec![0.0; t.len()], vec![0.0; t.len()]];
                for s in t.specs() {
                    let src = full.get(&s.name).unwrap().span.range();
                    for (dst, from) in a.iter_mut().zip([model.params(), &opt.m, &opt.v]) {
                        dst[s.span.range()].copy_from_slice(&from[src.clone()]);
                    }
                }
                a
            })
            .collect();
        let parts: Vec<Part<'_>> =
            tables.iter().zip(&arenas).map(|(table, [p, m, v])| Part { table, params: p, m, v }).collect();
        let staged = save_with_fault(&tempdir("staged"), &st, Arenas { full, parts: &parts }, None).unwrap();
        for name in [MODEL_FILE, OPTIM_FILE] {
            assert!(
                fs::read(whole.join(name)).unwrap() == fs::read(staged.join(name)).unwrap(),
                "{name} differs"
            );
        }

        // A tensor no part holds is an error naming it, not a panic or a partial file set.
        let err =
            save_with_fault(&tempdir("short"), &st, Arenas { full, parts: &parts[..1] }, None).unwrap_err();
        assert!(err.to_string().contains("no part of the model to save holds"), "{err}");
        for tag in ["whole", "staged", "short"] {
            let _ = fs::remove_dir_all(tempdir(tag));
        }
    }

    /// The names in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A save that fails (a full disk) leaves nothing behind and `latest` as it was; the next
    /// save removes what saves of dead processes left half way (their partial files), and keeps
    /// what a running process is writing and an `.old` directory that is the only copy of its step,
    /// which resolving `latest` then moves back.
    #[test]
    fn failed_and_abandoned_saves_leave_no_partial_files() {
        let cfg = GptConfig::tiny();
        let model = Gpt::new(&cfg, 7).unwrap();
        let opt = AdamW::new(crate::optim::AdamWConfig::default(), model.table().len());
        let dir = tempdir("abandoned");
        let mut st = state(&cfg);
        let first = save(&dir, &st, &model, &opt).unwrap();
        let parts = [Part::of(&model, &opt)];
        let arenas = Arenas { full: model.table(), parts: &parts };
        st.step = 4;
        let err = save_with_fault(&dir, &st, arenas, Some(SaveFault::DiskFull)).unwrap_err();
        assert!(err.to_string().contains("os error 28"), "{err}");
        assert_eq!(listing(&dir), ["iter_0000003", LATEST], "a failed save left files behind");
        assert_eq!(resolve(&dir).unwrap(), Some(first));

        // A process that has exited, and one that runs (this one's parent, the test harness).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let alive = std::os::unix::process::parent_id();
        for (name, pid) in
            [("iter_0000005.tmp", dead), ("iter_0000006.tmp", alive), ("iter_0000003.old", dead)]
        {
            let d = dir.join(format!(".{name}-{pid}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join(MODEL_FILE), b"partial").unwrap();
        }
        fs::write(dir.join(format!(".{LATEST}.tmp-{dead}")), b"iter_00").unwrap();
        // An `.old` copy of a step that is not there (the process died between its renames).
        let only = dir.join(format!(".iter_0000002.old-{dead}"));
        fs::create_dir_all(&only).unwrap();
        // Not a checkpoint's: left alone whatever its number.
        fs::write(dir.join(format!(".notes.tmp-{dead}")), b"mine").unwrap();
        st.step = 7;
        save(&dir, &st, &model, &opt).unwrap();
        let mut want = [
            format!(".iter_0000002.old-{dead}"),
            format!(".iter_0000006.tmp-{alive}"),
            format!(".notes.tmp-{dead}"),
            LATEST.to_string(),
            "iter_0000003".to_string(),
            "iter_0000007".to_string(),
        ];
        want.sort();
        if Path::new("/proc/self").exists() {
            assert_eq!(listing(&dir), want);
        }

        // A re-save of step 7 that died between its renames: `latest` names `iter_0000007`, which
        // was moved aside; resolving moves it back, and it loads.
        let aside = dir.join(format!(".iter_0000007.old-{dead}"));
        fs::rename(dir.join("iter_0000007"), &aside).unwrap();
        assert_eq!(resolve(&dir).unwrap(), Some(dir.join("iter_0000007")));
        assert!(!aside.exists(), "the old copy is still aside");
        assert_eq!(load(&dir.join("iter_0000007")).unwrap().state.step, 7);
        let _ = fs::remove_dir_all(&dir);
    }

    /// One holder at a time: a second claim names the first holder; once it is released the
    /// next claim succeeds and records itself. `read_state` reads a step without the tensors.
    /// Letting go removes the lock file, and the directories the claim created when the run
    /// wrote nothing there; it never removes a lock file that is not its own.
    #[test]
    fn a_released_claim_leaves_no_lock_file_and_no_empty_directory_it_made() {
        let base = tempdir("lock-release");
        fs::create_dir_all(&base).unwrap();
        let dir = base.join("runs/default");
        let claim = lock_save_dir(&dir, "me").unwrap().expect("locks");
        assert!(dir.join(LOCK_FILE).is_file());
        drop(claim);
        assert!(!base.join("runs").exists(), "the claim's empty directories stayed");
        assert!(base.is_dir(), "a directory the claim did not make was removed");
        // A run that wrote something keeps its directory; the lock file goes.
        let claim = lock_save_dir(&dir, "me").unwrap().expect("locks");
        fs::write(dir.join("latest"), "iter_0000001\n").unwrap();
        drop(claim);
        assert!(dir.join("latest").is_file() && !dir.join(LOCK_FILE).exists());
        // A lock file that replaced ours (another claimant's) is not removed with ours.
        let claim = lock_save_dir(&dir, "me").unwrap().expect("locks");
        fs::remove_file(dir.join(LOCK_FILE)).unwrap();
        fs::write(dir.join(LOCK_FILE), "someone else\n").unwrap();
        drop(claim);
        assert_eq!(fs::read_to_string(dir.join(LOCK_FILE)).unwrap(), "someone else\n");
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn a_save_directory_has_one_holder_at_a_time() {
        let dir = tempdir("lock");
        let first = lock_save_dir(&dir, "pid 11 on host a: troupe train --save x").unwrap();
        assert!(first.is_some(), "this filesystem does not support locks");
        match lock_save_dir(&dir, "pid 12 on host b: troupe train") {
            Err(e @ CheckpointError::Busy { .. }) => {
                assert!(
                    e.to_string().contains("in use by another run (pid 11 on host a: troupe train --save x)")
                )
            }
            other => panic!("a second claim gave {other:?}"),
        }
        drop(first);
        let second = lock_save_dir(&dir, "pid 12 on host b: troupe train").unwrap();
        assert!(second.is_some());
        let held = fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(held, "pid 12 on host b: troupe train\n");
        assert!(this_process().starts_with(&format!("pid {} on host ", std::process::id())));
        // The lock file is not something a save cleans up.
        remove_abandoned(&dir);
        assert!(dir.join(LOCK_FILE).is_file());
        drop(second);

        let cfg = GptConfig::tiny();
        let st = state(&cfg);
        let model = Gpt::new(&cfg, 7).unwrap();
        let opt = AdamW::new(crate::optim::AdamWConfig::default(), model.table().len());
        let saved = save(&dir, &st, &model, &opt).unwrap();
        assert_eq!(read_state(&saved).unwrap().step, 3);
        fs::remove_file(saved.join(MODEL_FILE)).unwrap();
        assert_eq!(read_state(&saved).unwrap().step, 3, "read_state needs the state file alone");
        assert!(matches!(read_state(&dir), Err(CheckpointError::Missing { .. })));
        let _ = fs::remove_dir_all(&dir);
    }
}
