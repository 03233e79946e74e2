//! Launcher environment parsing: torchrun, Open MPI, MPICH, Slurm; incomplete and contradictory
//! environments give errors that list what was found.

use std::collections::HashMap;

use troupe::comm::env::{LaunchEnv, Launcher};

fn parse(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>, troupe::comm::env::EnvError> {
    let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    LaunchEnv::from_lookup(&move |k| m.get(k).cloned())
}

#[test]
fn nothing_set_is_none() {
    assert_eq!(parse(&[("HOME", "/root")]).unwrap(), None);
}

#[test]
fn torchrun_with_agent_store() {
    let e = parse(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(e.launcher, Launcher::Torchrun);
    assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (3, 8, 1, 2));
    assert_eq!((e.master_addr.as_str(), e.master_port), ("node0", 29500));
    assert!(e.use_agent_store);
    assert_eq!(e.restart_count, 2);
}

#[test]
fn torchrun_incomplete_lists_found_variables() {
    let e = parse(&[("RANK", "0"), ("MASTER_ADDR", "h")]).unwrap_err().to_string();
    assert!(e.contains("WORLD_SIZE is not set"), "{e}");
    assert!(e.contains("RANK=0") && e.contains("MASTER_ADDR=h"), "{e}");
    let e = parse(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
    assert!(e.contains("MASTER_ADDR"), "{e}");
}

#[test]
fn contradictions_are_errors() {
    let base = [("MASTER_ADDR", "h"), ("MASTER_PORT", "1")];
    let e = parse(&[base[0], base[1], ("RANK", "4"), ("WORLD_SIZE", "4")]).unwrap_err().to_string();
    assert!(e.contains("rank 4 is not below world size 4"), "{e}");
    let e = parse(&[
        base[0],
        base[1],
        ("RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_RANK", "2"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("contradictory") && e.contains("OMPI_COMM_WORLD_RANK=2"), "{e}");
    let e = parse(&[base[0], base[1], ("RANK", "x"), ("WORLD_SIZE", "4")]).unwrap_err().to_string();
    assert!(e.contains("RANK=\"x\""), "{e}");
    let e = parse(&[base[0], ("MASTER_PORT", "99999"), ("RANK", "0"), ("WORLD_SIZE", "4")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("port"), "{e}");
    let e = parse(&[
        base[0],
        base[1],
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("TORCHELASTIC_USE_AGENT_STORE", "maybe"),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("TORCHELASTIC_USE_AGENT_STORE"), "{e}");
}

#[test]
fn open_mpi_single_node_defaults_master() {
    let e = parse(&[
        ("OMPI_COMM_WORLD_RANK", "1"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(e.launcher, Launcher::OpenMpi);
    assert_eq!((e.rank, e.world_size, e.master_addr.as_str(), e.master_port), (1, 4, "127.0.0.1", 29500));
}

#[test]
fn open_mpi_multi_node_needs_master_addr() {
    let vars = [
        ("OMPI_COMM_WORLD_RANK", "5"),
        ("OMPI_COMM_WORLD_SIZE", "8"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
    ];
    let e = parse(&vars).unwrap_err().to_string();
    assert!(e.contains("MASTER_ADDR") && e.contains("OMPI_COMM_WORLD_SIZE=8"), "{e}");
    let mut with = vars.to_vec();
    with.push(("MASTER_ADDR", "10.0.0.1"));
    assert_eq!(parse(&with).unwrap().unwrap().master_addr, "10.0.0.1");
}

#[test]
fn mpich_and_slurm() {
    let e =
        parse(&[("PMI_RANK", "2"), ("PMI_SIZE", "3"), ("MPI_LOCALRANKID", "2"), ("MPI_LOCALNRANKS", "3")])
            .unwrap()
            .unwrap();
    assert_eq!((e.launcher, e.rank, e.world_size), (Launcher::Mpich, 2, 3));
    let e = parse(&[
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NNODES", "1"),
        ("SLURM_JOB_ID", "123456"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!((e.launcher, e.rank, e.world_size, e.master_port), (Launcher::Slurm, 1, 2, 15000 + 3456));
    let e = parse(&[("PMI_RANK", "0")]).unwrap_err().to_string();
    assert!(e.contains("PMI_SIZE is not set"), "{e}");
}

/// A multi-node `srun` job needs no MASTER_ADDR: rank 0's host is the first of the step's node
/// list (as `scontrol show hostnames | head -n1` gives it), and this node's task count comes
/// from the tasks-per-node list; MASTER_ADDR still overrides, and malformed lists are errors.
#[test]
fn slurm_across_nodes_finds_rank_0s_host_and_this_nodes_tasks() {
    let vars = [
        ("SLURM_PROCID", "9"),
        ("SLURM_NTASKS", "11"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NNODES", "3"),
        ("SLURM_NODEID", "2"),
        ("SLURM_JOB_NODELIST", "gpu-[007-009,012],login1"),
        ("SLURM_STEP_NODELIST", "gpu-[008-009,012]"),
        ("SLURM_STEP_TASKS_PER_NODE", "4(x2),3"),
        ("SLURM_TASKS_PER_NODE", "8(x4)"),
    ];
    let e = parse(&vars).unwrap().unwrap();
    assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (9, 11, 1, 3));
    assert_eq!(e.master_addr, "gpu-008");
    let mut with = vars.to_vec();
    with.push(("MASTER_ADDR", "10.0.0.1"));
    assert_eq!(parse(&with).unwrap().unwrap().master_addr, "10.0.0.1");
    // Without the step's variables, the job's.
    let job: Vec<_> = vars.iter().copied().filter(|(k, _)| !k.starts_with("SLURM_STEP_")).collect();
    let e = parse(&job).unwrap().unwrap();
    assert_eq!((e.master_addr.as_str(), e.local_world_size), ("gpu-007", 8));
    let mut bad = vars.to_vec();
    bad[6] = ("SLURM_STEP_NODELIST", "gpu-[a-b]");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(err.contains("SLURM_STEP_NODELIST") && err.contains("host list"), "{err}");
    bad = vars.to_vec();
    bad[7] = ("SLURM_STEP_TASKS_PER_NODE", "4(x2");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(err.contains("SLURM_STEP_TASKS_PER_NODE"), "{err}");
}

#[test]
fn slurm_host_lists_and_task_counts_parse_as_scontrol_does() {
    use troupe::comm::env::{slurm_first_host, slurm_tasks_per_node};
    for (list, first) in [
        ("node[01-04,07]", "node01"),
        ("node[01-04,07],gpu3", "node01"),
        ("login1,login2", "login1"),
        ("a-[3-5]-ib", "a-3-ib"),
        ("rack[1-2]-n[05-06]", "rack1-n05"),
        ("single", "single"),
        (" x[9] ", "x9"),
    ] {
        assert_eq!(slurm_first_host(list).as_deref(), Some(first), "{list}");
    }
    for bad in ["", "node[", "node[]", "node[a-b]", "n]"] {
        assert_eq!(slurm_first_host(bad), None, "{bad:?}");
    }
    assert_eq!(slurm_tasks_per_node("4(x2),3"), Some(vec![4, 4, 3]));
    assert_eq!(slurm_tasks_per_node("1"), Some(vec![1]));
    for bad in ["", "x", "4(x)", "4(x2", "(x2)"] {
        assert_eq!(slurm_tasks_per_node(bad), None, "{bad:?}");
    }
}

#[test]
fn torchrun_wins_over_slurm_when_both_are_set() {
    let e = parse(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "1"),
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "2"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!((e.launcher, e.rank), (Launcher::Torchrun, 5));
}
