//! Two hosts on one machine: `ferry send` and `ferry receive` in two network
//! namespaces joined by a veth pair, the link shaped with tc's token bucket
//! to 1 Gbit/s and to 10 Gbit/s. The guest must arrive and verify, and the
//! bandwidth the policy measured must match the shaped rate.
//!
//! Runs as root where `ip netns` works; skips with a message otherwise. The
//! namespaces, their addresses (link-local 169.254.201.0/30) and all traffic
//! stay inside this test.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

/// Two namespaces and the veth pair between them; removed on drop.
struct TwoHosts {
    a: String,
    b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TwoHosts {
    fn new(rate: &str, burst: &str) -> Result<TwoHosts, String> {
        let id = std::process::id();
        let hosts = TwoHosts {
            a: format!("ferry-src-{id}"),
            b: format!("ferry-dst-{id}"),
        };
        let (va, vb) = (format!("fs{id}"), format!("fd{id}"));
        ip(&["netns", "add", &hosts.a])?;
        ip(&["netns", "add", &hosts.b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &hosts.a])?;
        ip(&["link", "set", &vb, "netns", &hosts.b])?;
        ip(&[
            "-n",
            &hosts.a,
            "addr",
            "add",
            "169.254.201.1/30",
            "dev",
            &va,
        ])?;
        ip(&[
            "-n",
            &hosts.b,
            "addr",
            "add",
            "169.254.201.2/30",
            "dev",
            &vb,
        ])?;
        for (ns, dev) in [(&hosts.a, &va), (&hosts.b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // The source's egress is the migration's direction.
        let out = Command::new("ip")
            .args(["netns", "exec", &hosts.a, "tc", "qdisc", "add", "dev", &va])
            .args([
                "root", "tbf", "rate", rate, "burst", burst, "latency", "100ms",
            ])
            .output()
            .map_err(|e| format!("tc: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tc: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(hosts)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and so the pair.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: two-host migration needs root for ip netns");
        return false;
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: /dev/kvm is missing on this machine, so no KVM guest can run");
        return false;
    }
    let probe = format!("ferry-probe-{}", std::process::id());
    match ip(&["netns", "add", &probe]) {
        Ok(()) => {
            let _ = ip(&["netns", "del", &probe]);
            true
        }
        Err(e) => {
            eprintln!("skipping: network namespaces are not available here ({e})");
            false
        }
    }
}

/// Migrates a 256 MiB guest from namespace `a` to `b`; returns the two
/// reports.
fn migrate(hosts: &TwoHosts) -> (serde_json::Value, serde_json::Value) {
    let ferry = env!("CARGO_BIN_EXE_ferry");
    let mem = (256 * MIB).to_string();
    let mut dst = Command::new("ip")
        .args(["netns", "exec", &hosts.b, ferry, "receive"])
        .args([
            "--listen",
            "169.254.201.2:0",
            "--mem",
            &mem,
            "--json",
            "--insecure",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run ferry receive in the destination namespace");
    let mut lines = BufReader::new(dst.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a listening line").expect("read");
    let listening: serde_json::Value = serde_json::from_str(&first).expect("JSON");
    let to = listening["endpoint"]
        .as_str()
        .and_then(|e| e.strip_prefix("tcp:"))
        .expect("a tcp endpoint")
        .to_string();
    let src = Command::new("ip")
        .args(["netns", "exec", &hosts.a, ferry, "send", "--to", &to])
        .args(["--mem", &mem, "--dirty-rate", "20M", "--json", "--insecure"])
        .stdin(Stdio::null())
        .output()
        .expect("run ferry send in the source namespace");
    eprintln!("send stderr:\n{}", String::from_utf8_lossy(&src.stderr));
    let source: serde_json::Value =
        serde_json::from_slice(&src.stdout).expect("ferry send's JSON report");
    let report = lines
        .map_while(Result::ok)
        .find(|l| l.contains("\"report\""))
        .expect("ferry receive's report");
    let _ = dst.wait();
    let destination: serde_json::Value = serde_json::from_str(&report).expect("JSON");
    (source, destination)
}

fn check(rate: &str, burst: &str, bytes_per_sec: f64) {
    let hosts = match TwoHosts::new(rate, burst) {
        Ok(h) => h,
        Err(e) => panic!("setting up two namespaces failed: {e}"),
    };
    let (source, destination) = migrate(&hosts);
    assert_eq!(source["ok"], true, "{source}");
    assert_eq!(destination["ok"], true, "{destination}");
    assert_eq!(destination["verify_mismatches"], 0, "{destination}");
    assert!(
        destination["verify_pages_checked"].as_u64().unwrap_or(0) > 0,
        "{destination}"
    );
    let measured = source["source"]["bandwidth"].as_f64().unwrap_or(0.0);
    let overall = source["source"]["throughput"].as_f64().unwrap_or(0.0);
    eprintln!(
        "{rate}: the policy measured {:.0} MB/s, the migration averaged {:.0} MB/s, the link allows {:.0} MB/s",
        measured / 1e6,
        overall / 1e6,
        bytes_per_sec / 1e6
    );
    // The policy's estimate may not exceed the shaped rate by much (a
    // burst must not fool it), and must see most of it.
    assert!(
        measured <= bytes_per_sec * 1.15,
        "the policy measured {measured} B/s on a {bytes_per_sec} B/s link"
    );
    assert!(
        measured >= bytes_per_sec * 0.4 || bytes_per_sec > 1e9,
        "the policy measured only {measured} B/s on a {bytes_per_sec} B/s link"
    );
}

#[test]
fn a_guest_migrates_between_two_namespaces_over_shaped_links() {
    if !available() {
        return;
    }
    // 1 Gbit/s: 125 MB/s of link, framing included.
    check("1gbit", "1mb", 125e6);
    // 10 Gbit/s: faster than this machine moves memory between processes,
    // so only the upper bound is checked.
    check("10gbit", "8mb", 1.25e9);
}
