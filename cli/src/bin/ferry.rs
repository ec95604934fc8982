//! The `ferry` command: live-migrate a real KVM guest.
//!
//! - `ferry demo`: a whole migration on this machine, source and destination
//!   as two processes over loopback, ending with the guest verifying its own
//!   memory on the destination.
//! - `ferry receive --listen ADDR` and `ferry send --to ADDR`: the same across
//!   two machines.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use ferry_cli::kvm_guest::{self, IncomingGuest, SourceGuest};
use ferry_cli::operator::{self, Outcome};
use ferry_cli::vmm::{VerifyReport, Vm, VmConfig};
use ferry_host::destination;
use ferry_host::link::{Acceptor, ChannelRole, Conn, DataConn, Endpoint, LinkError, Listener};
use ferry_host::migration::{DestinationReport, Event, SourceConfig, SourceReport};
use ferry_host::postcopy::{DestinationPostcopyReport, PostcopyHandle};
use ferry_host::ram::Ram;
use ferry_host::source::{self, SourceLink};
use ferry_host::tls::{DestinationTls, End, PskKey, SourceTls, TlsAcceptor, X509Credentials};
use ferry_uring::{RecvStrategy, Transport, UringConfig};

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of a running KVM guest's memory, precopy over io_uring."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Migrate a real KVM guest between two processes on this machine and let it verify itself.
    Demo(DemoArgs),
    /// Start a guest here and migrate it to a `ferry receive` elsewhere.
    Send(SendArgs),
    /// Wait for a migration, run the guest that arrives, and have it verify its memory.
    Receive(ReceiveArgs),
    /// Write a throw-away CA and certificates for both ends (x509 for `--tls-creds`).
    TlsGen(TlsGenArgs),
}

#[derive(Args, Debug)]
struct TlsGenArgs {
    /// The directory to write (created if missing; copy it to both hosts).
    #[arg(long)]
    dir: std::path::PathBuf,
    /// A name or address the destination's certificate is valid for (repeat
    /// for several; what `ferry send --to` or `--tls-hostname` names).
    #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    names: Vec<String>,
    /// The source's identity, for the destination's `--tls-authz`.
    #[arg(long, default_value = "ferry-source")]
    client: String,
}

fn tls_gen(a: TlsGenArgs) -> Result<ExitCode, BoxError> {
    let names: Vec<&str> = a.names.iter().map(String::as_str).collect();
    let g = ferry_host::tls::generate_x509(&a.dir, &names, &a.client)?;
    println!(
        "wrote a throw-away CA and certificates to {}: the destination's is valid for {}, the source's names {}",
        g.dir.display(),
        g.server_names.join(", "),
        g.client_name
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TransportArg {
    /// io_uring with registered guest memory (falls back to std when unavailable).
    Uring,
    /// io_uring with zero-copy sends (SEND_ZC).
    UringZc,
    /// Plain blocking std::net sockets.
    Std,
}

/// Which pages back guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum HugePagesArg {
    /// Transparent huge pages (`MADV_HUGEPAGE`), as QEMU asks for on guest
    /// RAM. Registering guest RAM with io_uring pins 2 MiB at a time, and the
    /// destination receives into fewer, larger pages. Falls back to base
    /// pages when the kernel's setting is `never` (shmem's, for memfd RAM).
    #[default]
    Thp,
    /// Base 4 KiB pages only.
    None,
}

impl HugePagesArg {
    fn pages(self) -> ferry_host::memory::HugePages {
        match self {
            HugePagesArg::Thp => ferry_host::memory::HugePages::Transparent,
            HugePagesArg::None => ferry_host::memory::HugePages::None,
        }
    }
}

impl MigrateArgs {
    /// `--channels`, or its default: one when postcopy may be used, else two.
    fn bulk_channels(&self) -> usize {
        let default = if self.postcopy || self.allow_postcopy {
            1
        } else {
            2
        };
        self.channels.unwrap_or(default).max(1)
    }
}

impl TransportArg {
    fn transport(self) -> Transport {
        match self {
            TransportArg::Uring => Transport::Uring(UringConfig::default()),
            TransportArg::UringZc => Transport::Uring(UringConfig {
                zero_copy: true,
                ..UringConfig::default()
            }),
            TransportArg::Std => Transport::Std(RecvStrategy::Direct),
        }
    }
}

#[derive(Args, Debug, Clone)]
struct GuestArgs {
    /// Guest memory size (K, M, G suffixes; a multiple of 2 MiB).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    mem: u64,
    /// vCPUs; each dirties its share of the pages.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Back guest RAM with memfds: in postcopy the destination receives
    /// pages in place through a second mapping and maps them with
    /// UFFDIO_CONTINUE (instead of UFFDIO_COPY into anonymous memory).
    /// `ferry receive --postcopy` always does: its switchover then drops no
    /// page one by one, so the downtime does not grow with the guest.
    #[arg(long)]
    memfd: bool,
    /// With `--postcopy`, keep the destination's guest RAM anonymous:
    /// pages go in with UFFDIO_COPY, and the switchover drops every page
    /// that changed since it was sent, one by one (the baseline of
    /// `migrate_bench --postcopy`).
    #[arg(long, conflicts_with = "memfd")]
    anonymous: bool,
    /// Pages backing guest RAM, on both sides of a demo.
    #[arg(long, value_enum, default_value_t = HugePagesArg::Thp)]
    huge_pages: HugePagesArg,
}

/// How the migration's connections are protected. One of `--tls-creds`,
/// `--tls-psk` or `--insecure` is required: there is no silent fallback to
/// clear text.
#[derive(Args, Debug, Clone, Default)]
struct TlsArgs {
    /// TLS 1.3 with mutual x509: a directory in QEMU's layout, `ca-cert.pem`
    /// and, on the source, `client-cert.pem` and `client-key.pem`, on the
    /// destination `server-cert.pem` and `server-key.pem` (`ferry tls-gen`
    /// writes a throw-away set).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["tls_psk", "insecure"])]
    tls_creds: Option<std::path::PathBuf>,
    /// TLS 1.3 with a pre-shared key: a file of `identity:hexkey` lines
    /// (QEMU's `keys.psk`); the source uses the first line.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    tls_psk: Option<std::path::PathBuf>,
    /// Destination: a source identity to accept (repeat for several): a DNS
    /// name in its certificate, or its PSK identity. Without it, any source
    /// the CA signed, or that holds a key, is accepted.
    #[arg(long, value_name = "ID")]
    tls_authz: Vec<String>,
    /// Source: the name the destination's certificate must be valid for
    /// (by default the address of `--to`).
    #[arg(long, value_name = "NAME")]
    tls_hostname: Option<String>,
    /// Migrate in clear text, unauthenticated: anyone on the path reads the
    /// guest's memory, and anyone who can connect can push a guest in.
    #[arg(long)]
    insecure: bool,
}

const NO_CREDENTIALS: &str =
    "no credentials for the migration's connections: give --tls-creds DIR \
(mutual x509) or --tls-psk FILE (a pre-shared key), or --insecure to migrate in clear text, \
unauthenticated";

impl TlsArgs {
    /// The source's TLS settings; `None` with `--insecure`.
    fn source(&self, to: &Endpoint) -> Result<Option<SourceTls>, BoxError> {
        if let Some(dir) = &self.tls_creds {
            let name = match (&self.tls_hostname, to) {
                (Some(n), _) => n.clone(),
                (None, Endpoint::Tcp(a)) => a.ip().to_string(),
                (None, Endpoint::Unix(_)) => {
                    return Err(
                        "--tls-creds over a Unix socket needs --tls-hostname: the name \
                                the destination's certificate is valid for"
                            .into(),
                    )
                }
            };
            let creds = X509Credentials::from_dir(dir, End::Source)?;
            return Ok(Some(SourceTls::x509(creds, &name)?));
        }
        if let Some(file) = &self.tls_psk {
            let keys = PskKey::read_file(file)?;
            let first = keys.into_iter().next().ok_or(NO_CREDENTIALS)?;
            return Ok(Some(SourceTls::psk(first)?));
        }
        if self.insecure {
            return Ok(None);
        }
        Err(NO_CREDENTIALS.into())
    }

    /// The destination's TLS settings; `None` with `--insecure`.
    fn destination(&self) -> Result<Option<DestinationTls>, BoxError> {
        if let Some(dir) = &self.tls_creds {
            let creds = X509Credentials::from_dir(dir, End::Destination)?;
            return Ok(Some(DestinationTls::x509(creds, self.tls_authz.clone())?));
        }
        if let Some(file) = &self.tls_psk {
            let keys = PskKey::read_file(file)?;
            return Ok(Some(DestinationTls::psk(keys, self.tls_authz.clone())?));
        }
        if self.insecure {
            return Ok(None);
        }
        Err(NO_CREDENTIALS.into())
    }

    /// What the reports say about the connections.
    fn mode(&self) -> &'static str {
        if self.tls_creds.is_some() {
            "TLS 1.3, mutual x509"
        } else if self.tls_psk.is_some() {
            "TLS 1.3, pre-shared key"
        } else {
            "clear text (--insecure)"
        }
    }

    /// The same choice as arguments, for a child `ferry receive`.
    fn as_receive_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(d) = &self.tls_creds {
            v.extend(["--tls-creds".to_string(), d.display().to_string()]);
        }
        if let Some(f) = &self.tls_psk {
            v.extend(["--tls-psk".to_string(), f.display().to_string()]);
        }
        for id in &self.tls_authz {
            v.extend(["--tls-authz".to_string(), id.clone()]);
        }
        if self.insecure {
            v.push("--insecure".to_string());
        }
        v
    }
}

/// The destination's connections: plain, or through TLS.
enum Accepting<'l> {
    Plain(&'l Listener),
    Tls(TlsAcceptor<&'l Listener>),
}

impl Accepting<'_> {
    /// The first record that failed on the session's protected connections.
    fn record_fault(&self) -> Option<ferry_host::tls::RecordError> {
        match self {
            Accepting::Plain(_) => None,
            Accepting::Tls(t) => t.record_fault(),
        }
    }
}

impl Acceptor for &Accepting<'_> {
    fn accept(&mut self, channel: ChannelRole) -> Result<Conn, LinkError> {
        match self {
            Accepting::Plain(l) => l.accept(),
            Accepting::Tls(t) => Acceptor::accept(&mut &*t, channel),
        }
    }

    fn accept_within(&mut self, channel: ChannelRole, bound: Duration) -> Result<Conn, LinkError> {
        match self {
            Accepting::Plain(l) => l.accept_within(channel, bound),
            Accepting::Tls(t) => Acceptor::accept_within(&mut &*t, channel, bound),
        }
    }

    fn accept_data_within(
        &mut self,
        channel: ChannelRole,
        bound: Duration,
    ) -> Result<DataConn, LinkError> {
        match self {
            Accepting::Plain(l) => l.accept_within(channel, bound).map(DataConn::plain),
            Accepting::Tls(t) => Acceptor::accept_data_within(&mut &*t, channel, bound),
        }
    }
}

#[derive(Args, Debug, Clone)]
struct MigrateArgs {
    /// How fast the guest dirties memory during the migration, bytes/s (K, M, G suffixes).
    #[arg(long, default_value = "100M", value_parser = parse_size)]
    dirty_rate: u64,
    /// Downtime limit in milliseconds: a ceiling, not a budget.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Bandwidth cap in bytes/s (K, M, G suffixes); none by default.
    #[arg(long, value_parser = parse_size)]
    bandwidth: Option<u64>,
    /// Bulk channels: connections carrying pages, each with its own sender
    /// and receiver thread. By default two, or one when postcopy may be used:
    /// on a 2-core machine running both ends, two channels moved guests that
    /// dirty memory faster than one (idle guests slower), but in postcopy a
    /// second receiver thread took the cores the running guest and its faults
    /// need (the guest ran at 12 % of its speed against 43 %).
    #[arg(long)]
    channels: Option<usize>,
    /// Transport of the bulk channels in clear text (encrypted ones carry
    /// TLS records on their own sends and receives; control uses it either way).
    #[arg(long, value_enum, default_value = "uring")]
    transport: TransportArg,
    /// Give up when the migration has not converged after this many seconds.
    #[arg(long, default_value_t = 60)]
    give_up_s: u64,
    /// Bound, in seconds, on each wait of the handover: ready after the end
    /// of the stream, started after go.
    #[arg(long, default_value_t = 10)]
    handover_timeout_s: u64,
    /// Bound, in seconds, on the handshake and on a destination that takes
    /// no data while data is due.
    #[arg(long, default_value_t = 30)]
    idle_timeout_s: u64,
    /// Print the final report as JSON on stdout (progress stays off).
    #[arg(long)]
    json: bool,
    /// Postcopy after precopy: negotiate postcopy-ram and switch the guest
    /// over after the first full pass; missing pages are fetched on fault.
    #[arg(long)]
    postcopy: bool,
    /// Negotiate postcopy-ram but switch only when asked: send SIGUSR1 to
    /// this process mid-migration.
    #[arg(long)]
    allow_postcopy: bool,
    /// Keep a snapshot dirty bitmap and migrate it as a postcopy-only
    /// section (with --postcopy-sections it streams after the guest resumes;
    /// without, it goes in the downtime).
    #[arg(long)]
    snapshot_bitmap: bool,
    /// Negotiate the postcopy-only-sections capability.
    #[arg(long)]
    postcopy_sections: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args, Debug)]
struct DemoArgs {
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    migrate: MigrateArgs,
    /// Use a Unix socket instead of loopback TCP.
    #[arg(long)]
    unix: bool,
}

#[derive(Args, Debug)]
struct SendArgs {
    /// The destination: HOST:PORT or unix:PATH.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    migrate: MigrateArgs,
}

#[derive(Args, Debug)]
struct ReceiveArgs {
    /// Where to listen: HOST:PORT (port 0 picks one) or unix:PATH.
    #[arg(long)]
    listen: String,
    #[command(flatten)]
    guest: GuestArgs,
    /// Transport of the bulk channels in clear text (encrypted ones carry
    /// TLS records on their own sends and receives; control uses it either way).
    #[arg(long, value_enum, default_value = "uring")]
    transport: TransportArg,
    /// Let the guest run this long on this side before it verifies its memory.
    #[arg(long, default_value_t = 1.0)]
    run_s: f64,
    /// Print the report as one JSON line on stdout.
    #[arg(long)]
    json: bool,
    /// Accept postcopy (guest RAM is then not prefaulted: missing pages are
    /// fetched on fault).
    #[arg(long)]
    postcopy: bool,
    /// Bound, in seconds, on each wait of the handover: torn pages sent
    /// again, go after ready.
    #[arg(long, default_value_t = 10)]
    handover_timeout_s: u64,
    /// Bound, in seconds, on the hello, the source's data channels, and a
    /// source that sends nothing while data is due.
    #[arg(long, default_value_t = 30)]
    idle_timeout_s: u64,
    #[command(flatten)]
    tls: TlsArgs,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size such as 512M or 2G"))?;
    if v < 0.0 {
        return Err(format!("'{s}' is negative"));
    }
    Ok((v * mul as f64) as u64)
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

fn human_rate(bps: u64) -> String {
    format!("{:.2} GB/s", bps as f64 / 1e9)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The protocol's bounds: every handover wait set to `handover_s` seconds,
/// the handshake and a silent or stalled peer to `idle_s` seconds.
fn protocol_timeouts(handover_s: u64, idle_s: u64) -> ferry_core::session::Timeouts {
    let n = handover_s.max(1).saturating_mul(ferry_core::session::SEC);
    let idle = idle_s.max(1).saturating_mul(ferry_core::session::SEC);
    ferry_core::session::Timeouts {
        handshake: idle,
        idle,
        ready: n,
        go: n,
        started: n,
        resend: n,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Demo(a) => demo(a),
        Cmd::Send(a) => send(a),
        Cmd::Receive(a) => receive(a),
        Cmd::TlsGen(a) => tls_gen(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::FAILURE
        }
    }
}

fn require_kvm() -> Result<(), BoxError> {
    if std::path::Path::new("/dev/kvm").exists() {
        Ok(())
    } else {
        Err("/dev/kvm is missing: this machine cannot run a KVM guest, so there is nothing to migrate".into())
    }
}

fn vm_config(g: &GuestArgs, dirty_rate: u64) -> VmConfig {
    VmConfig {
        mem_size: g.mem,
        vcpus: g.vcpus,
        dirty_rate,
        memory: ferry_host::memory::MemoryOptions {
            backing: if g.memfd {
                ferry_host::memory::Backing::Memfd
            } else {
                ferry_host::memory::Backing::Anonymous
            },
            huge_pages: g.huge_pages.pages(),
        },
        ..VmConfig::default()
    }
}

/// What the destination process reports.
#[derive(Debug, Serialize, serde::Deserialize, Default)]
struct DestinationSummary {
    ok: bool,
    /// How it ended, as the exit status tells it.
    #[serde(default)]
    outcome: String,
    error: Option<String>,
    go_received: bool,
    bytes_received: u64,
    pages_received: u64,
    zero_pages: u64,
    resend_requests: u64,
    go_at_ns: u64,
    resumed_at_ns: u64,
    ran_s: f64,
    pages_dirtied_here: u64,
    verify_pages_checked: u64,
    verify_mismatches: u64,
    postcopy: Option<DestinationPostcopyReport>,
    /// Postcopy cut off and taken up again: the attempt that succeeded.
    #[serde(default)]
    recoveries: u32,
    /// In postcopy: the guest's own rate here from its start to the last
    /// page, pages per second.
    #[serde(default)]
    guest_rate_in_postcopy: Option<f64>,
}

/// One line of `ferry receive --json`: JSON lines told apart by `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ReceiveLine<'a> {
    /// The destination's report, once the migration has ended.
    Report(&'a DestinationSummary),
}

/// Parses one line of `ferry receive --json`: its `type` and the object.
fn receive_line(line: &str) -> Option<(String, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some((v.get("type")?.as_str()?.to_string(), v))
}

/// The whole demo's report.
#[derive(Debug, Serialize)]
struct DemoReport {
    ok: bool,
    /// How it ended, as the exit status tells it (`done`, `runs-on-source`,
    /// `held`, `failed-after-go`, `error`).
    outcome: &'static str,
    error: Option<String>,
    guest_mem_bytes: u64,
    vcpus: u32,
    dirty_rate: u64,
    downtime_limit_ms: u64,
    total_s: f64,
    downtime_ms: Option<f64>,
    source: SourceReport,
    destination: Option<DestinationSummary>,
    guest_verified: bool,
    /// After a failure before *ready*: the guest's own check of its memory
    /// back on the source, where it runs on.
    source_guest_after_failure: Option<SourceGuestCheck>,
    /// Postcopy cut off and taken up again: the attempt that succeeded.
    recoveries: u32,
    /// The source guest's own rate before the migration, pages per second.
    guest_rate_before: f64,
}

/// The guest's verification on the source after a failed migration.
#[derive(Debug, Serialize)]
struct SourceGuestCheck {
    running: bool,
    pages_checked: u64,
    mismatches: u64,
}

/// When the migration failed and the guest was resumed here, asks it to
/// check its memory: the proof that a failure lost nothing.
fn check_source_guest(vm: &Vm, failed: bool) -> Option<SourceGuestCheck> {
    if !failed {
        return None;
    }
    if vm.is_paused() {
        return Some(SourceGuestCheck {
            running: false,
            pages_checked: 0,
            mismatches: 0,
        });
    }
    let v = vm.request_verify(Duration::from_secs(120)).ok()?;
    Some(SourceGuestCheck {
        running: true,
        pages_checked: v.pages_checked,
        mismatches: v.mismatches,
    })
}

fn progress(json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// Prints a line to stderr unless `quiet`, above the progress bar.
fn note(pb: &ProgressBar, quiet: bool, msg: String) {
    if quiet {
        return;
    }
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// What backs the guest's RAM, in words (the first region speaks for all).
fn page_kind_text(vm: &Vm) -> String {
    use ferry_host::memory::PageKind;
    match vm.memory().regions().first().map(|r| r.page_kind()) {
        Some(PageKind::Transparent) => "transparent huge pages".into(),
        Some(PageKind::Hugetlb) => "2 MiB hugetlb pages".into(),
        Some(PageKind::Fallback { got, reason }) => format!("{got}: {reason}"),
        Some(PageKind::Base) | None => "4 KiB pages".into(),
    }
}

/// Boots the source guest, lets it fill its RAM and start dirtying.
fn start_source(g: &GuestArgs, m: &MigrateArgs, pb: &ProgressBar) -> Result<Vm, BoxError> {
    require_kvm()?;
    pb.set_message(format!(
        "booting a {} guest with {} vCPU(s)",
        human_bytes(g.mem),
        g.vcpus
    ));
    let vm = Vm::new(vm_config(g, 0))?;
    vm.resume()?;
    pb.set_message("the guest fills its RAM with pseudo-random data (in ring 3)");
    let t = Instant::now();
    vm.wait_filled(Duration::from_secs(600))?;
    note(
        pb,
        m.json,
        format!(
            "guest: {} ({}) filled in {:.1} s",
            human_bytes(g.mem),
            page_kind_text(&vm),
            t.elapsed().as_secs_f64()
        ),
    );
    vm.set_dirty_rate(m.dirty_rate)?;
    vm.wait_rate_applied(Duration::from_secs(10))?;
    // The guest's own rate before the migration, by its own counter: the
    // baseline for its rate during postcopy.
    let p0 = vm.guest_status()?.pages_dirtied;
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let rate =
        vm.guest_status()?.pages_dirtied.saturating_sub(p0) as f64 / t.elapsed().as_secs_f64();
    GUEST_RATE_BEFORE.store(rate as u64, std::sync::atomic::Ordering::Relaxed);
    note(
        pb,
        m.json,
        format!(
            "guest: dirtying {}/s ({rate:.0} pages/s by its own count)",
            human_bytes(m.dirty_rate)
        ),
    );
    Ok(vm)
}

/// The source guest's own rate before the migration, pages per second.
static GUEST_RATE_BEFORE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn run_source(
    vm: &Vm,
    endpoint: Endpoint,
    m: &MigrateArgs,
    tls: Option<&SourceTls>,
    pb: &ProgressBar,
) -> Result<SourceReport, source::SourceError> {
    let ram = Ram::from_memory(vm.memory());
    let mut tracker = kvm_guest::dirty_tracker(vm)?;
    let mut guest = SourceGuest::new(vm);
    let (config, link) = source_setup(endpoint, m);
    watch_sigusr1(config.postcopy.clone());
    let json = m.json;
    let mut events = |e: &Event| source_event(vm, pb, json, e);
    match tls {
        None => source::migrate(&ram, &mut tracker, &mut guest, &config, &link, &mut events),
        Some(t) => source::migrate_over(
            &ram,
            &mut tracker,
            &mut guest,
            &config,
            &mut t.connector(&link.endpoint),
            link.transport,
            link.bulk_channels,
            &mut events,
        ),
    }
}

/// One attempt to take up a postcopy that was cut off (see `send`).
fn resume_source(
    vm: &Vm,
    hold: &source::SourceHold,
    endpoint: Endpoint,
    m: &MigrateArgs,
    tls: Option<&SourceTls>,
) -> Result<SourceReport, source::SourceError> {
    let ram = Ram::from_memory(vm.memory());
    let (config, link) = source_setup(endpoint, m);
    match tls {
        None => source::resume_postcopy(&ram, &config, &link, hold, &mut |_| {}),
        Some(t) => source::resume_postcopy_over(
            &ram,
            &config,
            &mut t.connector(&link.endpoint),
            link.transport,
            link.bulk_channels,
            hold,
            &mut |_| {},
        ),
    }
}

/// Postcopy was cut off (`failure` says how): the guest runs on the
/// destination with pages missing and this side holds every page. Resumes
/// every second until it completes (the attempt and the report) or the
/// operator discards the guest (`None`).
fn resume_until_done(
    vm: &Vm,
    hold: &source::SourceHold,
    endpoint: &Endpoint,
    m: &MigrateArgs,
    tls: Option<&SourceTls>,
    failure: &str,
) -> Option<(u32, SourceReport)> {
    let mut hold = hold.clone();
    let what = format!(
        "{failure}; resuming postcopy (session {:#010x})",
        hold.session
    );
    operator::hold_retrying(&what, Duration::from_secs(1), |n| {
        match resume_source(vm, &hold, endpoint.clone(), m, tls) {
            Ok(r) => Some((n, r)),
            Err(e) => {
                if n == 1 || n % 10 == 0 {
                    eprintln!("ferry: resume attempt {n} failed: {e}");
                }
                if let source::SourceError::PostcopyInterrupted { hold: h, .. } = e {
                    hold = *h;
                }
                None
            }
        }
    })
}

/// The source's configuration and link from the command line.
fn source_setup(endpoint: Endpoint, m: &MigrateArgs) -> (SourceConfig, SourceLink) {
    let config = SourceConfig {
        downtime_limit: Duration::from_millis(m.downtime_ms),
        bandwidth_cap: m.bandwidth,
        give_up_after: Some(Duration::from_secs(m.give_up_s)),
        offer_postcopy_ram: m.postcopy || m.allow_postcopy,
        offer_postcopy_only_sections: m.postcopy_sections,
        postcopy_after_first_pass: m.postcopy,
        snapshot_bitmap: m.snapshot_bitmap,
        timeouts: protocol_timeouts(m.handover_timeout_s, m.idle_timeout_s),
        ..SourceConfig::default()
    };
    let link = SourceLink {
        endpoint,
        transport: m.transport.transport(),
        bulk_channels: m.bulk_channels(),
    };
    (config, link)
}

/// Shows the source's progress.
fn source_event(vm: &Vm, pb: &ProgressBar, json: bool, e: &Event) {
    match e {
        Event::Connected { transport } => note(
            pb,
            json,
            format!(
                "connected: {transport}, dirty log: {}",
                if vm.dirty_log_caps().manual_protect {
                    "KVM manual protect"
                } else {
                    "KVM"
                }
            ),
        ),
        Event::Round(p) => {
            let what = if p.round == 0 {
                "first pass".to_string()
            } else {
                format!("round {}", p.round)
            };
            let msg = format!(
                "{what}: pending {} · link {} · dirty {}/s · expected downtime {}",
                human_bytes(p.pending_bytes),
                human_rate(p.bandwidth),
                human_bytes(p.dirty_rate),
                p.expected_downtime_ns
                    .map(|n| format!("{:.1} ms", n as f64 / 1e6))
                    .unwrap_or_else(|| "?".into())
            );
            pb.set_message(msg.clone());
            if p.round == 0 {
                note(pb, json, msg);
            }
        }
        Event::Paused => pb.set_message("guest paused: stop-and-copy"),
        Event::AwaitingReady => pb.set_message("waiting for the destination's ready"),
        Event::GoSent => pb.set_message("go sent: waiting for the destination to start the guest"),
        Event::Started => pb.set_message("the destination started the guest"),
        Event::ResumedOnSource => note(
            pb,
            json,
            "the migration failed before ready: the guest runs on here again".into(),
        ),
        Event::PostcopyStarted { ram, pages_left } => {
            let msg = if *ram {
                format!("postcopy: the guest runs on the destination; {pages_left} pages to stream, missing pages fetched on fault")
            } else {
                "postcopy: the guest runs on the destination; postcopy-only sections follow"
                    .to_string()
            };
            pb.set_message(msg.clone());
            note(pb, json, msg);
        }
        Event::Postcopy(p) => pb.set_message(format!(
            "postcopy {:.1} s: {} pages streamed, {} left, {} page requests served",
            p.elapsed_ns as f64 / 1e9,
            p.pages_streamed,
            p.pages_left,
            p.requests
        )),
        Event::Completed => pb.set_message("the destination acknowledged every page"),
    }
}

/// Set by the SIGUSR1 handler: the operator asks for postcopy.
static SIGUSR1_SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    SIGUSR1_SEEN.store(true, std::sync::atomic::Ordering::Release);
}

/// SIGUSR1 throws the postcopy switch of the running migration.
fn watch_sigusr1(handle: PostcopyHandle) {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGUSR1, on_sigusr1 as *const () as libc::sighandler_t) };
    let _ = std::thread::Builder::new()
        .name("ferry-sigusr1".into())
        .spawn(move || loop {
            if SIGUSR1_SEEN.swap(false, std::sync::atomic::Ordering::AcqRel) {
                handle.start_postcopy();
            }
            std::thread::sleep(Duration::from_millis(20));
        });
}

/// The identity of the demo's source in its throw-away certificates.
const DEMO_SOURCE: &str = "ferry-demo-source";

/// The demo's credentials: as given, or (encrypted by default) a throw-away
/// CA and certificates for both processes, in a directory removed at exit.
fn demo_tls(t: &mut TlsArgs, unix: bool) -> Result<Option<TempDir>, BoxError> {
    if t.insecure || t.tls_psk.is_some() || t.tls_creds.is_some() {
        return Ok(None);
    }
    let dir = TempDir(std::env::temp_dir().join(format!("ferry-demo-tls-{}", std::process::id())));
    ferry_host::tls::generate_x509(&dir.0, &["localhost", "127.0.0.1"], DEMO_SOURCE)?;
    t.tls_creds = Some(dir.0.clone());
    t.tls_authz = vec![DEMO_SOURCE.to_string()];
    if unix {
        t.tls_hostname = Some("localhost".to_string());
    }
    Ok(Some(dir))
}

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn demo(mut a: DemoArgs) -> Result<ExitCode, BoxError> {
    require_kvm()?;
    let pb = progress(a.migrate.json);
    let _creds = demo_tls(&mut a.migrate.tls, a.unix)?;
    let listen = if a.unix {
        format!(
            "unix:{}",
            std::env::temp_dir()
                .join(format!("ferry-demo-{}.sock", std::process::id()))
                .display()
        )
    } else {
        "127.0.0.1:0".to_string()
    };
    // The destination: a second process, so the guest really moves.
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "receive",
            "--listen",
            &listen,
            "--json",
            "--mem",
            &a.guest.mem.to_string(),
            "--vcpus",
            &a.guest.vcpus.to_string(),
            "--huge-pages",
            a.guest
                .huge_pages
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
                .as_str(),
        ])
        .args(if a.guest.memfd {
            &["--memfd"][..]
        } else if a.guest.anonymous {
            &["--anonymous"][..]
        } else {
            &[][..]
        })
        .args([
            "--transport",
            a.migrate
                .transport
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
                .as_str(),
        ])
        .args(
            if a.migrate.postcopy || a.migrate.allow_postcopy || a.migrate.postcopy_sections {
                &["--postcopy"][..]
            } else {
                &[][..]
            },
        )
        .args(a.migrate.tls.as_receive_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or("the destination process has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = lines
        .next()
        .ok_or("the destination process exited before listening")??;
    let endpoint: Endpoint = receive_line(&first)
        .filter(|(kind, _)| kind == "listening")
        .and_then(|(_, v)| v.get("endpoint")?.as_str().map(str::to_string))
        .ok_or_else(|| {
            format!("the destination process said '{first}' instead of where it listens")
        })?
        .parse()?;
    note(
        &pb,
        a.migrate.json,
        format!(
            "destination: process {} listening on {endpoint}",
            child.id()
        ),
    );

    let tls = a.migrate.tls.source(&endpoint)?;
    note(
        &pb,
        a.migrate.json,
        format!("connections: {}", a.migrate.tls.mode()),
    );
    let started = Instant::now();
    let vm = start_source(&a.guest, &a.migrate, &pb)?;
    let mut result = run_source(&vm, endpoint.clone(), &a.migrate, tls.as_ref(), &pb);
    pb.finish_and_clear();
    // Postcopy cut off: keep resuming until it completes, or until the
    // operator discards the guest.
    let mut recoveries = 0;
    let mut discarded = false;
    if let Err(source::SourceError::PostcopyInterrupted { hold, .. }) = &result {
        let what = result.as_ref().err().map(|e| e.to_string());
        match resume_until_done(
            &vm,
            hold,
            &endpoint,
            &a.migrate,
            tls.as_ref(),
            &what.unwrap_or_default(),
        ) {
            Some((n, r)) => {
                recoveries = n;
                result = Ok(r);
            }
            None => discarded = true,
        }
    }
    let dest: Option<DestinationSummary> = lines.map_while(Result::ok).find_map(|l| {
        receive_line(&l)
            .filter(|(kind, _)| kind == "report")
            .and_then(|(_, v)| serde_json::from_value(v).ok())
    });
    // The destination exits once it reported, unless it holds a guest (a
    // postcopy cut off): the demo owns both sides, so it ends it then.
    let waited = Instant::now();
    while matches!(child.try_wait(), Ok(None)) && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }

    let (source, error) = match &result {
        Ok(r) => (r.clone(), None),
        Err(e) => (SourceReport::default(), Some(e.to_string())),
    };
    let source_check = check_source_guest(&vm, result.is_err());
    let downtime_ms = match (&result, &dest) {
        (Ok(s), Some(d)) if d.ok => {
            Some(d.resumed_at_ns.saturating_sub(s.paused_at_ns) as f64 / 1e6)
        }
        _ => None,
    };
    let verified = dest
        .as_ref()
        .is_some_and(|d| d.ok && d.verify_mismatches == 0 && d.verify_pages_checked > 0);
    let outcome = match &result {
        Ok(_) if verified => Outcome::Done,
        Ok(_) => Outcome::FailedAfterGo,
        Err(e) => failure_outcome(&vm, e),
    };
    let report = DemoReport {
        ok: result.is_ok() && verified,
        outcome: outcome.name(),
        error: error.or_else(|| dest.as_ref().and_then(|d| d.error.clone())),
        guest_mem_bytes: a.guest.mem,
        vcpus: a.guest.vcpus,
        dirty_rate: a.migrate.dirty_rate,
        downtime_limit_ms: a.migrate.downtime_ms,
        total_s: started.elapsed().as_secs_f64(),
        downtime_ms,
        source,
        destination: dest,
        guest_verified: verified,
        source_guest_after_failure: source_check,
        recoveries,
        guest_rate_before: GUEST_RATE_BEFORE.load(std::sync::atomic::Ordering::Relaxed) as f64,
    };
    if discarded {
        eprintln!("ferry: the guest held here is discarded");
    }
    print_report(&report, a.migrate.json)?;
    Ok(outcome.into())
}

/// Where a failed migration left the guest, from the source's error.
fn failure_outcome(vm: &Vm, e: &source::SourceError) -> Outcome {
    use source::SourceError as E;
    match e {
        E::GoUnconfirmed { .. } | E::AfterGo(_) => Outcome::Held,
        E::PostcopyInterrupted { .. } => Outcome::FailedAfterGo,
        _ if vm.is_paused() => Outcome::Held,
        _ => Outcome::RunsOnSource,
    }
}

fn print_report(r: &DemoReport, json: bool) -> Result<(), BoxError> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, r)?;
        writeln!(out)?;
        return Ok(());
    }
    let s = &r.source;
    writeln!(out)?;
    writeln!(
        out,
        "Ferry live migration — {}",
        if r.ok { "done" } else { "FAILED" }
    )?;
    writeln!(
        out,
        "  guest            {} RAM, {} vCPU(s), dirtying {}/s",
        human_bytes(r.guest_mem_bytes),
        r.vcpus,
        human_bytes(r.dirty_rate)
    )?;
    if let Some(c) = &r.source_guest_after_failure {
        if c.running {
            writeln!(
                out,
                "  source guest     runs on here and verified its memory: {} pages checked, {} mismatches",
                c.pages_checked, c.mismatches
            )?;
        } else {
            writeln!(
                out,
                "  source guest     paused here: check the destination before resuming it"
            )?;
        }
    }
    if let Some(e) = &r.error {
        writeln!(out, "  error            {e}")?;
    }
    if s.total_ns > 0 {
        writeln!(
            out,
            "  migration time   {:.2} s  ({} rounds after the first pass)",
            s.total_ns as f64 / 1e9,
            s.rounds
        )?;
        match r.downtime_ms {
            Some(d) => writeln!(
                out,
                "  downtime         {d:.2} ms  (source pause → destination resume; limit {} ms)",
                r.downtime_limit_ms
            )?,
            None => writeln!(out, "  downtime         unknown")?,
        }
        writeln!(
            out,
            "  sent             {}  ({} pages, {} zero pages, {} resent)",
            human_bytes(s.bytes_sent),
            s.pages_sent,
            s.zero_pages,
            s.pages_resent
        )?;
        writeln!(
            out,
            "  throughput       {} overall; {} after {:.0} ms of setup (connect, rings, registering RAM)",
            human_rate(s.throughput),
            human_rate(s.transfer_throughput),
            s.setup_ns as f64 / 1e6
        )?;
        writeln!(out, "  transport        {}", s.transport)?;
        if let Some(p) = &s.postcopy {
            writeln!(
                out,
                "  postcopy         {} · {:.2} s after go · {} pages discarded at switchover (a {} discard map), {} streamed, {} requested ({} requests), {} of postcopy-only sections",
                p.mode,
                p.postcopy_ns as f64 / 1e9,
                p.pages_discarded,
                human_bytes(p.discard_map_bytes),
                p.pages_streamed,
                p.pages_requested,
                p.requests,
                human_bytes(p.section_bytes)
            )?;
        }
    }
    if let Some(p) = r.destination.as_ref().and_then(|d| d.postcopy.as_ref()) {
        let us = |ns: u64| ns as f64 / 1e3;
        writeln!(
            out,
            "  faults           {} on the destination · latency p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
            p.faults,
            us(p.fault_latency.p50_ns),
            us(p.fault_latency.p99_ns),
            us(p.fault_latency.p999_ns),
            us(p.fault_latency.max_ns)
        )?;
        writeln!(
            out,
            "  switchover there {:.1} ms syncing the dirty log, {:.1} ms from pause to go sent",
            r.source.final_sync_ns as f64 / 1e6,
            r.source.source_downtime_ns as f64 / 1e6
        )?;
        writeln!(
            out,
            "  switchover here  {:.1} ms waiting for the bulk channels' markers, {:.1} ms arming ({:.1} ms dropping {} ranges)",
            p.markers_wait_ns as f64 / 1e6,
            p.arm_ns as f64 / 1e6,
            p.zap_ns as f64 / 1e6,
            p.zapped_ranges
        )?;
        writeln!(
            out,
            "  fault latency    {} (µs, power-of-two buckets); vCPUs blocked {:.1} ms in all; {} minor faults (pages here, mapped on first touch)",
            latency_buckets_text(&p.fault_latency_buckets_us),
            p.blocked_ns as f64 / 1e6,
            p.minor_faults
        )?;
        writeln!(
            out,
            "  pages            {} missing at switchover: {} fetched on demand, {} streamed",
            p.pages_missing_at_switchover, p.pages_on_demand, p.pages_streamed
        )?;
        if let Some(rate) = r
            .destination
            .as_ref()
            .and_then(|d| d.guest_rate_in_postcopy)
        {
            let pct = if r.guest_rate_before > 0.0 {
                format!(
                    " ({:.0} % of its rate before)",
                    100.0 * rate / r.guest_rate_before
                )
            } else {
                String::new()
            };
            writeln!(
                out,
                "  guest speed      {rate:.0} pages/s during postcopy{pct}, {:.0} pages/s before, by its own count",
                r.guest_rate_before
            )?;
        }
    }
    if let Some(d) = &r.destination {
        if d.ok {
            writeln!(
                out,
                "  guest verify     {} pages checked on the destination, {} mismatches (after running there {:.1} s and dirtying {} more pages)",
                d.verify_pages_checked, d.verify_mismatches, d.ran_s, d.pages_dirtied_here
            )?;
        } else if let Some(e) = &d.error {
            writeln!(out, "  destination      {e}")?;
        }
    }
    writeln!(out, "  total            {:.2} s", r.total_s)?;
    Ok(())
}

fn send(a: SendArgs) -> Result<ExitCode, BoxError> {
    let endpoint: Endpoint = a.to.parse()?;
    let tls = a.migrate.tls.source(&endpoint)?;
    require_kvm()?;
    let pb = progress(a.migrate.json);
    let started = Instant::now();
    let vm = start_source(&a.guest, &a.migrate, &pb)?;
    let result = run_source(&vm, endpoint.clone(), &a.migrate, tls.as_ref(), &pb);
    pb.finish_and_clear();
    let (report, outcome, holds) = send_report(&a, &vm, &result, started, 0);
    print_report(&report, a.migrate.json)?;
    if let Err(source::SourceError::PostcopyInterrupted { hold, .. }) = &result {
        // Postcopy cut off: the guest runs on the destination with pages
        // missing and this side holds every page. Keep resuming until it
        // completes, or until the operator discards the guest; the report
        // above said `held`, the one after a resume says how it ended.
        let what = report.error.clone().unwrap_or_default();
        let resumed = resume_until_done(&vm, hold, &endpoint, &a.migrate, tls.as_ref(), &what);
        let Some((n, r)) = resumed else {
            eprintln!("ferry: the guest held here is discarded");
            return Ok(Outcome::Held.into());
        };
        eprintln!("ferry: postcopy resumed on attempt {n} and completed");
        let (report, outcome, _) = send_report(&a, &vm, &Ok(r), started, n);
        print_report(&report, a.migrate.json)?;
        return Ok(outcome.into());
    }
    if holds {
        // Never exit while holding the guest: exiting would destroy it.
        let what = report.error.clone().unwrap_or_default();
        match operator::hold(&what, true) {
            operator::Decision::Resume => {
                vm.resume()?;
                match check_source_guest(&vm, true) {
                    Some(c) => eprintln!(
                        "ferry: the guest runs here again and checked {} pages: {} mismatches",
                        c.pages_checked, c.mismatches
                    ),
                    None => eprintln!("ferry: the guest runs here again"),
                }
                return Ok(Outcome::RunsOnSource.into());
            }
            operator::Decision::Discard => {
                eprintln!("ferry: the guest held here is discarded");
                return Ok(Outcome::Held.into());
            }
        }
    }
    Ok(outcome.into())
}

/// The report of `ferry send` for `result`, how it ended, and whether this
/// process holds the guest.
fn send_report(
    a: &SendArgs,
    vm: &Vm,
    result: &Result<SourceReport, source::SourceError>,
    started: Instant,
    recoveries: u32,
) -> (DemoReport, Outcome, bool) {
    let (source, error) = match result {
        Ok(r) => (r.clone(), None),
        Err(e) => (SourceReport::default(), Some(e.to_string())),
    };
    let outcome = match result {
        Ok(_) => Outcome::Done,
        Err(e) => failure_outcome(vm, e),
    };
    let holds = matches!(
        result,
        Err(source::SourceError::GoUnconfirmed { .. }
            | source::SourceError::AfterGo(_)
            | source::SourceError::PostcopyInterrupted { .. })
    ) || (result.is_err() && vm.is_paused());
    let source_check = check_source_guest(vm, result.is_err() && !holds);
    let report = DemoReport {
        ok: result.is_ok(),
        outcome: if holds {
            Outcome::Held.name()
        } else {
            outcome.name()
        },
        error,
        guest_mem_bytes: a.guest.mem,
        vcpus: a.guest.vcpus,
        dirty_rate: a.migrate.dirty_rate,
        downtime_limit_ms: a.migrate.downtime_ms,
        total_s: started.elapsed().as_secs_f64(),
        downtime_ms: result
            .as_ref()
            .ok()
            .map(|s| s.source_downtime_ns as f64 / 1e6),
        source,
        destination: None,
        guest_verified: false,
        source_guest_after_failure: source_check,
        recoveries,
        guest_rate_before: GUEST_RATE_BEFORE.load(std::sync::atomic::Ordering::Relaxed) as f64,
    };
    (report, outcome, holds)
}

fn receive(a: ReceiveArgs) -> Result<ExitCode, BoxError> {
    let tls = a.tls.destination()?;
    require_kvm()?;
    let endpoint: Endpoint = a.listen.parse()?;
    // With postcopy, pages not received are fetched on fault: RAM must not
    // be prefaulted.
    // With postcopy, guest RAM is memfd-backed: pages are received in
    // place and the switchover costs the same whatever the guest's size.
    let guest = GuestArgs {
        memfd: a.guest.memfd || (a.postcopy && !a.guest.anonymous),
        ..a.guest.clone()
    };
    let vm = Vm::new_incoming(VmConfig {
        prefault: !a.postcopy,
        ..vm_config(&guest, 0)
    })?;
    // Postcopy into memfd RAM: pre-allocate it through the second mappings
    // (as QEMU's destination pre-allocates), so that received pages land in
    // memory that exists, while the guest's own mapping maps none of them.
    let seconds = if guest.memfd && a.postcopy {
        vm.memory()
            .regions()
            .iter()
            .map(|r| r.map_second())
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    for m in &seconds {
        m.populate()?;
    }
    let listener = Listener::bind(&endpoint)?;
    let bound = listener.local_endpoint()?;
    let accepting = match tls {
        Some(t) => Accepting::Tls(t.acceptor(&listener)),
        None => Accepting::Plain(&listener),
    };
    {
        // With --json, stdout carries JSON lines only, each with a `type`:
        // this `listening` line, then the `report`.
        let mut out = std::io::stdout().lock();
        if a.json {
            let line = serde_json::json!({ "type": "listening", "endpoint": bound.to_string() });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "listening {bound}")?;
        }
        out.flush()?;
    }
    if !a.json {
        eprintln!(
            "ferry: waiting for a migration on {bound} ({})",
            a.tls.mode()
        );
    }
    // Guest RAM is preallocated before the first connection is taken (as
    // QEMU's destination preallocates before it listens): the pages then do
    // not compete with the migration for the CPU, and the switchover never
    // waits for them. The source may already connect meanwhile; its
    // handshake waits.
    vm.wait_prefault()?;
    let ram = Ram::from_memory(vm.memory());
    let mut starter = IncomingGuest::new(&vm);
    let config = destination::DestinationConfig {
        postcopy_ram: a.postcopy,
        postcopy_only_sections: a.postcopy,
        timeouts: protocol_timeouts(a.handover_timeout_s, a.idle_timeout_s),
        ..destination::DestinationConfig::new(a.transport.transport())
    };
    let parts: Vec<_> = seconds
        .iter()
        .zip(vm.memory().regions())
        .filter_map(|(m, r)| Some((r.gpa(), std::ptr::NonNull::new(m.as_ptr())?, m.len() as u64)))
        .collect();
    // SAFETY: the second mappings live until the end of this function, past
    // the migration.
    let second = unsafe { Ram::from_raw(&parts) };
    let result = if seconds.is_empty() {
        destination::receive_with(&accepting, &ram, &mut starter, &config)
    } else {
        destination::receive_in_place(&accepting, &ram, &second, &mut starter, &config)
    };
    let (mut result, held) = match result {
        Err(mut e) => {
            let h = e.postcopy_hold.take();
            (Err(e), h)
        }
        ok => (ok, None),
    };
    // Postcopy cut off: the guest's vCPUs wait on their faults here. Keep
    // listening for the source's resume until it completes, or until the
    // operator discards the guest; the hold keeps the userfaultfd open
    // (closing it would let the vCPUs run on zero pages).
    let mut recoveries = 0;
    let mut discarded = None;
    if let Some(mut hold) = held {
        let what = format!(
            "{}; waiting for the source to resume postcopy (session {:#010x}) on {bound}",
            result
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            hold.session
        );
        // Say so at once: this process holds the guest from here on.
        let early = DestinationSummary {
            outcome: Outcome::Held.name().to_string(),
            error: result.as_ref().err().map(|e| e.to_string()),
            go_received: true,
            ..DestinationSummary::default()
        };
        print_receive(&early, a.json)?;
        // Each attempt waits a few seconds for the source, so that a
        // discard is seen soon.
        let mut again = config;
        again.timeouts.handshake = again.timeouts.handshake.min(5_000_000_000);
        let second = (!seconds.is_empty()).then_some(&second);
        let resumed = operator::hold_retrying(&what, Duration::from_millis(100), |n| {
            match destination::resume_postcopy(
                &accepting,
                &ram,
                second,
                &hold,
                &mut starter,
                &again,
            ) {
                Ok(r) => {
                    recoveries = n;
                    Some(r)
                }
                Err(mut e) => {
                    // A source that has not come back yet is no news.
                    if !matches!(
                        e.kind,
                        destination::DestinationErrorKind::Link(
                            ferry_host::link::LinkError::AcceptTimeout { .. }
                        )
                    ) {
                        eprintln!("ferry: resume attempt {n} failed: {e}");
                    }
                    if let Some(h) = e.postcopy_hold.take() {
                        hold = h;
                    }
                    None
                }
            }
        });
        match resumed {
            Some(r) => result = Ok(r),
            None => discarded = Some(hold),
        }
    }
    let mut summary = DestinationSummary {
        recoveries,
        ..DestinationSummary::default()
    };
    let mut postcopy_stuck = None;
    let code = match result {
        Ok(r) => {
            if r.postcopy.is_some() {
                summary.guest_rate_in_postcopy = starter.rate_since_start();
            }
            fill_summary(&mut summary, &r);
            let at_start = vm.guest_status().map(|s| s.pages_dirtied).unwrap_or(0);
            let t = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(a.run_s.max(0.0)));
            summary.ran_s = t.elapsed().as_secs_f64();
            summary.pages_dirtied_here = vm
                .guest_status()
                .map(|s| s.pages_dirtied)
                .unwrap_or(0)
                .saturating_sub(at_start);
            match vm.request_verify(Duration::from_secs(300)) {
                Ok(VerifyReport {
                    pages_checked,
                    mismatches,
                    ..
                }) => {
                    summary.ok = true;
                    summary.verify_pages_checked = pages_checked;
                    summary.verify_mismatches = mismatches;
                }
                Err(e) => {
                    summary.error = Some(format!("the guest could not verify its memory: {e}"))
                }
            }
            if summary.ok && summary.verify_mismatches == 0 {
                Outcome::Done
            } else {
                Outcome::FailedAfterGo
            }
        }
        Err(e) => {
            summary.error = Some(match accepting.record_fault() {
                // A relay ended a connection on a record that failed: say so,
                // not just that the stream ended.
                Some(f) => format!("{e} (TLS: {f})"),
                None => e.to_string(),
            });
            summary.go_received = e.go_received;
            if let Some(hold) = e.postcopy_hold {
                // Postcopy lost its connection: the guest's vCPUs wait on
                // their faults. Keep the userfaultfd open (closing it would
                // let them run on zero pages) until the operator decides.
                postcopy_stuck = Some(hold);
            }
            if e.go_received {
                Outcome::FailedAfterGo
            } else {
                Outcome::RunsOnSource
            }
        }
    };
    summary.outcome = if postcopy_stuck.is_some() || discarded.is_some() {
        Outcome::Held.name().to_string()
    } else {
        code.name().to_string()
    };
    print_receive(&summary, a.json)?;
    if let Some(hold) = discarded {
        eprintln!("ferry: the guest held here is discarded");
        drop(hold);
        return Ok(Outcome::Held.into());
    }
    if let Some(hold) = postcopy_stuck {
        // The guest runs here with pages missing: never exit on our own.
        let what = format!(
            "postcopy was cut off with {} pages missing; the guest's vCPUs wait for them here",
            hold.missing_pages
        );
        let _ = operator::hold(&what, false);
        eprintln!("ferry: the guest held here is discarded");
        drop(hold);
        return Ok(Outcome::Held.into());
    }
    Ok(code.into())
}

/// Power-of-two latency buckets as text: `<2:5 2-4:17 4-8:3`, empty ones
/// left out.
fn latency_buckets_text(buckets: &[u64]) -> String {
    let parts: Vec<String> = buckets
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| match k {
            0 => format!("<2:{n}"),
            k => format!("{}-{}:{n}", 1u64 << k, 1u64 << (k + 1)),
        })
        .collect();
    if parts.is_empty() {
        "no faults".into()
    } else {
        parts.join(" ")
    }
}

/// Prints `ferry receive`'s report: a JSON line with `--json`.
fn print_receive(summary: &DestinationSummary, json: bool) -> Result<(), BoxError> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string(&ReceiveLine::Report(summary))?
        )?;
    } else {
        match &summary.error {
            Some(e) => writeln!(out, "ferry receive: failed: {e}")?,
            None => writeln!(
                out,
                "ferry receive: the guest arrived ({} pages, {} zero pages, {} torn pages asked again), ran {:.1} s here and verified {} pages: {} mismatches",
                summary.pages_received, summary.zero_pages, summary.resend_requests, summary.ran_s, summary.verify_pages_checked, summary.verify_mismatches
            )?,
        }
        if let Some(p) = &summary.postcopy {
            writeln!(
                out,
                "ferry receive: postcopy ({}): {} faults, latency p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns; {} pages fetched on demand, {} streamed",
                p.mode, p.faults, p.fault_latency.p50_ns, p.fault_latency.p99_ns, p.fault_latency.p999_ns, p.fault_latency.max_ns, p.pages_on_demand, p.pages_streamed
            )?;
            writeln!(
                out,
                "ferry receive: fault latency {} (µs, power-of-two buckets); vCPUs blocked {:.1} ms in all",
                latency_buckets_text(&p.fault_latency_buckets_us),
                p.blocked_ns as f64 / 1e6
            )?;
            if let Some(rate) = summary.guest_rate_in_postcopy {
                writeln!(
                    out,
                    "ferry receive: the guest ran at {rate:.0} pages/s during postcopy, by its own count"
                )?;
            }
        }
    }
    drop(out);
    let _ = std::io::stdout().flush();
    Ok(())
}

fn fill_summary(s: &mut DestinationSummary, r: &DestinationReport) {
    s.go_received = true;
    s.bytes_received = r.bytes_received;
    s.pages_received = r.pages_received;
    s.zero_pages = r.zero_pages;
    s.resend_requests = r.resend_requests;
    s.go_at_ns = r.go_at_ns;
    s.resumed_at_ns = r.resumed_at_ns;
    s.postcopy = r.postcopy.clone();
}
