//! End-to-end migration benchmark: real KVM guests migrated by `ferry demo`
//! (two processes over loopback TCP), beside the loopback TCP ceiling measured
//! in the same run the standard way (one stream and two, 1 MiB writes, 3 s,
//! as iperf3); "% raw" is against the one-stream figure.
//!
//! ```text
//! cargo build --release -p ferry-cli --bin ferry -p ferry-benches --bin migrate_bench
//! target/release/migrate_bench [--runs 3] [--sizes 1G,4G] [--rates 0,50M,500M]
//!     [--channels 1,2] [--tls] [--postcopy] [--json]
//! ```
//!
//! Migrations run in clear text (`--insecure`) unless `--tls` is given: then
//! each configuration runs twice, in clear text and encrypted (TLS 1.3 with
//! mutual x509, the demo's throw-away CA), and the table adds the encrypted
//! run's throughput as a share of the clear-text one. With `--postcopy --tls` the two runs of
//! a configuration are into memfd RAM, in clear text and encrypted (`memfd-tls`).
//!
//! Each configuration runs `--runs` times; the table shows medians (and the
//! worst downtime, since the limit is a ceiling that no run may cross).
//!
//! With `--postcopy` (default rates: 500M) every migration switches to
//! postcopy after the first pass, and each configuration runs twice: into
//! memfd RAM (what `ferry receive --postcopy` does) and, as the baseline,
//! into anonymous RAM (`--anonymous`: `UFFDIO_COPY`, and a switchover that
//! drops every changed page one by one). The table adds the destination's
//! fault latency (p50, p99, p99.9) and the guest's own speed during postcopy
//! against its speed before.

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
    let postcopy = args.iter().any(|a| a == "--postcopy");
    let sizes: Vec<u64> = get("--sizes")
        .unwrap_or_else(|| "1G,4G".into())
        .split(',')
        .filter_map(parse_size)
        .collect();
    let default_rates = if postcopy { "500M" } else { "0,50M,500M" };
    let rates: Vec<u64> = get("--rates")
        .unwrap_or_else(|| default_rates.into())
        .split(',')
        .filter_map(parse_size)
        .collect();
    let channels: Vec<usize> = get("--channels")
        .unwrap_or_else(|| "1".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .filter(|&c| c > 0)
        .collect();
    let tls = args.iter().any(|a| a == "--tls");
    let variants: &[&str] = match (postcopy, tls) {
        (true, true) => &["memfd", "memfd-tls"],
        (true, false) => &["memfd", "anonymous"],
        (false, true) => &["plain", "tls"],
        (false, false) => &["plain"],
    };
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
            for &chans in &channels {
                for &variant in variants {
                    rows.push(run_config(
                        &ferry, size, rate, chans, variant, postcopy, runs,
                    ));
                }
            }
        }
    }

    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "downtime_limit_ms": 300, "postcopy": postcopy, "rows": rows })
            )
            .unwrap_or_default()
        );
        return;
    }
    if postcopy {
        print_postcopy(&rows, runs);
    } else {
        print_precopy(&rows, runs);
    }
}

/// Runs one configuration `runs` times; its row of medians.
fn run_config(
    ferry: &std::path::Path,
    size: u64,
    rate: u64,
    chans: usize,
    variant: &str,
    postcopy: bool,
    runs: usize,
) -> Value {
    let mut total_s = Vec::new();
    let mut downtime = Vec::new();
    let mut thr = Vec::new();
    let mut rounds = Vec::new();
    let mut ceiling = Vec::new();
    let mut ceiling2 = Vec::new();
    let (mut p50, mut p99, mut p999, mut speed) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
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
            "migrate_bench: {} GiB guest dirtying {} MB/s, {chans} channel(s){}, run {}/{}",
            size >> 30,
            rate >> 20,
            if postcopy {
                format!(", postcopy into {variant} RAM")
            } else {
                String::new()
            },
            run + 1,
            runs
        );
        let mut cmd = Command::new(ferry);
        cmd.args([
            "demo",
            "--json",
            "--mem",
            &size.to_string(),
            "--dirty-rate",
            &rate.to_string(),
            "--channels",
            &chans.to_string(),
        ]);
        if postcopy {
            cmd.arg("--postcopy");
        }
        if variant == "anonymous" {
            cmd.arg("--anonymous");
        }
        if !variant.ends_with("tls") {
            cmd.arg("--insecure");
        }
        let r: Option<Value> = cmd
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok());
        match r {
            Some(r) if r["ok"] == true => {
                total_s.push(r["source"]["total_ns"].as_f64().unwrap_or(f64::NAN) / 1e9);
                downtime.push(r["downtime_ms"].as_f64().unwrap_or(f64::NAN));
                thr.push(r["source"]["throughput"].as_f64().unwrap_or(f64::NAN));
                rounds.push(r["source"]["rounds"].as_f64().unwrap_or(f64::NAN));
                mismatches += r["destination"]["verify_mismatches"].as_u64().unwrap_or(0);
                let pc = &r["destination"]["postcopy"]["fault_latency"];
                p50.push(pc["p50_ns"].as_f64().unwrap_or(f64::NAN) / 1e3);
                p99.push(pc["p99_ns"].as_f64().unwrap_or(f64::NAN) / 1e3);
                p999.push(pc["p999_ns"].as_f64().unwrap_or(f64::NAN) / 1e3);
                let before = r["guest_rate_before"].as_f64().unwrap_or(f64::NAN);
                let during = r["destination"]["guest_rate_in_postcopy"]
                    .as_f64()
                    .unwrap_or(f64::NAN);
                speed.push(100.0 * during / before);
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
    json!({
        "guest_bytes": size,
        "dirty_rate": rate,
        "channels": chans,
        "ram": variant.trim_end_matches("-tls"),
        "variant": variant,
        "link": if variant.ends_with("tls") { "tls" } else { "plain" },
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
        "fault_p50_us_median": median(&mut p50),
        "fault_p99_us_median": median(&mut p99),
        "fault_p999_us_median": median(&mut p999),
        "guest_speed_pct_median": median(&mut speed),
    })
}

fn f(r: &Value, k: &str) -> f64 {
    r[k].as_f64().unwrap_or(f64::NAN)
}

fn print_precopy(rows: &[Value], runs: usize) {
    println!("End-to-end live migration, `ferry demo` (io_uring, downtime limit 300 ms), medians of {runs} runs");
    println!(
        "{:>6} {:>9} {:>5} {:>6} {:>9} {:>12} {:>12} {:>11} {:>11} {:>8} {:>11} {:>7} {:>6} {:>8}",
        "guest",
        "dirty",
        "chans",
        "link",
        "total s",
        "downtime ms",
        "worst ms",
        "GB/s",
        "raw GB/s",
        "% raw",
        "raw2 GB/s",
        "rounds",
        "fails",
        "% plain"
    );
    for (i, r) in rows.iter().enumerate() {
        // An encrypted row follows its clear-text twin.
        let vs_plain = match (r["link"].as_str(), i.checked_sub(1).map(|j| &rows[j])) {
            (Some("tls"), Some(p)) => format!(
                "{:.0}%",
                100.0 * f(r, "throughput_median") / f(p, "throughput_median")
            ),
            _ => "-".to_string(),
        };
        println!(
            "{:>4}Gi {:>6}M/s {:>5} {:>6} {:>9.2} {:>12.2} {:>12.2} {:>11.2} {:>11.2} {:>7.0}% {:>11.2} {:>7.0} {:>6} {:>8}",
            r["guest_bytes"].as_u64().unwrap_or(0) >> 30,
            r["dirty_rate"].as_u64().unwrap_or(0) >> 20,
            r["channels"],
            r["link"].as_str().unwrap_or(""),
            f(r, "total_s_median"),
            f(r, "downtime_ms_median"),
            f(r, "downtime_ms_max"),
            f(r, "throughput_median") / 1e9,
            f(r, "ceiling_median") / 1e9,
            f(r, "throughput_vs_ceiling") * 100.0,
            f(r, "ceiling_two_streams_median") / 1e9,
            f(r, "rounds_median"),
            r["failures"],
            vs_plain,
        );
    }
    println!("Targets: encrypted throughput >= 70% of plain; idle throughput >= 85% of raw; downtime (worst) <= 5 ms idle, <= 10 ms at 50 MB/s, <= 50 ms at 500 MB/s; never above 300 ms.");
}

fn print_postcopy(rows: &[Value], runs: usize) {
    println!("Postcopy after the first pass, `ferry demo --postcopy` (io_uring), medians of {runs} runs; each row's baseline is the one above it: into anonymous RAM, or (memfd-tls) in clear text");
    println!(
        "{:>6} {:>9} {:>5} {:>10} {:>9} {:>12} {:>9} {:>9} {:>9} {:>10} {:>8} {:>6}",
        "guest",
        "dirty",
        "chans",
        "RAM",
        "total s",
        "downtime ms",
        "worst ms",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "speed %",
        "fails"
    );
    for r in rows {
        println!(
            "{:>4}Gi {:>6}M/s {:>5} {:>10} {:>9.2} {:>12.2} {:>9.2} {:>9.0} {:>9.0} {:>10.0} {:>7.0}% {:>6}",
            r["guest_bytes"].as_u64().unwrap_or(0) >> 30,
            r["dirty_rate"].as_u64().unwrap_or(0) >> 20,
            r["channels"],
            r["variant"].as_str().unwrap_or(""),
            f(r, "total_s_median"),
            f(r, "downtime_ms_median"),
            f(r, "downtime_ms_max"),
            f(r, "fault_p50_us_median"),
            f(r, "fault_p99_us_median"),
            f(r, "fault_p999_us_median"),
            f(r, "guest_speed_pct_median"),
            r["failures"],
        );
    }
    println!("Targets: downtime (worst) <= 10 ms for 1 GiB and 4 GiB at 500 MB/s; fault p99 <= 100 µs, p99.9 <= 1 ms; guest speed >= 50 %.");
}
