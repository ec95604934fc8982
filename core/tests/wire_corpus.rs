//! Replays every file of the committed fuzz seed corpus (`fuzz/seeds/<target>/`) through
//! the same harnesses the fuzz targets run, so `cargo test` exercises the corpus
//! without a fuzzer. Also checks the corpus is what the seed generator produces.
//!
//! Regenerate the seeds with `FERRY_WRITE_SEEDS=1 cargo test -p ferry-core --test wire_corpus`.
#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

#[path = "../../fuzz/src/harness.rs"]
mod harness;

use std::fs;
use std::path::PathBuf;

use ferry_core::session::Custody;

fn seeds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds")
}

#[test]
fn seed_corpus_matches_generator() {
    let dir = seeds_dir();
    let write = std::env::var_os("FERRY_WRITE_SEEDS").is_some();
    for (target, name, bytes) in harness::seeds() {
        let path = dir.join(target).join(&name);
        if write {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, &bytes).unwrap();
        }
        let on_disk = fs::read(&path)
            .unwrap_or_else(|e| panic!("seed {} is missing ({e}); regenerate", path.display()));
        assert_eq!(
            on_disk,
            bytes,
            "seed {} is stale; regenerate",
            path.display()
        );
    }
}

fn replay(target: &str) -> usize {
    let dir = seeds_dir().join(target);
    let mut n = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = fs::read(&path).unwrap();
        match target {
            "stream_decoder" => {
                let out = harness::stream_decoder(&data).expect("a seed has a header");
                if name.starts_with("valid_") {
                    assert!(out.ended_cleanly(), "{name}: {:?}", out.trace);
                    assert_eq!(out.torn(), 0, "{name}");
                    assert!(out.records() >= 2, "{name}");
                }
                if name.starts_with("torn_") {
                    assert!(out.ended_cleanly(), "{name}: {:?}", out.trace);
                    assert_eq!(out.torn(), 1, "{name}");
                }
            }
            "return_path" => {
                let out = harness::return_path(&data).expect("a seed has a header");
                if name.starts_with("valid_") {
                    assert!(
                        !out.is_empty() && out.iter().all(|r| r.is_ok()),
                        "{name}: {out:?}"
                    );
                }
            }
            "roundtrip" => {
                harness::roundtrip(&data).expect("a seed has a header");
            }
            "destination_session" | "source_session" => {
                let run = if target == "destination_session" {
                    harness::destination_session(&data)
                } else {
                    harness::source_session(&data)
                };
                assert!(run.ops > 0, "{name}: no operations");
                if name.starts_with("complete_") {
                    assert!(run.completed, "{name}: {run:?}");
                    assert_eq!(run.failure, None, "{name}");
                    let guest = if target == "destination_session" {
                        Custody::Runs
                    } else {
                        Custody::Released
                    };
                    assert_eq!(run.custody, guest, "{name}");
                }
                if name.starts_with("fail_") {
                    let e = run.failure.unwrap_or_else(|| panic!("{name}: {run:?}"));
                    assert_eq!(e.custody, run.custody, "{name}");
                    assert!(!run.completed, "{name}");
                }
            }
            _ => unreachable!(),
        }
        n += 1;
    }
    n
}

#[test]
fn replay_stream_decoder_seeds() {
    assert!(replay("stream_decoder") >= 20);
}

#[test]
fn replay_return_path_seeds() {
    assert!(replay("return_path") >= 6);
}

#[test]
fn replay_roundtrip_seeds() {
    assert!(replay("roundtrip") >= 10);
}

#[test]
fn replay_destination_session_seeds() {
    assert!(replay("destination_session") >= 10);
}

#[test]
fn replay_source_session_seeds() {
    assert!(replay("source_session") >= 10);
}

/// The harness must notice a decoder that lets a torn page through: feed a torn stream
/// and check the harness reports it as torn (so the replay above can fail).
#[test]
fn harness_detects_torn_page() {
    let neg = harness::session(7);
    let recs = harness::sample_records();
    let stream = harness::encode_stream(&neg, &recs, Some(3));
    let out = harness::decode_stream(&neg, &stream, &mut || 7, false);
    assert_eq!(out.torn(), 1);
    assert!(out.ended_cleanly());
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Round-trip property: random record sequences (valid and not) encode and decode back
/// to themselves, in random pieces, under every configuration.
#[test]
fn random_round_trips() {
    let mut rng = Rng(0x5eed_0001);
    for i in 0..1000 {
        let len = 2 + (rng.next() % 120) as usize;
        let mut data = rng.bytes(len);
        data[0] = (i % 8) as u8;
        harness::roundtrip(&data).unwrap();
    }
}

/// Robustness property: valid streams with random bytes flipped, cut or spliced never
/// break the decoder's contract (the harness asserts it), and some are refused.
#[test]
fn mutated_streams_keep_the_contract() {
    let mut rng = Rng(0x5eed_0002);
    let corpus: Vec<Vec<u8>> = harness::seeds()
        .into_iter()
        .filter(|(t, _, _)| *t == "stream_decoder")
        .map(|(_, _, b)| b)
        .collect();
    let mut refused = 0;
    for _ in 0..3000 {
        let mut data = corpus[(rng.next() % corpus.len() as u64) as usize].clone();
        for _ in 0..1 + rng.next() % 3 {
            let at = 2 + (rng.next() % (data.len() as u64 - 2)) as usize;
            match rng.next() % 3 {
                0 => data[at] ^= 1 << (rng.next() % 8),
                1 => data.truncate(at),
                _ => {
                    let n = (rng.next() % 40) as usize;
                    let extra = rng.bytes(n);
                    data.splice(at..at, extra);
                }
            }
            if data.len() < 3 {
                break;
            }
        }
        data[1] = rng.next() as u8;
        let out = harness::stream_decoder(&data).unwrap();
        if out.error().is_some() {
            refused += 1;
        }
    }
    assert!(
        refused > 1000,
        "only {refused} mutated streams were refused"
    );
}

/// Random garbage on the return path never breaks its decoder.
#[test]
fn random_return_path_bytes() {
    let mut rng = Rng(0x5eed_0003);
    for _ in 0..2000 {
        let len = 2 + (rng.next() % 200) as usize;
        harness::return_path(&rng.bytes(len)).unwrap();
    }
}

/// Random operations, and the session seeds with random bytes flipped, cut or spliced,
/// never break the sessions' promises (the harnesses assert them on every step).
#[test]
fn random_session_ops_keep_the_protocol() {
    let mut rng = Rng(0x5eed_0004);
    for _ in 0..2000 {
        let len = 1 + (rng.next() % 200) as usize;
        let data = rng.bytes(len);
        harness::destination_session(&data);
        harness::source_session(&data);
    }
    let seeds = harness::seeds();
    let mut reached = [0usize; 2];
    for (k, target) in ["destination_session", "source_session"].iter().enumerate() {
        let corpus: Vec<&Vec<u8>> = seeds
            .iter()
            .filter(|(t, _, _)| t == target)
            .map(|(_, _, b)| b)
            .collect();
        for _ in 0..3000 {
            let mut data = corpus[(rng.next() % corpus.len() as u64) as usize].clone();
            for _ in 0..1 + rng.next() % 3 {
                let at = (rng.next() % data.len() as u64) as usize;
                match rng.next() % 3 {
                    0 => data[at] ^= 1 << (rng.next() % 8),
                    1 => data.truncate(at.max(1)),
                    _ => {
                        let n = (rng.next() % 16) as usize;
                        let extra = rng.bytes(n);
                        data.splice(at..at, extra);
                    }
                }
            }
            let run = if k == 0 {
                harness::destination_session(&data)
            } else {
                harness::source_session(&data)
            };
            if run.completed {
                reached[k] += 1;
            }
        }
    }
    assert!(
        reached.iter().all(|&n| n > 100),
        "too few mutated runs completed: {reached:?}"
    );
}

/// Inputs the `source_session` fuzz target found, each of which broke a promise of
/// `SourceSession`: `finish_stream` / `finish_postcopy` queue another end of stream (and,
/// for postcopy-sections, another listen marker) when called again before the first was
/// handed out; the 4-slot transmit queue then drops its oldest record, and a completed
/// session still hands out what is left queued. In order: a second end before go; the
/// stop-and-copy marker dropped; a second end in postcopy; an end after completion.
/// Regression test: the session now refuses a repeated finish (and clears
/// its queue on completion).
#[test]
fn source_session_repeated_finish() {
    for hex in [
        "030390050400000496035898",
        "03ff010568ff16686868",
        "0003000504ff9670989490041919",
        "000300050400000496709894900419194eb4",
    ] {
        let data: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        harness::source_session(&data);
    }
}
