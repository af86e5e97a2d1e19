//! Small text helpers the output parsers share: how much of a buffer might be
//! the start of a marker and so must be held back from a stream.

/// Bytes at the end of `text` that are a proper prefix of one of `markers`:
/// text that may turn into a marker once more arrives.
pub fn partial_marker_len(text: &str, markers: &[&str]) -> usize {
    let mut best = 0;
    for marker in markers {
        let longest = marker.len().saturating_sub(1).min(text.len());
        for len in (best + 1..=longest).rev() {
            let start = text.len() - len;
            if text.is_char_boundary(start) && marker.starts_with(&text[start..]) {
                best = len;
                break;
            }
        }
    }
    best
}

/// The earliest occurrence of any of `markers` in `text`: (offset, marker).
pub fn find_first<'m>(text: &str, markers: &[&'m str]) -> Option<(usize, &'m str)> {
    markers
        .iter()
        .filter_map(|m| text.find(m).map(|at| (at, *m)))
        .min_by_key(|(at, m)| (*at, std::cmp::Reverse(m.len())))
}

/// Bytes of trailing whitespace in `text`.
pub fn trailing_whitespace_len(text: &str) -> usize {
    text.len() - text.trim_end().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_markers_are_held_back() {
        assert_eq!(partial_marker_len("hello <th", &["<think>"]), 3);
        assert_eq!(partial_marker_len("hello <think>", &["<think>"]), 0);
        assert_eq!(partial_marker_len("a <", &["<think>", "</think>"]), 1);
        assert_eq!(partial_marker_len("a </", &["<think>", "</think>"]), 2);
        assert_eq!(
            partial_marker_len("x<｜tool", &["<｜tool▁calls▁begin｜>"]),
            "<｜tool".len()
        );
        assert_eq!(partial_marker_len("", &["<a>"]), 0);
    }

    #[test]
    fn first_marker_prefers_the_earliest_then_the_longest() {
        assert_eq!(find_first("ab<x>c<y>", &["<y>", "<x>"]), Some((2, "<x>")));
        assert_eq!(find_first("ab<xy>", &["<x", "<xy>"]), Some((2, "<xy>")));
        assert_eq!(find_first("abc", &["<x>"]), None);
    }
}
