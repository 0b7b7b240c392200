//! Replays the fuzz seed corpus and every input the fuzzer ever found a problem with
//! (`fuzz/regressions/request_stream/`) through the fuzz harness, so a fixed finding stays fixed
//! in the ordinary `cargo test` run. The harness is the fuzz crate's own file.

#[path = "../../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

fn fuzz_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz").join(sub).join("request_stream")
}

fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.ends_with("README.md"))
        .collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

/// Each input must pass within this (libFuzzer's `-timeout` in .ci/run is the same): a hang is a
/// finding too.
const PER_INPUT: Duration = Duration::from_secs(10);

fn replay(what: &str, inputs: Vec<(PathBuf, Vec<u8>)>) -> usize {
    let n = inputs.len();
    for (path, data) in inputs {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(|| harness::run_one(&data));
            let _ = tx.send(r.is_ok());
        });
        match rx.recv_timeout(PER_INPUT) {
            Ok(true) => {}
            Ok(false) => panic!("{what} {} fails the harness again", path.display()),
            Err(_) => panic!("{what} {} hangs again (over {PER_INPUT:?})", path.display()),
        }
    }
    n
}

#[test]
fn every_past_fuzz_finding_is_handled() {
    let n = replay("regression", inputs(&fuzz_dir("regressions")));
    assert!(n >= 1, "fuzz/regressions/request_stream/ holds the findings; it cannot be empty");
}

/// Set BLOCKFUSE_WRITE_FUZZ_SEEDS=1 to (re)write the seed corpus from `harness::seeds()` first:
/// `BLOCKFUSE_WRITE_FUZZ_SEEDS=1 cargo test -p blockfuse-core --test fuzz_regressions`.
#[test]
fn the_committed_seed_corpus_is_current_and_passes() {
    if std::env::var_os("BLOCKFUSE_WRITE_FUZZ_SEEDS").is_some() {
        write_fuzz_seeds();
    }
    let on_disk = inputs(&fuzz_dir("seeds"));
    let generated = harness::seeds();
    let names: Vec<_> = on_disk
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for (name, data) in &generated {
        let i = names.iter().position(|n| n == name);
        let i = i.unwrap_or_else(|| {
            panic!("seed {name} is missing: rerun with BLOCKFUSE_WRITE_FUZZ_SEEDS=1")
        });
        assert_eq!(
            &on_disk[i].1, data,
            "seed {name} is stale: rerun with BLOCKFUSE_WRITE_FUZZ_SEEDS=1"
        );
    }
    replay("seed", on_disk);
}

#[test]
fn inputs_shorter_than_the_configuration_are_ignored() {
    harness::run_one(&[]);
    harness::run_one(&[0xff]);
}

fn write_fuzz_seeds() {
    let dir = fuzz_dir("seeds");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in harness::seeds() {
        std::fs::write(dir.join(name), data).unwrap();
    }
}
