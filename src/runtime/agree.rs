//! Settings agreement across the ranks of a multi-process run.
//!
//! Every rank of a launched run parses its own command line and configuration file, and nothing
//! forces them to be the same: a wrapper script that adds a flag on some nodes, a configuration
//! file edited between the start of two nodes, or an older binary on one host all give ranks that
//! disagree about the model, the schedule or the message protocol. Such ranks do not fail cleanly
//! on their own — a sender that appends a checksum and a receiver that expects none, or two
//! stages with different layer counts, stop at the communication timeout with a message about a
//! missing or malformed message, or silently train something else.
//!
//! So before the first step every rank publishes its [`Settings`] (the configuration that
//! changes the math or the protocol, the runtime flags that change the protocol, its training
//! data in brief and the version of troupe) through the rendezvous store, and [`agree`] compares
//! them: each rank reads rank 0's, and rank 0 reads everyone's. A difference fails every rank
//! involved with the list of differing settings, each with its value on both ranks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::comm::store::{StoreClient, StoreError};
use crate::config::Config;
use crate::data::SampleSource;

/// Configuration keys that may differ between ranks: they change neither the math nor the
/// messages (worker threads follow each host's cores; only rank 0 logs and writes the JSON and
/// TensorBoard logs; index caches are per host), or they name files that hosts may keep at
/// different paths — the training data and its tokenizer, whose content the ranks compare instead
/// ([`data_fingerprint`]).
pub const PER_RANK_KEYS: &[&str] = &[
    "train.threads",
    "logging.log_format",
    "logging.log_json",
    "logging.tensorboard_dir",
    "logging.tensorboard_log_interval",
    "logging.log_interval",
    "data.cache_dir",
    "data.data_path",
    "data.train_data_path",
    "data.valid_data_path",
    "data.test_data_path",
    "data.tokenizer",
    "data.merge_file",
];

/// At most this many differences are listed in an error (the count says how many there were).
const LISTED: usize = 8;

/// Errors of the agreement; each names this rank.
#[derive(Debug, Error)]
pub enum AgreeError {
    /// The ranks run with different settings.
    #[error(
        "rank {rank}: the ranks run with different settings ({detail}); every rank must be started with the \
         same configuration, flags and troupe binary"
    )]
    Disagree { rank: usize, detail: String },
    /// The rendezvous store failed or another rank never published its settings.
    #[error("rank {rank}: {op}: {source}")]
    Store { rank: usize, op: String, source: StoreError },
    /// A published entry is not a settings list (another program uses the same store keys?).
    #[error("rank {rank}: the settings published by rank {peer} cannot be read: {reason}")]
    Garbled { rank: usize, peer: usize, reason: String },
}

/// One setting whose value differs between two ranks (`None`: unset on that rank).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The setting: a configuration key (`model.hidden_size`), a flag (`--no-checksums`) or a
    /// fact about the rank (`troupe version`, `training data`).
    pub key: String,
    /// Its value on this rank.
    pub mine: Option<String>,
    /// Its value on the other rank.
    pub theirs: Option<String>,
}

/// The settings of one rank that every rank must share, as ordered `key → value` text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    entries: BTreeMap<String, String>,
}

impl Settings {
    /// The configuration's keys (dotted, as `--set` takes them) with their values, without
    /// [`PER_RANK_KEYS`], and the version of this binary.
    pub fn of_config(cfg: &Config) -> Settings {
        let mut s = Settings::of_binary();
        match cfg.flat() {
            Ok(flat) => s.entries.extend(flat),
            // Not reachable for a parsed configuration; the rendering is then compared whole.
            Err(e) => {
                s.entries.insert("configuration".into(), format!("unrenderable: {e}"));
            }
        }
        for k in PER_RANK_KEYS {
            s.entries.remove(*k);
        }
        s
    }

    /// The version of this binary alone: what every command's settings start from.
    pub fn of_binary() -> Settings {
        let mut s = Settings::default();
        s.set("troupe version", env!("CARGO_PKG_VERSION"));
        s
    }

    /// Adds or replaces one setting.
    pub fn set(&mut self, key: &str, value: impl ToString) {
        self.entries.insert(key.to_string(), value.to_string());
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// Number of settings.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The wire form: one `key\tvalue` line per setting (keys and values have no tabs or line
    /// breaks: values are TOML renderings, which escape them).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::new();
        for (k, v) in &self.entries {
            out.push_str(&k.replace(['\t', '\n'], " "));
            out.push('\t');
            out.push_str(&v.replace(['\t', '\n'], " "));
            out.push('\n');
        }
        out.into_bytes()
    }

    /// Reads [`Settings::encode`]'s form.
    ///
    /// # Errors
    /// Text that is not UTF-8 or a line without a tab, named by its number.
    pub fn decode(bytes: &[u8]) -> Result<Settings, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        let mut s = Settings::default();
        for (i, line) in text.lines().enumerate() {
            let (k, v) =
                line.split_once('\t').ok_or_else(|| format!("line {} has no tab: {line:?}", i + 1))?;
            s.entries.insert(k.to_string(), v.to_string());
        }
        Ok(s)
    }

    /// The settings whose values differ from `other`'s, in key order.
    pub fn differences(&self, other: &Settings) -> Vec<Difference> {
        let mut keys: Vec<&String> = self.entries.keys().chain(other.entries.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|k| {
                let (mine, theirs) = (self.entries.get(k), other.entries.get(k));
                (mine != theirs).then(|| Difference {
                    key: k.clone(),
                    mine: mine.cloned(),
                    theirs: theirs.cloned(),
                })
            })
            .collect()
    }
}

/// What the ranks compare of their training data: the number of samples, their length and a
/// hash of the tokens of the first, middle and last sample (in the seed's shuffled order), so
/// the same data at different paths agree and different data, tokenizers, splits or seeds do not.
pub fn data_fingerprint(source: &dyn SampleSource) -> String {
    let n = source.num_samples();
    let (mut tokens, mut bytes) = (Vec::new(), Vec::new());
    for i in [0, n / 2, n.saturating_sub(1)].into_iter().filter(|&i| i < n) {
        if let Err(e) = source.sample_into(i, &mut tokens) {
            return format!("{n} samples, sample {i} unreadable ({e})");
        }
        bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    }
    let h = crate::data::gpt_dataset::fnv1a64(&bytes);
    format!("{n} samples of {} tokens, hash {h:016x}", source.sample_tokens())
}

/// Describes `diffs` between `rank` and `peer` for an error: at most 8 of them (`LISTED`).
pub fn describe(diffs: &[Difference], rank: usize, peer: usize) -> String {
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "unset".into());
    let mut parts: Vec<String> = diffs
        .iter()
        .take(LISTED)
        .map(|d| format!("{}: {} on rank {rank}, {} on rank {peer}", d.key, show(&d.mine), show(&d.theirs)))
        .collect();
    if diffs.len() > LISTED {
        parts.push(format!("and {} more", diffs.len() - LISTED));
    }
    format!(
        "{} setting{} of rank {rank} differ{} from rank {peer}'s: {}",
        diffs.len(),
        if diffs.len() == 1 { "" } else { "s" },
        if diffs.len() == 1 { "s" } else { "" },
        parts.join("; ")
    )
}

/// Publishes `mine` as rank `rank`'s settings under `settings/<rank>` and compares: rank 0 with
/// every other rank, the others with rank 0. Waits at most `timeout` for the others' entries.
///
/// # Errors
/// [`AgreeError::Disagree`] listing the differences (rank 0 names every rank that differs and
/// details the first), [`AgreeError::Store`] when the store fails or a rank publishes nothing
/// within `timeout`, [`AgreeError::Garbled`] for an unreadable entry.
pub fn agree(
    store: &mut StoreClient,
    rank: usize,
    world: usize,
    mine: &Settings,
    timeout: Duration,
) -> Result<(), AgreeError> {
    let store_err = |op: String, source| AgreeError::Store { rank, op, source };
    store
        .set(&format!("settings/{rank}"), &mine.encode())
        .map_err(|e| store_err("publishing its settings".into(), e))?;
    let deadline = Instant::now() + timeout;
    let peers: Vec<usize> = if rank == 0 { (1..world).collect() } else { vec![0] };
    let mut first: Option<String> = None;
    let mut differing: Vec<usize> = Vec::new();
    for peer in peers {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let bytes = store
            .get(&format!("settings/{peer}"), left)
            .map_err(|e| store_err(format!("reading the settings of rank {peer}"), e))?;
        let theirs = Settings::decode(&bytes).map_err(|reason| AgreeError::Garbled { rank, peer, reason })?;
        let diffs = mine.differences(&theirs);
        if !diffs.is_empty() {
            differing.push(peer);
            first.get_or_insert_with(|| describe(&diffs, rank, peer));
        }
    }
    match first {
        None => Ok(()),
        Some(detail) if differing.len() == 1 => Err(AgreeError::Disagree { rank, detail }),
        Some(detail) => {
            let list: Vec<String> = differing.iter().map(usize::to_string).collect();
            Err(AgreeError::Disagree {
                rank,
                detail: format!("ranks {} differ from rank {rank}; {detail}", list.join(", ")),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::store::StoreServer;

    fn config(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml_str(
            "[model]\nvocab_size = 4096\nseq_length = 16\nnum_layers = 2\nhidden_size = 16\nnum_attention_heads = 2\n",
            "test",
            &sets,
        )
        .unwrap()
    }

    #[test]
    fn settings_hold_the_configuration_but_not_what_may_differ_per_rank() {
        let s = Settings::of_config(&config(&["train.lr=0.0006", "train.threads=3"]));
        assert_eq!(s.get("model.hidden_size"), Some("16"));
        assert_eq!(s.get("train.lr"), Some("0.0006"), "f32 values print as written");
        assert_eq!(s.get("parallel.pipeline_schedule"), Some("\"1f1b\""));
        assert_eq!(s.get("troupe version"), Some(env!("CARGO_PKG_VERSION")));
        for k in PER_RANK_KEYS {
            assert_eq!(s.get(k), None, "{k} may differ per rank");
        }
        // Threads and the log file do not make two ranks disagree; the learning rate does.
        let other =
            Settings::of_config(&config(&["train.lr=0.0006", "train.threads=7", "logging.log_json=x"]));
        assert!(s.differences(&other).is_empty());
        let other = Settings::of_config(&config(&["train.lr=0.001"]));
        let d = s.differences(&other);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            (d[0].key.as_str(), d[0].mine.as_deref(), d[0].theirs.as_deref()),
            ("train.lr", Some("0.0006"), Some("0.001"))
        );
    }

    #[test]
    fn settings_survive_their_wire_form_and_unset_keys_are_differences() {
        let mut a = Settings::of_config(&config(&["data.split=\"98,1,1\""]));
        a.set("--inject", "crash:rank=1,step=2; slow:rank=0");
        let b = Settings::decode(&a.encode()).unwrap();
        assert_eq!(a, b);
        assert!(a.len() > 20, "{}", a.len());
        let mut c = b.clone();
        c.entries.remove("--inject");
        c.set("--no-checksums", true);
        let d = a.differences(&c);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(
            (d[0].key.as_str(), d[0].mine.as_deref(), d[0].theirs.as_deref()),
            ("--inject", Some("crash:rank=1,step=2; slow:rank=0"), None)
        );
        assert_eq!(
            (d[1].key.as_str(), d[1].mine.as_deref(), d[1].theirs.as_deref()),
            ("--no-checksums", None, Some("true"))
        );
        let text = describe(&d, 3, 0);
        assert!(text.starts_with("2 settings of rank 3 differ from rank 0's"), "{text}");
        assert!(text.contains("--no-checksums: unset on rank 3, true on rank 0"), "{text}");
        assert!(Settings::decode(b"model.x 1\n").unwrap_err().contains("line 1 has no tab"));
        assert!(Settings::decode(&[0xff, b'\t']).unwrap_err().contains("UTF-8"));
        // Many differences are counted, not all listed.
        let mut many = Settings::default();
        for i in 0..12 {
            many.set(&format!("k{i:02}"), i);
        }
        let text = describe(&many.differences(&Settings::default()), 1, 0);
        assert!(text.starts_with("12 settings") && text.ends_with("and 4 more"), "{text}");
    }

    #[test]
    fn the_data_fingerprint_sees_the_tokens_not_the_path() {
        let open = |sets: &[&str]| {
            let cfg = config(sets);
            let data = crate::train::corpus::open(&cfg).unwrap();
            data_fingerprint(data.train.as_ref())
        };
        let base = open(&[]);
        assert!(base.contains(" samples of 17 tokens, hash "), "{base}");
        assert_eq!(open(&[]), base, "the same data gives the same fingerprint");
        // Another seed shuffles the samples otherwise (same count); another split holds other
        // documents; another sequence length cuts them elsewhere.
        let seed = open(&["train.seed=99"]);
        assert!(seed != base && seed.starts_with(&base[..base.find(", hash").unwrap()]), "{seed} vs {base}");
        assert_ne!(open(&["data.split=\"50,49,1\""]), base);
        assert_ne!(open(&["model.seq_length=12"]), base);
        // A path is not compared: the data's content is.
        let s = Settings::of_config(&config(&["data.data_path=[\"/node-a/corpus\"]"]));
        assert!(
            s.differences(&Settings::of_config(&config(&["data.data_path=[\"/node-b/corpus\"]"]))).is_empty()
        );
    }

    /// Runs `agree` as each rank of `all` in its own thread over one store.
    fn agree_all(all: Vec<Settings>, timeout: Duration) -> Vec<Result<(), AgreeError>> {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr().to_string();
        let world = all.len();
        let handles: Vec<_> = all
            .into_iter()
            .enumerate()
            .map(|(rank, s)| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut store = StoreClient::connect(&addr, timeout).unwrap().with_prefix("test");
                    agree(&mut store, rank, world, &s, timeout)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn ranks_agree_or_each_names_the_difference() {
        let base = Settings::of_config(&config(&[]));
        let results = agree_all(vec![base.clone(); 3], Duration::from_secs(20));
        assert!(results.iter().all(Result::is_ok), "{results:?}");

        let mut odd = base.clone();
        odd.set("--no-checksums", true);
        let results = agree_all(vec![base.clone(), base.clone(), odd.clone(), odd], Duration::from_secs(20));
        assert!(results[1].is_ok(), "rank 1 equals rank 0: {:?}", results[1]);
        let e0 = results[0].as_ref().unwrap_err().to_string();
        assert!(e0.contains("ranks 2, 3 differ from rank 0"), "{e0}");
        assert!(e0.contains("--no-checksums: unset on rank 0, true on rank 2"), "{e0}");
        let e2 = results[2].as_ref().unwrap_err().to_string();
        assert!(
            e2.starts_with("rank 2: the ranks run with different settings (1 setting of rank 2 differs"),
            "{e2}"
        );
        assert!(e2.contains("--no-checksums: true on rank 2, unset on rank 0"), "{e2}");
        assert!(results[3].as_ref().unwrap_err().to_string().contains("rank 3"));
    }

    #[test]
    fn a_rank_that_publishes_nothing_is_a_timeout_naming_it() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let mut store = StoreClient::connect(&server.addr().to_string(), Duration::from_secs(5)).unwrap();
        let s = Settings::of_config(&config(&[]));
        let t = Instant::now();
        let e = agree(&mut store, 0, 2, &s, Duration::from_millis(300)).unwrap_err().to_string();
        assert!(e.contains("rank 0: reading the settings of rank 1") && e.contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // A garbled entry is named by its publisher.
        store.set("settings/1", b"no tab here").unwrap();
        let e = agree(&mut store, 0, 2, &s, Duration::from_secs(5)).unwrap_err().to_string();
        assert!(e.contains("settings published by rank 1 cannot be read: line 1 has no tab"), "{e}");
    }
}
