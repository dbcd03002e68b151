//! A worker's part of a restart hand-over (see `handover`): quiesce, carry the connections
//! that come to rest, close what cannot move, exit; and in the next process, adopt a carried
//! connection straight into the relay.

use super::*;
use crate::handover::{Carried, ConnRecord, Resume};
use std::os::fd::AsFd;

impl Worker {
    /// One loop turn of a hand-over; true once every connection left (carried or closed)
    /// and the worker may exit.
    pub(super) fn handover_step(&mut self, until: &mut Option<Instant>) -> bool {
        let now = Instant::now();
        let deadline = *until.get_or_insert_with(|| {
            tracing::debug!(
                worker = self.index,
                conns = self.conns.len(),
                "handing over"
            );
            now + crate::handover::GRACE
        });
        let expired = now >= deadline;
        let mut carry = Vec::new();
        let mut close = Vec::new();
        let mut run = Vec::new();
        for (slot, c) in self.conns.iter_mut() {
            let movable = c.tls.is_none();
            if let State::Relay { c2d, d2c, .. } = &mut c.state {
                c2d.quiesce();
                d2c.quiesce();
            }
            match &c.state {
                State::Relay { .. } => {
                    if c.at_rest() && movable {
                        carry.push(slot);
                    } else if c.at_rest() {
                        close.push((
                            slot,
                            "restart: a userspace TLS session cannot be handed over",
                        ));
                    } else if expired {
                        close.push((slot, "restart: not between frames in time"));
                    } else {
                        // Drive it to the end of its frame without waiting for readiness.
                        run.push((slot, c.gen));
                    }
                }
                State::Layered(_) if c.at_rest() || expired => {
                    close.push((slot, "restart: a SASL security layer cannot be handed over"))
                }
                State::Layered(_) => {}
                // Nothing read from it yet: the next process takes it as just accepted.
                State::Pre(p)
                    if movable
                        && c.kind != ListenerKind::Tls
                        && p.client_frames == 0
                        && p.c_rx.is_empty()
                        && p.c_tx.is_empty() =>
                {
                    carry.push(slot)
                }
                State::Pre(_) if expired => {
                    close.push((slot, "restart: the client had not opened its connection"))
                }
                State::Pre(_) => {}
            }
        }
        for (slot, why) in close {
            self.close(slot, why);
        }
        let ids: Vec<u64> = carry
            .iter()
            .filter_map(|&s| self.conns.get(s).map(|c| c.id))
            .collect();
        let mut records = self.shared.registry.take_many(&ids).into_iter();
        let mut carried = Vec::with_capacity(carry.len());
        for slot in carry {
            let record = records.next().flatten();
            if let Some(c) = self.carry(slot, record) {
                carried.push(c);
            }
        }
        if !carried.is_empty() {
            self.shared.handover.leave(carried);
        }
        for (slot, gen) in run {
            if let Some(c) = self.conns.get_mut(slot) {
                if !c.queued {
                    c.queued = true;
                    self.runnable.push_back((slot, gen));
                }
            }
        }
        self.conns.is_empty()
    }

    /// Takes a connection at rest out of this worker, fds and all, without closing it. Its
    /// sockets stay registered with the reactor until the worker exits (a moment later) and
    /// drops it: 9,000 deregistrations cost the pause more than they save, and any event
    /// still reported for them carries a slot generation that matches nothing.
    fn carry(
        &mut self,
        slot: usize,
        reg: Option<crate::registry::ClientRecord>,
    ) -> Option<Carried> {
        let mut conn = self.conns.try_remove(slot)?;
        let daemon = conn.daemon.take();
        let fresh = matches!(conn.state, State::Pre(_));
        // A fresh client's early daemon connection (if any) is just closed.
        let daemon = if fresh { None } else { Some(daemon?) };
        let (client_done, daemon_done, daemon_shut) = match &mut conn.state {
            State::Pre(_) => (false, false, false),
            State::Relay {
                c2d,
                d2c,
                daemon_shut,
                ..
            } => {
                c2d.release(&mut self.pools);
                d2c.release(&mut self.pools);
                (c2d.is_finished(), d2c.is_finished(), *daemon_shut)
            }
            _ => return None,
        };
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
        let (identity, peer_addr, claimed, opened_readonly, timestamp) = match reg {
            Some(r) => (
                r.identity,
                r.peer_addr,
                r.claimed,
                r.opened_readonly,
                r.timestamp,
            ),
            None => (
                Identity::default(),
                None,
                None,
                false,
                crate::registry::now_epoch(),
            ),
        };
        tracing::debug!(conn = conn.id, "connection carried to the next process");
        Some(Carried {
            inheritable: conn.inheritable && !fresh,
            record: ConnRecord {
                id: conn.id,
                kind: conn.kind,
                timestamp,
                age_ms: conn.since.elapsed().as_millis() as u64,
                identity,
                peer_addr,
                claimed,
                opened_readonly,
                uri: conn.uri.take(),
                daemon_path: conn
                    .daemon_path
                    .take()
                    .map(|p| p.to_string_lossy().into_owned()),
                client_done,
                daemon_done,
                daemon_shut,
                ktls: conn.kind == ListenerKind::Tls,
                fresh,
            },
            client: conn.client,
            daemon,
        })
    }

    /// Adopts a connection carried from the previous process: straight into the relay, at
    /// rest. Not driven now: registering a socket reports what its queue already holds (epoll
    /// and io_uring's poll both check readiness as they add it), so only the connections
    /// with bytes waiting cost a step, and 9,000 idle ones cost no reads.
    pub(super) fn adopt_carried(&mut self, client: OwnedFd, resume: Resume) {
        let Resume { record: r, daemon } = resume;
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        let mut c2d = Pump::new(Direction::ToDaemon, &self.pools);
        let mut d2c = Pump::new(Direction::ToClient, &self.pools);
        if r.ktls {
            d2c.cut_writes_at_frames();
            c2d.distrust_short_reads();
        }
        if r.client_done {
            c2d.set_finished();
        }
        if r.daemon_done {
            d2c.set_finished();
        }
        let client_raw = client.as_raw_fd();
        let daemon_raw = daemon.as_fd().as_raw_fd();
        entry.insert(Conn {
            id: r.id,
            gen,
            kind: r.kind,
            queued: false,
            inheritable: inheritable(&client, &daemon),
            tls: None,
            client_readable: false,
            daemon_readable: false,
            client_write_watched: false,
            daemon_write_watched: false,
            client_hup: false,
            daemon_hup: false,
            client,
            daemon: Some(daemon),
            state: State::Relay {
                c2d,
                d2c,
                daemon_shut: r.daemon_shut,
                head: Vec::new(),
                head_cutter: r.ktls.then(FrameCutter::default),
                owed: Default::default(),
            },
            uri: r.uri,
            daemon_path: r.daemon_path.map(Into::into),
            since: Instant::now()
                .checked_sub(Duration::from_millis(r.age_ms))
                .unwrap_or_else(Instant::now),
            unauthenticated: None,
            sasl: None,
            // Counted as accepted by this process (its counters start at the restart).
            meter: self.meter.as_ref().map(|m| m.adopted(r.kind)),
        });
        for (fd, side) in [(client_raw, Side::Accepted), (daemon_raw, Side::Daemon)] {
            if let Err(e) = self
                .reactor
                .add(fd, token(slot, gen, side), Interest::ReadOnly)
            {
                tracing::warn!(conn = r.id, "cannot watch a carried socket: {e}");
                self.close(slot, "reactor registration failed");
                return;
            }
        }
    }
}

/// Clears close-on-exec on a relayed connection's two sockets (see `Conn::inheritable`):
/// true if both are now inheritable. Off the pause: once per connection, as its relay
/// starts. Only `--handover-check` is ever spawned, and it closes what it inherits.
pub(super) fn inheritable(client: &OwnedFd, daemon: &OwnedFd) -> bool {
    crate::sys::set_cloexec(client.as_fd(), false) && crate::sys::set_cloexec(daemon.as_fd(), false)
}
