//! `troupe launch`: starts this node's ranks with a torchrun-compatible environment (RANK,
//! LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE=True, …), hosts
//! the rendezvous store on node 0 like torchrun's static agent, prefixes every output line with
//! `[rank r]`, and tears the job down when any rank fails.
//!
//! Teardown: each rank runs in its own process group and dies with the launcher
//! (`PR_SET_PDEATHSIG`). When a rank exits non-zero or by a signal, the others' groups get
//! SIGTERM, then SIGKILL after `--grace` seconds; the launcher exits non-zero naming the first
//! failing rank and its status. Every group is killed before the launcher returns, so no process
//! it started outlives it.
//!
//! Signals: SIGINT or SIGTERM to the launcher (Ctrl-C in its terminal reaches only the launcher,
//! since the ranks have groups of their own) is passed on to every rank as SIGTERM, so that they
//! stop after the current step with a checkpoint; the launcher waits for them and does not
//! restart. A second signal kills the ranks at once (SIGTERM, then SIGKILL after `--grace`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::UsageError;
use troupe::comm::store::StoreServer;

#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// Ranks to start on this node.
    #[arg(long, alias = "nproc_per_node", default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Number of nodes in the job.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index (node 0 hosts the rendezvous store). Default: `SLURM_NODEID` under
    /// Slurm, else 0; required with several nodes otherwise.
    #[arg(long, alias = "node_rank")]
    pub node_rank: Option<usize>,
    /// Host of node 0, as every rank should reach it.
    #[arg(long, alias = "master_addr", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Store port on node 0; 0 picks a free one (single node only).
    #[arg(long, alias = "master_port", default_value_t = 29500)]
    pub master_port: u16,
    /// One node, the store on a free local port (torchrun's `--standalone`).
    #[arg(long)]
    pub standalone: bool,
    /// torchrun's rendezvous endpoint, HOST[:PORT] (port 29400 if omitted): taken as node 0's
    /// store address, in place of --master-addr and --master-port.
    #[arg(long, alias = "rdzv_endpoint", value_name = "HOST[:PORT]")]
    pub rdzv_endpoint: Option<String>,
    /// torchrun's rendezvous backend: `c10d` and `static` are what troupe launch does (a TCPStore
    /// on node 0, ranks by node index); others are refused.
    #[arg(long, alias = "rdzv_backend")]
    pub rdzv_backend: Option<String>,
    /// torchrun's rendezvous id (accepted; one store serves one job).
    #[arg(long, alias = "rdzv_id")]
    pub rdzv_id: Option<String>,
    /// Seconds between SIGTERM and SIGKILL when stopping the other ranks after a failure.
    #[arg(long, default_value_t = 5.0)]
    pub grace: f64,
    /// Restart every rank up to this many times after a failure (like torchelastic); each
    /// attempt gets `TORCHELASTIC_RESTART_COUNT`, and the training resumes from its latest
    /// checkpoint when the command passes `--load` (with `--allow-fresh-start`). After the last
    /// restart fails the launcher exits with code 3. On one node a rank that fails with exit code 2
    /// (a usage error) is not restarted, and the launcher exits with 2.
    #[arg(long, alias = "max_restarts", default_value_t = 0)]
    pub max_restarts: u32,
    /// The program and its arguments, after `--` or directly (as torchrun takes them);
    /// `${local_rank}` is replaced per rank, as torchrun does.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "PROGRAM")]
    pub cmd: Vec<String>,
    /// This node's index, as [`LaunchArgs::settle`] resolved it.
    #[arg(skip)]
    pub node: usize,
}

impl LaunchArgs {
    /// Resolves torchrun's spellings into the launcher's own settings: --standalone, the
    /// rendezvous endpoint and backend, and this node's index (Slurm's `SLURM_NODEID` when not
    /// given).
    ///
    /// # Errors
    /// A usage error naming the flag.
    fn settle(&mut self) -> anyhow::Result<()> {
        if self.standalone {
            if self.nnodes > 1 {
                return Err(
                    UsageError(format!("--standalone is one node, but --nnodes is {}", self.nnodes)).into()
                );
            }
            self.master_addr = "127.0.0.1".into();
            self.master_port = 0;
        }
        if let Some(b) = &self.rdzv_backend
            && !matches!(b.to_ascii_lowercase().as_str(), "c10d" | "static")
        {
            return Err(UsageError(format!(
                "--rdzv-backend {b}: troupe launch's rendezvous is a c10d TCPStore on node 0 (c10d or static)"
            ))
            .into());
        }
        if let Some(ep) = &self.rdzv_endpoint {
            let (host, port) = match ep.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') || h.starts_with('[') => (h, p),
                _ => (ep.as_str(), "29400"),
            };
            let port: u16 = port.parse().map_err(|_| {
                UsageError(format!("--rdzv-endpoint {ep}: the port {port:?} is not a port number"))
            })?;
            if host.is_empty() {
                return Err(UsageError(format!("--rdzv-endpoint {ep}: no host")).into());
            }
            self.master_addr = host.trim_start_matches('[').trim_end_matches(']').to_string();
            self.master_port = port;
        }
        self.node = match (self.node_rank, std::env::var("SLURM_NODEID")) {
            (Some(n), _) => n,
            (None, Ok(id)) if self.nnodes > 1 => id.trim().parse().map_err(|_| {
                UsageError(format!("SLURM_NODEID={id:?} is not a node index; pass --node-rank"))
            })?,
            (None, _) if self.nnodes > 1 => {
                return Err(UsageError(format!(
                    "--nnodes {}: give this node's --node-rank (0 on the node that hosts the store at \
                     --master-addr/--rdzv-endpoint); ranks are assigned by node index",
                    self.nnodes
                ))
                .into());
            }
            (None, _) => 0,
        };
        Ok(())
    }
}

struct Rank {
    rank: usize,
    child: Child,
    status: Option<ExitStatus>,
}

/// SIGINT and SIGTERM sent to the launcher, counted by a thread of their own.
#[derive(Clone)]
struct Interrupts {
    count: Arc<AtomicUsize>,
    first: Arc<AtomicI32>,
}

impl Interrupts {
    fn install() -> anyhow::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let me = Self { count: Arc::new(AtomicUsize::new(0)), first: Arc::new(AtomicI32::new(0)) };
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("installing the launcher's SIGINT/SIGTERM handlers")?;
        let seen = me.clone();
        std::thread::Builder::new()
            .name("troupe-launch-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let _ = seen.first.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
                    seen.count.fetch_add(1, Ordering::SeqCst);
                }
            })
            .context("starting the launcher's signal thread")?;
        Ok(me)
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    fn name(&self) -> &'static str {
        if self.first.load(Ordering::SeqCst) == libc::SIGINT { "SIGINT" } else { "SIGTERM" }
    }
}

/// How one attempt ended.
enum Attempt {
    /// Every rank exited successfully.
    Done,
    /// A rank failed: the root cause and its exit code.
    Failed(String, Option<i32>),
    /// The launcher was signalled: every rank was asked to stop; a failure if one did not stop
    /// cleanly, and whether a second signal cut the wait short.
    Interrupted { failed: Option<String>, at_once: bool },
}

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".into(),
    }
}

fn signal_group(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group; it has no memory effects.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

/// Copies `from` line by line to stdout or stderr with a `[rank r]` prefix.
fn pump(from: impl Read + Send + 'static, rank: usize, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "[rank {rank}] {line}");
            }
        }
    })
}

/// The launcher gave up: the job failed after every allowed restart (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GaveUp(pub String);

fn spawn_rank(
    a: &LaunchArgs,
    local: usize,
    port: u16,
    agent_store: bool,
    attempt: u32,
) -> anyhow::Result<Child> {
    let world = a.nnodes * a.nproc_per_node;
    let rank = a.node * a.nproc_per_node + local;
    let args: Vec<String> =
        a.cmd[1..].iter().map(|x| x.replace("${local_rank}", &local.to_string())).collect();
    let mut cmd = Command::new(&a.cmd[0]);
    cmd.args(&args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", local.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_WORLD_SIZE", a.nproc_per_node.to_string())
        .env("GROUP_RANK", a.node.to_string())
        .env("GROUP_WORLD_SIZE", a.nnodes.to_string())
        .env("ROLE_RANK", rank.to_string())
        .env("ROLE_WORLD_SIZE", world.to_string())
        .env("ROLE_NAME", "default")
        .env("MASTER_ADDR", &a.master_addr)
        .env("MASTER_PORT", port.to_string())
        .env("TORCHELASTIC_RESTART_COUNT", attempt.to_string())
        .env("TORCHELASTIC_MAX_RESTARTS", a.max_restarts.to_string())
        .env("TORCHELASTIC_RUN_ID", "none")
        .env("TORCHELASTIC_USE_AGENT_STORE", if agent_store { "True" } else { "False" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if std::env::var_os("OMP_NUM_THREADS").is_none() && a.nproc_per_node > 1 {
        cmd.env("OMP_NUM_THREADS", "1");
    }
    // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting rank {rank}: {:?}", a.cmd[0]))
}

/// Makes `cmd` startable: as given when its program is a path or on `PATH`; `troupe` not on
/// `PATH` is this troupe binary; a troupe subcommand first (`troupe launch -- train …`) runs this
/// binary with it. Anything else is a usage error before any rank or store starts (rather than a
/// failed start of rank 0).
fn resolve_program(cmd: &mut Vec<String>) -> anyhow::Result<()> {
    let first = cmd[0].clone();
    let on_path = || {
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(&first).is_file()))
    };
    if first.contains('/') || on_path() {
        return Ok(());
    }
    let me = || -> anyhow::Result<String> {
        let exe = std::env::current_exe().context("finding this troupe binary")?;
        Ok(exe.to_string_lossy().into_owned())
    };
    if first == "troupe" {
        cmd[0] = me()?;
        return Ok(());
    }
    let subcommand = <super::Cli as clap::CommandFactory>::command()
        .get_subcommands()
        .any(|c| c.get_name() == first && first != "launch");
    if subcommand {
        cmd.insert(0, me()?);
        return Ok(());
    }
    Err(UsageError(format!(
        "`{first}` is neither a path, nor a program on PATH, nor a troupe subcommand; give the \
         program to start, e.g. `troupe launch --nproc-per-node 2 -- train --actors …`"
    ))
    .into())
}

pub fn launch(mut a: LaunchArgs) -> anyhow::Result<()> {
    a.settle()?;
    resolve_program(&mut a.cmd)?;
    if a.nproc_per_node == 0 || a.nnodes == 0 || a.node >= a.nnodes {
        return Err(UsageError(format!(
            "need --nproc-per-node ≥ 1 and --node-rank < --nnodes (got {}, {}, {})",
            a.nproc_per_node, a.node, a.nnodes
        ))
        .into());
    }
    if a.master_port == 0 && a.nnodes > 1 {
        return Err(UsageError("--master-port 0 (pick a free port) only works with one node".into()).into());
    }
    // Node 0 hosts the store, as torchrun's static rendezvous agent does.
    let store = if a.node == 0 {
        Some(
            StoreServer::start(&format!("0.0.0.0:{}", a.master_port))
                .with_context(|| format!("hosting the rendezvous store on port {}", a.master_port))?,
        )
    } else {
        None
    };
    let port = store.as_ref().map_or(a.master_port, |s| s.addr().port());
    let signals = Interrupts::install()?;
    let mut failures: Vec<String> = Vec::new();
    for attempt in 0..=a.max_restarts {
        if signals.count() > 0 {
            // Signalled while the last attempt's ranks were being stopped: no restart.
            break;
        }
        if attempt > 0 {
            eprintln!("troupe launch: restarting all ranks (attempt {attempt} of {})", a.max_restarts);
        }
        match run_attempt(&a, port, attempt, &signals)? {
            Attempt::Done => {
                drop(store);
                return Ok(());
            }
            Attempt::Interrupted { failed, at_once } => {
                drop(store);
                let name = signals.name();
                return match (failed, at_once) {
                    (_, true) => Err(Interrupted(format!(
                        "{name} again: stopped every rank at once, without waiting for its checkpoint"
                    ))
                    .into()),
                    (Some(why), false) => {
                        bail!("{name}: asked every rank to stop after its step, but {why}")
                    }
                    (None, false) => {
                        eprintln!("troupe launch: {name}: every rank stopped after its step");
                        Ok(())
                    }
                };
            }
            Attempt::Failed(why, code) => {
                // Exit code 2 is a usage error (troupe's, and argparse's): the same command
                // fails the same way again. One node knows all its ranks and stops; with several,
                // every node's launcher must make the same choice, so they restart as torchrun does.
                if code == Some(2) && a.nnodes == 1 {
                    drop(store);
                    let again = if attempt < a.max_restarts {
                        " and did not restart them: a restart would repeat it"
                    } else {
                        ""
                    };
                    return Err(
                        UsageError(format!("{why}: a usage error; stopped the other ranks{again}")).into()
                    );
                }
                eprintln!("troupe launch: attempt {attempt}: {why}");
                failures.push(format!("attempt {attempt}: {why}"));
            }
        }
    }
    drop(store);
    if a.max_restarts == 0 {
        bail!(
            "{}; stopped the other ranks",
            failures.pop().unwrap_or_default().trim_start_matches("attempt 0: ")
        );
    }
    if signals.count() > 0 {
        bail!(
            "{}: stopped; not restarted after {}",
            signals.name(),
            failures.pop().unwrap_or_default().trim_start_matches("attempt 0: ")
        );
    }
    Err(GaveUp(format!("gave up after {} restarts; root causes: {}", a.max_restarts, failures.join("; ")))
        .into())
}

/// The launcher was signalled twice and killed its ranks (exit code 130, as for Ctrl-C).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub String);

/// Starts every rank of this node once and waits for them (see [`supervise`]).
fn run_attempt(a: &LaunchArgs, port: u16, attempt: u32, signals: &Interrupts) -> anyhow::Result<Attempt> {
    let mut ranks = Vec::new();
    let mut pumps = Vec::new();
    for local in 0..a.nproc_per_node {
        let mut child = match spawn_rank(a, local, port, true, attempt) {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut ranks, Duration::from_secs_f64(a.grace));
                return Err(e);
            }
        };
        let rank = a.node * a.nproc_per_node + local;
        if let Some(o) = child.stdout.take() {
            pumps.push(pump(o, rank, false));
        }
        if let Some(e) = child.stderr.take() {
            pumps.push(pump(e, rank, true));
        }
        ranks.push(Rank { rank, child, status: None });
    }
    let (failed, asked) = supervise(&mut ranks, signals);
    // Ranks that neither finished nor failed by the time the first failure was chosen: when
    // that failure is only a consequence (exit code 4, a peer was lost or silent), a rank still
    // running is the likely culprit (hung, stopped, or swapped out), and is named.
    let running: Vec<usize> = ranks.iter().filter(|r| r.status.is_none()).map(|r| r.rank).collect();
    stop_all(&mut ranks, Duration::from_secs_f64(a.grace.max(0.0)));
    for p in pumps {
        let _ = p.join();
    }
    let failed = failed.map(|(rank, status)| {
        let mut why = format!("rank {rank} failed first ({})", describe(status));
        if status.code() == Some(4) && !running.is_empty() {
            let list: Vec<String> = running.iter().map(usize::to_string).collect();
            why.push_str(&format!(
                " because a peer did; still running then, so likely hung or stopped: {} {}",
                if running.len() == 1 { "rank" } else { "ranks" },
                list.join(", ")
            ));
        }
        (why, status)
    });
    Ok(match (failed, asked) {
        (failed, true) => Attempt::Interrupted { failed: failed.map(|f| f.0), at_once: signals.count() > 1 },
        (Some((why, status)), false) => Attempt::Failed(why, status.code()),
        (None, false) => Attempt::Done,
    })
}

/// Polls until every rank exited successfully or one failed; returns the root cause: of the
/// ranks that failed within a short window of the first, the first whose exit code is not 4 (4
/// means "failed because a peer failed"). The second value says whether the launcher was
/// signalled: then every rank was asked to stop (SIGTERM) and the poll waits for all of them,
/// unless a second signal comes.
fn supervise(ranks: &mut [Rank], signals: &Interrupts) -> (Option<(usize, ExitStatus)>, bool) {
    let mut failed: Vec<(usize, ExitStatus)> = Vec::new();
    let mut deadline: Option<Instant> = None;
    let mut asked = false;
    loop {
        let n = signals.count();
        if n > 0 && !asked {
            asked = true;
            eprintln!(
                "troupe launch: {}: asking every rank to stop after its current step (signal again to stop them at once)",
                signals.name()
            );
            for r in ranks.iter().filter(|r| r.status.is_none()) {
                signal_group(r.child.id(), libc::SIGTERM);
            }
        }
        if n > 1 {
            return (root_cause(&failed), true);
        }
        let mut running = 0;
        for r in ranks.iter_mut() {
            if r.status.is_some() {
                continue;
            }
            match r.child.try_wait() {
                Ok(Some(s)) => {
                    r.status = Some(s);
                    if !s.success() {
                        failed.push((r.rank, s));
                        deadline.get_or_insert_with(|| Instant::now() + Duration::from_millis(500));
                    }
                }
                Ok(None) | Err(_) => running += 1,
            }
        }
        if asked && running > 0 {
            // Stopping on request: every rank gets to finish its step and checkpoint.
        } else if deadline.is_some_and(|d| Instant::now() >= d) || (running == 0 && !failed.is_empty()) {
            return (root_cause(&failed), asked);
        } else if running == 0 {
            return (None, asked);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Of the failed ranks, the first whose exit code is not 4 (a consequence), else the first.
fn root_cause(failed: &[(usize, ExitStatus)]) -> Option<(usize, ExitStatus)> {
    failed.iter().find(|(_, s)| s.code() != Some(4)).or(failed.first()).copied()
}

/// SIGTERM to every rank's process group, SIGKILL to whatever is left after `grace`, then reap.
fn stop_all(ranks: &mut [Rank], grace: Duration) {
    for r in ranks.iter() {
        signal_group(r.child.id(), libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && ranks.iter_mut().any(|r| matches!(r.child.try_wait(), Ok(None))) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in ranks.iter_mut() {
        signal_group(r.child.id(), libc::SIGKILL);
        let _ = r.child.wait();
    }
}
