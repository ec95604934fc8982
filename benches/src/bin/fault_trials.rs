//! Fault-injection trials: real `ferry send` → `ferry receive` migrations of a
//! 64 MiB KVM guest through a fault proxy inside this program, each trial with
//! one fault picked at random, then classified by where the guest ended up.
//!
//! ```text
//! cargo build --release -p ferry-cli --bin ferry -p ferry-benches --bin fault_trials
//! target/release/fault_trials --trials 40 [--seed S] [--json] [--postcopy] [--tls]
//!     [--faults reset,stall,kill,handover,cut] [--trial-seed X] [--expect-bytes N] [--bound-s 45]
//!     [--kill-window-ms 4000] [--ferry PATH] [--fault KIND:N]
//! ```
//!
//! `--fault` forces every trial's fault instead of drawing it (`reset:BYTES`,
//! `stall:BYTES`, `kill-source:MS`, `kill-destination:MS`,
//! `handover-reset:READ`, `handover-stall:READ`, and `return-reset:READ`,
//! `return-stall:READ` counting the destination's reads from the start,
//! where read 1 is its *accept*), to replay one:
//!
//! ```text
//! target/release/fault_trials --trials 1 --fault return-reset:1 --bound-s 60
//! ```
//!
//! The `ferry` binary must sit next to this program (`target/release/ferry`).
//!
//! # The proxy
//!
//! It listens on 127.0.0.1:0; `ferry send --to` points at it. For every
//! connection it accepts (control, then bulk) it opens one to the real
//! `ferry receive` and forwards bytes both ways, one thread per direction,
//! counting the bytes forwarded over all connections and both directions.
//! An end of stream on one side is passed on as a half close.
//!
//! # The faults
//!
//! Weights: reset 45, kill 35, stall 20 (stalls are the long trials), and
//! `handover` 30 and `cut` 45 when asked for with `--faults` (not in the
//! default list).
//!
//! With `--tls` both sides migrate encrypted (TLS 1.3 with a pre-shared key
//! this program writes), and the proxy cuts, stalls and resets encrypted
//! connections; `handover` faults, which read the return path in clear text,
//! are refused then.
//!
//! With `--postcopy` both sides run with `--postcopy` (postcopy after the
//! first pass) and the source with `--bandwidth 64M`, so that postcopy lasts
//! a while; 7 cuts in 10 then aim at it (95–112 % of `--expect-bytes`). A
//! process that reports `held` is given 9 s instead of 3 to resume before it
//! counts as holding.
//!
//! - `reset`: once the byte count reaches a threshold, every connection is
//!   shut down in both directions at once (both the source's and the
//!   destination's sockets) and closed; connections opened later are closed
//!   at once.
//! - `cut`: as `reset`, once; connections opened later pass (the link comes
//!   back): a postcopy cut off resumes through them.
//! - `stall`: once the byte count reaches a threshold, nothing more is
//!   forwarded either way, but every socket stays open until the trial ends;
//!   later connections are accepted and left silent.
//! - `handover`: on the 1st–3rd read from the destination towards the source
//!   (the return path, where *ready* and *started* come) once 85 % of
//!   `--expect-bytes` went through, that read is dropped and the connections
//!   are reset (as above) or stalled (even odds): aims at the handover, which
//!   byte thresholds hardly ever hit (the stream ends anywhere in 63–67 MB).
//! - `kill`: the sender or the receiver (even odds) gets SIGKILL at a moment
//!   uniform in 0–4 s (`--kill-window-ms`) after `ferry send` started, if it
//!   still runs then (a 64 MiB migration takes about 1.2 s here, so many
//!   kills land after the end: "not delivered", classified as without a kill).
//!
//! Thresholds: 30 % uniform in 0–100 KB (the handshake and the first
//! records), 70 % uniform in 0–1.2 × `--expect-bytes` (default 70 MB, about a
//! whole 64 MiB migration), so some never fire: those trials are controls
//! and must end `done`.
//!
//! Both sides run with `--handover-timeout-s 2 --idle-timeout-s 5`, so a
//! stall ends in seconds. Each trial is bounded by `--bound-s` (45 s).
//!
//! # Held
//!
//! A process *holds* when it has printed its report and is still alive 3 s
//! later (it waits for the operator). The trial records it, waits for the
//! other side to end (or hold), then sends SIGTERM (discard: exit 4). A
//! process never resumed here with SIGUSR2.
//!
//! # Classes (first rule that matches)
//!
//! 1. `wrong`: any `verify_mismatches` > 0 on the destination, or any
//!    `source_guest_after_failure.mismatches` > 0 on the source.
//! 2. `hung`: a process neither exited nor held within the bound. (A
//!    `ferry receive` still waiting for its first connection after the source
//!    was killed before connecting is not hung: it holds nothing.)
//! 3. `both`: the source resumed the guest (`runs-on-source`, running) and
//!    the destination received *go* (conservative: *go* received counts as
//!    started, whether or not its report is ok).
//! 4. A process killed on purpose while it ran:
//!    - source killed: `killed-source` whatever the destination did: the
//!      guest either runs on the destination (the kill came after *go*) or
//!      died with the source (the kill itself lost it, which is expected);
//!      the note says which.
//!    - destination killed: the source must not lose the guest by itself:
//!      `back-on-source` if it resumed it (running, 0 mismatches) and the
//!      destination never got *go*; `held` if it holds it (go sent, started
//!      never came: the operator may resume it, the destination is dead);
//!      `killed-destination` if the source released it (`done`: the
//!      destination had confirmed *started*, so the kill lost the guest, as
//!      expected); anything else (the source exited without a running guest)
//!      is `lost`.
//! 5. `back-on-source`: the source says `runs-on-source`, its guest runs and
//!    verified with 0 mismatches, and the destination never received *go*.
//! 6. `held`: a process held the guest (never resumed, so not `both`); the
//!    note says whether the other side runs it (the README's "go sent,
//!    started never came" case: the destination runs the guest, the source
//!    holds a paused copy the operator discards).
//! 7. `done`: `ferry send` ok and `ferry receive` ok with 0 mismatches;
//!    `recovered` when postcopy was cut off and resumed on the way (either
//!    report's `recoveries` > 0).
//! 8. `lost`: anything else, e.g. the source released the guest (done) but the
//!    destination failed, or the source exited with an error and no guest.
//!
//! The process exits 1 when any trial is `lost`, `both`, `wrong` or `hung`.
//!
//! The phase reached is told from the reports and the proxy: `after-go` when
//! the destination received *go* or the source says `done` or `held` (it
//! sent go), else `handshake` when fewer than 100 KB
//! went through the proxy, else `precopy` (`no-connection` when none was
//! made).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a process must stay alive after its report to count as holding.
const HOLD_AFTER: Duration = Duration::from_secs(3);
/// Bytes under which a fault counts as hitting the handshake.
const SMALL: u64 = 100_000;

/// xorshift64*: small, seeded, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that neighbouring seeds differ.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(z.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Which side a kill hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// The fault of one trial.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Reset {
        after: u64,
    },
    Stall {
        after: u64,
    },
    /// Every connection is reset once, at a byte threshold; connections made
    /// afterwards pass (the link comes back: postcopy recovery reconnects).
    Cut {
        after: u64,
    },
    Kill {
        side: Side,
        at: Duration,
    },
    /// A reset (or stall) on the `read`-th read from the destination to the
    /// source (the return path: accept, ready, started), whose bytes are
    /// dropped: aims at the handover, which the byte thresholds rarely hit.
    Handover {
        read: u64,
        stall: bool,
        /// Count the reads from the start, not from 85 % of the bytes.
        from_start: bool,
    },
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::Reset { .. } => "reset",
            Fault::Stall { .. } => "stall",
            Fault::Cut { .. } => "cut",
            Fault::Handover {
                stall: false,
                from_start: true,
                ..
            } => "return-reset",
            Fault::Handover {
                stall: true,
                from_start: true,
                ..
            } => "return-stall",
            Fault::Handover { stall: false, .. } => "handover-reset",
            Fault::Handover { stall: true, .. } => "handover-stall",
            Fault::Kill {
                side: Side::Source, ..
            } => "kill-source",
            Fault::Kill {
                side: Side::Destination,
                ..
            } => "kill-destination",
        }
    }
    fn detail(&self) -> String {
        match self {
            Fault::Reset { after } | Fault::Stall { after } | Fault::Cut { after } => {
                format!("after {after} B")
            }
            Fault::Kill { at, .. } => format!("at {:.2} s", at.as_secs_f64()),
            Fault::Handover {
                read,
                from_start: true,
                ..
            } => format!("on return read {read}"),
            Fault::Handover { read, .. } => format!("on return read {read} past 85 %"),
        }
    }
    /// A fault given on the command line: `reset:BYTES`, `stall:BYTES`,
    /// `kill-source:MS`, `kill-destination:MS`, `handover-reset:READ`,
    /// `handover-stall:READ`, `return-reset:READ`, `return-stall:READ`.
    fn parse(s: &str) -> Option<Fault> {
        let (kind, n) = s.split_once(':')?;
        let n: u64 = n.parse().ok()?;
        Some(match kind {
            "reset" => Fault::Reset { after: n },
            "stall" => Fault::Stall { after: n },
            "cut" => Fault::Cut { after: n },
            "kill-source" => Fault::Kill {
                side: Side::Source,
                at: Duration::from_millis(n),
            },
            "kill-destination" => Fault::Kill {
                side: Side::Destination,
                at: Duration::from_millis(n),
            },
            "handover-reset" | "return-reset" => Fault::Handover {
                read: n,
                stall: false,
                from_start: kind == "return-reset",
            },
            "handover-stall" | "return-stall" => Fault::Handover {
                read: n,
                stall: true,
                from_start: kind == "return-stall",
            },
            _ => return None,
        })
    }

    fn pick(
        rng: &mut Rng,
        kinds: &[&str],
        expect: u64,
        kill_window_ms: u64,
        postcopy: bool,
    ) -> Fault {
        let weights: Vec<(&str, u64)> = [
            ("reset", 45),
            ("kill", 35),
            ("stall", 20),
            ("handover", 30),
            ("cut", 45),
        ]
        .into_iter()
        .filter(|(k, _)| kinds.contains(k))
        .collect();
        let total: u64 = weights.iter().map(|w| w.1).sum();
        let mut r = rng.below(total);
        let mut kind = weights[0].0;
        for (k, w) in &weights {
            if r < *w {
                kind = k;
                break;
            }
            r -= w;
        }
        let bytes = |rng: &mut Rng| {
            if rng.below(10) < 3 {
                rng.below(SMALL)
            } else {
                rng.below(expect + expect / 5)
            }
        };
        match kind {
            "reset" => Fault::Reset { after: bytes(rng) },
            "stall" => Fault::Stall { after: bytes(rng) },
            // With postcopy, most cuts aim at it: it runs from about 95 %
            // to 112 % of the expected bytes.
            "cut" if postcopy && rng.below(10) < 7 => Fault::Cut {
                after: expect / 100 * 95 + rng.below(expect / 100 * 17),
            },
            "cut" => Fault::Cut { after: bytes(rng) },
            "handover" => Fault::Handover {
                read: 1 + rng.below(3),
                stall: rng.below(2) == 0,
                from_start: false,
            },
            _ => Fault::Kill {
                side: if rng.below(2) == 0 {
                    Side::Source
                } else {
                    Side::Destination
                },
                at: Duration::from_millis(rng.below(kill_window_ms)),
            },
        }
    }
}

/// The proxy's shared state.
struct Proxy {
    /// Bytes read by the proxy, all connections, both directions (at the
    /// fault, those past the threshold are read but not forwarded).
    bytes: AtomicU64,
    /// Connections accepted from the source.
    conns: AtomicUsize,
    /// The byte threshold of a reset or stall (u64::MAX: none).
    threshold: u64,
    /// The read from the destination that fires a handover fault (0: none).
    return_read: u64,
    /// Bytes read (both ways) from which reads from the destination count.
    return_from: u64,
    /// Reads from the destination so far (since `return_from`).
    return_reads: AtomicU64,
    /// Whether the fault is a stall (else a reset).
    stall_mode: bool,
    /// A cut: the reset hits the connections of the moment only.
    transient: bool,
    /// Cuts so far: a pump ends when it changes (its connection was cut).
    generation: AtomicU64,
    /// The fault fired.
    fired: AtomicBool,
    /// The trial is over: every thread ends.
    stop: AtomicBool,
    /// Every socket, both sides, to shut down on a reset or at the end.
    socks: Mutex<Vec<TcpStream>>,
    /// When the fault fired, since the proxy started.
    fired_at: Mutex<Option<Duration>>,
    started: Instant,
}

impl Proxy {
    fn shutdown_all(&self) {
        for s in self.socks.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn fire(&self) {
        if !self.fired.swap(true, Ordering::SeqCst) {
            *self.fired_at.lock().unwrap() = Some(self.started.elapsed());
            if self.transient {
                self.generation.fetch_add(1, Ordering::SeqCst);
            }
            if !self.stall_mode {
                self.shutdown_all();
                // Close the proxy's copies too: once the pumps return, every
                // descriptor is closed and further data is answered with RST.
                self.socks.lock().unwrap().clear();
            }
        }
    }

    fn wait_stop(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the fault ends a pump of connection generation `gen`.
    fn ends(&self, gen: u64) -> bool {
        if self.transient {
            self.generation.load(Ordering::SeqCst) != gen
        } else {
            self.fired.load(Ordering::SeqCst)
        }
    }

    /// Forwards `from` to `to` until end of stream, an error, or the fault.
    fn pump(self: Arc<Self>, mut from: TcpStream, mut to: TcpStream, returning: bool, gen: u64) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if self.ends(gen) {
                if self.stall_mode {
                    self.wait_stop();
                }
                return;
            }
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => n,
            };
            if self.ends(gen) {
                if self.stall_mode {
                    self.wait_stop();
                }
                return;
            }
            let prev = self.bytes.fetch_add(n as u64, Ordering::SeqCst);
            let mut fwd = n;
            let mut fire = false;
            if returning
                && prev >= self.return_from
                && self.return_reads.fetch_add(1, Ordering::SeqCst) + 1 == self.return_read
            {
                self.fire();
                if self.stall_mode {
                    self.wait_stop();
                }
                return;
            }
            if prev.saturating_add(n as u64) >= self.threshold && !self.fired.load(Ordering::SeqCst)
            {
                fwd = self.threshold.saturating_sub(prev).min(n as u64) as usize;
                fire = true;
            }
            if fire && !self.stall_mode {
                // A reset: the bytes up to the threshold go out, then every socket closes.
                let _ = to.write_all(&buf[..fwd]);
                self.fire();
                return;
            }
            if fwd > 0 && to.write_all(&buf[..fwd]).is_err() {
                let _ = from.shutdown(Shutdown::Read);
                return;
            }
            if fire {
                self.fire();
            }
        }
    }

    /// Starts the proxy towards `upstream`; returns its state and address.
    fn start(
        upstream: String,
        fault: &Fault,
        expect: u64,
    ) -> std::io::Result<(Arc<Proxy>, String)> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?.to_string();
        let (threshold, stall_mode, return_read, from_start) = match *fault {
            Fault::Reset { after } => (after, false, 0, true),
            Fault::Stall { after } => (after, true, 0, true),
            Fault::Cut { after } => (after, false, 0, true),
            Fault::Kill { .. } => (u64::MAX, false, 0, true),
            Fault::Handover {
                read,
                stall,
                from_start,
            } => (u64::MAX, stall, read, from_start),
        };
        let p = Arc::new(Proxy {
            bytes: AtomicU64::new(0),
            conns: AtomicUsize::new(0),
            threshold,
            return_read,
            return_from: if from_start { 0 } else { expect / 100 * 85 },
            return_reads: AtomicU64::new(0),
            stall_mode,
            transient: matches!(fault, Fault::Cut { .. }),
            generation: AtomicU64::new(0),
            fired: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            socks: Mutex::new(Vec::new()),
            fired_at: Mutex::new(None),
            started: Instant::now(),
        });
        let pp = p.clone();
        thread::spawn(move || {
            while !pp.stop.load(Ordering::SeqCst) {
                let client = match l.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                pp.conns.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nonblocking(false);
                if pp.fired.load(Ordering::SeqCst) && !pp.transient {
                    if pp.stall_mode {
                        // The link is dead: accepted, and never a byte.
                        if let Ok(c) = client.try_clone() {
                            pp.socks.lock().unwrap().push(c);
                        }
                    } else {
                        let _ = client.shutdown(Shutdown::Both);
                    }
                    continue;
                }
                let server = match TcpStream::connect(&upstream) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    }
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let clones = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                );
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = clones else {
                    continue;
                };
                {
                    let mut socks = pp.socks.lock().unwrap();
                    socks.push(c3);
                    socks.push(s3);
                }
                let gen = pp.generation.load(Ordering::SeqCst);
                let a = pp.clone();
                thread::spawn(move || a.pump(client, server, false, gen));
                let b = pp.clone();
                thread::spawn(move || b.pump(s2, c2, true, gen));
            }
        });
        Ok((p, addr))
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.shutdown_all();
    }
}

/// What one side's process printed.
#[derive(Default)]
struct Out {
    report: Option<Value>,
    report_at: Option<Instant>,
    stderr: String,
}

/// One `ferry` process of a trial.
struct Proc {
    child: Child,
    out: Arc<Mutex<Out>>,
    exit: Option<Option<i32>>,
    /// When it exited, since the trial started.
    exit_after: Option<Duration>,
    t0: Instant,
    killed: bool,
    held: bool,
    hung: bool,
    terminated: bool,
}

impl Proc {
    fn poll(&mut self) {
        if self.exit.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exit = Some(st.code());
                self.exit_after = Some(self.t0.elapsed());
            }
        }
    }
    fn alive(&self) -> bool {
        self.exit.is_none()
    }
    fn report_after(&self) -> Option<f64> {
        self.out
            .lock()
            .unwrap()
            .report_at
            .map(|t| t.duration_since(self.t0).as_secs_f64())
    }
    fn report_age(&self) -> Option<Duration> {
        self.out.lock().unwrap().report_at.map(|t| t.elapsed())
    }
    fn report(&self) -> Value {
        self.out
            .lock()
            .unwrap()
            .report
            .clone()
            .unwrap_or(Value::Null)
    }
    fn stderr_tail(&self) -> String {
        let s = &self.out.lock().unwrap().stderr;
        let mut start = s.len().saturating_sub(1500);
        while !s.is_char_boundary(start) {
            start += 1;
        }
        s[start..].to_string()
    }
    fn sigterm(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.terminated = true;
    }
    fn wait_exit(&mut self, d: Duration) {
        let t = Instant::now();
        while self.alive() && t.elapsed() < d {
            self.poll();
            thread::sleep(Duration::from_millis(20));
        }
    }
    fn json(&self, with_stderr: bool) -> Value {
        let mut v = json!({
            "exit": self.exit.flatten(),
            "exit_after_s": self.exit_after.map(|d| d.as_secs_f64()),
            "report_after_s": self.report_after(),
            "killed": self.killed,
            "held": self.held,
            "hung": self.hung,
            "sigterm": self.terminated,
            "report": self.report(),
        });
        if with_stderr {
            v["stderr_tail"] = Value::String(self.stderr_tail());
        }
        v
    }
}

fn collect_stderr(err: ChildStderr, out: Arc<Mutex<Out>>) {
    thread::spawn(move || {
        let mut r = BufReader::new(err);
        let mut line = String::new();
        while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
            let mut o = out.lock().unwrap();
            o.stderr.push_str(&line);
            if o.stderr.len() > 64 * 1024 {
                let cut = o.stderr.len() - 32 * 1024;
                let mut c = cut;
                while !o.stderr.is_char_boundary(c) {
                    c += 1;
                }
                o.stderr.drain(..c);
            }
            line.clear();
        }
    });
}

/// The result of one trial.
struct Trial {
    index: usize,
    seed: u64,
    fault: Fault,
    fired: bool,
    fired_at_s: Option<f64>,
    kill_delivered: bool,
    class: &'static str,
    note: String,
    phase: &'static str,
    proxy_bytes: u64,
    return_reads: u64,
    conns: usize,
    secs: f64,
    send: Value,
    receive: Value,
}

fn bad(class: &str) -> bool {
    matches!(class, "lost" | "both" | "wrong" | "hung")
}

/// The settings every trial shares.
struct Settings<'a> {
    kinds: &'a [&'a str],
    expect: u64,
    kill_window_ms: u64,
    forced: Option<Fault>,
    bound: Duration,
    /// Both sides switch to postcopy after the first pass.
    postcopy: bool,
    /// Both sides migrate encrypted with the pre-shared key in this file.
    tls_psk: Option<&'a Path>,
}

fn run_trial(ferry: &Path, index: usize, seed: u64, set: &Settings) -> Result<Trial, String> {
    let Settings {
        kinds,
        expect,
        kill_window_ms,
        forced,
        bound,
        postcopy,
        tls_psk,
    } = *set;
    let link_args: Vec<&str> = match tls_psk.and_then(Path::to_str) {
        Some(p) => vec!["--tls-psk", p],
        None => vec!["--insecure"],
    };
    // Postcopy cut off: both sides hold while they resume, for a moment.
    let hold_after = if postcopy { HOLD_AFTER * 3 } else { HOLD_AFTER };
    let postcopy_args: &[&str] = if postcopy { &["--postcopy"] } else { &[] };
    // A link of 64 MB/s: the first pass takes about a second, and postcopy
    // then streams what the guest dirtied meanwhile.
    let send_postcopy_args: &[&str] = if postcopy {
        &["--postcopy", "--bandwidth", "64M"]
    } else {
        &[]
    };
    let mut rng = Rng::new(seed);
    let fault = match forced {
        Some(f) => f,
        None => Fault::pick(&mut rng, kinds, expect, kill_window_ms, postcopy),
    };
    let t0 = Instant::now();

    // The destination, and its endpoint from its first JSON line.
    let mut rchild = Command::new(ferry)
        .args([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--mem",
            "64M",
            "--json",
        ])
        .args(&link_args)
        .args([
            "--handover-timeout-s",
            "2",
            "--idle-timeout-s",
            "5",
            "--run-s",
            "0.5",
        ])
        .args(postcopy_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", ferry.display()))?;
    let rout = Arc::new(Mutex::new(Out::default()));
    collect_stderr(rchild.stderr.take().unwrap(), rout.clone());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    {
        let stdout = rchild.stdout.take().unwrap();
        let out = rout.clone();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                match v.get("type").and_then(Value::as_str) {
                    Some("listening") => {
                        if let (Some(tx), Some(ep)) =
                            (tx.take(), v.get("endpoint").and_then(Value::as_str))
                        {
                            let _ = tx.send(ep.to_string());
                        }
                    }
                    Some("report") => {
                        let mut o = out.lock().unwrap();
                        o.report = Some(v);
                        o.report_at = Some(Instant::now());
                    }
                    _ => {}
                }
            }
        });
    }
    let endpoint = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(e) => e,
        Err(_) => {
            let _ = rchild.kill();
            let _ = rchild.wait();
            return Err(format!(
                "ferry receive printed no listening line: {}",
                rout.lock().unwrap().stderr
            ));
        }
    };
    let upstream = endpoint
        .strip_prefix("tcp:")
        .unwrap_or(&endpoint)
        .to_string();
    let (proxy, addr) =
        Proxy::start(upstream, &fault, expect).map_err(|e| format!("proxy: {e}"))?;

    // The source, through the proxy.
    let mut schild = Command::new(ferry)
        .args([
            "send",
            "--to",
            &addr,
            "--mem",
            "64M",
            "--dirty-rate",
            "20M",
            "--json",
        ])
        .args(&link_args)
        .args(["--handover-timeout-s", "2", "--idle-timeout-s", "5"])
        .args(send_postcopy_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", ferry.display()))?;
    let sstart = Instant::now();
    let sout = Arc::new(Mutex::new(Out::default()));
    collect_stderr(schild.stderr.take().unwrap(), sout.clone());
    {
        let stdout = schild.stdout.take().unwrap();
        let out = sout.clone();
        thread::spawn(move || {
            // One pretty JSON object: parse once a line closes it.
            let mut buf = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                buf.push_str(&line);
                buf.push('\n');
                if line.starts_with('}') {
                    if let Ok(v) = serde_json::from_str::<Value>(&buf) {
                        let mut o = out.lock().unwrap();
                        o.report = Some(v);
                        o.report_at = Some(Instant::now());
                    }
                    buf.clear();
                }
            }
        });
    }
    let mut send = Proc {
        child: schild,
        out: sout,
        exit: None,
        exit_after: None,
        t0,
        killed: false,
        held: false,
        hung: false,
        terminated: false,
    };
    let mut recv = Proc {
        child: rchild,
        out: rout,
        exit: None,
        exit_after: None,
        t0,
        killed: false,
        held: false,
        hung: false,
        terminated: false,
    };

    let mut kill_delivered = false;
    let mut kill_pending = matches!(fault, Fault::Kill { .. });
    loop {
        send.poll();
        recv.poll();
        if let Fault::Kill { side, at } = fault {
            if kill_pending && sstart.elapsed() >= at {
                kill_pending = false;
                let p = if side == Side::Source {
                    &mut send
                } else {
                    &mut recv
                };
                if p.alive() && !p.held {
                    let _ = p.child.kill();
                    p.killed = true;
                    kill_delivered = true;
                }
            }
        }
        for p in [&mut send, &mut recv] {
            if p.alive() && !p.held && p.report_age().is_some_and(|a| a >= hold_after) {
                p.held = true;
            }
        }
        let settled = |p: &Proc| !p.alive() || p.held;
        // A destination that never saw a connection holds nothing.
        let idle_dest = proxy.conns.load(Ordering::SeqCst) == 0
            && !send.alive()
            && recv.alive()
            && recv.report_age().is_none();
        if (settled(&send) && settled(&recv)) || idle_dest {
            break;
        }
        if t0.elapsed() >= bound {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let idle_dest =
        proxy.conns.load(Ordering::SeqCst) == 0 && recv.alive() && recv.report_age().is_none();
    for p in [&mut send, &mut recv] {
        if p.alive() && !p.held {
            p.hung = true;
        }
    }
    if idle_dest {
        recv.hung = false;
    }
    // Discard what is held, and end what hung.
    for p in [&mut send, &mut recv] {
        if p.held && p.alive() {
            p.sigterm();
        }
    }
    for p in [&mut send, &mut recv] {
        if p.terminated {
            p.wait_exit(Duration::from_secs(5));
        }
    }
    if idle_dest {
        recv.sigterm();
        recv.wait_exit(Duration::from_secs(2));
    }
    for p in [&mut send, &mut recv] {
        if p.alive() {
            let _ = p.child.kill();
            let _ = p.child.wait();
            p.poll();
        }
    }
    proxy.stop();
    // Let the output threads take the last lines.
    thread::sleep(Duration::from_millis(100));

    let (class, note) = classify(&send, &recv, idle_dest);
    let srep = send.report();
    let rrep = recv.report();
    let go = rrep["go_received"].as_bool().unwrap_or(false);
    let proxy_bytes = proxy.bytes.load(Ordering::SeqCst);
    let conns = proxy.conns.load(Ordering::SeqCst);
    // The source's word counts too: a destination killed after go printed nothing.
    let go_sent = matches!(srep["outcome"].as_str(), Some("done" | "held"));
    let phase = if go || go_sent {
        "after-go"
    } else if conns == 0 {
        "no-connection"
    } else if proxy_bytes < SMALL {
        "handshake"
    } else {
        "precopy"
    };
    let fired_at_s = proxy.fired_at.lock().unwrap().map(|d| d.as_secs_f64());
    Ok(Trial {
        index,
        seed,
        fault,
        fired: proxy.fired.load(Ordering::SeqCst),
        fired_at_s,
        kill_delivered,
        class,
        note,
        phase,
        proxy_bytes,
        return_reads: proxy.return_reads.load(Ordering::SeqCst),
        conns,
        secs: t0.elapsed().as_secs_f64(),
        send: send.json(bad(class) || class == "held"),
        receive: recv.json(bad(class) || class == "held"),
    })
}

/// Applies the rules of the module documentation.
fn classify(send: &Proc, recv: &Proc, idle_dest: bool) -> (&'static str, String) {
    let s = send.report();
    let r = recv.report();
    let s_outcome = s["outcome"].as_str().unwrap_or("");
    let s_ok = s["ok"].as_bool().unwrap_or(false) && send.exit == Some(Some(0));
    let sg = &s["source_guest_after_failure"];
    let s_running = sg["running"].as_bool().unwrap_or(false);
    let s_mism = sg["mismatches"].as_u64().unwrap_or(0);
    let r_mism = r["verify_mismatches"].as_u64().unwrap_or(0);
    let r_ok = r["ok"].as_bool().unwrap_or(false) && recv.exit == Some(Some(0));
    let go = r["go_received"].as_bool().unwrap_or(false);
    let src_runs = s_outcome == "runs-on-source" && s_running && !send.killed;
    let dst_runs = r_ok && r_mism == 0 && !recv.killed;
    let src_held = send.held || s_outcome == "held";
    let dst_held = recv.held || r["outcome"].as_str() == Some("held");
    let where_dst = if dst_runs {
        "the destination runs the guest"
    } else if go {
        "the destination received go but did not report it running"
    } else {
        "the destination never received go"
    };

    if s_mism > 0 || r_mism > 0 {
        return (
            "wrong",
            format!("mismatches: source {s_mism}, destination {r_mism}"),
        );
    }
    if send.hung || (recv.hung && !idle_dest) {
        let who = match (send.hung, recv.hung) {
            (true, true) => "both processes",
            (true, false) => "ferry send",
            _ => "ferry receive",
        };
        return (
            "hung",
            format!("{who} neither exited nor held within the bound"),
        );
    }
    if src_runs && go {
        return (
            "both",
            format!("the source resumed the guest and the destination received go (destination ok: {r_ok})"),
        );
    }
    if send.killed {
        let note = if dst_runs {
            "killed after go: the guest runs on the destination".to_string()
        } else {
            format!("the guest died with the source; {where_dst}")
        };
        return ("killed-source", note);
    }
    if recv.killed {
        if src_runs {
            return (
                "back-on-source",
                "destination killed; the source resumed the guest".into(),
            );
        }
        if src_held {
            return (
                "held",
                "destination killed after go; the source holds the guest".into(),
            );
        }
        if s_ok {
            return (
                "killed-destination",
                "the source had released the guest (started confirmed); the kill lost it".into(),
            );
        }
        return (
            "lost",
            format!("destination killed; the source ended '{s_outcome}' without a running guest"),
        );
    }
    if src_runs {
        return ("back-on-source", "the source resumed the guest".into());
    }
    if src_held || dst_held {
        let who = match (src_held, dst_held) {
            (true, true) => "both sides held",
            (true, false) => "the source held",
            _ => "the destination held",
        };
        return ("held", format!("{who}; {where_dst}"));
    }
    if s_ok && dst_runs {
        let recovered = s["recoveries"]
            .as_u64()
            .unwrap_or(0)
            .max(r["recoveries"].as_u64().unwrap_or(0));
        if recovered > 0 {
            return (
                "recovered",
                format!("postcopy was cut off and resumed (attempt {recovered})"),
            );
        }
        return ("done", String::new());
    }
    (
        "lost",
        format!(
            "source '{s_outcome}' (exit {:?}, running {s_running}), destination '{}' (exit {:?}, go {go})",
            send.exit.flatten(),
            r["outcome"].as_str().unwrap_or(""),
            recv.exit.flatten()
        ),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let trials: usize = get("--trials").and_then(|s| s.parse().ok()).unwrap_or(10);
    let base_seed: u64 = get("--seed").and_then(|s| s.parse().ok()).unwrap_or(1);
    let expect: u64 = get("--expect-bytes")
        .and_then(|s| s.parse().ok())
        .unwrap_or(70_000_000);
    let kill_window_ms: u64 = get("--kill-window-ms")
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000)
        .max(1);
    let bound = Duration::from_secs(get("--bound-s").and_then(|s| s.parse().ok()).unwrap_or(45));
    let faults = get("--faults").unwrap_or_else(|| "reset,stall,kill".into());
    let kinds: Vec<&str> = faults
        .split(',')
        .map(str::trim)
        .filter(|k| matches!(*k, "reset" | "stall" | "kill" | "handover" | "cut"))
        .collect();
    if kinds.is_empty() {
        eprintln!("fault_trials: --faults takes a list of reset, stall, kill, handover, cut");
        std::process::exit(2);
    }
    let json_out = args.iter().any(|a| a == "--json");
    let forced = match get("--fault") {
        Some(f) => match Fault::parse(&f) {
            Some(f) => Some(f),
            None => {
                eprintln!("fault_trials: --fault takes KIND:N, e.g. reset:121 or kill-source:300");
                std::process::exit(2);
            }
        },
        None => None,
    };
    let only: Option<u64> = get("--trial-seed").and_then(|s| s.parse().ok());
    let ferry: PathBuf = match get("--ferry") {
        Some(p) => PathBuf::from(p),
        None => match std::env::current_exe() {
            Ok(p) => p.with_file_name("ferry"),
            Err(e) => {
                eprintln!("fault_trials: cannot find my own path: {e}");
                std::process::exit(1);
            }
        },
    };
    if !ferry.exists() {
        eprintln!(
            "fault_trials: {} is missing; build it with: cargo build --release -p ferry-cli --bin ferry",
            ferry.display()
        );
        std::process::exit(1);
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("fault_trials: /dev/kvm is missing: no guest to migrate");
        std::process::exit(1);
    }

    let seeds: Vec<u64> = match only {
        Some(s) => vec![s],
        None => (0..trials as u64)
            .map(|i| base_seed.wrapping_mul(1_000_003).wrapping_add(i))
            .collect(),
    };
    let tls = args.iter().any(|a| a == "--tls");
    if tls && kinds.contains(&"handover") {
        eprintln!("fault_trials: handover faults read the return path in clear text; with --tls use reset, stall, kill, cut");
        std::process::exit(2);
    }
    let psk = std::env::temp_dir().join(format!("fault-trials-{}.psk", std::process::id()));
    if tls {
        if let Err(e) = std::fs::write(&psk, "fault-trials:0f1e2d3c4b5a69788796a5b4c3d2e1f0\n") {
            eprintln!("fault_trials: cannot write {}: {e}", psk.display());
            std::process::exit(1);
        }
    }
    let set = Settings {
        kinds: &kinds,
        expect,
        kill_window_ms,
        forced,
        bound,
        postcopy: args.iter().any(|a| a == "--postcopy"),
        tls_psk: tls.then_some(psk.as_path()),
    };
    let started = Instant::now();
    let mut results = Vec::new();
    for (i, &seed) in seeds.iter().enumerate() {
        match run_trial(&ferry, i, seed, &set) {
            Ok(t) => {
                eprintln!(
                    "fault_trials: trial {}/{} seed {} {} {}{} → {} [{}] {:.1} s, {} B, {} conn{}",
                    i + 1,
                    seeds.len(),
                    t.seed,
                    t.fault.kind(),
                    t.fault.detail(),
                    if matches!(t.fault, Fault::Kill { .. }) {
                        if t.kill_delivered {
                            ""
                        } else {
                            " (not delivered)"
                        }
                    } else if t.fired {
                        ""
                    } else {
                        " (never fired)"
                    },
                    t.class,
                    t.phase,
                    t.secs,
                    t.proxy_bytes,
                    t.conns,
                    if t.note.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", t.note)
                    }
                );
                let side = |v: &Value| {
                    format!(
                        "exit {} at {} s, outcome {}{}",
                        v["exit"],
                        v["exit_after_s"]
                            .as_f64()
                            .map_or("-".into(), |x| format!("{x:.1}")),
                        v["report"]["outcome"],
                        if v["held"] == true { ", held" } else { "" }
                    )
                };
                eprintln!(
                    "fault_trials:   send {}; receive {}, go {}",
                    side(&t.send),
                    side(&t.receive),
                    t.receive["report"]["go_received"]
                );
                if bad(t.class) {
                    eprintln!("fault_trials:   send    {}", t.send);
                    eprintln!("fault_trials:   receive {}", t.receive);
                }
                results.push(t);
            }
            Err(e) => {
                eprintln!(
                    "fault_trials: trial {} seed {seed} could not run: {e}",
                    i + 1
                );
                std::process::exit(1);
            }
        }
    }

    let mut by_class: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_fault: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    let mut by_phase: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for t in &results {
        *by_class.entry(t.class).or_default() += 1;
        *by_fault
            .entry(t.fault.kind())
            .or_default()
            .entry(t.class)
            .or_default() += 1;
        *by_phase
            .entry(t.phase)
            .or_default()
            .entry(t.class)
            .or_default() += 1;
    }
    let failures = results.iter().filter(|t| bad(t.class)).count();
    let total_s = started.elapsed().as_secs_f64();

    if json_out {
        let trials: Vec<Value> = results
            .iter()
            .map(|t| {
                json!({
                    "index": t.index,
                    "seed": t.seed,
                    "fault": t.fault.kind(),
                    "fault_detail": t.fault.detail(),
                    "fired": t.fired || t.kill_delivered,
                    "fired_at_s": t.fired_at_s,
                    "class": t.class,
                    "note": t.note,
                    "phase": t.phase,
                    "proxy_bytes": t.proxy_bytes,
                    "return_reads": t.return_reads,
                    "connections": t.conns,
                    "secs": t.secs,
                    "send": t.send,
                    "receive": t.receive,
                })
            })
            .collect();
        let v = json!({
            "trials": results.len(),
            "failures": failures,
            "total_s": total_s,
            "by_class": by_class,
            "by_fault": by_fault,
            "by_phase": by_phase,
            "results": trials,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        let classes = [
            "done",
            "recovered",
            "back-on-source",
            "held",
            "killed-source",
            "killed-destination",
            "lost",
            "both",
            "wrong",
            "hung",
        ];
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "\nFerry fault trials — {} trials in {:.0} s\n",
            results.len(),
            total_s
        );
        let row = |out: &mut std::io::StdoutLock, name: &str, m: &BTreeMap<&str, usize>| {
            let mut line = format!("  {name:<18}");
            for c in classes {
                line.push_str(&format!("{:>10}", m.get(c).copied().unwrap_or(0)));
            }
            line.push_str(&format!("{:>10}", m.values().sum::<usize>()));
            let _ = writeln!(out, "{line}");
        };
        let head = |out: &mut std::io::StdoutLock, first: &str| {
            let mut line = format!("  {first:<18}");
            for c in [
                "done",
                "recovered",
                "back-src",
                "held",
                "kill-src",
                "kill-dst",
                "lost",
                "both",
                "wrong",
                "hung",
                "total",
            ] {
                line.push_str(&format!("{c:>10}"));
            }
            let _ = writeln!(out, "{line}");
        };
        head(&mut out, "fault \\ class");
        for (f, m) in &by_fault {
            row(&mut out, f, m);
        }
        row(&mut out, "all", &by_class);
        let _ = writeln!(out);
        head(&mut out, "phase \\ class");
        for (p, m) in &by_phase {
            row(&mut out, p, m);
        }
        let _ = writeln!(
            out,
            "\n  {} failure(s) (lost, both, wrong or hung)\n",
            failures
        );
    }
    if failures > 0 {
        std::process::exit(1);
    }
}
