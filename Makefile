# Strata developer entry points. `make demo` and `make test` are the quick start.
#
# DEPS_FLAGS is passed to scripts/install-deps.sh by every target that needs the
# system packages. Tests that talk to libvirt will need it set to --libvirt
# (e.g. `make test DEPS_FLAGS=--libvirt`, or change the default below once they exist).

CARGO      ?= cargo
DEPS_FLAGS ?= --libvirt
STRATA     := target/release/strata

.PHONY: all deps build demo test lint fmt fixtures chains clean fuzz fuzz-smoke hostile bench bench-qemu guest test-guest
.PHONY: release-bins gen install uninstall deb

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
# where the tests look for it; test-guest runs the tests that boot it (the
# offline lifecycle and the live-domain workflow).
guest:
	scripts/guest/build-guest.sh $(or $(CARGO_TARGET_DIR),target)/tmp
test-guest: deps
	$(CARGO) nextest run -p strata-libvirt --test booted_guest --test live_domain --no-fail-fast

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

# Installing: `make install` (PREFIX=/usr/local, DESTDIR honoured) puts both
# binaries, the man pages and the bash, zsh and fish completions in place;
# `make deb` builds target/debian/strata_VERSION_ARCH.deb and
# strata-libvirt_VERSION_ARCH.deb with dpkg-deb (scripts/deb/build.sh).
# BINARIES is where the built programs are; NO_BUILD=1 skips the release
# build (the tests install their own debug build that way).
TARGET_DIR  ?= $(or $(CARGO_TARGET_DIR),target)
BINARIES    ?= $(TARGET_DIR)/release
GEN_DIR     ?= $(TARGET_DIR)/gen
DEB_OUT     ?= $(TARGET_DIR)/debian
PREFIX      ?= /usr/local
DESTDIR     ?=
BINDIR      ?= $(PREFIX)/bin
MANDIR      ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/vendor-completions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d

release-bins:
	$(CARGO) build --release -p strata-cli --bins

# Man pages and completions from the clap definitions (strata-gen).
gen: $(if $(NO_BUILD),,release-bins)
	rm -rf $(GEN_DIR)
	$(BINARIES)/strata-gen man $(GEN_DIR)/man >/dev/null
	$(BINARIES)/strata-gen completions $(GEN_DIR)/completions >/dev/null

install: gen
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(BASHCOMPDIR) \
		$(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	install -m 755 $(BINARIES)/strata $(BINARIES)/strata-libvirt $(DESTDIR)$(BINDIR)/
	install -m 644 $(GEN_DIR)/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 644 $(GEN_DIR)/completions/strata.bash $(DESTDIR)$(BASHCOMPDIR)/strata
	install -m 644 $(GEN_DIR)/completions/_strata $(DESTDIR)$(ZSHCOMPDIR)/_strata
	install -m 644 $(GEN_DIR)/completions/strata.fish $(DESTDIR)$(FISHCOMPDIR)/strata.fish

# What install put there, and nothing else (the pages from a fresh list).
uninstall: gen
	rm -f $(DESTDIR)$(BINDIR)/strata $(DESTDIR)$(BINDIR)/strata-libvirt \
		$(DESTDIR)$(BASHCOMPDIR)/strata $(DESTDIR)$(ZSHCOMPDIR)/_strata \
		$(DESTDIR)$(FISHCOMPDIR)/strata.fish
	cd $(GEN_DIR)/man && for p in *.1; do rm -f "$(DESTDIR)$(MANDIR)/man1/$$p"; done

deb:
	DEB_OUT=$(DEB_OUT) scripts/deb/build.sh

clean:
	$(CARGO) clean
