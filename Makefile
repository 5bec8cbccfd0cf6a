# thaw: the two commands a newcomer needs are `make demo` and `make test`.
# Both install Debian packages they need (as root) and build the guest
# kernel once (cached in /var/cache/thaw, keyed by its inputs).
SHELL := /bin/bash
.PHONY: deps kernel build demo test lint bench install

deps:
	bash scripts/install-deps.sh

kernel: deps
	kernel-config/build.sh >/dev/null

build: deps
	cargo build --workspace

# Builds everything, starts a private containerd, runs containers in thaw
# micro-VMs and prints what it did and how long it took.
demo: deps kernel
	bash scripts/demo.sh

# Every test: unit tests, the VMM booting the real kernel under KVM, the
# agent's container runtime, the shim through a private containerd.
test: deps kernel lint
	THAW_KERNEL="$$(kernel-config/build.sh)" cargo test --workspace -- --test-threads=2

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench: deps kernel
	THAW_KERNEL="$$(kernel-config/build.sh)" cargo bench -p thaw-benches

install: deps kernel
	bash shim/install.sh
