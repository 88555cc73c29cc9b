#!/bin/sh
# Smoke test of the VM harness itself; kvcd is not involved.
# Fixture modules load with busybox insmod, in-tree ones with the real
# kmod modprobe from the image's /usr/lib/modules/$(uname -r).
set -u

fail() { echo "KVCD-VM: SMOKE FAIL: $*"; exit 1; }
loaded() { grep -q "^$1 " /proc/modules; }

# Fixtures with a dependency between them.
busybox insmod /fixtures/kvcd_base.ko || fail "insmod kvcd_base"
busybox insmod /fixtures/kvcd_user.ko || fail "insmod kvcd_user"
loaded kvcd_base || fail "kvcd_base not in /proc/modules"
loaded kvcd_user || fail "kvcd_user not in /proc/modules"
version=$(cat /sys/module/kvcd_user/version) || fail "no /sys/module/kvcd_user/version"
echo "smoke: kvcd_user version $version"
[ "$version" = 1.2.0 ] || fail "kvcd_user version is '$version'"
if busybox rmmod kvcd_base 2>/dev/null; then fail "in-use kvcd_base was removed"; fi
busybox rmmod kvcd_user || fail "rmmod kvcd_user"
busybox rmmod kvcd_base || fail "rmmod kvcd_base"
if loaded kvcd_base || loaded kvcd_user; then fail "fixtures still loaded after rmmod"; fi

# In-tree module through modules.dep, then a fixture that depends on it.
modprobe crc8 || fail "modprobe crc8"
loaded crc8 || fail "crc8 not in /proc/modules"
echo "smoke: crc8 from $(modinfo -F filename crc8)"
busybox insmod /fixtures/kvcd_crc.ko || fail "insmod kvcd_crc"
busybox rmmod kvcd_crc || fail "rmmod kvcd_crc"
modprobe -r crc8 || fail "modprobe -r crc8"

# Parameters.
busybox insmod /fixtures/kvcd_param.ko level=3 label=smoke || fail "insmod kvcd_param"
echo "smoke: kvcd_param level=$(cat /sys/module/kvcd_param/parameters/level)" \
    "label=$(cat /sys/module/kvcd_param/parameters/label)"
[ "$(cat /sys/module/kvcd_param/parameters/label)" = smoke ] || fail "label param"
busybox rmmod kvcd_param || fail "rmmod kvcd_param"

# Same-name module: the in-tree dummy has no "origin" parameter, ours does.
modprobe dummy || fail "modprobe dummy (in-tree)"
if [ -e /sys/module/dummy/parameters/origin ]; then fail "in-tree dummy has an origin param"; fi
modprobe -r dummy || fail "modprobe -r dummy"
busybox insmod /fixtures/dummy.ko || fail "insmod fixture dummy"
echo "smoke: fixture dummy origin=$(cat /sys/module/dummy/parameters/origin)"
busybox rmmod dummy || fail "rmmod fixture dummy"

# Informational: what the kernel itself does with the forged vermagic.
if busybox insmod /fixtures/bad-vermagic/kvcd_param.ko 2>/tmp/err; then
    echo "smoke: kernel accepted bad-vermagic/kvcd_param.ko"
    busybox rmmod kvcd_param
else
    echo "smoke: kernel refused bad-vermagic/kvcd_param.ko: $(cat /tmp/err)"
fi

echo "KVCD-VM: SMOKE PASS"
