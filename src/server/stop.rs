//! Stop strings over a reply that arrives in pieces.
//!
//! A stop string can straddle pieces, so text that could be the start of one is held back
//! until the next piece says whether it is; the stop string itself is never emitted.

/// Feeds reply text through the stop strings.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    /// Text received but not released: a suffix that may begin a stop string.
    held: String,
    stopped: bool,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> StopText {
        StopText {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has matched (nothing more is released after it).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next piece; returns the text that can be released now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        // The earliest match wins: text after it was never meant to be said.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        let keep = self.partial_suffix();
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// What is still held at the end of the reply (no stop string followed).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop string.
    fn partial_suffix(&self) -> usize {
        let h = &self.held;
        let mut best = 0;
        for s in &self.stops {
            let most = (s.len() - 1).min(h.len());
            for n in (best + 1..=most).rev() {
                let start = h.len() - n;
                if h.is_char_boundary(start) && s.starts_with(&h[start..]) {
                    best = n;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::StopText;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            out += &s.push(p);
        }
        if !s.stopped() {
            out += &s.finish();
        }
        (out, s.stopped())
    }

    #[test]
    fn a_stop_string_across_pieces_is_cut_and_not_emitted() {
        assert_eq!(
            run(&["END"], &["he", "llo E", "N", "D more"]),
            ("hello ".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn text_that_only_looks_like_a_start_is_released() {
        assert_eq!(run(&["END"], &["E", "N", "x"]), ("ENx".into(), false));
        // Held back while it may be a stop string, released at the end of the reply.
        let mut s = StopText::new(vec!["END".into()]);
        assert_eq!(s.push("abc E"), "abc ");
        assert_eq!(s.push("N"), "");
        assert_eq!(s.finish(), "EN");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_without_stops_all_passes() {
        assert_eq!(run(&["b", "a"], &["xab"]), ("x".into(), true));
        assert_eq!(run(&[], &["é", "ü"]), ("éü".into(), false));
        // A multi-byte stop string is matched on character boundaries.
        assert_eq!(run(&["éé"], &["aé", "é!"]), ("a".into(), true));
    }
}
