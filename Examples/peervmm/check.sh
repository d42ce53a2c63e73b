#!/usr/bin/env bash
# peervmm's check (.ci/run runs it): build the package and its tests, run the tests, then run its guest
# once with DMP off and once with DMP on (--check-dmp: the sensor block's STATUS read and DATA write
# patched and served in the guest) and once as a DMP dry run, and compare what the guest printed and its
# exit status.
# Without a usable /dev/kvm the runs are skipped with the reason printed.
set -euo pipefail
cd "$(dirname "$0")"

swift build --build-tests
swift test --skip-build
bin="$(swift build --show-bin-path)/peervmm"
guest=Guest/sensor-cpl3.elf
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

run() { # run NAME ARGS...: the guest's output in $out/NAME.out, stderr in $out/NAME.err, status in $out/NAME.status
    local name=$1; shift
    local status=0
    "$bin" "$@" "$guest" >"$out/$name.out" 2>"$out/$name.err" || status=$?
    echo "$status" >"$out/$name.status"
}

run off
if [ "$(cat "$out/off.status")" = 77 ]; then
    cat "$out/off.err"
    echo "peervmm: guest runs skipped (no usable /dev/kvm)"
    exit 0
fi
run on --dmp --check-dmp
run dry --dmp-dry-run
# What the VMM said (DMP's decisions, logged one a line, left out).
for r in off on dry; do
    echo "== peervmm $r: exit status $(cat "$out/$r.status") =="
    grep -v ' vmmkit.dmp: ' "$out/$r.err" || true
done
tail -n 2 "$out/on.out"
status=0
[ "$(cat "$out/off.status")" = 0 ] || { echo "peervmm: DMP off: exit status $(cat "$out/off.status")"; status=1; }
for r in on dry; do
    [ "$(cat "$out/$r.status")" = 0 ] || { echo "peervmm: DMP $r: exit status $(cat "$out/$r.status")"; status=1; }
    cmp "$out/off.out" "$out/$r.out" || { echo "peervmm: the guest's output differs with DMP $r"; diff "$out/off.out" "$out/$r.out" | head -20; status=1; }
done
[ $status = 0 ] && echo "peervmm: DMP off, on and dry run: identical output and exit status; with DMP on the sensor's hot sites served"
exit $status
