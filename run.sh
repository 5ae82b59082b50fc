#!/usr/bin/env bash
# One entry point for a fresh machine (Debian bookworm, root, Linux >= 6.6):
#
#   ./run.sh demo     set up, then run the lab demo
#   ./run.sh test     set up, then run the unit and end-to-end tests
#   ./run.sh bench    set up, then benchmark the mesh against no mesh (release)
#   ./run.sh setup    set up only
#   ./run.sh <any cargo xtask arguments>, e.g. ./run.sh lab status
#
# Set-up is idempotent and takes seconds when everything is already there:
# Debian packages, the pinned Rust toolchain (with rust-src, to build `core`
# for the BPF target) and bpf-linker built against LLVM 22.
set -euo pipefail
cd "$(dirname "$0")"

TOOLCHAIN=1.98.0            # must match rust-toolchain.toml and mesh-agent/build.rs
BPF_LINKER_VERSION=0.13.0
LLVM=22                     # an eBPF toolchain on LLVM 23 fails with "Invalid record"
# gcc: the linker for Rust and the C parts of ring and aws-lc-sys (no cmake or nasm needed).
PACKAGES=(gcc bpftool "llvm-${LLVM}-dev" iproute2 util-linux procps iperf3 socat protobuf-compiler strace curl tcpdump python3-venv gnuplot-nox default-jdk-headless nginx-light redis-server postgresql wget nghttp2-client tshark linux-perf)
KUBERNETES_VALIDATE_VERSION=1.37.0
GRPCIO_VERSION=1.85.3          # gRPC's own Python implementation, a real client and server in the L7 tests
OTEL_PROTO_VERSION=1.39.1      # the OTLP protobufs and gRPC stubs, for the tests' trace receiver
TOOLS=/opt/mesh-tools          # a venv for kubernetes-validate (checks deploy/), grpcio and opentelemetry-proto

say() { printf '\n=== %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    echo "run.sh: needs root (eBPF, network namespaces, cgroups): run it as root" >&2
    exit 1
fi

setup_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        # nginx, redis and PostgreSQL are programs the tests run inside lab
        # pods; keep their packages from starting host services on install.
        local guard=""
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            guard=/usr/sbin/policy-rc.d
            printf '#!/bin/sh\nexit 101\n' > "$guard"
            chmod 0755 "$guard"
        fi
        local rc=0
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || rc=$?
        if [[ -n $guard ]]; then rm -f "$guard"; fi
        if ((rc)); then
            echo "run.sh: apt-get install ${missing[*]} failed (exit $rc)" >&2
            exit "$rc"
        fi
    fi
}

setup_toolchain() {
    # rustup will not install a toolchain on demand here (RUSTUP_AUTO_INSTALL=0).
    # rust-src builds `core` for the BPF target; clippy and rustfmt are
    # part of the test command (lints and formatting are checked in CI).
    if ! rustup toolchain list | grep -q "^${TOOLCHAIN}-"; then
        say "setup: installing Rust ${TOOLCHAIN} (minimal, with rust-src, clippy, rustfmt)"
        rustup toolchain install "$TOOLCHAIN" --profile minimal -c rust-src -c clippy -c rustfmt
    fi
    local c
    for c in rust-src clippy rustfmt; do
        if ! rustup component list --toolchain "$TOOLCHAIN" --installed | grep -q "^${c}"; then
            rustup component add "$c" --toolchain "$TOOLCHAIN"
        fi
    done
}

setup_bpf_linker() {
    local bin
    bin=$(command -v bpf-linker || true)
    if [[ -n $bin ]] && bpf-linker --version | grep -q " ${BPF_LINKER_VERSION}\$" \
        && ldd "$bin" | grep -q "libLLVM.so.${LLVM}"; then
        return
    fi
    say "setup: building bpf-linker ${BPF_LINKER_VERSION} against LLVM ${LLVM} (about a minute)"
    LLVM_PREFIX="/usr/lib/llvm-${LLVM}" cargo "+${TOOLCHAIN}" install bpf-linker \
        --version "$BPF_LINKER_VERSION" --locked --no-default-features --features "llvm-${LLVM}" --force
}

setup_promtool() {
    # Only promtool (to check /metrics) from Debian's prometheus package: the
    # package itself would also install and start a Prometheus server.
    command -v promtool >/dev/null && return
    say "setup: installing promtool from Debian's prometheus package"
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null \
        && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool) \
        || { rm -rf "$tmp"; echo "run.sh: could not fetch promtool (apt-get download prometheus)" >&2; exit 1; }
    install -m 0755 "$tmp/usr/bin/promtool" /usr/local/bin/promtool
    rm -rf "$tmp"
}

setup_python_tools() {
    local bin="$TOOLS/venv/bin/kubernetes-validate" py="$TOOLS/venv/bin/python"
    if [[ -x $bin ]] && "$bin" --version | grep -qx "$KUBERNETES_VALIDATE_VERSION" \
        && "$py" -c "import grpc, sys; sys.exit(grpc.__version__ != '$GRPCIO_VERSION')" 2>/dev/null \
        && "$TOOLS/venv/bin/pip" show opentelemetry-proto 2>/dev/null | grep -qx "Version: $OTEL_PROTO_VERSION"; then
        return
    fi
    say "setup: installing kubernetes-validate ${KUBERNETES_VALIDATE_VERSION}, grpcio ${GRPCIO_VERSION} and opentelemetry-proto ${OTEL_PROTO_VERSION} (PyPI) in $TOOLS/venv"
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install -q "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" "grpcio==${GRPCIO_VERSION}" \
        "opentelemetry-proto==${OTEL_PROTO_VERSION}"
}

setup_packages
setup_promtool
setup_python_tools
setup_toolchain
export PATH="$HOME/.cargo/bin:$PATH"
setup_bpf_linker

if [[ ${1:-} == setup ]]; then
    say "setup: done"
    exit 0
fi
exec cargo xtask "$@"
