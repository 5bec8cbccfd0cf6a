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
demo: deps
	bash scripts/demo.sh

# Every test suite, each timed, on both platforms: this machine's KVM and
# hardware-style KVM in an emulated-SVM guest (scripts/svm-run). Prints a
# summary with each suite's wall time and pass count at the end.
test: deps lint
	bash scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench: deps kernel
	THAW_KERNEL="$$(kernel-config/build.sh)" cargo bench -p thaw-benches

install: deps kernel
	bash shim/install.sh
