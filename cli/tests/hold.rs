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
        session: 0,
    })
    .ok()?;
    // Every bulk connection the hello announced (all but control).
    let mut drains = Vec::new();
    for _ in 1..theirs.caps.channels.max(2) {
        let (bulk, _) = listener.accept().ok()?;
        drains.push(thread::spawn(move || {
            let mut bulk = bulk;
            let mut buf = vec![0u8; 1 << 20];
            while matches!(bulk.read(&mut buf), Ok(n) if n > 0) {}
        }));
    }
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
    drop(drains);
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
            "--insecure",
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

#[test]
fn ferry_receive_refuses_garbage_in_time_and_says_the_guest_is_the_sources() {
    if !kvm_present() {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--mem",
            "64M",
            "--json",
            "--insecure",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferry receive");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).expect("read") == 1 && byte[0] != b'\n' {
        first.push(byte[0]);
    }
    let listening: serde_json::Value = serde_json::from_slice(&first).expect("a JSON line");
    let addr = listening["endpoint"]
        .as_str()
        .and_then(|e| e.strip_prefix("tcp:"))
        .expect("a tcp endpoint")
        .to_string();
    let t = Instant::now();
    let mut peer = std::net::TcpStream::connect(&addr).expect("connect");
    std::io::Write::write_all(
        &mut peer,
        b"GET / HTTP/1.1\r\nHost: ferry.test\r\nAccept: */*\r\n\r\n",
    )
    .expect("write");
    let mut answer = Vec::new();
    let _ = peer.read_to_end(&mut answer);
    let status = child.wait().expect("wait");
    let took = t.elapsed();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("read the report");
    let report: serde_json::Value = serde_json::from_str(rest.trim()).expect("a JSON report line");
    assert_eq!(report["type"], "report", "{report}");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["go_received"], false, "{report}");
    assert_eq!(report["outcome"], "runs-on-source", "{report}");
    assert_eq!(
        status.code(),
        Some(3),
        "exit status 3: the guest is the source's"
    );
    // The source is told why: an error record on the return path.
    assert_eq!(answer.first(), Some(&0x84), "an error record comes back");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
