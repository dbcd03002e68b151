# Installs virtproxyd-rs in place of libvirt's virtproxyd.
#   make install [PREFIX=/usr/local] [DESTDIR=/staging] [BIN=path]
#       binary, units, conf (kept if present), man page
#   make uninstall [PREFIX=/usr/local] [DESTDIR=...]
# Units go to /etc/systemd/system, where they take precedence over a distribution's units of
# the same name; `make uninstall` and `systemctl daemon-reload` bring those back.
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR ?= /etc/systemd/system
CARGO ?= cargo
BIN ?= target/release/virtproxyd

UNITS := virtproxyd.service virtproxyd.socket virtproxyd-ro.socket virtproxyd-admin.socket \
         virtproxyd-tcp.socket virtproxyd-tls.socket

.PHONY: all install uninstall
all:
	$(CARGO) build --release

install: all
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
