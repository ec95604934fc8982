//! End-to-end migration benchmark: real KVM guests migrated by `ferry demo`
//! (two processes over loopback TCP), beside the loopback TCP ceiling measured
//! in the same run the standard way (one stream and two, 1 MiB writes, 3 s,
//! as iperf3), right before each migration; "% raw" is the median of each
//! run's throughput against the one-stream ceiling measured before it.
//!
//! ```text
//! cargo build --release -p ferry-cli --bin ferry -p ferry-benches --bin migrate_bench
//! target/release/migrate_bench [--runs 3] [--sizes 1G,4G] [--rates 0,50M,500M]
//!     [--channels 1,2] [--huge-pages thp,none] [--downtime-ms 50]
//!     [--tls] [--postcopy] [--json]
//! ```
//!
//! `--huge-pages` names what backs guest RAM on both sides (`ferry demo
//! --huge-pages`): `thp` (the default, transparent huge pages) and `none`
//! (4 KiB pages); each named kind runs as its own row, one beside the other.
//!
//! Migrations run in clear text (`--insecure`) unless `--tls` is given: then
//! each configuration runs twice, in clear text and encrypted (TLS 1.3 with
//! mutual x509, the demo's throw-away CA), and the table adds the encrypted
//! run's throughput as a share of the clear-text one. With `--postcopy --tls` the two runs of
//! a configuration are into memfd RAM, in clear text and encrypted (`memfd-tls`).
//!
//! Each configuration runs `--runs` times; the table shows medians (and the
//! worst downtime, since the limit is a ceiling that no run may cross). The
//! configurations of one guest size and dirty rate take turns run by run, so
//! that rows compared with one another meet the same drift of a shared machine. The
//! policy's downtime limit is `--downtime-ms` (default 50, the issue's goal at
//! 500 MB/s; `ferry demo` alone defaults to QEMU's 300).
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
    // Precopy compares one channel with two (the default); postcopy runs on
    // one, the default there.
    let channels: Vec<usize> = get("--channels")
        .unwrap_or_else(|| if postcopy { "1" } else { "1,2" }.into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .filter(|&c| c > 0)
        .collect();
    let pages: Vec<String> = get("--huge-pages")
        .unwrap_or_else(|| "thp".into())
        .split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| p == "thp" || p == "none")
        .collect();
    if pages.is_empty() {
        eprintln!("migrate_bench: --huge-pages takes thp, none or both");
        std::process::exit(2);
    }
    let tls = args.iter().any(|a| a == "--tls");
    let variants: &[&str] = match (postcopy, tls) {
        (true, true) => &["memfd", "memfd-tls"],
        (true, false) => &["memfd", "anonymous"],
        (false, true) => &["plain", "tls"],
        (false, false) => &["plain"],
    };
    // The issue's goals are a worst of 50 ms at 500 MB/s: the benchmark asks
    // the policy for that, not for the demo's 300 ms default.
    let downtime_ms: u64 = get("--downtime-ms")
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
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

    // The configurations that are compared with one another (channels, page
    // kinds, clear text and encrypted, memfd and anonymous) take turns, run
    // by run, so that the machine's drift over minutes falls on all of them.
    let mut rows = Vec::new();
    for &size in &sizes {
        for &rate in &rates {
            let mut block = Vec::new();
            for &chans in &channels {
                for page in &pages {
                    for &variant in variants {
                        block.push((
                            Config {
                                size,
                                rate,
                                chans,
                                pages: page,
                                variant,
                                postcopy,
                                downtime_ms,
                            },
                            Samples::default(),
                        ));
                    }
                }
            }
            for run in 0..runs {
                for (c, s) in &mut block {
                    run_once(&ferry, c, run, runs, s);
                }
            }
            rows.extend(block.into_iter().map(|(c, s)| row(&c, runs, s)));
        }
    }

    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "downtime_limit_ms": downtime_ms, "postcopy": postcopy, "rows": rows })
            )
            .unwrap_or_default()
        );
        return;
    }
    if postcopy {
        print_postcopy(&rows, runs, downtime_ms);
    } else {
        print_precopy(&rows, runs, downtime_ms);
    }
}

/// One configuration of the matrix.
struct Config<'a> {
    size: u64,
    rate: u64,
    chans: usize,
    pages: &'a str,
    variant: &'a str,
    postcopy: bool,
    downtime_ms: u64,
}

/// What the runs of one configuration measured, run by run.
#[derive(Default)]
struct Samples {
    total_s: Vec<f64>,
    downtime: Vec<f64>,
    thr: Vec<f64>,
    rounds: Vec<f64>,
    ceiling: Vec<f64>,
    ceiling2: Vec<f64>,
    /// Each run's throughput against the ceiling measured right before it.
    vs_ceiling: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    speed: Vec<f64>,
    failures: u32,
    mismatches: u64,
    /// Each successful run's own figures, for the JSON output: where a
    /// worst case went.
    detail: Vec<Value>,
}

/// Runs one migration of `c` and adds what it measured to `s`, beside the
/// loopback ceiling measured right before it.
fn run_once(ferry: &std::path::Path, c: &Config<'_>, run: usize, runs: usize, s: &mut Samples) {
    let ceiling = match raw_ceiling(1, 3.0) {
        Ok(v) => {
            s.ceiling.push(v);
            Some(v)
        }
        Err(e) => {
            eprintln!("migrate_bench: raw ceiling failed: {e}");
            None
        }
    };
    match raw_ceiling(2, 3.0) {
        Ok(v) => s.ceiling2.push(v),
        Err(e) => eprintln!("migrate_bench: two-stream ceiling failed: {e}"),
    }
    eprintln!(
        "migrate_bench: {} GiB guest ({} pages) dirtying {} MB/s, {} channel(s){}, run {}/{}",
        c.size >> 30,
        c.pages,
        c.rate >> 20,
        c.chans,
        if c.postcopy {
            format!(", postcopy into {} RAM", c.variant)
        } else {
            format!(", {}", c.variant)
        },
        run + 1,
        runs
    );
    let mut cmd = Command::new(ferry);
    cmd.args([
        "demo",
        "--json",
        "--mem",
        &c.size.to_string(),
        "--dirty-rate",
        &c.rate.to_string(),
        "--channels",
        &c.chans.to_string(),
        "--huge-pages",
        c.pages,
        "--downtime-ms",
        &c.downtime_ms.to_string(),
    ]);
    if c.postcopy {
        cmd.arg("--postcopy");
    }
    if c.variant == "anonymous" {
        cmd.arg("--anonymous");
    }
    if !c.variant.ends_with("tls") {
        cmd.arg("--insecure");
    }
    let r: Option<Value> = cmd
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok());
    match r {
        Some(r) if r["ok"] == true => {
            s.total_s
                .push(r["source"]["total_ns"].as_f64().unwrap_or(f64::NAN) / 1e9);
            s.downtime
                .push(r["downtime_ms"].as_f64().unwrap_or(f64::NAN));
            let thr = r["source"]["throughput"].as_f64().unwrap_or(f64::NAN);
            s.thr.push(thr);
            if let Some(c) = ceiling {
                s.vs_ceiling.push(thr / c);
            }
            s.rounds
                .push(r["source"]["rounds"].as_f64().unwrap_or(f64::NAN));
            let ns = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
            let (src, dst) = (&r["source"], &r["destination"]);
            s.detail.push(json!({
                "total_s": ns(&src["total_ns"]) / 1e9,
                "setup_ms": ns(&src["setup_ns"]) / 1e6,
                "downtime_ms": r["downtime_ms"],
                "source_downtime_ms": ns(&src["source_downtime_ns"]) / 1e6,
                "final_sync_ms": ns(&src["final_sync_ns"]) / 1e6,
                "go_to_resumed_ms": (ns(&dst["resumed_at_ns"]) - ns(&dst["go_at_ns"])) / 1e6,
                "throughput": thr,
                "ceiling": ceiling,
                "rounds": src["rounds"],
            }));
            s.mismatches += r["destination"]["verify_mismatches"].as_u64().unwrap_or(0);
            let pc = &r["destination"]["postcopy"]["fault_latency"];
            s.p50.push(pc["p50_ns"].as_f64().unwrap_or(f64::NAN) / 1e3);
            s.p99.push(pc["p99_ns"].as_f64().unwrap_or(f64::NAN) / 1e3);
            s.p999
                .push(pc["p999_ns"].as_f64().unwrap_or(f64::NAN) / 1e3);
            let before = r["guest_rate_before"].as_f64().unwrap_or(f64::NAN);
            let during = r["destination"]["guest_rate_in_postcopy"]
                .as_f64()
                .unwrap_or(f64::NAN);
            s.speed.push(100.0 * during / before);
        }
        Some(r) => {
            s.failures += 1;
            eprintln!("migrate_bench: run failed: {}", r["error"]);
        }
        None => {
            s.failures += 1;
            eprintln!("migrate_bench: run printed no report");
        }
    }
}

/// One configuration's row: medians of its runs, and the worst downtime.
fn row(c: &Config<'_>, runs: usize, mut s: Samples) -> Value {
    let worst = s.downtime.iter().cloned().fold(f64::NAN, f64::max);
    json!({
        "guest_bytes": c.size,
        "dirty_rate": c.rate,
        "channels": c.chans,
        "huge_pages": c.pages,
        "ram": c.variant.trim_end_matches("-tls"),
        "variant": c.variant,
        "link": if c.variant.ends_with("tls") { "tls" } else { "plain" },
        "runs": runs,
        "failures": s.failures,
        "verify_mismatches": s.mismatches,
        "total_s_median": median(&mut s.total_s),
        "total_s_max": s.total_s.iter().cloned().fold(f64::NAN, f64::max),
        "downtime_ms_median": median(&mut s.downtime),
        "downtime_ms_max": worst,
        "throughput_median": median(&mut s.thr),
        "ceiling_median": median(&mut s.ceiling),
        "ceiling_two_streams_median": median(&mut s.ceiling2),
        "throughput_vs_ceiling": median(&mut s.vs_ceiling),
        "rounds_median": median(&mut s.rounds),
        "fault_p50_us_median": median(&mut s.p50),
        "fault_p99_us_median": median(&mut s.p99),
        "fault_p999_us_median": median(&mut s.p999),
        "guest_speed_pct_median": median(&mut s.speed),
        "per_run": s.detail,
    })
}

fn f(r: &Value, k: &str) -> f64 {
    r[k].as_f64().unwrap_or(f64::NAN)
}

fn print_precopy(rows: &[Value], runs: usize, downtime_ms: u64) {
    println!("End-to-end live migration, `ferry demo` (io_uring, downtime limit {downtime_ms} ms), medians of {runs} runs");
    println!(
        "{:>6} {:>9} {:>5} {:>5} {:>6} {:>9} {:>12} {:>12} {:>11} {:>11} {:>8} {:>11} {:>7} {:>6} {:>8}",
        "guest",
        "dirty",
        "chans",
        "pages",
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
            "{:>4}Gi {:>6}M/s {:>5} {:>5} {:>6} {:>9.2} {:>12.2} {:>12.2} {:>11.2} {:>11.2} {:>7.0}% {:>11.2} {:>7.0} {:>6} {:>8}",
            r["guest_bytes"].as_u64().unwrap_or(0) >> 30,
            r["dirty_rate"].as_u64().unwrap_or(0) >> 20,
            r["channels"],
            r["huge_pages"].as_str().unwrap_or(""),
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
    println!("Targets: encrypted throughput >= 70% of plain; idle throughput >= 85% of raw; downtime (worst) <= 5 ms idle, <= 10 ms at 50 MB/s, <= 50 ms at 500 MB/s.");
}

fn print_postcopy(rows: &[Value], runs: usize, downtime_ms: u64) {
    println!("Postcopy after the first pass, `ferry demo --postcopy` (io_uring, downtime limit {downtime_ms} ms), medians of {runs} runs; each row's baseline is the one above it: into anonymous RAM, or (memfd-tls) in clear text");
    println!(
        "{:>6} {:>9} {:>5} {:>5} {:>10} {:>9} {:>12} {:>9} {:>9} {:>9} {:>10} {:>8} {:>6}",
        "guest",
        "dirty",
        "chans",
        "pages",
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
            "{:>4}Gi {:>6}M/s {:>5} {:>5} {:>10} {:>9.2} {:>12.2} {:>9.2} {:>9.0} {:>9.0} {:>10.0} {:>7.0}% {:>6}",
            r["guest_bytes"].as_u64().unwrap_or(0) >> 30,
            r["dirty_rate"].as_u64().unwrap_or(0) >> 20,
            r["channels"],
            r["huge_pages"].as_str().unwrap_or(""),
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
