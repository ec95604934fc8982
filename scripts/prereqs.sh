#!/usr/bin/env bash
# Checks, and where it can installs, what building Ferry needs on a fresh
# Debian/Ubuntu machine: a Rust toolchain and libclang (the userfaultfd crate
# generates its bindings with bindgen at build time).
set -euo pipefail

say() { printf 'ferry prereqs: %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
    say "cargo was not found. Install a Rust toolchain (https://rustup.rs) and run this again."
    exit 1
fi

have_libclang() {
    if [ -n "${LIBCLANG_PATH:-}" ] && ls "$LIBCLANG_PATH"/libclang*.so* >/dev/null 2>&1; then
        return 0
    fi
    ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9][0-9.]*)?\.so' && return 0
    ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-*.so* >/dev/null 2>&1
}

if ! have_libclang; then
    cmd="apt-get install -y libclang-dev"
    if [ "$(id -u)" -eq 0 ]; then
        say "libclang is missing; installing it: apt-get update && $cmd"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive $cmd >/dev/null
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        say "libclang is missing; installing it with sudo: $cmd"
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive $cmd >/dev/null
    else
        say "libclang is missing, and it is needed to build the userfaultfd bindings."
        say "Install it as root, then run this again:  sudo apt-get update && sudo $cmd"
        exit 1
    fi
    if ! have_libclang; then
        say "libclang is still not found after installing libclang-dev; set LIBCLANG_PATH to the folder that holds libclang.so."
        exit 1
    fi
fi

if [ ! -e /dev/kvm ]; then
    say "note: /dev/kvm is missing; the KVM tests will be skipped and the demo cannot run a guest."
fi
