//! End-to-end migration benchmark: real KVM guests migrated by `ferry demo`
//! (two processes over loopback TCP), beside the loopback TCP ceiling measured
//! in the same run the standard way (one stream and two, 1 MiB writes, 3 s,
//! as iperf3); "% raw" is against the one-stream figure.
//!
//! ```text
//! cargo build --release -p ferry-cli --bin ferry -p ferry-benches --bin migrate_bench
//! target/release/migrate_bench [--runs 3] [--sizes 1G,4G] [--rates 0,50M,200M] [--json]
//! ```
//!
//! Each configuration runs `--runs` times; the table shows medians (and the
//! worst downtime, since the limit is a ceiling that no run may cross).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (n, m) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>().ok().map(|v| v * m)
}

/// The loopback TCP ceiling, measured the way iperf3 measures it: `streams`
/// connections, each written with 1 MiB writes (`write_all` of one 1 MiB
/// buffer, again and again) for `secs` seconds and read on the other side
/// into a 1 MiB buffer; returns the bytes/s all readers received together.
fn raw_ceiling(streams: usize, secs: f64) -> std::io::Result<f64> {
    const WRITE: usize = 1 << 20;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let t = Instant::now();
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..streams {
        let w = TcpStream::connect(addr)?;
        let (mut s, _) = l.accept()?;
        readers.push(std::thread::spawn(move || -> std::io::Result<u64> {
            let mut buf = vec![0u8; WRITE];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(total);
                }
                total += n as u64;
            }
        }));
        writers.push(std::thread::spawn(move || -> std::io::Result<()> {
            let mut w = w;
            let buf: Vec<u8> = (0..WRITE).map(|i| (i % 251 + 1) as u8).collect();
            let t = Instant::now();
            while t.elapsed().as_secs_f64() < secs {
                w.write_all(&buf)?;
            }
            Ok(())
        }));
    }
    for w in writers {
        w.join()
            .map_err(|_| std::io::Error::other("writer panicked"))??;
    }
    let mut total = 0u64;
    for r in readers {
        total += r
            .join()
            .map_err(|_| std::io::Error::other("reader panicked"))??;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runs: usize = get("--runs")
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let sizes: Vec<u64> = get("--sizes")
        .unwrap_or_else(|| "1G,4G".into())
        .split(',')
        .filter_map(parse_size)
        .collect();
    let rates: Vec<u64> = get("--rates")
        .unwrap_or_else(|| "0,50M,200M".into())
        .split(',')
        .filter_map(parse_size)
        .collect();
    let json_out = args.iter().any(|a| a == "--json");
    let ferry = match std::env::current_exe() {
        Ok(p) => p.with_file_name("ferry"),
        Err(e) => {
            eprintln!("migrate_bench: cannot find my own path: {e}");
            std::process::exit(1);
        }
    };
    if !ferry.exists() {
        eprintln!("migrate_bench: {} is missing; build it with: cargo build --release -p ferry-cli --bin ferry", ferry.display());
        std::process::exit(1);
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("migrate_bench: /dev/kvm is missing: no guest to migrate");
        std::process::exit(1);
    }

    let mut rows = Vec::new();
    for &size in &sizes {
        for &rate in &rates {
            let mut total_s = Vec::new();
            let mut downtime = Vec::new();
            let mut thr = Vec::new();
            let mut rounds = Vec::new();
            let mut ceiling = Vec::new();
            let mut ceiling2 = Vec::new();
            let mut failures = 0;
            let mut mismatches = 0u64;
            for run in 0..runs {
                // The ceiling, measured right before each run it is compared with.
                match raw_ceiling(1, 3.0) {
                    Ok(c) => ceiling.push(c),
                    Err(e) => eprintln!("migrate_bench: raw ceiling failed: {e}"),
                }
                match raw_ceiling(2, 3.0) {
                    Ok(c) => ceiling2.push(c),
                    Err(e) => eprintln!("migrate_bench: two-stream ceiling failed: {e}"),
                }
                eprintln!(
                    "migrate_bench: {} GiB guest dirtying {} MB/s, run {}/{}",
                    size >> 30,
                    rate >> 20,
                    run + 1,
                    runs
                );
                let out = Command::new(&ferry)
                    .args([
                        "demo",
                        "--json",
                        "--mem",
                        &size.to_string(),
                        "--dirty-rate",
                        &rate.to_string(),
                    ])
                    .output();
                let r: Option<Value> = out
                    .ok()
                    .and_then(|o| serde_json::from_slice(&o.stdout).ok());
                match r {
                    Some(r) if r["ok"] == true => {
                        total_s.push(r["source"]["total_ns"].as_f64().unwrap_or(f64::NAN) / 1e9);
                        downtime.push(r["downtime_ms"].as_f64().unwrap_or(f64::NAN));
                        thr.push(r["source"]["throughput"].as_f64().unwrap_or(f64::NAN));
                        rounds.push(r["source"]["rounds"].as_f64().unwrap_or(f64::NAN));
                        mismatches += r["destination"]["verify_mismatches"].as_u64().unwrap_or(0);
                    }
                    Some(r) => {
                        failures += 1;
                        eprintln!("migrate_bench: run failed: {}", r["error"]);
                    }
                    None => {
                        failures += 1;
                        eprintln!("migrate_bench: run printed no report");
                    }
                }
            }
            let worst = downtime.iter().cloned().fold(f64::NAN, f64::max);
            let c = median(&mut ceiling);
            let t = median(&mut thr);
            rows.push(json!({
                "guest_bytes": size,
                "dirty_rate": rate,
                "runs": runs,
                "failures": failures,
                "verify_mismatches": mismatches,
                "total_s_median": median(&mut total_s),
                "downtime_ms_median": median(&mut downtime),
                "downtime_ms_max": worst,
                "throughput_median": t,
                "ceiling_median": c,
                "ceiling_two_streams_median": median(&mut ceiling2),
                "throughput_vs_ceiling": t / c,
                "rounds_median": median(&mut rounds),
            }));
        }
    }

    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "downtime_limit_ms": 300, "rows": rows }))
                .unwrap_or_default()
        );
        return;
    }
    println!("End-to-end live migration, `ferry demo` (io_uring, 1 bulk channel, downtime limit 300 ms), medians of {runs} runs");
    println!(
        "{:>6} {:>9} {:>9} {:>12} {:>12} {:>11} {:>11} {:>8} {:>11} {:>7} {:>6}",
        "guest",
        "dirty",
        "total s",
        "downtime ms",
        "worst ms",
        "GB/s",
        "raw GB/s",
        "% raw",
        "raw2 GB/s",
        "rounds",
        "fails"
    );
    for r in &rows {
        println!(
            "{:>4}Gi {:>6}M/s {:>9.2} {:>12.2} {:>12.2} {:>11.2} {:>11.2} {:>7.0}% {:>11.2} {:>7.0} {:>6}",
            r["guest_bytes"].as_u64().unwrap_or(0) >> 30,
            r["dirty_rate"].as_u64().unwrap_or(0) >> 20,
            r["total_s_median"].as_f64().unwrap_or(f64::NAN),
            r["downtime_ms_median"].as_f64().unwrap_or(f64::NAN),
            r["downtime_ms_max"].as_f64().unwrap_or(f64::NAN),
            r["throughput_median"].as_f64().unwrap_or(f64::NAN) / 1e9,
            r["ceiling_median"].as_f64().unwrap_or(f64::NAN) / 1e9,
            r["throughput_vs_ceiling"].as_f64().unwrap_or(f64::NAN) * 100.0,
            r["ceiling_two_streams_median"].as_f64().unwrap_or(f64::NAN) / 1e9,
            r["rounds_median"].as_f64().unwrap_or(f64::NAN),
            r["failures"],
        );
    }
    println!("Targets: idle throughput >= 85% of raw; downtime <= 5 ms idle, <= 10 ms at 50 MB/s, <= 50 ms at 200 MB/s; never above 300 ms.");
}
