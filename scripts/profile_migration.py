#!/usr/bin/env python3
"""Where the CPU time of a migration goes, per GB moved, at both ends.

Runs `ferry demo --json` under `perf record` (system-wide, CLOCK_MONOTONIC
timestamps), keeps the samples taken between the migration's start and *go*
(from the demo's own report), and splits them by process (source: the demo;
destination: its `ferry receive` child; vCPU threads belong to the source)
and by what the sampled function does. Prints CPU-seconds per GB sent.

    scripts/profile_migration.py [DEMO ARGS...]   e.g. --mem 2G --dirty-rate 0 --insecure

Needs perf (Debian: `apt-get install linux-perf`) and a built
`target/release/ferry`. Software cpu-clock sampling at 1999 Hz is used, so it
works in VMs without hardware counters.
"""
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

FREQ = 1999
# Most-sampled functions listed under each process's "other".
OTHER_SHOWN = 6
CATEGORIES = [
    ("kernel copy", r"copy_(to|from)_iter|copy_user|rep_movs_alternative"),
    ("AES-GCM", r"aes_gcm|gcm_|aes_hw|ghash"),
    ("user memcpy", r"memmove|memcpy"),
    ("CRC32", r"crc32|pclmul"),
    ("TCP/IP, syscalls", r"tcp_|__tcp|skb|ip_|__dev_|netif|net_rx|sock_|__sys_|do_syscall|entry_SYSCALL|syscall"),
    ("idle", r"pv_native_safe_halt|cpu_idle|do_idle|default_idle"),
    ("page faults, zeroing", r"clear_page|handle_mm_fault|do_anonymous|page_fault|alloc_pages|folio|pte"),
    ("locks, interrupts", r"spin_unlock_irqrestore|spin_lock"),
]


def category(sym):
    for name, pattern in CATEGORIES:
        if re.search(pattern, sym):
            return name
    return "other"


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ferry = os.path.join(root, "target", "release", "ferry")
    if not shutil.which("perf"):
        sys.exit("profile: perf is missing (Debian: apt-get install linux-perf)")
    if not os.path.exists(ferry):
        sys.exit("profile: build ferry first: cargo build --release -p ferry-cli --bin ferry")
    tmp = tempfile.mkdtemp(prefix="ferry-profile-")
    data = os.path.join(tmp, "perf.data")
    cmd = ["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-F", str(FREQ), "-a", "-g",
           "-o", data, "--", ferry, "demo", "--json"] + sys.argv[1:]
    run = subprocess.run(cmd, capture_output=True, text=True)
    try:
        report = json.loads(run.stdout)
    except json.JSONDecodeError:
        sys.exit("profile: ferry demo printed no report:\n" + run.stderr[-2000:])
    if not report.get("ok"):
        sys.exit("profile: the migration failed: %s" % report.get("error"))
    src = report["source"]
    start, end = (src["go_at_ns"] - src["total_ns"]) / 1e9, src["go_at_ns"] / 1e9
    gb = src["bytes_sent"] / 1e9
    script = subprocess.run(
        ["perf", "script", "-i", data, "--time", "%.6f,%.6f" % (start, end), "-F", "comm,pid,tid,ip,sym"],
        capture_output=True, text=True).stdout
    per = collections.defaultdict(collections.Counter)
    # The functions the categories do not name, per process, so "other" can be read.
    unnamed = collections.defaultdict(collections.Counter)
    ferry_pids = set()
    pid = None
    first = False
    for line in script.splitlines():
        m = re.match(r"\s*(\S.*?)\s+(\d+)/(\d+)\s*$", line)
        if m:
            pid, first = int(m.group(2)), True
            if m.group(1) == "ferry":
                ferry_pids.add(pid)
            continue
        if first and line.strip():
            parts = line.strip().split(None, 1)
            sym = parts[1] if len(parts) > 1 else "?"
            cat = category(sym)
            per[pid][cat] += 1
            if cat == "other":
                unnamed[pid][re.sub(r"\+0x[0-9a-f]+$", "", sym)] += 1
            first = False
    shutil.rmtree(tmp, ignore_errors=True)
    # The demo (the source) starts first; its `ferry receive` child comes after.
    ordered = sorted(ferry_pids)
    names = {0: "idle (swapper)"}
    if ordered:
        names[ordered[0]] = "source (ferry demo)"
    if len(ordered) > 1:
        names[ordered[1]] = "destination (ferry receive)"
    print("migration window %.3f s, %.2f GB sent, throughput %.2f GB/s, downtime %.2f ms"
          % (end - start, gb, src["throughput"] / 1e9, report["downtime_ms"]))
    for p, counts in sorted(per.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(counts.values())
        if n / FREQ / gb < 0.005:
            continue
        who = names.get(p, "other (pid %d)" % p)
        print("%-34s %.3f CPU-s per GB" % (who, n / FREQ / gb))
        for name, k in counts.most_common():
            print("    %-24s %5.1f %%  %.3f CPU-s/GB" % (name, 100 * k / n, k / FREQ / gb))
        for sym, k in unnamed[p].most_common(OTHER_SHOWN):
            print("        other: %-40.40s %5.1f %%" % (sym, 100 * k / n))


if __name__ == "__main__":
    main()
