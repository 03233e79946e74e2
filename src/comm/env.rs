//! Reads who-am-I from the launcher's environment: torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, `TORCHELASTIC_*`), Open MPI
//! (`OMPI_COMM_WORLD_*`), MPICH/Hydra (`PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`,
//! `MPI_LOCALNRANKS`) and Slurm (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, …), in that
//! order of precedence (torchrun under srun sees both; torchrun's are the worker's own).
//!
//! Parsing takes a lookup function instead of reading the process environment, so it is pure
//! and testable. An incomplete or contradictory environment is an [`EnvError`] that lists every
//! launcher variable it found.

/// Which launcher the values came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Torchrun,
    OpenMpi,
    Mpich,
    Slurm,
    Flags,
}

/// A rank's place in the job and where to rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub launcher: Launcher,
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already hosts the store at MASTER_ADDR:MASTER_PORT; every rank is a client.
    pub use_agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT` (0 elsewhere); store keys are namespaced by it.
    pub restart_count: u64,
}

/// An environment that does not describe a job, with the variables that were found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}; launcher variables found: {}", found_list(.found))]
pub struct EnvError {
    pub msg: String,
    pub found: Vec<(String, String)>,
}

fn found_list(found: &[(String, String)]) -> String {
    if found.is_empty() {
        return "none".into();
    }
    found.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
}

/// Every variable any supported launcher sets that we read.
pub const KNOWN_VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_NNODES",
    "SLURM_NODEID",
    "SLURM_STEP_NODELIST",
    "SLURM_JOB_NODELIST",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_JOB_ID",
];

struct Vars<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
    found: Vec<(String, String)>,
}

impl Vars<'_> {
    fn err(&self, msg: String) -> EnvError {
        EnvError { msg, found: self.found.clone() }
    }
    fn raw(&self, k: &str) -> Option<String> {
        (self.get)(k).filter(|v| !v.is_empty())
    }
    fn num(&self, k: &str) -> Result<Option<usize>, EnvError> {
        match self.raw(k) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .map_err(|_| self.err(format!("{k}={v:?} is not a non-negative integer"))),
        }
    }
    fn need(&self, k: &str, family: &str) -> Result<usize, EnvError> {
        self.num(k)?.ok_or_else(|| self.err(format!("{family} environment is incomplete: {k} is not set")))
    }
}

impl LaunchEnv {
    /// Reads the process environment. `Ok(None)` when no launcher variables are set.
    ///
    /// # Errors
    /// See [`LaunchEnv::from_lookup`].
    pub fn detect() -> Result<Option<Self>, EnvError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    /// Explicit values from command-line flags.
    ///
    /// # Errors
    /// When `rank >= world_size`.
    pub fn explicit(
        rank: usize,
        world_size: usize,
        master_addr: &str,
        master_port: u16,
    ) -> Result<Self, EnvError> {
        let e = Self {
            launcher: Launcher::Flags,
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            master_addr: master_addr.to_string(),
            master_port,
            use_agent_store: false,
            restart_count: 0,
        };
        e.validate(&[])
    }

    /// Parses a launcher environment from `get`. `Ok(None)` when no launcher is detected.
    ///
    /// # Errors
    /// An [`EnvError`] listing the variables found when one is missing, unparsable or
    /// contradicts another.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>, EnvError> {
        let found = KNOWN_VARS
            .iter()
            .filter_map(|k| get(k).filter(|v| !v.is_empty()).map(|v| (k.to_string(), v)))
            .collect();
        let v = Vars { get, found };
        let env = if v.raw("RANK").is_some() || v.raw("WORLD_SIZE").is_some() {
            Self::torchrun(&v)?
        } else if v.raw("OMPI_COMM_WORLD_RANK").is_some() || v.raw("OMPI_COMM_WORLD_SIZE").is_some() {
            Self::mpi(
                &v,
                Launcher::OpenMpi,
                [
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                    "OMPI_COMM_WORLD_LOCAL_SIZE",
                ],
            )?
        } else if v.raw("PMI_RANK").is_some() || v.raw("PMI_SIZE").is_some() {
            Self::mpi(&v, Launcher::Mpich, ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"])?
        } else if v.raw("SLURM_PROCID").is_some() {
            Self::slurm(&v)?
        } else {
            return Ok(None);
        };
        Self::cross_check(&v, &env)?;
        env.validate(&v.found).map(Some)
    }

    fn torchrun(v: &Vars<'_>) -> Result<Self, EnvError> {
        let family = "torchrun";
        let rank = v.need("RANK", family)?;
        let world_size = v.need("WORLD_SIZE", family)?;
        let master_addr = v
            .raw("MASTER_ADDR")
            .ok_or_else(|| v.err("torchrun environment is incomplete: MASTER_ADDR is not set".into()))?;
        let master_port = port(v, "MASTER_PORT")?
            .ok_or_else(|| v.err("torchrun environment is incomplete: MASTER_PORT is not set".into()))?;
        let use_agent_store = match v.raw("TORCHELASTIC_USE_AGENT_STORE").as_deref() {
            None => false,
            Some("True" | "true" | "1") => true,
            Some("False" | "false" | "0") => false,
            Some(x) => {
                return Err(v.err(format!("TORCHELASTIC_USE_AGENT_STORE={x:?} is neither True nor False")));
            }
        };
        Ok(Self {
            launcher: Launcher::Torchrun,
            rank,
            world_size,
            local_rank: v.num("LOCAL_RANK")?.unwrap_or(rank),
            local_world_size: v.num("LOCAL_WORLD_SIZE")?.unwrap_or(world_size),
            master_addr,
            master_port,
            use_agent_store,
            restart_count: v.num("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0) as u64,
        })
    }

    /// Open MPI or MPICH: rank/size/local rank/local size variable names in that order.
    fn mpi(v: &Vars<'_>, launcher: Launcher, names: [&str; 4]) -> Result<Self, EnvError> {
        let family = if launcher == Launcher::OpenMpi { "Open MPI" } else { "MPICH" };
        let rank = v.need(names[0], family)?;
        let world_size = v.need(names[1], family)?;
        let local_rank = v.num(names[2])?.unwrap_or(rank);
        let local_world_size = v.num(names[3])?.unwrap_or(world_size);
        Self::with_master(v, launcher, (rank, world_size, local_rank, local_world_size), 29500, None)
    }

    fn slurm(v: &Vars<'_>) -> Result<Self, EnvError> {
        let rank = v.need("SLURM_PROCID", "Slurm")?;
        let world_size = v.need("SLURM_NTASKS", "Slurm")?;
        let local_rank = v.num("SLURM_LOCALID")?.unwrap_or(rank);
        let nnodes = v.num("SLURM_NNODES")?.unwrap_or(1).max(1);
        // Lightning's convention: 15000 + the last four digits of the job id.
        let default_port = v.num("SLURM_JOB_ID")?.map_or(29500, |id| 15000 + (id % 10000) as u16);
        // This node's tasks from the step's (or else the job's) tasks per node, e.g. `4(x2),3`.
        let per_node =
            ["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"].iter().find_map(|k| {
                let text = v.raw(k)?;
                Some(slurm_tasks_per_node(&text).ok_or_else(|| {
                    v.err(format!("{k}={text:?} is not a Slurm task count list such as 4(x2),3"))
                }))
            });
        let here = match (per_node.transpose()?, v.num("SLURM_NODEID")?) {
            (Some(counts), Some(node)) => counts.get(node).copied(),
            _ => None,
        };
        let local_world = here.unwrap_or(if nnodes == 1 { world_size } else { world_size.div_ceil(nnodes) });
        // Rank 0 runs on the first node of the step: its host name is the store's address
        // unless MASTER_ADDR says otherwise (as `scontrol show hostnames | head -n1` gives it).
        let first_host =
            ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"].iter().find_map(|k| {
                let text = v.raw(k)?;
                Some(slurm_first_host(&text).ok_or_else(|| {
                    v.err(format!("{k}={text:?} is not a Slurm host list such as node[01-04]"))
                }))
            });
        let ranks = (rank, world_size, local_rank, local_world);
        Self::with_master(v, Launcher::Slurm, ranks, default_port, first_host.transpose()?)
    }

    /// MPI does not say where rank 0 lives: MASTER_ADDR must be given unless the whole job is
    /// on this node. Slurm does (`first_host`, the first node of its list), and MASTER_ADDR
    /// overrides it. `ranks`: rank, world size, local rank, local world size.
    fn with_master(
        v: &Vars<'_>,
        launcher: Launcher,
        (rank, world_size, local_rank, local_world_size): (usize, usize, usize, usize),
        default_port: u16,
        first_host: Option<String>,
    ) -> Result<Self, EnvError> {
        let master_addr = match (v.raw("MASTER_ADDR"), first_host) {
            (Some(a), _) => a,
            (None, _) if local_world_size >= world_size => "127.0.0.1".into(),
            (None, Some(host)) => host,
            (None, None) => {
                return Err(v.err(format!("{launcher:?} job spans several nodes ({local_world_size} of {world_size} ranks here): set MASTER_ADDR to rank 0's host")));
            }
        };
        Ok(Self {
            launcher,
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port: port(v, "MASTER_PORT")?.unwrap_or(default_port),
            use_agent_store: false,
            restart_count: 0,
        })
    }

    /// torchrun's variables and an MPI launcher's must agree when both are present.
    fn cross_check(v: &Vars<'_>, env: &Self) -> Result<(), EnvError> {
        if env.launcher != Launcher::Torchrun {
            return Ok(());
        }
        for (r, w) in [("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")] {
            if let (Some(mr), Some(mw)) = (v.num(r)?, v.num(w)?)
                && (mr != env.rank || mw != env.world_size)
            {
                return Err(v.err(format!(
                    "contradictory environment: RANK/WORLD_SIZE say {}/{} but {r}/{w} say {mr}/{mw}",
                    env.rank, env.world_size
                )));
            }
        }
        Ok(())
    }

    fn validate(self, found: &[(String, String)]) -> Result<Self, EnvError> {
        let err = |msg: String| EnvError { msg, found: found.to_vec() };
        if self.world_size == 0 {
            return Err(err("world size is 0".into()));
        }
        if self.rank >= self.world_size {
            return Err(err(format!(
                "contradictory environment: rank {} is not below world size {}",
                self.rank, self.world_size
            )));
        }
        if self.local_world_size == 0
            || self.local_rank >= self.local_world_size
            || self.local_world_size > self.world_size
        {
            return Err(err(format!(
                "contradictory environment: local rank {} of local world {} in a world of {}",
                self.local_rank, self.local_world_size, self.world_size
            )));
        }
        Ok(self)
    }
}

fn port(v: &Vars<'_>, k: &str) -> Result<Option<u16>, EnvError> {
    match v.raw(k) {
        None => Ok(None),
        Some(p) => {
            p.trim().parse::<u16>().map(Some).map_err(|_| v.err(format!("{k}={p:?} is not a port number")))
        }
    }
}

/// The first host of a Slurm host list: `node[01-04,07],gpu3` → `node01`, `a-[3-5]-ib` → `a-3-ib`,
/// `login1,login2` → `login1`. `None` when the text is not a host list.
pub fn slurm_first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first entry: up to a comma outside brackets.
    let mut depth = 0usize;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let mut entry = list[..end].to_string();
    // Each bracket (a host name may have several) keeps the first value of its first range,
    // zero padding and all.
    while let Some(open) = entry.find('[') {
        let close = open + entry[open..].find(']')?;
        let first = entry[open + 1..close].split(',').next()?.split('-').next()?.trim().to_string();
        if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        entry.replace_range(open..=close, &first);
    }
    (!entry.is_empty() && !entry.contains(']')).then_some(entry)
}

/// Slurm's tasks per node, expanded: `4(x2),3` → `[4, 4, 3]`. `None` when malformed.
pub fn slurm_tasks_per_node(text: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in text.trim().split(',') {
        let (count, times) = match part.split_once("(x") {
            Some((c, rest)) => (c, rest.strip_suffix(')')?.trim().parse::<usize>().ok()?),
            None => (part, 1),
        };
        let count = count.trim().parse::<usize>().ok()?;
        out.extend(std::iter::repeat_n(count, times));
    }
    (!out.is_empty()).then_some(out)
}
