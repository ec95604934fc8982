//! `ferry send` against a destination that answers *ready*, reads *go* and
//! vanishes without *started*: the real binary must not report success, must
//! not exit while it holds the paused guest, and must leave only when the
//! operator decides, with the exit status that says the guest was held.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ferry_core::wire::{Hello, Repr, ReturnRepr, HEADER_LEN, MAX_HELLO_LEN};
use ferry_host::link::{self, Conn, ReturnWriter, WireDecoder};

fn kvm_present() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("skipping: /dev/kvm is missing on this machine, so no KVM guest can run");
        false
    }
}

/// Accepts the source's connections, takes its whole stream, answers ready,
/// reads go and closes everything. Returns the record that followed ready.
fn ready_then_vanish(listener: TcpListener) -> Option<Repr> {
    let (ctl, _) = listener.accept().ok()?;
    let mut ctl = Conn::Tcp(ctl);
    let mut hello = [0u8; MAX_HELLO_LEN];
    ctl.read_exact(&mut hello[..HEADER_LEN]).ok()?;
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&hello[..HEADER_LEN]);
    let rest = Hello::payload_len(&header).ok()?;
    ctl.read_exact(&mut hello[HEADER_LEN..HEADER_LEN + rest])
        .ok()?;
    let theirs = Hello::parse(&hello[..HEADER_LEN + rest]).ok()?;
    let neg = theirs.negotiate(&theirs).ok()?;
    let ret = ReturnWriter::new(ctl.try_clone().ok()?);
    ret.send(&ReturnRepr::Accept {
        max_channels: 16,
        max_device_bytes: 1 << 30,
    })
    .ok()?;
    let (bulk, _) = listener.accept().ok()?;
    let drain = thread::spawn(move || {
        let mut bulk = bulk;
        let mut buf = vec![0u8; 1 << 20];
        while matches!(bulk.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut dec = WireDecoder::buffered(neg, 4 << 20);
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let (rec, _) = link::read_stream_record(&mut ctl, &mut dec, &mut buf).ok()??;
        if rec.repr == Repr::End {
            break;
        }
    }
    ret.send(&ReturnRepr::Ready).ok()?;
    let after = link::read_stream_record(&mut ctl, &mut dec, &mut buf)
        .ok()
        .flatten()
        .map(|(r, _)| r.repr);
    let _ = ctl.shutdown();
    drop(drain);
    after
}

#[test]
fn ferry_send_holds_a_guest_whose_go_was_not_confirmed_until_the_operator_decides() {
    if !kvm_present() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let fake = thread::spawn(move || ready_then_vanish(listener));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "send",
            "--to",
            &addr,
            "--mem",
            "64M",
            "--dirty-rate",
            "10M",
            "--handover-timeout-s",
            "2",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferry send");
    let after_ready = fake.join().expect("fake destination");
    assert_eq!(
        after_ready,
        Some(Repr::Go),
        "the source sent go after ready"
    );
    // Past the started bound (2 s): the sender has given up waiting, yet it
    // must still be running, holding the paused guest.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        assert!(
            child.try_wait().expect("poll").is_none(),
            "ferry send exited while it held the guest"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // The operator discards the guest.
    // SAFETY: kill(2) on the child's pid; no memory is involved.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("stderr:\n{stderr}");
    assert_eq!(
        out.status.code(),
        Some(4),
        "exit status 4: held, then discarded"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON report on stdout");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["outcome"], "held", "{report}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("go was sent but the destination did not confirm"),
        "{error}"
    );
    assert!(
        stderr.contains("kill -TERM"),
        "the operator is told what to do"
    );
}
