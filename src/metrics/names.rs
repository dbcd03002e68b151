//! Procedure names for metric labels, and the dense slot numbering per-worker call counters
//! are indexed by. Numbers are the identity on the wire; the names come from the table
//! generated from libvirt's protocol definitions ([`super::procedures`]).

use super::procedures::{Program, NAMED_SLOTS, PROGRAMS};

/// Label of every number outside the table (program and procedure alike), so garbage
/// numbers from a client add one series, not one per number.
pub const UNKNOWN: &str = "unknown";

/// Slots of a per-procedure counter array: one per named procedure number, plus
/// [`UNKNOWN_SLOT`].
pub const SLOTS: usize = NAMED_SLOTS + 1;

/// The slot shared by every number the table does not name.
pub const UNKNOWN_SLOT: usize = NAMED_SLOTS;

/// First slot of each program in [`PROGRAMS`] order.
const BASES: [usize; PROGRAMS.len()] = {
    let mut out = [0; PROGRAMS.len()];
    let mut i = 1;
    while i < PROGRAMS.len() {
        out[i] = out[i - 1] + PROGRAMS[i - 1].names.len();
        i += 1;
    }
    out
};

fn program(number: u32) -> Option<(usize, &'static Program)> {
    PROGRAMS
        .iter()
        .enumerate()
        .find(|(_, p)| p.number == number)
}

/// The (program, procedure) labels of a call, e.g. `("remote", "connect_open")`; `None` for a
/// number the table does not name (count it under [`UNKNOWN`]).
pub fn procedure_name(program_number: u32, proc_: i32) -> Option<(&'static str, &'static str)> {
    let (_, p) = program(program_number)?;
    let name = *p.names.get(usize::try_from(proc_).ok()?.checked_sub(1)?)?;
    (!name.is_empty()).then_some((p.label, name))
}

/// The counter slot of a call: a dense index in `0..SLOTS`, [`UNKNOWN_SLOT`] for numbers the
/// table does not name. Cheap enough for the relay (a scan of four program numbers).
#[inline]
pub fn slot(program_number: u32, proc_: i32) -> usize {
    match program(program_number) {
        Some((i, p)) => match usize::try_from(proc_).ok().and_then(|n| n.checked_sub(1)) {
            Some(n) if p.names.get(n).is_some_and(|s| !s.is_empty()) => BASES[i] + n,
            _ => UNKNOWN_SLOT,
        },
        None => UNKNOWN_SLOT,
    }
}

/// The labels of a slot (the inverse of [`slot`]); [`UNKNOWN`] twice for [`UNKNOWN_SLOT`] and
/// anything out of range.
pub fn slot_labels(slot: usize) -> (&'static str, &'static str) {
    for (p, &base) in PROGRAMS.iter().zip(BASES.iter()) {
        if let Some(name) = slot.checked_sub(base).and_then(|n| p.names.get(n)) {
            if !name.is_empty() {
                return (p.label, name);
            }
            break;
        }
    }
    (UNKNOWN, UNKNOWN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::program;

    #[test]
    fn known_procedures_have_libvirts_names() {
        assert_eq!(
            procedure_name(program::REMOTE, 1),
            Some(("remote", "connect_open"))
        );
        assert_eq!(
            procedure_name(program::REMOTE, 66),
            Some(("remote", "auth_list"))
        );
        assert_eq!(
            procedure_name(program::REMOTE, 419),
            Some(("remote", "connect_set_identity"))
        );
        assert_eq!(
            procedure_name(program::QEMU, 1),
            Some(("qemu", "domain_monitor_command"))
        );
        assert_eq!(
            procedure_name(program::LXC, 1),
            Some(("lxc", "domain_open_namespace"))
        );
        assert_eq!(
            procedure_name(program::KEEPALIVE, 2),
            Some(("keepalive", "pong"))
        );
    }

    #[test]
    fn table_program_numbers_are_the_protocols() {
        let numbers: Vec<u32> = PROGRAMS.iter().map(|p| p.number).collect();
        assert_eq!(
            numbers,
            [
                program::REMOTE,
                program::QEMU,
                program::LXC,
                program::KEEPALIVE
            ]
        );
        assert_eq!(super::super::procedures::LIBVIRT_VERSION, "9.0.0");
    }

    #[test]
    fn unknown_numbers_share_one_slot() {
        for (prog, proc_) in [
            (program::REMOTE, 0),
            (program::REMOTE, -1),
            (program::REMOTE, 444),
            (program::REMOTE, i32::MAX),
            (program::LXC, 2),
            (program::KEEPALIVE, 3),
            (program::ADMIN, 1),
            (0xdead_beef, 1),
        ] {
            assert_eq!(procedure_name(prog, proc_), None, "{prog:#x} {proc_}");
            assert_eq!(slot(prog, proc_), UNKNOWN_SLOT, "{prog:#x} {proc_}");
        }
        assert_eq!(slot_labels(UNKNOWN_SLOT), (UNKNOWN, UNKNOWN));
        assert_eq!(slot_labels(usize::MAX), (UNKNOWN, UNKNOWN));
    }

    #[test]
    fn every_named_number_has_its_own_slot_and_back() {
        let mut seen = vec![false; SLOTS];
        for p in PROGRAMS {
            for (i, name) in p.names.iter().enumerate() {
                let n = i32::try_from(i + 1).unwrap();
                let s = slot(p.number, n);
                if name.is_empty() {
                    assert_eq!(s, UNKNOWN_SLOT);
                    continue;
                }
                assert!(s < UNKNOWN_SLOT && !seen[s], "{} {n}", p.label);
                seen[s] = true;
                assert_eq!(slot_labels(s), (p.label, *name));
                assert_eq!(procedure_name(p.number, n), Some((p.label, *name)));
            }
        }
        // Remote alone has 443 procedures in 9.0.0; the table has no holes there.
        assert_eq!(seen.iter().filter(|&&s| s).count(), SLOTS - 1);
    }
}
