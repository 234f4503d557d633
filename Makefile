# stockplane: every command a newcomer, CI or an SRE runs. `make help` lists them.
#
# Nothing here assumes a server the project did not start. The main job (`make run`)
# brings up PostgreSQL (a private cluster under target/pg unless DATABASE_URL is set), the
# data plane and the control plane on this machine, seeds a demo catalog through the API,
# drives the data plane with the example checkout client and reconciles the books.

SHELL := /bin/bash
CARGO ?= cargo
SEED ?=
SEEDS ?= 100
# Client operations per seed: what `make test` runs, so a seed it prints replays as is.
OPS ?= 10000
# Shards per seed: drawn from the seed unless set.
SHARDS ?=
JOBS ?= 2
LONG_OPS ?= 100000000
# Kill/restart cycles of `make crash-long`.
CRASH_CYCLES ?= 300
SHARDS_FLAG := $(if $(SHARDS),--shards $(SHARDS),)
FUZZ_SECONDS ?= 60
# Benchmarks run pinned to one core; the other core is left for the OS and the build.
BENCH_CORE ?= 1
REPORT_DIR := perf-reports
# The end-to-end benchmark: the data plane on SERVER_CPU, the driver on DRIVER_CPU. By
# default the data plane goes on the CPU that takes the interrupts of the disk under this
# directory and the driver on another (benches/cpus.sh says why); set both to override.
CPU_CHOICE := $(shell benches/cpus.sh . 2>/dev/null || echo "0 1 (defaults)")
SERVER_CPU ?= $(word 1,$(CPU_CHOICE))
DRIVER_CPU ?= $(word 2,$(CPU_CHOICE))
E2E_SECONDS ?= 10
# bench-disk's back-to-back fdatasync rounds (benches/src/bin/fsync.rs --seconds).
DISK_SECONDS ?= 10
JITTER_SECONDS ?= 10
E2E_WARMUP ?= 2
E2E_SKUS ?= 100000
# Interleaved pairs of batched none and sync runs at the end of bench-e2e (benches/pairs.sh).
E2E_PAIRS ?= 5
# The open-loop rate of the null server's calibration run (about half the data plane's
# batched saturation on this host).
NULL_RATE ?= 1000000
# bench-e2e's snapshot source (files, replica, fork); empty: benches/e2e.toml's (the default).
SNAPSHOT_SOURCE ?=
MESH_SECONDS ?= 2
# The control plane's sync benchmark: lines drained, SKUs bootstrapped.
SYNC_LINES ?= 2000000
SYNC_SKUS ?= 1000000
# Where cargo puts the release binaries (CARGO_TARGET_DIR when set).
BIN_DIR := $(or $(CARGO_TARGET_DIR),target)/release

.PHONY: help run pg pg-stop sim-seeds test lint unit sim sim-long fuzz bench bench-instructions bench-e2e bench-sync bench-mesh bench-disk memory certs crash-long check-toolchain

help:
	@echo "make run        PostgreSQL, the data plane and the control plane; a demo catalog through the API,"
	@echo "                the example checkout client, the drained sales and reconcile"
	@echo "make pg         start the private PostgreSQL under target/pg (make pg-stop stops it)"
	@echo "make sim-seeds  run the seeded multi-shard simulation, SEEDS seeds of OPS operations"
	@echo "make test       fmt, clippy -D warnings, every test (what CI runs)"
	@echo "make sim SEED=n replay one simulation seed (OPS=m if it ran with other than 10000)"
	@echo "make sim-long   100,000,000 simulated operations with faults"
	@echo "make fuzz       fuzz frame decoding and WAL recovery, FUZZ_SECONDS each (installs cargo-fuzz)"
	@echo "make bench      criterion benchmarks pinned to core BENCH_CORE, report in perf-reports/"
	@echo "make bench-instructions  instructions per reserve+commit pair (callgrind), engine and baseline"
	@echo "make bench-e2e  one-core data plane on SERVER_CPU, stockplane-e2e on DRIVER_CPU: saturate (batched,"
	@echo "                one request per frame) and latency at half saturation; report in perf-reports/"
	@echo "                (then E2E_PAIRS interleaved pairs of the batched run, none and sync, for their ratio)"
	@echo "                (SNAPSHOT_SOURCE=files|replica|fork picks where the server's snapshots come from)"
	@echo "make bench-sync the control plane: drain SYNC_LINES committed lines into PostgreSQL, and bootstrap"
	@echo "                SYNC_SKUS SKUs into an empty data plane (data plane on SERVER_CPU, the rest on DRIVER_CPU)"
	@echo "make bench-mesh messages/s between two pinned executors over the channel mesh, report in perf-reports/"
	@echo "make bench-disk the disk's fdatasync p50/p99 and the recovery time of a 10M-SKU, 1M-hold shard"
	@echo "make memory     bytes per SKU-location and per live hold, report in perf-reports/"
	@echo "make crash-long CRASH_CYCLES kill -9/restart cycles of the real server under load (default 300)"
	@echo "make certs      development certificates (CA, server, one client per role) in target/certs"

check-toolchain:
	@command -v $(CARGO) >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy

run: check-toolchain
	$(CARGO) build --release -p stockplane-dataplane --bin dataplane -p stockplane-control-plane --bin control-plane
	$(CARGO) build --release -p stockplane-wire --features client --example checkout
	BIN=$(BIN_DIR) scripts/run-demo.sh

pg:
	@scripts/pg.sh start target/pg

pg-stop:
	@scripts/pg.sh stop target/pg

sim-seeds: check-toolchain
	$(CARGO) run --release -p stockplane-sim -- --seeds $(SEEDS) --ops $(OPS) --jobs $(JOBS) -v $(SHARDS_FLAG)

test: check-toolchain lint unit

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The control plane's tests use the PostgreSQL that DATABASE_URL names, or else the
# private cluster under target/pg, started (and installed, when missing) here.
unit:
	export DATABASE_URL=$${DATABASE_URL:-$$(scripts/pg.sh start target/pg)} && \
	  $(CARGO) test --workspace --exclude stockplane-sim
	# The simulation runs optimised: two million operations with faults, every seed
	# printed before it runs (a failure names the command that replays it).
	$(CARGO) test --release -p stockplane-sim -- --nocapture

sim: check-toolchain
	@test -n "$(SEED)" || { echo "usage: make sim SEED=<u64>" >&2; exit 2; }
	$(CARGO) run --release -p stockplane-sim -- --seed $(SEED) --ops $(OPS) -v $(SHARDS_FLAG)

sim-long: check-toolchain
	$(CARGO) run --release -p stockplane-sim -- --seeds $$(( $(LONG_OPS) / $(OPS) )) --ops $(OPS) --jobs $(JOBS) $(SHARDS_FLAG)

fuzz: check-toolchain
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	for target in frame_decode wal_recover; do \
	  mkdir -p fuzz/corpus/$$target && \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$target fuzz/corpus/$$target fuzz/seeds/$$target -- \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=5 || exit 1; \
	done

# Writes the benchmark output as printed, headed by the machine, the date and the command.
bench: check-toolchain
	@mkdir -p $(REPORT_DIR)
	@report=$(REPORT_DIR)/bench-$$(date -u +%Y%m%dT%H%M%SZ).txt; \
	{ echo "# stockplane criterion benchmarks"; \
	  echo "date: $$(date -u +%Y-%m-%dT%H:%M:%SZ)"; \
	  echo "machine: $$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $$(nproc) cores, $$(free -g | awk '/Mem:/{print $$2}') GiB"; \
	  echo "commit: $$(git rev-parse --short HEAD 2>/dev/null)"; \
	  echo "command: taskset -c $(BENCH_CORE) $(CARGO) bench -p stockplane-benches"; echo; } > $$report; \
	taskset -c $(BENCH_CORE) $(CARGO) bench -p stockplane-benches 2>&1 | tee -a $$report; \
	echo "report: $$report"

# benches/e2e.sh starts the server, runs the driver three times and stops the server
# (also on failure); each run prints its own header (date, machine, commit, command).
# One report: the CPU jitter of both CPUs (a floor on any server's tail latency there),
# the disk's own fdatasync latency, the driver against a null server (what QUIC and framing
# alone allow on the host that day), then the server without its disk (--durability none),
# then with every reply after its fdatasync (--durability sync).
bench-e2e: check-toolchain
	$(CARGO) build --release -p stockplane-dataplane -p stockplane-loadgen --bins
	$(CARGO) build --release -p stockplane-benches --bin fsync --bin jitter --bin null_server
	@test -f target/certs/ca.pem || $(BIN_DIR)/dataplane certs --dir target/certs
	@mkdir -p $(REPORT_DIR)
	@set -o pipefail; report=$(REPORT_DIR)/e2e-$$(date -u +%Y%m%dT%H%M%SZ).txt; \
	export STOCKPLANE_COMMIT=$$(git rev-parse --short HEAD 2>/dev/null) SERVER_CPU=$(SERVER_CPU) DRIVER_CPU=$(DRIVER_CPU) \
	  E2E_SECONDS=$(E2E_SECONDS) E2E_WARMUP=$(E2E_WARMUP) E2E_SKUS=$(E2E_SKUS) NULL_RATE=$(NULL_RATE) SNAPSHOT_SOURCE=$(SNAPSHOT_SOURCE); \
	{ echo "=== the CPUs: server on $(SERVER_CPU), driver on $(DRIVER_CPU); benches/cpus.sh: $(CPU_CHOICE)"; \
	  echo "time taken from a pinned thread (server CPU, then driver CPU)"; \
	  taskset -c $(SERVER_CPU) $(BIN_DIR)/jitter --seconds $(JITTER_SECONDS) && echo && \
	  taskset -c $(DRIVER_CPU) $(BIN_DIR)/jitter --seconds $(JITTER_SECONDS) && echo && \
	  echo "both CPUs at the same time (does this machine give both at once, as a busy server and driver take them?)" && \
	  $(BIN_DIR)/jitter --seconds $(JITTER_SECONDS) --cpus $(SERVER_CPU),$(DRIVER_CPU) && echo && \
	  echo "both CPUs while the disk works as the WAL does (64 KiB O_DIRECT writes into a zero-filled file, each followed by fdatasync, back to back, from a thread on the server CPU): does the disk's I/O take CPU time from both?" && \
	  $(BIN_DIR)/jitter --seconds $(JITTER_SECONDS) --cpus $(SERVER_CPU),$(DRIVER_CPU) --disk target && echo && \
	  echo "=== the disk: fdatasync latency (the WAL's own write pattern), then $(E2E_SECONDS) s of back-to-back rounds as group commit under load" && \
	  taskset -c $(SERVER_CPU) $(BIN_DIR)/fsync --dir target --seconds $(E2E_SECONDS) && echo && \
	  echo "the same probe from the driver's CPU, leaving the disk's interrupt CPU to the kernel's workers that finish each write and flush (docs/wal.md)" && \
	  taskset -c $(DRIVER_CPU) $(BIN_DIR)/fsync --dir target --seconds $(E2E_SECONDS) && echo && \
	  echo "=== calibration: the same driver against a null server (QUIC and framing on quinn, no engine): saturate, then open loop at $(NULL_RATE) requests/s" && \
	  benches/null.sh $(BIN_DIR) && echo && \
	  echo "=== durability none: the server without its disk" && \
	  DURABILITY=none benches/e2e.sh $(BIN_DIR) && echo && \
	  echo "=== durability sync: every reply to a state change after the fdatasync that covers it" && \
	  DURABILITY=sync benches/e2e.sh $(BIN_DIR) && echo && \
	  echo "=== sync against none, interleaved: the batched saturation run alone, $(E2E_PAIRS) pairs against fresh servers" && \
	  PAIRS=$(E2E_PAIRS) benches/pairs.sh $(BIN_DIR); } 2>&1 | tee $$report; status=$$?; \
	echo "report: $$report"; exit $$status

# benches/sync.sh starts a fresh data plane for each of its two runs and a fresh database
# in PostgreSQL (the private cluster unless DATABASE_URL is set).
bench-sync: check-toolchain
	$(CARGO) build --release -p stockplane-dataplane --bin dataplane -p stockplane-benches --bin sync
	@test -f target/certs/ca.pem || $(BIN_DIR)/dataplane certs --dir target/certs
	@mkdir -p $(REPORT_DIR)
	@set -o pipefail; report=$(REPORT_DIR)/sync-$$(date -u +%Y%m%dT%H%M%SZ).txt; \
	STOCKPLANE_COMMIT=$$(git rev-parse --short HEAD 2>/dev/null) SERVER_CPU=$(SERVER_CPU) DRIVER_CPU=$(DRIVER_CPU) \
	  SYNC_LINES=$(SYNC_LINES) SYNC_SKUS=$(SYNC_SKUS) benches/sync.sh $(BIN_DIR) 2>&1 | tee $$report; status=$$?; \
	echo "report: $$report"; exit $$status

# The benchmark pins its two executors itself (CPUs 0 and 1) and prints its own header.
bench-mesh: check-toolchain
	$(CARGO) build --release -p stockplane-benches --bin mesh
	@mkdir -p $(REPORT_DIR)
	@set -o pipefail; report=$(REPORT_DIR)/mesh-$$(date -u +%Y%m%dT%H%M%SZ).txt; \
	STOCKPLANE_COMMIT=$$(git rev-parse --short HEAD 2>/dev/null) \
	  $(BIN_DIR)/mesh --seconds $(MESH_SECONDS) 2>&1 | tee $$report; status=$$?; \
	echo "report: $$report"; exit $$status

# The disk's own fdatasync latency (overwrite, append, O_DSYNC, then DISK_SECONDS of back-to-back
# rounds: each round, and what a random arrival waits) and the recovery time of one shard
# with 10,000,000 SKUs and 1,000,000 live holds from its log (page cache dropped when root).
bench-disk: check-toolchain
	$(CARGO) build --release -p stockplane-benches --bin fsync --bin recovery
	@mkdir -p $(REPORT_DIR)
	@set -o pipefail; report=$(REPORT_DIR)/disk-$$(date -u +%Y%m%dT%H%M%SZ).txt; \
	{ STOCKPLANE_COMMIT=$$(git rev-parse --short HEAD 2>/dev/null) $(BIN_DIR)/fsync --dir target --seconds $(DISK_SECONDS) && echo && \
	  STOCKPLANE_COMMIT=$$(git rev-parse --short HEAD 2>/dev/null) taskset -c $(BENCH_CORE) $(BIN_DIR)/recovery --dir target; } \
	  2>&1 | tee $$report; status=$$?; echo "report: $$report"; exit $$status

# Instructions per pair (callgrind) of the engine and of the plain-map baseline: the engine's
# cost as a count that repeats exactly, whatever the shared host's speed that day.
bench-instructions: check-toolchain
	$(CARGO) build --release -p stockplane-benches --example engine_profile
	@mkdir -p $(REPORT_DIR)
	@set -o pipefail; report=$(REPORT_DIR)/instructions-$$(date -u +%Y%m%dT%H%M%SZ).txt; \
	scripts/instructions.sh $(BIN_DIR)/examples/engine_profile 2>&1 | tee $$report; status=$$?; \
	echo "report: $$report"; exit $$status

memory: check-toolchain
	@mkdir -p $(REPORT_DIR)
	@report=$(REPORT_DIR)/memory-$$(date -u +%Y%m%dT%H%M%SZ).txt; \
	STOCKPLANE_COMMIT=$$(git rev-parse --short HEAD 2>/dev/null) \
	  $(CARGO) run --release -p stockplane-benches --bin memory 2>&1 | tee $$report; \
	echo "report: $$report"

# Hundreds of SIGKILL/restart cycles of the real server (make test runs 20).
crash-long: check-toolchain
	CRASH_CYCLES=$(CRASH_CYCLES) $(CARGO) test --release -p stockplane-dataplane --test crash -- --nocapture

certs: check-toolchain ## Write development certificates (CA, server, one client per role) to target/certs
	$(CARGO) run --release -q -p stockplane-dataplane -- certs --dir target/certs
