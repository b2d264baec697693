# Strata developer entry points. `make demo` and `make test` are the quick start.
#
# DEPS_FLAGS is passed to scripts/install-deps.sh by every target that needs the
# system packages. Tests that talk to libvirt will need it set to --libvirt
# (e.g. `make test DEPS_FLAGS=--libvirt`, or change the default below once they exist).

CARGO      ?= cargo
DEPS_FLAGS ?= --libvirt
STRATA     := target/release/strata

.PHONY: all deps build demo test lint fmt fixtures chains clean fuzz fuzz-smoke hostile bench bench-qemu guest test-guest

all: build

deps:
	scripts/install-deps.sh $(DEPS_FLAGS)

build:
	$(CARGO) build --release --workspace

demo: deps build
	$(STRATA) demo

# nextest when installed, plain cargo test otherwise. Doc tests run through
# cargo test (nextest does not run them) and go first, so that the last lines
# printed are the main test summary.
test: deps
	$(CARGO) test --doc --workspace
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "$(CARGO) nextest run --workspace --no-fail-fast"; \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		echo "$(CARGO) test --workspace --no-fail-fast"; \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

fmt:
	$(CARGO) fmt --all

fixtures:
	testdata/make-fixtures.sh

# Backing-chain shapes for differential tests (not committed): CHAINS_DIR=...
CHAINS_DIR ?= target/chains
chains:
	testdata/make-chains.sh $(CHAINS_DIR)

# The tiny Linux guest of the booted-guest tests (docs/libvirt.md), cached
# where the tests look for it; test-guest runs those tests, the ignored ones too.
guest:
	scripts/guest/build-guest.sh $(or $(CARGO_TARGET_DIR),target)/tmp
test-guest: deps
	$(CARGO) nextest run -p strata-libvirt --test booted_guest --run-ignored all --no-fail-fast

# Fuzzing (cargo-fuzz on the stable toolchain via RUSTC_BOOTSTRAP; see
# docs/hostile-images.md). fuzz: every target FUZZ_SECONDS each; fuzz-smoke:
# the short run CI does.
FUZZ_SECONDS ?= 60
fuzz:
	scripts/install-deps.sh --fuzz
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh
fuzz-smoke:
	scripts/install-deps.sh --fuzz
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz-smoke.sh

# The crafted hostile-image corpus (committed in testdata/hostile/).
hostile:
	testdata/make-hostile.sh

# criterion benchmarks, and qemu-img vs Strata side by side (docs/BENCHMARKS.md).
bench:
	$(CARGO) bench -p strata-benches
bench-qemu: build
	benches/compare-qemu.sh

clean:
	$(CARGO) clean
