#!/bin/sh
# Demo scenario (scripts/demo), run as /scenario.sh in the VM: load the
# simple-kmod example drivers with kvcd, look at them, unload them.
# Every line meant for the user starts with "DEMO: "; scripts/demo shows those.
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

say() { printf '%s\n' "$@" | sed 's/^/DEMO: /'; }
show() {
    say "" "\$ $*"
    out=$("$@" 2>&1)
    rc=$?
    if [ -n "$out" ]; then say "$out"; else say "(nothing)"; fi
    return $rc
}
fail() { say "" "FAILED: $*"; echo "KVCD-DEMO: FAIL"; exit 1; }
ours() { grep -E '^simple_(procfs_)?kmod ' /proc/modules; }

say "kernel $(uname -r)"
show cat /etc/kvcd/modules.d/simple-kmod.toml
show ls -l "/usr/lib/kvcd/simple-kmod/$(uname -r)"

show kvcd apply simple-kmod || fail "kvcd apply simple-kmod"
show cat /proc/modules
[ "$(ours | wc -l)" = 2 ] || fail "simple_kmod and simple_procfs_kmod are not both loaded"
show cat /proc/simple-procfs-kmod || fail "cannot read /proc/simple-procfs-kmod"

show kvcd apply --unload simple-kmod || fail "kvcd apply --unload simple-kmod"
show cat /proc/modules
[ -z "$(ours)" ] || fail "simple-kmod modules are still loaded"
[ ! -e /proc/simple-procfs-kmod ] || fail "/proc/simple-procfs-kmod is still there"

say "" "kernel log of the two drivers:"
say "$(dmesg | grep -E 'simple-kmod|simple-procfs-kmod')"

echo "KVCD-DEMO: PASS"
