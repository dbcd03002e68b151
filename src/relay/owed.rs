//! The replies the proxy owes a client for frames it took out of the stream (a client's own
//! CONNECT_SET_IDENTITY, see `conn::client_frame_verdict`), kept bounded.
//!
//! A captured frame leaves nothing to forward, so without a bound a client that writes
//! header-only identity calls and never reads would make the proxy queue an error reply
//! (about four times the frame's size) per frame, as fast as it can write. Both relays keep
//! the frames they captured here, answer them only while the replies already queued toward
//! the client stay under a cap ([`OWED_CAP`] for the splice relay, whose queue toward the
//! client holds only the proxy's own replies), and read the client only when every captured
//! frame is answered and that queue is under the cap. So what one client is owed never
//! exceeds the cap plus one reply, and its unanswered frames never exceed what one read
//! brought in.

/// Replies queued toward a client (answers and the pre-open replies before them) beyond which
/// the proxy stops answering its captured frames and stops reading it, until it reads.
pub const OWED_CAP: usize = 32 * 1024;

#[derive(Debug, Default)]
pub struct Owed {
    /// Captured frames not answered yet, one after the other from `at`, each starting with
    /// its length word.
    unanswered: Vec<u8>,
    at: usize,
    /// Answers made, waiting for the daemon→client stream to reach a frame boundary.
    pub answers: Vec<u8>,
}

/// The frames of a buffer of whole frames, one after the other (as `Tracker::take_captured`
/// gives them). A length word that does not fit ends the walk (the tracker never makes one).
pub fn frames(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let len = frame_len(bytes)?;
        let (frame, rest) = bytes.split_at(len);
        bytes = rest;
        Some(frame)
    })
}

fn frame_len(bytes: &[u8]) -> Option<usize> {
    let word: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let len = u32::from_be_bytes(word) as usize;
    (len >= 4 && len <= bytes.len()).then_some(len)
}

impl Owed {
    /// Frames just captured (whole, one after the other), to be answered in order.
    pub fn push_captured(&mut self, frames: Vec<u8>) {
        if frames.is_empty() {
            return;
        }
        if self.at == self.unanswered.len() {
            self.unanswered = frames;
            self.at = 0;
        } else {
            self.unanswered.extend_from_slice(&frames);
        }
    }

    /// Answers captured frames in order while the answers, plus `queued` bytes already waiting
    /// for the client elsewhere, stay under `cap` ([`OWED_CAP`] where `queued` holds only the
    /// proxy's own replies). True when it answered any.
    pub fn answer(
        &mut self,
        queued: usize,
        cap: usize,
        reply: &mut dyn FnMut(&[u8]) -> Vec<u8>,
    ) -> bool {
        let mut any = false;
        while self.has_room(queued, cap) {
            let Some(len) = frame_len(&self.unanswered[self.at..]) else {
                break;
            };
            let frame = &self.unanswered[self.at..self.at + len];
            self.answers.extend_from_slice(&reply(frame));
            self.at += len;
            any = true;
        }
        if frame_len(&self.unanswered[self.at..]).is_none() {
            // All answered (the tracker only hands over whole frames): free the buffer.
            self.unanswered = Vec::new();
            self.at = 0;
        }
        any
    }

    /// Whether every captured frame is answered.
    pub fn all_answered(&self) -> bool {
        self.at == self.unanswered.len()
    }

    /// Whether what is queued for the client (the answers plus `queued` bytes elsewhere) is
    /// under `cap`.
    pub fn has_room(&self, queued: usize, cap: usize) -> bool {
        self.answers.len() + queued < cap
    }

    /// Whether the client may be read: nothing captured waits for an answer, and there is
    /// room for more.
    pub fn may_read_client(&self, queued: usize, cap: usize) -> bool {
        self.all_answered() && self.has_room(queued, cap)
    }

    /// Nothing captured or answered waits.
    pub fn is_empty(&self) -> bool {
        self.all_answered() && self.answers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f = (len as u32).to_be_bytes().to_vec();
        f.resize(len, tag);
        f
    }

    #[test]
    fn frames_walks_whole_frames_in_order() {
        let mut all = frame(1, 28);
        all.extend(frame(2, 40));
        let got: Vec<&[u8]> = frames(&all).collect();
        assert_eq!(got, vec![&all[..28], &all[28..]]);
        assert_eq!(
            frames(&[0, 0, 0, 9, 1]).count(),
            0,
            "a length past the end stops"
        );
    }

    /// A flood of captured frames is answered only up to the cap; the rest wait (and the
    /// client is not read) until the client takes what it is owed.
    #[test]
    fn answers_stop_at_the_cap_and_resume_when_drained() {
        let mut owed = Owed::default();
        let flood: Vec<u8> = (0..10_000).flat_map(|_| frame(7, 28)).collect();
        owed.push_captured(flood);
        let reply = &mut |f: &[u8]| vec![0u8; f.len() * 4];
        assert!(owed.answer(0, OWED_CAP, reply));
        assert!(
            owed.answers.len() < OWED_CAP + 28 * 4,
            "{}",
            owed.answers.len()
        );
        assert!(!owed.all_answered());
        assert!(!owed.may_read_client(0, OWED_CAP));
        // Queued bytes elsewhere count too: nothing more is answered.
        let before = owed.answers.len();
        owed.answers.clear();
        assert!(!owed.answer(OWED_CAP, OWED_CAP, reply));
        assert_eq!(owed.answers.len(), 0);
        // The client drained everything: answering resumes, and ends.
        let mut rounds = 0;
        while !owed.all_answered() {
            assert!(owed.answer(0, OWED_CAP, reply));
            owed.answers.clear();
            rounds += 1;
        }
        assert!(
            rounds >= 10_000 * 28 * 4 / OWED_CAP - 1,
            "{rounds} rounds, {before}"
        );
        assert!(owed.may_read_client(0, OWED_CAP));
        assert!(owed.is_empty());
    }

    #[test]
    fn frames_captured_later_queue_behind_the_unanswered() {
        let mut owed = Owed::default();
        owed.push_captured(frame(1, 28));
        owed.push_captured(frame(2, 32));
        let mut seen = Vec::new();
        owed.answer(0, OWED_CAP, &mut |f: &[u8]| {
            seen.push(f[4]);
            Vec::new()
        });
        assert_eq!(seen, vec![1, 2]);
        assert!(owed.all_answered());
    }
}
