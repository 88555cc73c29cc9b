#!/bin/sh
# kvcd end-to-end scenario, run as /scenario.sh inside the test VM (busybox sh).
#
# The image comes from tests/vm/mkinitramfs with --etc tests/vm/etc (the module
# configs) and a payload that holds the fixture modules at
# /usr/lib/kvcd/fixtures/$KVER and the forged-vermagic copy at
# /usr/lib/kvcd/badmagic/$KVER/extra. The same fixtures sit in /fixtures for
# loading by hand.
#
# Each check prints "KVCD-E2E: PASS <name>" or "KVCD-E2E: FAIL <name>: <why>"
# followed by the commands it ran and their output. The last line is
# "KVCD-E2E: N passed, M failed"; the exit status is 1 if any check failed.
#
# The agent checks (kvcd daemon + kvcctl over D-Bus) run last in the normal
# boot, after every `kvcd apply` check, since the daemon holds the runtime
# lock: dbus-daemon with the config tests/vm/e2e renders
# (/etc/dbus-1/kvcd-e2e-system-bus.conf, socket at the system bus's default
# path), then `kvcd daemon` in the background, logging to /tmp.
#
# Kernel command line with module.sig_enforce=1: only the signature checks
# run (every fixture is unsigned, so nothing of ours can load there).
# With kvcd_e2e_secureboot (the UEFI Secure Boot boot of tests/vm/e2e: the
# kernel is locked down and trusts the test MOK): only the Secure Boot checks,
# with the keys and certificates in /etc/kvcd-sb, the configs
# tests/vm/alt/sb (signs with the enrolled key) and tests/vm/alt/sb-other
# (signs with a key the kernel does not trust), and kvcd_base.ko signed on
# the host with each key in /fixtures/sb.
# With kvcd_e2e_verbose on the command line, passed checks show their
# transcripts too.
set -u

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
RUN=/run/kvcd
# Configs that name a module another config names too (alternatives, one
# scenario each): each sits in a config directory of its own, as a node would
# have only one of them. tests/vm/alt/NAME -> /etc/kvcd-alt/NAME.
ALT=/etc/kvcd-alt
# The firmware in the fixtures image (scripts/images): 0x00..0xff, 16 times.
FW_SIZE=4096
FW_SHA256=c8f5d0341d54d951a71b136e6e2afcb14d11ed8489a7ae126a8fee0df6ecf193
PASSED=0
FAILED=0

# --- check bookkeeping --------------------------------------------------------
# begin NAME; then any number of run/expect/bad; then end.
begin() { CHECK=$1; WHY=""; TRANSCRIPT=""; }

# run CMD...: runs it, keeps stdout+stderr in OUT and the status in RC, and
# appends both to the check's transcript.
run() {
    OUT=$("$@" 2>&1)
    RC=$?
    TRANSCRIPT="$TRANSCRIPT
\$ $* (exit $RC)"
    if [ -n "$OUT" ]; then TRANSCRIPT="$TRANSCRIPT
$OUT"; fi
}

# note TEXT: adds a line to the transcript (state snapshots and the like).
note() { TRANSCRIPT="$TRANSCRIPT
# $*"; }

bad() { WHY="${WHY:+$WHY; }$*"; }

end() {
    if [ -z "$WHY" ]; then
        PASSED=$((PASSED + 1))
        echo "KVCD-E2E: PASS $CHECK"
        if [ -n "$VERBOSE" ]; then
            printf '%s\n' "$TRANSCRIPT" | sed -e '1{/^$/d}' -e 's/^/    | /'
        fi
    else
        FAILED=$((FAILED + 1))
        echo "KVCD-E2E: FAIL $CHECK: $WHY"
        note "/proc/modules:"
        TRANSCRIPT="$TRANSCRIPT
$(cut -d' ' -f1-4 /proc/modules)"
        printf '%s\n' "$TRANSCRIPT" | sed -e '1{/^$/d}' -e 's/^/    | /'
    fi
}

# --- predicates ----------------------------------------------------------------
loaded() { grep -q "^$1 " /proc/modules; }
has() { case "$OUT" in *"$1"*) return 0 ;; esac; return 1; }
record() { [ -e "$RUN/loaded/$1.json" ]; }

expect_rc() { [ "$RC" = "$1" ] || bad "exit status $RC, expected $1"; }
expect_out() { has "$1" || bad "output lacks '$1'"; }
expect_no_out() { has "$1" && bad "output has '$1'"; }
expect_fail() { [ "$RC" != 0 ] || bad "exit status 0, expected a failure"; }
# expect_line A B: one output line holds both A and B.
expect_line() {
    printf '%s\n' "$OUT" | grep -F -- "$1" | grep -q -F -- "$2" ||
        bad "no output line has both '$1' and '$2'"
}
expect_loaded() { for _e; do loaded "$_e" || bad "$_e is not loaded"; done; }
expect_unloaded() { for _e; do loaded "$_e" && bad "$_e is still loaded"; done; }
expect_record() { record "$1" || bad "no record $RUN/loaded/$1.json"; }
expect_no_record() { record "$1" && bad "record $RUN/loaded/$1.json is left"; }

# expect_param MODULE PARAM VALUE
expect_param() {
    _p=/sys/module/$1/parameters/$2
    if [ ! -e "$_p" ]; then bad "$_p does not exist"; return; fi
    _v=$(cat "$_p")
    [ "$_v" = "$3" ] || bad "$_p is '$_v', expected '$3'"
}

# line_of TEXT: line number of the first output line holding TEXT (0 if none).
line_of() {
    _n=$(printf '%s\n' "$OUT" | grep -n -F -- "$1" | head -n1 | cut -d: -f1)
    echo "${_n:-0}"
}

# expect_before A B: output line with A comes before the one with B.
expect_before() {
    _a=$(line_of "$1") _b=$(line_of "$2")
    if [ "$_a" = 0 ] || [ "$_b" = 0 ]; then
        bad "output lacks '$1' or '$2'"
    elif [ "$_a" -ge "$_b" ]; then
        bad "'$1' (line $_a) is not before '$2' (line $_b)"
    fi
}

# Take whatever a failed check left behind out of the kernel so the next
# check starts clean. Quiet on purpose: a clean state prints nothing.
scrub() {
    for _m in "$@"; do
        if loaded "$_m"; then busybox rmmod "$_m" >/dev/null 2>&1; fi
    done
}

# --- background processes (busybox sh) --------------------------------------------
# proc_state PID: the process's state letter (R, S, Z, ...); empty once it is
# gone. The shell reaps its children by itself, so both cases mean "exited".
proc_state() { sed -n 's/^.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null; }
exited() { _s=$(proc_state "$1"); [ -z "$_s" ] || [ "$_s" = Z ]; }

# wait_exit PID SECONDS: true when PID exited within SECONDS; its exit
# status is then in EXIT_RC (from `wait`, which works on a reaped child too).
wait_exit() {
    _i=0
    while ! exited "$1"; do
        if [ "$_i" -ge $(($2 * 10)) ]; then return 1; fi
        sleep 0.1
        _i=$((_i + 1))
    done
    wait "$1"
    EXIT_RC=$?
}

# --- the agent: a system bus and kvcd daemon ---------------------------------------
BUS_CONF=/etc/dbus-1/kvcd-e2e-system-bus.conf
BUS_SOCKET=/run/dbus/system_bus_socket
BUS_LOG=/run/dbus/log
BUS_PID=""
DAEMON_PID=""
# kvcctl --wait gives up after this long (the boot's own timeout is longer).
WAIT_S=120

# start_bus: dbus-daemon in the background, until its socket exists.
start_bus() {
    mkdir -p /run/dbus
    rm -f "$BUS_SOCKET"
    dbus-daemon --config-file="$BUS_CONF" --nofork --nopidfile \
        </dev/null >"$BUS_LOG" 2>&1 &
    BUS_PID=$!
    note "started dbus-daemon (pid $BUS_PID)"
    _i=0
    while [ ! -S "$BUS_SOCKET" ]; do
        if exited "$BUS_PID" || [ "$_i" -ge 100 ]; then
            bad "the bus did not come up: $(cat "$BUS_LOG")"
            return 1
        fi
        sleep 0.1
        _i=$((_i + 1))
    done
}

stop_bus() {
    [ -n "$BUS_PID" ] || return 0
    kill "$BUS_PID" 2>/dev/null
    wait_exit "$BUS_PID" 10 || { kill -9 "$BUS_PID" 2>/dev/null; wait "$BUS_PID"; }
    BUS_PID=""
}

# start_daemon LOG [ARG...]: kvcd [ARG...] daemon in the background with
# stderr in LOG, until `kvcctl list` answers with the configs (among them
# $DAEMON_READY, default params).
start_daemon() {
    DAEMON_LOG=$1
    shift
    NO_COLOR=1 kvcd "$@" daemon </dev/null >"$DAEMON_LOG" 2>&1 &
    DAEMON_PID=$!
    note "started kvcd daemon (pid $DAEMON_PID), log in $DAEMON_LOG"
    _i=0
    until kvcctl list 2>/dev/null | grep -qx "${DAEMON_READY:-params}"; do
        if exited "$DAEMON_PID"; then
            wait "$DAEMON_PID"
            bad "kvcd daemon exited at start with status $?"
            DAEMON_PID=""
            return 1
        fi
        if [ "$_i" -ge 60 ]; then
            bad "kvcctl list did not show the configs within 30 s"
            return 1
        fi
        sleep 0.5
        _i=$((_i + 1))
    done
    note "kvcctl list answers"
}

# stop_daemon: SIGTERM, then wait (30 s) for it to exit; exit status in
# EXIT_RC. SIGKILL (and a failure) if it does not stop.
stop_daemon() {
    EXIT_RC=""
    [ -n "$DAEMON_PID" ] || return 1
    kill -TERM "$DAEMON_PID" 2>/dev/null
    if wait_exit "$DAEMON_PID" 30; then
        note "kvcd daemon (pid $DAEMON_PID) exited with status $EXIT_RC"
        DAEMON_PID=""
        return 0
    fi
    bad "kvcd daemon (pid $DAEMON_PID) did not exit within 30 s of SIGTERM"
    kill -9 "$DAEMON_PID" 2>/dev/null
    wait "$DAEMON_PID"
    DAEMON_PID=""
    return 1
}

# log_has FILE TEXT / log_count FILE TEXT: on the daemon's log.
log_has() { grep -q -F -- "$2" "$1" 2>/dev/null; }
log_count() { grep -c -F -- "$2" "$1" 2>/dev/null || true; }

# end_with_logs FILE...: end, with the daemon logs in the transcript of a
# failed check.
end_with_logs() {
    if [ -n "$WHY" ]; then
        for _f; do
            note "$_f:"
            TRANSCRIPT="$TRANSCRIPT
$(cat "$_f" 2>/dev/null)"
        done
        note "$BUS_LOG:"
        TRANSCRIPT="$TRANSCRIPT
$(cat "$BUS_LOG" 2>/dev/null)"
    fi
    end
}

# json_module NAME: module NAME's object in OUT (kvcctl status --json) on one
# line, without blanks (the pretty JSON's indentation and line breaks).
json_module() {
    printf '%s' "$OUT" | tr -d ' \n' |
        sed -n "s/.*\({[^{}]*\"name\":\"$1\"[^{}]*}\).*/\1/p"
}

# expect_json_state NAME STATE [MODULE]: OUT has module NAME in STATE, and
# MODULE among its loaded_modules.
expect_json_state() {
    _o=$(json_module "$1")
    if [ -z "$_o" ]; then bad "no module \"$1\" in the JSON"; return; fi
    case "$_o" in
        *"\"state\":\"$2\""*) ;;
        *) bad "$1 is not in state $2: $_o" ;;
    esac
    [ $# -ge 3 ] || return 0
    _l=$(printf '%s' "$_o" | sed -n 's/.*"loaded_modules":\[\([^]]*\)\].*/\1/p')
    case ",$_l," in
        *",\"$3\","*) ;;
        *) bad "loaded_modules of $1 is [$_l], without $3" ;;
    esac
}

# module_address MODULE: the module's load address from /proc/modules (root
# sees the real one); a new insert gets a new one.
module_address() { sed -n "s/^$1 .* \(0x[0-9a-f]*\).*/\1/p" /proc/modules; }

# pci_list: the PCI devices under /sys, lspci-like: ADDR VENDOR:DEVICE CLASS.
pci_list() {
    for _d in /sys/bus/pci/devices/*; do
        [ -e "$_d/vendor" ] || continue
        echo "${_d##*/} $(sed 's/^0x//' "$_d/vendor"):$(sed 's/^0x//' "$_d/device") class $(sed 's/^0x//' "$_d/class")"
    done
}

# pci_addr VENDOR DEVICE: the address of the first PCI device with these ids
# (4 hex digits each, lower case); empty if none.
pci_addr() {
    for _d in /sys/bus/pci/devices/*; do
        [ "$(cat "$_d/vendor" 2>/dev/null)" = "0x$1" ] &&
            [ "$(cat "$_d/device" 2>/dev/null)" = "0x$2" ] && { echo "${_d##*/}"; return; }
    done
}

# wait_json_state NAME STATE SECONDS: polls `kvcctl status --json NAME`
# until NAME is in STATE; false if it is not within SECONDS. OUT holds the
# last answer.
wait_json_state() {
    _i=0
    while :; do
        OUT=$(kvcctl status --json "$1" 2>&1)
        case "$(json_module "$1")" in *"\"state\":\"$2\""*) return 0 ;; esac
        [ "$_i" -ge $(($3 * 2)) ] && return 1
        sleep 0.5
        _i=$((_i + 1))
    done
}

KVER=$(uname -r)
VERBOSE=""
case " $(cat /proc/cmdline) " in *" kvcd_e2e_verbose "*) VERBOSE=1 ;; esac
echo "KVCD-E2E: kernel $KVER, cmdline: $(cat /proc/cmdline)"

# --- signature-enforcing kernel ---------------------------------------------------
sig_checks() {
    begin "signature rejected"
    run kvcd apply params
    expect_rc 1
    expect_out "EKEYREJECTED"
    expect_out "enforces module signatures"
    expect_out "params: failed at insert"
    expect_unloaded kvcd_param
    expect_no_record params
    end
    scrub kvcd_param

    # crc8 is Debian's own, signed, and goes in first; kvcd_crc is then
    # rejected, and kvcd must take crc8 out again.
    begin "signature rollback"
    run kvcd --config-dir "$ALT/crc" apply crc
    expect_rc 1
    expect_out "EKEYREJECTED"
    expect_out "inserted crc8"
    expect_out "rolled back: removed crc8"
    expect_unloaded kvcd_crc crc8
    expect_no_record crc
    end
    scrub kvcd_crc crc8
}

# --- Secure Boot: a locked-down kernel that trusts the test MOK --------------------
SB=/etc/kvcd-sb
# A module file ends with this when it carries a signature.
SIG_MAGIC="~Module signature appended~"
signed_file() { [ "$(tail -c 28 "$1")" = "$SIG_MAGIC" ]; }

sb_checks() {
    begin "Secure Boot: locked down, the test MOK in .machine"
    run cat /sys/kernel/security/lockdown
    expect_rc 0
    expect_out "[integrity]"
    run keyctl list %:.machine
    expect_rc 0
    expect_out "kvcd test MOK"
    expect_no_out "kvcd test untrusted"
    run grep -F "kvcd test" /proc/keys
    expect_out "kvcd test MOK"
    expect_no_out "kvcd test untrusted"
    for _k in mok other; do
        _m=$(stat -c '%a %u' "$SB/$_k.key" 2>/dev/null)
        [ "$_m" = "600 0" ] || bad "$SB/$_k.key has mode and owner '$_m', expected '600 0'"
    done
    end

    # The boot chain on its own: kvcd_base signed on the host by the kernel's
    # sign-file with each key, and not signed at all.
    begin "Secure Boot: sign-file control (MOK loads, other key and unsigned refused)"
    signed_file /fixtures/kvcd_base.ko && bad "/fixtures/kvcd_base.ko is signed"
    run busybox insmod /fixtures/sb/kvcd_base.mok.ko
    expect_rc 0
    expect_loaded kvcd_base
    run busybox rmmod kvcd_base
    expect_rc 0
    run busybox insmod /fixtures/sb/kvcd_base.other.ko
    expect_fail
    expect_out "Key was rejected by service"
    expect_unloaded kvcd_base
    run busybox insmod /fixtures/kvcd_base.ko
    expect_fail
    expect_out "Key was rejected by service"
    expect_unloaded kvcd_base
    end
    scrub kvcd_base

    begin "kvcd signing: the enrolled key"
    run kvcd --config-dir "$ALT/sb" signing
    expect_rc 0
    expect_out "trusted by: .machine"
    expect_out "lockdown: integrity"
    expect_out "secure boot: on"
    expect_line "subject:" "kvcd test MOK"
    end

    # Exit 1: the kernel enforces signatures and trusts no key of this cert.
    begin "kvcd signing: a key the kernel does not trust"
    run kvcd --config-dir "$ALT/sb-other" signing
    expect_rc 1
    expect_out "trusted by: none"
    expect_line "subject:" "kvcd test untrusted"
    end

    # kvcd_user needs kvcd_base (same package, signed by kvcd too), kvcd_crc
    # the in-tree crc8 (Debian's signature). The image has neither sign-file
    # nor openssl: kvcd signs by itself.
    begin "kvcd signs the package's modules with the enrolled key"
    run kvcd --config-dir "$ALT/sb" apply signed
    expect_rc 0
    expect_out "signed: loaded"
    expect_loaded kvcd_base kvcd_user crc8 kvcd_crc
    expect_record signed
    # Signed copies are kvcd's: the package's own files stay unsigned.
    for _f in kvcd_base kvcd_user kvcd_crc; do
        signed_file "/usr/lib/kvcd/fixtures/$KVER/$_f.ko" &&
            bad "/usr/lib/kvcd/fixtures/$KVER/$_f.ko was signed in place"
    done
    run kvcd --config-dir "$ALT/sb" apply --unload signed
    expect_rc 0
    expect_unloaded kvcd_user kvcd_crc kvcd_base crc8
    expect_no_record signed
    end
    scrub kvcd_crc kvcd_user kvcd_base crc8

    begin "sign = false under lockdown: refused, and said why"
    run kvcd --config-dir "$ALT/sb" apply unsigned
    expect_rc 1
    expect_out "EKEYREJECTED"
    expect_out "carries no signature"
    expect_unloaded kvcd_param
    expect_no_record unsigned
    end
    scrub kvcd_param

    # Same package, same state directory, another key: what kvcd staged
    # for the enrolled key above must not be what gets loaded here.
    begin "signed with a key the kernel does not trust"
    run kvcd --config-dir "$ALT/sb-other" apply signed
    expect_rc 1
    expect_out "EKEYREJECTED"
    expect_out "kvcd test untrusted"
    expect_out "mokutil --import"
    expect_unloaded kvcd_user kvcd_crc kvcd_base crc8
    expect_no_record signed
    end
    scrub kvcd_crc kvcd_user kvcd_base crc8

    begin "clean end state"
    for m in kvcd_base kvcd_user kvcd_crc kvcd_param crc8; do
        expect_unloaded "$m"
    done
    left=$(ls "$RUN/loaded" 2>/dev/null)
    [ -z "$left" ] || bad "records left: $left"
    end
}

# --- normal kernel ---------------------------------------------------------------
normal_checks() {
    begin "load with dependencies"
    run kvcd apply deps
    expect_rc 0
    expect_out "deps: loaded"
    expect_out "resolve: load order: kvcd_base, kvcd_user, crc8, kvcd_crc"
    expect_loaded kvcd_base kvcd_user crc8 kvcd_crc
    expect_record deps
    # The directory path was templated with the running kernel's release.
    expect_out "/usr/lib/kvcd/fixtures/$KVER"
    end

    begin "idempotent re-apply"
    before=$(cut -d' ' -f1 /proc/modules | sort)
    run kvcd apply deps
    expect_rc 0
    expect_out "deps: loaded"
    expect_out "kvcd_user is already loaded"
    expect_out "kvcd_base is already loaded"
    expect_out "kvcd_crc is already loaded"
    expect_no_out "inserted"
    after=$(cut -d' ' -f1 /proc/modules | sort)
    [ "$before" = "$after" ] || bad "/proc/modules changed"
    expect_record deps
    end

    begin "parameters"
    run kvcd apply params
    expect_rc 0
    expect_out "params: loaded"
    expect_out "level=7 label=vm"
    expect_loaded kvcd_param
    expect_param kvcd_param level 7
    expect_param kvcd_param label vm
    expect_record params
    run kvcd apply --json params
    expect_rc 0
    expect_out '"state": "loaded"'
    expect_out '"error": null'
    expect_out '"action": "already-loaded"'
    run kvcd apply --unload params
    expect_rc 0
    expect_out "removed kvcd_param"
    expect_unloaded kvcd_param
    expect_no_record params
    end
    scrub kvcd_param

    begin "reverse unload"
    run kvcd apply --unload deps
    expect_rc 0
    expect_out "deps: inactive"
    expect_unloaded kvcd_user kvcd_crc kvcd_base crc8
    expect_no_record deps
    expect_out "removed crc8"
    expect_before "removed kvcd_crc" "removed kvcd_base"
    expect_before "removed kvcd_user" "removed kvcd_base"
    expect_before "removed kvcd_crc" "removed crc8"
    end
    scrub kvcd_crc kvcd_user kvcd_base crc8

    begin "in-use refusal"
    run kvcd apply base
    expect_rc 0
    expect_loaded kvcd_base
    run busybox insmod /fixtures/kvcd_user.ko
    expect_rc 0
    run kvcd apply --unload base
    expect_rc 1
    expect_out "base: busy at remove"
    expect_out "in use"
    expect_out "kvcd_user"
    expect_out "nothing was unloaded"
    expect_loaded kvcd_base kvcd_user
    expect_record base
    run busybox rmmod kvcd_user
    expect_rc 0
    run kvcd apply --unload base
    expect_rc 0
    expect_out "removed kvcd_base"
    expect_unloaded kvcd_base
    expect_no_record base
    end
    scrub kvcd_user kvcd_base

    begin "never unload what kvcd did not load"
    run busybox insmod /fixtures/kvcd_param.ko
    expect_rc 0
    run kvcd apply params
    expect_rc 0
    expect_out "kvcd_param is already loaded"
    expect_no_out "inserted"
    # The hand-loaded module keeps its own parameters.
    expect_param kvcd_param level 1
    run kvcd apply --unload params
    expect_rc 0
    expect_no_out "removed kvcd_param"
    expect_loaded kvcd_param
    expect_no_record params
    run busybox rmmod kvcd_param
    expect_rc 0
    end
    scrub kvcd_param

    begin "a live in-tree module of the same name is not the package's"
    run modprobe dummy
    expect_rc 0
    run kvcd --config-dir "$ALT/nic" apply nic
    expect_rc 1
    expect_out "nic: failed at verify"
    expect_out "dummy is already loaded, but the live module is the in-tree dummy of kernel $KVER"
    expect_out "live build ID"
    expect_out 'add replace_in_tree = ["dummy"]'
    expect_loaded dummy
    [ -e /sys/module/dummy/parameters/origin ] &&
        bad "the fixture dummy was loaded"
    expect_no_record nic
    run modprobe -r dummy
    end
    scrub dummy

    begin "a module has one owner"
    run kvcd apply params
    expect_rc 0
    expect_record params
    # hooked names the same kvcd_param: it must not claim the module params owns.
    run kvcd --config-dir "$ALT/hooked" apply hooked
    expect_rc 1
    expect_out "kvcd_param is loaded by module config params; a module has one owner"
    expect_no_record hooked
    run kvcd apply --unload params
    expect_rc 0
    expect_unloaded kvcd_param
    end
    scrub kvcd_param

    begin "two configs of one node naming the same module are refused"
    cl=/tmp/clash
    mkdir -p $cl/modules.d
    cp /etc/kvcd/kvcd.toml $cl/
    cp /etc/kvcd/modules.d/params.toml $cl/modules.d/params.toml
    cp $ALT/hooked/modules.d/hooked.toml $cl/modules.d/hooked.toml
    run kvcd --config-dir $cl apply params
    expect_rc 1
    expect_out "params: failed at config"
    expect_out "$cl/modules.d/params.toml: key \`modules\`: module \"kvcd_param\" is also loaded by module config \"hooked\" ($cl/modules.d/hooked.toml)"
    expect_unloaded kvcd_param
    expect_no_record params
    end
    scrub kvcd_param

    begin "a missing module tree for the kernel is named"
    nm=/tmp/no-tree
    mkdir -p $nm/etc/modules.d $nm/modules
    cp /etc/kvcd/modules.d/deps.toml $nm/etc/modules.d/
    printf 'kernel_modules_dir = "%s"\nstate_dir = "%s"\nruntime_dir = "%s"\n' \
        $nm/modules $nm/state $nm/run >$nm/etc/kvcd.toml
    run kvcd --config-dir $nm/etc apply deps
    expect_rc 1
    expect_out "deps: failed"
    expect_out "$nm/modules/$KVER"
    expect_unloaded kvcd_crc crc8 kvcd_user kvcd_base
    end
    scrub kvcd_crc crc8 kvcd_user kvcd_base

    begin "in-tree replacement and restore"
    run modprobe dummy
    expect_rc 0
    expect_loaded dummy
    [ -e /sys/module/dummy/parameters/origin ] &&
        bad "the in-tree dummy already has an origin parameter"
    run kvcd apply replace
    expect_rc 0
    expect_out "replace: loaded"
    expect_out "removed in-tree module dummy"
    expect_loaded dummy
    expect_param dummy origin kvcd
    expect_record replace
    run kvcd apply --unload replace
    expect_rc 0
    expect_out "restored in-tree module dummy"
    expect_loaded dummy
    [ -e /sys/module/dummy/parameters/origin ] &&
        bad "dummy still has an origin parameter: the fixture is loaded, not the in-tree driver"
    expect_no_record replace
    run modprobe -r dummy
    expect_rc 0
    end
    scrub dummy

    begin "version mismatch"
    run kvcd --config-dir "$ALT/wrongver" apply wrongver
    expect_rc 1
    expect_out "wrongver: failed at verify"
    expect_out "is version 1.2.0, but the config expects version 9.9"
    expect_no_out "inserted"
    expect_unloaded kvcd_user kvcd_base
    expect_no_record wrongver
    end
    scrub kvcd_user kvcd_base

    begin "wrong vermagic"
    run kvcd --config-dir "$ALT/badmagic" apply badmagic
    expect_rc 1
    expect_out "badmagic: failed at verify"
    expect_out "was built for kernel 9.9.9-"
    expect_out "but the target kernel is $KVER"
    # Found one directory level down, and only there.
    expect_out "1 module file(s) in /usr/lib/kvcd/badmagic/$KVER"
    expect_no_out "inserted"
    expect_unloaded kvcd_param
    expect_no_record badmagic
    end
    scrub kvcd_param

    begin "kernel_match excludes this kernel"
    run kvcd --config-dir "$ALT/otherkernel" apply otherkernel
    expect_rc 0
    expect_out "otherkernel: unsupported"
    expect_unloaded kvcd_base
    expect_no_record otherkernel
    end
    scrub kvcd_base

    # [match]: the VM's PCI devices (qemu's default machine) decide. The
    # listing goes to the console for the record.
    pci_list | sed 's/^/KVCD-E2E: pci /'
    begin "[match] pci of a device the VM has"
    note "PCI devices:"
    TRANSCRIPT="$TRANSCRIPT
$(pci_list | sed 's/^/# /')"
    run kvcd --config-dir "$ALT/hw" apply hw-pci
    expect_rc 0
    expect_out "hw-pci: loaded"
    expect_out "matches [match]"
    expect_out "pci:v00008086d00007000"
    expect_loaded kvcd_base
    expect_record hw-pci
    run kvcd --config-dir "$ALT/hw" apply --unload hw-pci
    expect_rc 0
    expect_unloaded kvcd_base
    expect_no_record hw-pci
    end
    scrub kvcd_base

    begin "[match] modalias glob of a device the VM has"
    run kvcd --config-dir "$ALT/hw" apply hw-alias
    expect_rc 0
    expect_out "hw-alias: loaded"
    expect_out "matches [match]"
    expect_out "pci:v00008086d00007000"
    expect_loaded kvcd_param
    expect_record hw-alias
    run kvcd --config-dir "$ALT/hw" apply --unload hw-alias
    expect_rc 0
    expect_unloaded kvcd_param
    expect_no_record hw-alias
    end
    scrub kvcd_param

    begin "[match] with no matching device"
    run kvcd --config-dir "$ALT/hw" apply hw-none
    expect_rc 0
    expect_out "hw-none: unsupported"
    expect_out "no matching device ([match] pci dead:beef;"
    expect_out "device(s) under /sys)"
    expect_no_out "inserted"
    expect_unloaded kvcd_user kvcd_base
    expect_no_record hw-none
    run kvcd --config-dir "$ALT/hw" apply --json hw-none
    expect_rc 0
    expect_out '"state": "unsupported"'
    expect_out "no matching device"
    expect_unloaded kvcd_user kvcd_base
    expect_no_record hw-none
    end
    scrub kvcd_user kvcd_base

    begin "unknown config name"
    run kvcd apply no-such-config
    expect_rc 1
    expect_out "no-such-config: failed at config"
    end

    begin "driver image extracted on the host, loaded without podman"
    run kvcd --config-dir "$ALT/image" apply image
    expect_rc 0
    expect_out "no podman needed"
    expect_out "image: loaded"
    expect_loaded kvcd_base kvcd_user kvcd_param
    expect_param kvcd_param level 3
    expect_param kvcd_param label image
    run kvcd --config-dir "$ALT/image" apply --unload image
    expect_rc 0
    expect_unloaded kvcd_user kvcd_param kvcd_base
    expect_no_record image
    end
    scrub kvcd_user kvcd_param kvcd_base

    # The same image with firmware_dir: kvcd places the image's
    # /lib/firmware/kvcd/* under /var/lib/firmware and points the kernel's
    # firmware search path there before inserting kvcd_fw, whose init asks
    # for kvcd/kvcd-test.fw: fw_size is the size the kernel found (a
    # negative errno if it found nothing).
    begin "firmware from the image"
    fw=/var/lib/firmware/kvcd/kvcd-test.fw
    alias=/var/lib/firmware/kvcd/kvcd-alias.fw
    fwpath=$(cat /sys/module/firmware_class/parameters/path)
    [ -z "$fwpath" ] || bad "firmware_class.path is '$fwpath' before the apply"
    run kvcd apply firmware
    expect_rc 0
    expect_out "firmware: loaded"
    expect_out "file(s) in /var/lib/firmware"
    # The VM boots with an empty firmware_class.path, so kvcd sets it.
    expect_out "firmware: set the kernel's firmware search path to /var/lib/firmware"
    expect_before "firmware: firmware: placed" "inserted kvcd_fw"
    expect_loaded kvcd_fw
    expect_record firmware
    if [ -f "$fw" ]; then
        size=$(stat -c %s "$fw")
        [ "$size" = "$FW_SIZE" ] || bad "$fw has $size bytes, expected $FW_SIZE"
        sum=$(sha256sum "$fw" | cut -d' ' -f1)
        [ "$sum" = "$FW_SHA256" ] || bad "$fw has sha256 $sum, expected $FW_SHA256"
    else
        bad "$fw was not placed"
    fi
    # The image's in-tree link: reachable under its own name too.
    if [ -e "$alias" ]; then
        size=$(stat -L -c %s "$alias")
        [ "$size" = "$FW_SIZE" ] || bad "$alias has $size bytes, expected $FW_SIZE"
    else
        bad "$alias was not placed"
    fi
    note "firmware_class.path: '$(cat /sys/module/firmware_class/parameters/path)'"
    expect_param firmware_class path /var/lib/firmware
    expect_param kvcd_fw fw_size "$FW_SIZE"
    run kvcd apply --unload firmware
    expect_rc 0
    expect_out "firmware: inactive"
    expect_out "removed kvcd_fw"
    expect_out "file(s) from /var/lib/firmware"
    [ -e "$fw" ] && bad "$fw is still there"
    if [ -e "$alias" ] || [ -L "$alias" ]; then bad "$alias is still there"; fi
    expect_unloaded kvcd_fw
    expect_no_record firmware
    # kvcd set the search path, so it clears it with its last firmware.
    expect_out "cleared the kernel's firmware search path"
    fwpath=$(cat /sys/module/firmware_class/parameters/path)
    [ -z "$fwpath" ] || bad "firmware_class.path is '$fwpath' after the unload"
    end
    scrub kvcd_fw

    begin "hooks and ready check around a real load"
    rm -f /run/hooked.trace
    run kvcd --config-dir "$ALT/hooked" apply hooked
    expect_rc 0
    expect_out "hooked: ready: /sys/module/kvcd_param/parameters/level exists"
    expect_out "hooked: loaded"
    expect_loaded kvcd_param
    run kvcd --config-dir "$ALT/hooked" apply --unload hooked
    expect_rc 0
    expect_unloaded kvcd_param
    trace=$(cat /run/hooked.trace 2>/dev/null)
    want="pre_load hooked 0
post_load hooked 1
pre_unload hooked 1
post_unload hooked 0"
    [ "$trace" = "$want" ] || bad "hook trace is '$trace', expected '$want'"
    end
    scrub kvcd_param

    crash_checks
    daemon_checks

    # Everything above cleaned up after itself: no fixture module and no
    # record may be left.
    begin "clean end state"
    for m in kvcd_base kvcd_user kvcd_crc kvcd_param kvcd_fw crc8 dummy; do
        expect_unloaded "$m"
    done
    left=$(ls "$RUN/loaded" 2>/dev/null)
    [ -z "$left" ] || bad "records left: $left"
    end
}

# --- the kill -9 tier (normal kernel) -------------------------------------------------
CRASH_RUN=/run/kvcd-crash
CRASH_STATE=/var/lib/kvcd-crash
CRASH_FW=/var/lib/kvcd-crash-firmware
CRASH_MODS="dummy kvcd_base kvcd_user crc8 kvcd_crc kvcd_fw"

# crash_apply [ARGS...]: kvcd apply on the crash configs (failpoint from $FP).
crash_apply() {
    KVCD_FAILPOINTS=$FP kvcd --config-dir "$ALT/crash" apply "$@" crash crashfw >/tmp/crash.out 2>&1
}

# crash_state: what a run must leave the same: each module with its
# srcversion and parameters, the record without its timestamp, leftovers.
crash_state() {
    for _m in $CRASH_MODS; do
        if loaded "$_m"; then
            echo "live $_m $(cat /sys/module/$_m/srcversion 2>/dev/null) $(ls /sys/module/$_m/parameters 2>/dev/null | tr '\n' ' ')"
        fi
    done
    for _r in "$CRASH_RUN"/loaded/*.json; do
        [ -e "$_r" ] && grep -v '"since"' "$_r"
    done
    find "$CRASH_RUN" "$CRASH_STATE" "$CRASH_FW" -name '*.tmp*' 2>/dev/null | sed 's/^/left /'
    ls "$CRASH_STATE/mounts" 2>/dev/null | sed 's/^/mounted /'
    find "$CRASH_FW" -type f 2>/dev/null | sort | sed 's/^/firmware /'
    echo "firmware_class.path=$(cat /sys/module/firmware_class/parameters/path)"
}

# crash_points LOG: NAME#1 and NAME#LAST for each failpoint in LOG.
crash_points() {
    awk '{ c[$0]++ } END { for (k in c) { print k "#1"; if (c[k] > 1) print k "#" c[k] } }' "$1" | sort
}

# crash_kill POINT WANT WHAT: runs crash_apply (args in $ARGS) killed at
# POINT, then $THEN, and compares the end state with WANT.
crash_kill() {
    FP=$1
    crash_apply $ARGS
    _rc=$?
    FP=""
    [ "$_rc" = 137 ] || { bad "$3 at $1: not killed there (exit $_rc): $(tail -n 3 /tmp/crash.out)"; return; }
    crash_apply $THEN
    _now=$(crash_state)
    if [ "$_now" != "$2" ]; then
        bad "$3 at $1 did not converge"
        note "$3 at $1 ended as:"
        note "$_now"
        note "instead of:"
        note "$2"
    fi
    CRASH_KILLS=$((CRASH_KILLS + 1))
}

crash_checks() {
    begin "kill -9 at every failpoint (real kernel)"
    FP=""
    CRASH_KILLS=0
    loaded dummy || modprobe dummy
    rm -rf "$CRASH_RUN" "$CRASH_STATE/files" "$CRASH_STATE/sets"
    base=$(crash_state)
    KVCD_FAILPOINTS_LOG=/tmp/fp.load crash_apply
    full=$(crash_state)
    KVCD_FAILPOINTS_LOG=/tmp/fp.unload crash_apply --unload
    if [ ! -s /tmp/fp.load ]; then
        echo "KVCD-E2E: SKIP kill -9 tier: this kvcd was built without the failpoints feature"
        end
        return
    fi
    [ "$(crash_state)" = "$base" ] || bad "a clean load and unload did not restore the node"
    for p in $(crash_points /tmp/fp.load); do
        # Files are stored again each time, so the store's steps are reached.
        rm -rf "$CRASH_STATE/files" "$CRASH_STATE/sets"
        ARGS="" THEN=""; crash_kill "$p" "$full" "load, load"
        crash_apply --unload
        rm -rf "$CRASH_STATE/files" "$CRASH_STATE/sets"
        ARGS="" THEN="--unload"; crash_kill "$p" "$base" "load, unload"
    done
    for p in $(crash_points /tmp/fp.unload); do
        crash_apply
        ARGS="--unload" THEN="--unload"; crash_kill "$p" "$base" "unload, unload"
    done
    n=$(cat /tmp/fp.load /tmp/fp.unload | sort -u | wc -l)
    note "$n failpoints, $CRASH_KILLS kills"
    echo "KVCD-E2E: kill -9 tier: $n failpoints, $CRASH_KILLS kills"
    [ "$n" -ge 30 ] || bad "only $n failpoints reached"
    end
    scrub kvcd_fw kvcd_user kvcd_base kvcd_crc crc8 dummy
    rm -rf "$CRASH_RUN" "$CRASH_STATE" "$CRASH_FW"
}

# --- the agent over D-Bus (normal kernel, after every `kvcd apply` check) ---------
daemon_checks() {
    log1=/tmp/kvcd-daemon.1.log
    log2=/tmp/kvcd-daemon.2.log

    begin "daemon over D-Bus"
    if start_bus && start_daemon "$log1"; then
        run kvcctl load --wait --timeout "$WAIT_S" params
        expect_rc 0
        expect_out "params: loaded"
        expect_loaded kvcd_param
        expect_param kvcd_param level 7
        expect_param kvcd_param label vm
        expect_record params
        run kvcctl status --json
        expect_rc 0
        expect_json_state params loaded kvcd_param
        # Configs nobody asked for stay as they are.
        expect_json_state deps inactive
        run kvcctl status
        expect_rc 0
        printf '%s\n' "$OUT" | grep -q -E '^params +loaded +[^ ]+ +kvcd_param( |$)' ||
            bad "the status table has no line 'params loaded ... kvcd_param'"
        run kvcctl unload --wait --timeout "$WAIT_S" params
        expect_rc 0
        expect_out "params: inactive"
        expect_unloaded kvcd_param
        expect_no_record params
        log_has "$log1" "inserted kvcd_param" || bad "the daemon log lacks 'inserted kvcd_param'"
        log_has "$log1" "removed kvcd_param" || bad "the daemon log lacks 'removed kvcd_param'"
    fi
    end_with_logs "$log1"

    # SIGTERM stops the daemon and leaves the driver in; the next daemon finds
    # its record and the live module and takes it over without inserting.
    begin "daemon restart keeps and adopts loaded drivers"
    if [ -z "$DAEMON_PID" ]; then
        bad "no daemon runs (see the check before)"
    else
        run kvcctl load --wait --timeout "$WAIT_S" params
        expect_rc 0
        expect_out "params: loaded"
        expect_loaded kvcd_param
        addr1=$(module_address kvcd_param)
        note "kvcd_param is at $addr1"
        if stop_daemon; then
            [ "$EXIT_RC" = 0 ] || bad "kvcd daemon exited with status $EXIT_RC after SIGTERM, expected 0"
        fi
        log_has "$log1" "SIGTERM: stopping" || bad "the daemon log lacks 'SIGTERM: stopping'"
        expect_loaded kvcd_param
        expect_record params
        if start_daemon "$log2"; then
            run kvcctl status --json params
            expect_rc 0
            expect_json_state params loaded kvcd_param
            log_has "$log2" "adopted: already loaded by kvcd" ||
                bad "the second daemon's log lacks 'adopted: already loaded by kvcd'"
            n=$(log_count "$log2" "inserted")
            [ "$n" = 0 ] || bad "the second daemon inserted something ($n 'inserted' lines)"
            addr2=$(module_address kvcd_param)
            note "kvcd_param is at $addr2"
            [ "$addr1" = "$addr2" ] || bad "kvcd_param moved from $addr1 to $addr2: it was inserted again"
            run kvcctl unload --wait --timeout "$WAIT_S" params
            expect_rc 0
            expect_out "params: inactive"
            expect_unloaded kvcd_param
            expect_no_record params
            if stop_daemon; then
                [ "$EXIT_RC" = 0 ] || bad "kvcd daemon exited with status $EXIT_RC after SIGTERM, expected 0"
            fi
        fi
    fi
    end_with_logs "$log1" "$log2"

    # Hotplug: qemu's standard VGA (1234:1111) is removed from the PCI bus,
    # the daemon gets a wanted config that matches only it (unsupported: no
    # matching device); a rescan adds the device back and the kernel's add
    # uevent makes the daemon load the config.
    log3=/tmp/kvcd-daemon.3.log
    begin "daemon loads a [match] config when its device is added"
    vga=$(pci_addr 1234 1111)
    if [ -n "$DAEMON_PID" ]; then
        bad "a daemon still runs (see the check before)"
    elif [ -z "$vga" ]; then
        bad "no PCI device 1234:1111 (qemu's standard VGA) in the VM"
        note "$(pci_list)"
    elif [ ! -e /sys/bus/pci/rescan ]; then
        bad "the kernel has no /sys/bus/pci/rescan"
    else
        note "1234:1111 is at $vga"
        run sh -c "echo 1 > /sys/bus/pci/devices/$vga/remove"
        expect_rc 0
        [ -e "/sys/bus/pci/devices/$vga" ] && bad "$vga is still there after remove"
        # Only this config (its module is one /etc/kvcd's configs name too).
        if DAEMON_READY=hotplug start_daemon "$log3" --config-dir "$ALT/hotplug"; then
            run kvcctl load --wait --timeout 30 hotplug
            expect_rc 0
            expect_out "hotplug: unsupported"
            run kvcctl status --json hotplug
            expect_rc 0
            expect_json_state hotplug unsupported
            expect_out "no matching device ([match] pci 1234:1111;"
            expect_unloaded kvcd_base
            expect_no_record hotplug
            run sh -c "echo 1 > /sys/bus/pci/rescan"
            expect_rc 0
            [ -e "/sys/bus/pci/devices/$vga" ] || bad "$vga did not come back after the rescan"
            t0=$(date +%s)
            if wait_json_state hotplug loaded 30; then
                note "hotplug loaded $(($(date +%s) - t0)) s after the rescan"
            else
                bad "hotplug is not loaded 30 s after the rescan"
            fi
            TRANSCRIPT="$TRANSCRIPT
\$ kvcctl status --json hotplug (polled)
$OUT"
            expect_json_state hotplug loaded kvcd_base
            expect_loaded kvcd_base
            expect_record hotplug
            log_has "$log3" "a device was added: looking for a match again" ||
                bad "the daemon log lacks 'a device was added: looking for a match again'"
            log_has "$log3" "matches [match]" ||
                bad "the daemon log lacks 'matches [match]'"
            note "$log3 on the device:"
            TRANSCRIPT="$TRANSCRIPT
$(grep -F -e "device was added" -e "matches [match]" -e "inserted kvcd_base" "$log3")"
            run kvcctl unload --wait --timeout "$WAIT_S" hotplug
            expect_rc 0
            expect_out "hotplug: inactive"
            expect_unloaded kvcd_base
            expect_no_record hotplug
            if stop_daemon; then
                [ "$EXIT_RC" = 0 ] || bad "kvcd daemon exited with status $EXIT_RC after SIGTERM, expected 0"
            fi
        fi
    fi
    # Leave the VGA on the bus whatever happened.
    [ -n "$vga" ] && [ ! -e "/sys/bus/pci/devices/$vga" ] && echo 1 >/sys/bus/pci/rescan
    end_with_logs "$log3"
    scrub kvcd_base

    begin "kvcctl without a running daemon"
    if [ -n "$DAEMON_PID" ]; then stop_daemon; fi
    if [ -n "$BUS_PID" ]; then
        # The bus runs, nobody owns org.kvcd.Kvcd1.
        run kvcctl status
        expect_rc 3
        expect_out "kvcd is not running"
        run kvcctl load --wait params
        expect_rc 3
        expect_unloaded kvcd_param
    else
        bad "the bus is not running (see the checks before)"
    fi
    stop_bus
    # No bus at all.
    run kvcctl status
    expect_rc 3
    expect_out "cannot reach the D-Bus system bus"
    end_with_logs "$log1" "$log2"
    scrub kvcd_param
}

case " $(cat /proc/cmdline) " in
    *" kvcd_e2e_secureboot "*)
        echo "KVCD-E2E: mode secureboot (UEFI Secure Boot, lockdown)"
        sb_checks ;;
    *" module.sig_enforce=1 "*)
        echo "KVCD-E2E: mode signature (module.sig_enforce=1)"
        sig_checks ;;
    *)
        echo "KVCD-E2E: mode normal"
        normal_checks ;;
esac

echo "KVCD-E2E: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
