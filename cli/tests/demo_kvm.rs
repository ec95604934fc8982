//! The whole job, end to end: `ferry demo` boots a real KVM guest, migrates
//! it to a second `ferry` process over loopback while it dirties memory, and
//! the guest verifies every page on the destination.

use std::process::Command;

fn kvm_present() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("skipping: /dev/kvm is missing on this machine, so no KVM guest can run");
        false
    }
}

fn demo(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("demo")
        .args(args)
        .arg("--json")
        .output()
        .expect("run ferry demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("ferry demo printed no JSON report ({e}):\n{stdout}"));
    assert!(
        out.status.success() || report["ok"] == false,
        "exit status and report disagree"
    );
    report
}

/// Every line of a `--json` output parses as JSON from its first byte.
fn json_line(line: &str) -> serde_json::Value {
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("a --json line that is not JSON ({e}): {line:?}"))
}

/// The `tcp:` address from `ferry receive --json`'s first line.
fn listening_addr(line: &str) -> String {
    let v = json_line(line);
    assert_eq!(v["type"], "listening", "{v}");
    v["endpoint"]
        .as_str()
        .and_then(|e| e.strip_prefix("tcp:"))
        .unwrap_or_else(|| panic!("no tcp endpoint in {v}"))
        .to_string()
}

#[test]
fn a_kvm_guest_migrates_while_dirtying_and_verifies_on_the_destination() {
    if !kvm_present() {
        return;
    }
    // Both clear-text transports, and the default: encrypted (the TLS record
    // channel carries the pages, whatever --transport says), on the default
    // two bulk channels.
    for (transport, link, named) in [
        ("uring", "--insecure", "io_uring x2"),
        ("std", "--insecure", "std x2"),
        ("uring", "", "tls x2"),
    ] {
        let mut args = vec![
            "--mem",
            "256M",
            "--dirty-rate",
            "40M",
            "--vcpus",
            "2",
            "--transport",
            transport,
        ];
        args.extend([link].into_iter().filter(|a| !a.is_empty()));
        let r = demo(&args);
        assert_eq!(r["ok"], true, "{r:#}");
        assert_eq!(r["source"]["transport"], named, "{r:#}");
        let d = &r["destination"];
        assert_eq!(d["verify_mismatches"], 0, "{r:#}");
        assert_eq!(
            d["verify_pages_checked"].as_u64().map(|n| n > 60_000),
            Some(true),
            "{r:#}"
        );
        assert!(
            d["pages_dirtied_here"].as_u64().unwrap_or(0) > 0,
            "the guest runs on after migration: {r:#}"
        );
        let downtime = r["downtime_ms"].as_f64().expect("downtime");
        assert!(
            downtime > 0.0 && downtime < 300.0,
            "downtime {downtime} ms within the 300 ms limit"
        );
        let s = &r["source"];
        assert!(
            s["pages_sent"].as_u64().unwrap_or(0) + s["zero_pages"].as_u64().unwrap_or(0) >= 65_536
        );
    }
}

#[test]
fn send_and_receive_without_credentials_refuse_to_run_in_clear() {
    for args in [
        ["send", "--to", "127.0.0.1:9"],
        ["receive", "--listen", "127.0.0.1:0"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .output()
            .expect("run ferry");
        assert!(!out.status.success(), "{args:?} ran without credentials");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--tls-creds DIR")
                && err.contains("--tls-psk FILE")
                && err.contains("--insecure"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_destination_with_other_ram_is_refused_and_the_guest_stays() {
    if !kvm_present() {
        return;
    }
    // The receiving side is started by hand with less RAM than the sender,
    // both ends holding the same pre-shared key (QEMU's keys.psk format).
    let psk = std::env::temp_dir().join(format!("ferry-test-{}.psk", std::process::id()));
    std::fs::write(&psk, "ferry-test:00112233445566778899aabbccddeeff\n").expect("psk file");
    let psk = psk.to_str().expect("utf-8 path").to_string();
    let mut rx = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--mem",
            "128M",
            "--json",
            "--tls-psk",
            &psk,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ferry receive");
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(rx.stdout.take().expect("stdout")));
    let first = lines.next().expect("a line").expect("utf-8");
    let addr = listening_addr(&first);
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "send",
            "--to",
            &addr,
            "--mem",
            "256M",
            "--dirty-rate",
            "10M",
            "--json",
            "--tls-psk",
            &psk,
        ])
        .output()
        .expect("run ferry send");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert!(!out.status.success());
    assert_eq!(report["ok"], false);
    let err = report["error"].as_str().unwrap_or_default();
    assert!(err.contains("refused"), "{err}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let values: Vec<serde_json::Value> = rest.iter().map(|l| json_line(l)).collect();
    let dest = values
        .iter()
        .find(|v| v["type"] == "report")
        .expect("destination report");
    assert_eq!(dest["go_received"], false);
    assert!(
        dest["error"]
            .as_str()
            .unwrap_or_default()
            .contains("region"),
        "{dest}"
    );
    let _ = rx.wait();
}

#[test]
fn a_destination_process_killed_mid_precopy_leaves_the_guest_running_intact() {
    if !kvm_present() {
        return;
    }
    let mut rx = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--mem",
            "512M",
            "--json",
            "--insecure",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ferry receive");
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(rx.stdout.take().expect("stdout")));
    let first = lines.next().expect("a line").expect("utf-8");
    let addr = listening_addr(&first);
    // A capped link makes the first pass last several seconds.
    let tx = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "send",
            "--to",
            &addr,
            "--mem",
            "512M",
            "--dirty-rate",
            "20M",
            "--bandwidth",
            "64M",
            "--json",
            "--insecure",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ferry send");
    std::thread::sleep(std::time::Duration::from_secs(4));
    rx.kill().expect("kill the destination");
    let _ = rx.wait();
    let out = tx.wait_with_output().expect("ferry send ends");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert!(!out.status.success());
    assert_eq!(report["ok"], false, "{report:#}");
    assert!(
        report["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{report:#}"
    );
    let check = &report["source_guest_after_failure"];
    assert_eq!(
        check["running"], true,
        "the guest runs on at the source: {report:#}"
    );
    assert!(
        check["pages_checked"].as_u64().unwrap_or(0) > 100_000,
        "{report:#}"
    );
    assert_eq!(check["mismatches"], 0, "{report:#}");
}
