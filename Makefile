# Ferry: the two commands a new user runs are `make demo` and `make test`.
# Both install missing build prerequisites first (scripts/prereqs.sh).

CARGO ?= cargo
FUZZ_SECONDS ?= 600

.PHONY: all prereqs demo test lint unit nostd-proof bench bench-migrate bench-transport bench-postcopy bench-bitmap fuzz clean
.PHONY: faults profile

all: test

prereqs:
	@scripts/prereqs.sh

## demo: the main job: a 2 GiB KVM guest dirtying 100 MB/s migrates between two
## processes over loopback and verifies its memory on the destination.
## Pass options through DEMO_ARGS, e.g. make demo DEMO_ARGS="--mem 4G --dirty-rate 200M --json".
DEMO_ARGS ?=
demo: prereqs
	$(CARGO) build --release -p ferry-cli --bin ferry
	./target/release/ferry demo $(DEMO_ARGS)

## test: the whole suite: format, lints, the no_std proof, then every test
## (unit, integration, KVM end to end, corpus replay, doctests), closing with
## a one-line summary.
test: prereqs lint nostd-proof unit

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --release -- -D warnings
	# The library as a hypervisor adds it: no features, and nothing of the CLI.
	$(CARGO) clippy -p ferry-host --no-default-features --release -- -D warnings

unit:
	CARGO=$(CARGO) scripts/unit.sh

## nostd-proof: a no_std staticlib with its own panic handler links ferry-core,
## so anything in core that pulls in std or alloc breaks this build.
nostd-proof:
	cd nostd-proof && $(CARGO) build --release

## bench: the criterion micro-benchmarks (bitmap scan, wire decode), each beside its baselines.
bench: prereqs
	$(CARGO) bench -p ferry-benches

## bench-migrate: end-to-end migrations of real KVM guests beside the raw loopback ceiling.
BENCH_ARGS ?=
bench-migrate: prereqs
	$(CARGO) build --release -p ferry-cli --bin ferry -p ferry-benches --bin migrate_bench
	./target/release/migrate_bench $(BENCH_ARGS)

## bench-transport: io_uring, SEND_ZC and std streaming 4 GiB beside the raw ceiling.
bench-transport: prereqs
	$(CARGO) run --release -p ferry-benches --bin transport_stream -- $(BENCH_ARGS)

## bench-postcopy: postcopy fault latency (urgent vs shared channel), install costs, guest slowdown.
bench-postcopy: prereqs
	$(CARGO) build --release -p ferry-cli --bin ferry -p ferry-benches --bin postcopy_latency
	./target/release/postcopy_latency $(BENCH_ARGS)

## bench-bitmap: the bitmap-scan table (GB/s and pages/s beside the three baselines).
bench-bitmap: prereqs
	$(CARGO) run --release -p ferry-benches --bin bitmap_table

## profile: where a migration's CPU time goes, per GB moved, at both ends (perf,
## installed if missing); pass PROFILE_ARGS to ferry demo, e.g.
## make profile PROFILE_ARGS="--mem 4G --dirty-rate 0 --insecure".
PROFILE_ARGS ?= --mem 2G --dirty-rate 0
profile: prereqs
	@command -v perf >/dev/null 2>&1 || apt-get install -y linux-perf
	$(CARGO) build --release -p ferry-cli --bin ferry
	scripts/profile_migration.py $(PROFILE_ARGS)

## faults: fault-injection trials (connection resets, stalls, killed processes) on
## real 64 MiB KVM guest migrations through a fault proxy; pass FAULT_ARGS, e.g.
## make faults FAULT_ARGS="--trials 40 --seed 1 --json".
FAULT_ARGS ?= --trials 40
faults: prereqs
	$(CARGO) build --release -p ferry-cli --bin ferry -p ferry-benches --bin fault_trials
	./target/release/fault_trials $(FAULT_ARGS)

## fuzz: run each cargo-fuzz target for FUZZ_SECONDS (default 600).
fuzz: prereqs
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz
	for t in stream_decoder return_path roundtrip destination_session source_session; do fuzz/run.sh $$t $(FUZZ_SECONDS) || exit 1; done

clean:
	$(CARGO) clean
