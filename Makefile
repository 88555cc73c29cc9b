# Build and install kvcd.
#
#   make                                    cargo build --release --locked
#   make install DESTDIR=/tmp/root PREFIX=/usr
#   make check-install                      stage into a temporary root and check it
#   make rpm                                packaging/build-rpm (an RPM from this checkout)
#
# `make install` does not rebuild: it installs what `make` built (and builds
# only when the binaries are missing), so `make && sudo make install` never
# compiles as root and a packager's %install never compiles at all.
#
# The layout (see packaging/README.md; packaging/files.txt is the checked
# list):
#   $(BINDIR)/kvcd, kvcctl
#   $(UNITDIR)/kvcd.service, kvcd@.service, kvcd-prepare-next.{path,service}
#   $(TMPFILESDIR)/kvcd.conf
#   $(KERNELINSTALLDIR)/50-kvcd.install, $(SYSCONFDIR)/kernel/postinst.d/kvcd
#                                         prepare drivers when a kernel package lands
#   $(DATADIR)/dbus-1/system.d/org.kvcd.Kvcd1.conf        the bus policy
#   $(DATADIR)/dbus-1/interfaces/org.kvcd.Kvcd1.*.xml     introspection data
#   $(SYSCONFDIR)/kvcd/modules.d/, $(PREFIX)/lib/kvcd/modules.d/   (empty)
#   $(DOCDIR)/README.md, docs/*.md, examples/ (conf.d/ as it is: examples
#   only, never an active modules.d)
#
# The units name /usr/bin/kvcd and /usr/bin/kvcctl; with another BINDIR they
# are rewritten on the way in.

CARGO ?= cargo
CARGO_FLAGS ?=
# cargo honours CARGO_TARGET_DIR from the environment; so does this file.
CARGO_TARGET_DIR ?= target
export CARGO_TARGET_DIR

PREFIX ?= /usr
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
DATADIR ?= $(PREFIX)/share
UNITDIR ?= $(PREFIX)/lib/systemd/system
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
KERNELINSTALLDIR ?= $(PREFIX)/lib/kernel/install.d
DBUSPOLICYDIR ?= $(DATADIR)/dbus-1/system.d
DBUSIFACEDIR ?= $(DATADIR)/dbus-1/interfaces
DOCDIR ?= $(DATADIR)/doc/kvcd
EXAMPLESDIR ?= $(DOCDIR)/examples
VENDORCONFDIR ?= $(PREFIX)/lib/kvcd
DESTDIR ?=

INSTALL ?= install

RELEASE_DIR = $(CARGO_TARGET_DIR)/release
BINS = $(RELEASE_DIR)/kvcd $(RELEASE_DIR)/kvcctl

UNITS = kvcd.service kvcd@.service kvcd-prepare-next.path kvcd-prepare-next.service

# Rewrite the units' binary paths only when they are not /usr/bin.
ifeq ($(BINDIR),/usr/bin)
UNIT_SED =
else
UNIT_SED = -E -e 's@/usr/bin/(kvcd|kvcctl)([[:space:]]|$$)@$(BINDIR)/\1\2@g'
endif
ifneq ($(DOCDIR),/usr/share/doc/kvcd)
UNIT_SED += -e 's@file:/usr/share/doc/kvcd/@file:$(DOCDIR)/@g'
endif

.PHONY: all build install check-install rpm clean help

all: build

help:
	@sed -n '1,/^$$/{s/^# \{0,1\}//;p}' $(firstword $(MAKEFILE_LIST))

build:
	$(CARGO) build --release --locked $(CARGO_FLAGS)

# Only when missing: see the header.
$(RELEASE_DIR)/kvcd:
	$(CARGO) build --release --locked $(CARGO_FLAGS)
$(RELEASE_DIR)/kvcctl: $(RELEASE_DIR)/kvcd

install: $(BINS)
	$(INSTALL) -D -m 0755 $(RELEASE_DIR)/kvcd $(DESTDIR)$(BINDIR)/kvcd
	$(INSTALL) -D -m 0755 $(RELEASE_DIR)/kvcctl $(DESTDIR)$(BINDIR)/kvcctl
	$(INSTALL) -d -m 0755 $(DESTDIR)$(UNITDIR)
ifeq ($(strip $(UNIT_SED)),)
	for u in $(UNITS); do \
	    $(INSTALL) -m 0644 systemd/$$u $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
else
	for u in $(UNITS); do \
	    sed $(UNIT_SED) systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u && \
	    chmod 0644 $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
endif
	$(INSTALL) -D -m 0644 systemd/kvcd.tmpfiles.conf $(DESTDIR)$(TMPFILESDIR)/kvcd.conf
	for h in kernel/install.d/50-kvcd.install:$(KERNELINSTALLDIR) kernel/postinst.d/kvcd:$(SYSCONFDIR)/kernel/postinst.d; do \
	    src=$${h%%:*}; dir=$${h#*:}; \
	    if [ -n "$(strip $(UNIT_SED))" ]; then \
	        $(INSTALL) -d -m 0755 $(DESTDIR)$$dir && \
	        sed $(UNIT_SED) $$src > $(DESTDIR)$$dir/$${src##*/} && \
	        chmod 0755 $(DESTDIR)$$dir/$${src##*/} || exit 1; \
	    else \
	        $(INSTALL) -D -m 0755 $$src $(DESTDIR)$$dir/$${src##*/} || exit 1; \
	    fi; \
	done
	$(INSTALL) -D -m 0644 systemd/org.kvcd.Kvcd1.conf $(DESTDIR)$(DBUSPOLICYDIR)/org.kvcd.Kvcd1.conf
	$(INSTALL) -d -m 0755 $(DESTDIR)$(DBUSIFACEDIR)
	for f in docs/dbus/*.xml; do \
	    [ -e "$$f" ] || continue; \
	    $(INSTALL) -m 0644 "$$f" $(DESTDIR)$(DBUSIFACEDIR)/ || exit 1; \
	done
	$(INSTALL) -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/kvcd/modules.d
	$(INSTALL) -d -m 0755 $(DESTDIR)$(VENDORCONFDIR)/modules.d
	$(INSTALL) -D -m 0644 README.md $(DESTDIR)$(DOCDIR)/README.md
	for f in docs/*.md; do \
	    [ -e "$$f" ] || continue; \
	    $(INSTALL) -m 0644 "$$f" $(DESTDIR)$(DOCDIR)/ || exit 1; \
	done
	$(INSTALL) -d -m 0755 $(DESTDIR)$(EXAMPLESDIR)
	cd conf.d && find . -mindepth 1 | LC_ALL=C sort | while IFS= read -r p; do \
	    p=$${p#./}; \
	    if [ -d "$$p" ]; then \
	        $(INSTALL) -d -m 0755 "$(DESTDIR)$(EXAMPLESDIR)/$$p" || exit 1; \
	    else \
	        if [ -x "$$p" ]; then m=0755; else m=0644; fi; \
	        $(INSTALL) -D -m $$m "$$p" "$(DESTDIR)$(EXAMPLESDIR)/$$p" || exit 1; \
	    fi; \
	done

# Stage into a temporary root, list it and check it against
# packaging/files.txt: every file there, modes right, nothing else.
check-install: $(BINS)
	@set -e; root=$$(mktemp -d); trap 'rm -rf "$$root"' EXIT; \
	$(MAKE) --no-print-directory -s install DESTDIR="$$root" PREFIX=$(PREFIX) SYSCONFDIR=$(SYSCONFDIR); \
	echo "staged into $$root (PREFIX=$(PREFIX)):"; \
	(cd "$$root" && find . -mindepth 1 -printf '%M %m %P\n' | LC_ALL=C sort -k3); \
	packaging/check-files --prefix $(PREFIX) --sysconfdir $(SYSCONFDIR) --tree "$$root"

rpm:
	packaging/build-rpm

clean:
	$(CARGO) clean
