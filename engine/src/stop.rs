//! Stop strings on streamed text: decides how much of each text delta is safe to emit, holding
//! back what could still turn into a stop string and cutting the output where one completes.

use crate::error::{EngineError, Result};

/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// The stop strings of one request and the text held back while it might begin one.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
    stopped: bool,
    /// Index in `stops` of the stop string that completed.
    matched: Option<usize>,
}

/// What [`StopStrings::push`] lets out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopCheck {
    /// Text safe to emit now.
    pub emit: String,
    /// A stop string completed: `emit` is the last text of the stream.
    pub stopped: bool,
}

impl StopStrings {
    /// Rejects empty strings, more than 16 stops, or any longer than 256 bytes.
    pub fn new(stops: Vec<String>) -> Result<Self> {
        if stops.len() > MAX_STOP_STRINGS {
            return Err(EngineError::InvalidRequest(format!(
                "stop: at most {MAX_STOP_STRINGS} stop strings, got {}",
                stops.len()
            )));
        }
        for s in &stops {
            if s.is_empty() {
                return Err(EngineError::InvalidRequest(
                    "stop: stop strings must not be empty".into(),
                ));
            }
            if s.len() > MAX_STOP_BYTES {
                return Err(EngineError::InvalidRequest(format!(
                    "stop: stop strings must be at most {MAX_STOP_BYTES} bytes, got one of {}",
                    s.len()
                )));
            }
        }
        Ok(StopStrings {
            stops,
            held: String::new(),
            stopped: false,
            matched: None,
        })
    }

    /// The stop strings, as given.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// Whether a stop string has completed; later pushes emit nothing.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The stop string that completed, if one did (the earliest in the text; of two
    /// completing at the same place, the first given).
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// Feed a text delta. Returns the text that is safe to emit now: never any part of a stop
    /// string; text that could be the beginning of a stop string is held back until it can't be.
    /// When a stop string completes, `stopped` is true and `emit` holds the text before it (the
    /// stop string itself and anything after are dropped, as OpenAI does).
    pub fn push(&mut self, delta: &str) -> StopCheck {
        if self.stopped {
            return StopCheck {
                emit: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(delta);
        // Earliest completed stop. Text emitted before never began one (it would have been held),
        // so a match can only start inside `held`.
        let earliest = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, i)) = earliest {
            self.held.truncate(at);
            self.stopped = true;
            self.matched = Some(i);
            return StopCheck {
                emit: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let keep_from = self.hold_start();
        let rest = self.held.split_off(keep_from);
        StopCheck {
            emit: std::mem::replace(&mut self.held, rest),
            stopped: false,
        }
    }

    /// End of stream without a stop: the held-back text.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Byte offset in `held` from which the text could still be the start of a stop string
    /// (`held.len()` when none could). Only char boundaries are candidates, since stop strings
    /// are whole UTF-8.
    fn hold_start(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let lowest = self.held.len().saturating_sub(longest.saturating_sub(1));
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= lowest)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> StopStrings {
        StopStrings::new(s.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    /// Feeds `deltas`; returns everything emitted (with the flush when not stopped), whether it
    /// stopped, and the per-push emits.
    fn feed(st: &mut StopStrings, deltas: &[&str]) -> (String, bool, Vec<String>) {
        let mut out = String::new();
        let mut emits = vec![];
        let mut stopped = false;
        for d in deltas {
            let c = st.push(d);
            out.push_str(&c.emit);
            emits.push(c.emit);
            if c.stopped {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.push_str(&st.flush());
        }
        (out, stopped, emits)
    }

    #[test]
    fn stop_inside_one_delta() {
        let mut st = stops(&["END"]);
        let c = st.push("abc END def");
        assert_eq!(
            c,
            StopCheck {
                emit: "abc ".into(),
                stopped: true
            }
        );
        assert!(st.stopped());
        assert_eq!(
            st.push("more"),
            StopCheck {
                emit: "".into(),
                stopped: true
            }
        );
        assert_eq!(st.flush(), "");
    }

    #[test]
    fn stop_split_across_deltas() {
        let mut st = stops(&["llo"]);
        let c = st.push("Hel");
        assert_eq!(
            c,
            StopCheck {
                emit: "He".into(),
                stopped: false
            }
        ); // "l" could begin "llo"
        let c = st.push("lo world");
        assert_eq!(
            c,
            StopCheck {
                emit: "".into(),
                stopped: true
            }
        );
        let (out, stopped, _) = feed(&mut stops(&["llo"]), &["H", "e", "l", "l", "o", "!"]);
        assert_eq!((out.as_str(), stopped), ("He", true));
    }

    #[test]
    fn a_false_start_is_emitted_in_full() {
        let mut st = stops(&["</s>"]);
        assert_eq!(st.push("a <").emit, "a ");
        assert_eq!(st.push("/").emit, "");
        assert_eq!(st.push("b> c").emit, "</b> c");
        assert_eq!(st.push("<").emit, "");
        assert_eq!(st.flush(), "<");
        // A repeated prefix: "aab" with stop "ab" must not lose the first "a".
        let (out, stopped, emits) = feed(&mut stops(&["ab"]), &["a", "a", "b"]);
        assert_eq!((out.as_str(), stopped), ("a", true));
        assert_eq!(emits, vec!["", "a", ""]);
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped, _) = feed(&mut stops(&["world", "lo w", "o"]), &["Hello world"]);
        assert_eq!((out.as_str(), stopped), ("Hel", true));
        // Across deltas, a longer stop that starts earlier beats a shorter one completing first.
        let (out, stopped, _) = feed(&mut stops(&["xyz", "yz"]), &["a x", "yz b"]);
        assert_eq!((out.as_str(), stopped), ("a ", true));
        let (out, _, emits) = feed(&mut stops(&["abcd", "bc"]), &["ab", "c"]);
        assert_eq!(out, "a");
        assert_eq!(emits, vec!["", "a"]);
    }

    #[test]
    fn multi_byte_characters() {
        let mut st = stops(&["日本語", "é!"]);
        // "日本" could begin a stop: held; "é" too.
        assert_eq!(st.push("こんにちは日本").emit, "こんにちは");
        assert_eq!(st.push("人 café").emit, "日本人 caf");
        assert_eq!(st.push("?").emit, "é?");
        let c = st.push("x 😀日本語 y");
        assert_eq!(
            c,
            StopCheck {
                emit: "x 😀".into(),
                stopped: true
            }
        );
        // Stops that share a leading byte but not a character never hold a partial character.
        let (out, stopped, emits) = feed(&mut stops(&["é"]), &["è", "ê", "e"]);
        assert_eq!((out.as_str(), stopped), ("èêe", false));
        assert_eq!(emits, vec!["è", "ê", "e"]);
    }

    #[test]
    fn no_stops_pass_through() {
        let mut st = stops(&[]);
        for d in ["a", "", "bc ", "日本", "\n"] {
            assert_eq!(
                st.push(d),
                StopCheck {
                    emit: d.into(),
                    stopped: false
                }
            );
        }
        assert_eq!(st.flush(), "");
    }

    #[test]
    fn output_is_the_input_cut_at_the_first_stop() {
        let text = "The end is near. A stop ñ here, then END and more END 🎉 after.";
        let stop_sets: [&[&str]; 5] = [&["END"], &["ñ h", "near"], &["🎉"], &["not there"], &["e", "END"]];
        for set in stop_sets {
            let first = set.iter().filter_map(|s| text.find(s)).min();
            let expect = &text[..first.unwrap_or(text.len())];
            // Every split of the text into deltas of 1..=7 chars gives the same output.
            for width in 1..=7 {
                let chars: Vec<char> = text.chars().collect();
                let deltas: Vec<String> = chars.chunks(width).map(|c| c.iter().collect()).collect();
                let refs: Vec<&str> = deltas.iter().map(String::as_str).collect();
                let (out, stopped, _) = feed(&mut stops(set), &refs);
                assert_eq!(out, expect, "{set:?} width {width}");
                assert_eq!(stopped, first.is_some());
            }
        }
    }

    #[test]
    fn invalid_stops_are_rejected() {
        let bad = |v: Vec<String>| matches!(StopStrings::new(v), Err(EngineError::InvalidRequest(_)));
        assert!(bad(vec!["ok".into(), "".into()]));
        assert!(bad((0..17).map(|i| i.to_string()).collect()));
        assert!(bad(vec!["x".repeat(257)]));
        assert!(!bad((0..16).map(|i| i.to_string()).collect()));
        assert!(!bad(vec!["x".repeat(256)]));
    }
}
