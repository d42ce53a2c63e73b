#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for VMMKit: installs what the build
# needs (libcapstone-dev, pkg-config, binutils) when missing, and checks that
# /dev/kvm can be opened. Safe to run again: it does nothing when all is there.
set -euo pipefail

need=()
pkg-config --exists capstone 2>/dev/null || need+=(libcapstone-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v as >/dev/null 2>&1 && command -v ld >/dev/null 2>&1 || need+=(binutils)
command -v make >/dev/null 2>&1 || need+=(make)

if ((${#need[@]})); then
    echo "bootstrap: installing ${need[*]}" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            echo "bootstrap: need root (or sudo) to install ${need[*]}" >&2; exit 1
        fi
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -e /dev/kvm ]; then
    echo "bootstrap: /dev/kvm is missing: load the kvm module (kvm_intel/kvm_amd) or run on a host with virtualization." >&2
    echo "bootstrap: minivmm cannot run guests here; the KVM tests will be skipped." >&2
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    # Advise joining the device's group only when it has one (not root's) that exists here.
    group=$(stat -c %G /dev/kvm 2>/dev/null || echo root)
    if [ "$group" != root ] && getent group "$group" >/dev/null 2>&1; then
        echo "bootstrap: /dev/kvm exists but this user cannot open it: add the user to the '$group' group (sudo usermod -aG $group \$USER) or run as root." >&2
    else
        echo "bootstrap: /dev/kvm exists but this user cannot open it, and it belongs to no group to join: run as root or grant this user read and write access to it." >&2
    fi
    echo "bootstrap: minivmm cannot run guests here; the KVM tests will be skipped." >&2
fi
exit 0
