# Installs virtproxyd-rs in place of libvirt's virtproxyd.
#   make install [PREFIX=/usr/local] [DESTDIR=/staging] [BIN=path] [FORCE_NO_MODULAR=1]
#       binary, units, conf (kept if present), man page
# It is for hosts with libvirt's modular daemons (virtqemud, virtnetworkd, ...: Fedora, RHEL).
# Without them (Debian ships only libvirtd) the units' Conflicts= would stop libvirtd and
# every URI would be routed to a socket that does not exist, so installing onto this host
# (no DESTDIR) is refused there unless FORCE_NO_MODULAR=1. A DESTDIR install stages files
# for another host and is not checked. MODULAR_ROOT (default /) is where the check looks.
#   make uninstall [PREFIX=/usr/local] [DESTDIR=...]
# Units go to /etc/systemd/system, where they take precedence over a distribution's units of
# the same name; `make uninstall` and `systemctl daemon-reload` bring those back.
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR ?= /etc/systemd/system
CARGO ?= cargo
BIN ?= target/release/virtproxyd
MODULAR_ROOT ?=
FORCE_NO_MODULAR ?=

# A driver daemon binary or socket unit in any of these places makes a modular host.
MODULAR_DAEMONS := virtqemud virtlxcd virtxend virtchd virtvboxd virtnetworkd virtstoraged \
                   virtsecretd virtnodedevd virtinterfaced virtnwfilterd
MODULAR_PATHS := $(foreach d,$(MODULAR_DAEMONS),$(foreach b,/usr/sbin /usr/local/sbin /sbin,$(b)/$(d)) \
                   $(foreach u,/usr/lib/systemd/system /lib/systemd/system /etc/systemd/system,$(u)/$(d).socket))

UNITS := virtproxyd.service virtproxyd.socket virtproxyd-ro.socket virtproxyd-admin.socket \
         virtproxyd-tcp.socket virtproxyd-tls.socket virtproxyd-metrics.socket

.PHONY: all install uninstall check-host
all:
	$(CARGO) build --release

check-host:
	@if [ -n "$(DESTDIR)" ] || [ -n "$(FORCE_NO_MODULAR)" ]; then exit 0; fi; \
	for p in $(MODULAR_PATHS); do [ -e "$(MODULAR_ROOT)$$p" ] && exit 0; done; \
	echo "make install: this host has none of libvirt's modular driver daemons" >&2; \
	echo "  (no virtqemud, virtnetworkd, ... binary in /usr/sbin or socket unit; Debian ships" >&2; \
	echo "  only the monolithic libvirtd). virtproxyd forwards to those daemons only, and its" >&2; \
	echo "  units stop libvirtd (Conflicts=), so installing here would leave every client with" >&2; \
	echo "  'Failed to connect socket to .../virtqemud-sock'. Install on a host with modular" >&2; \
	echo "  daemons, stage with DESTDIR=..., or override with FORCE_NO_MODULAR=1." >&2; \
	exit 1

install: check-host all
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/sbin/virtproxyd
	for u in $(UNITS); do \
	  sed 's|/usr/sbin/virtproxyd|$(PREFIX)/sbin/virtproxyd|' systemd/$$u | \
	    install -D -m 0644 /dev/stdin $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	# An existing configuration is the operator's: never overwrite it.
	test -e $(DESTDIR)$(SYSCONFDIR)/libvirt/virtproxyd.conf || \
	  install -D -m 0644 conf/virtproxyd.conf $(DESTDIR)$(SYSCONFDIR)/libvirt/virtproxyd.conf
	install -D -m 0644 doc/virtproxyd.8 $(DESTDIR)$(PREFIX)/share/man/man8/virtproxyd.8

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/sbin/virtproxyd $(DESTDIR)$(PREFIX)/share/man/man8/virtproxyd.8
	for u in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done
