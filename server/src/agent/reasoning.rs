//! Splits a thinking model's output into `reasoning_content` and the answer.
//!
//! Every family we serve marks its reasoning with `<think>` ... `</think>`
//! (DeepSeek-R1 and V3.1 in thinking mode, Qwen3, GLM-4.5 and later,
//! MiniMax-M2, Kimi K2 Thinking / K2.5). Templates differ in who writes the
//! opening tag: some end the prompt with `<think>` (the output starts inside
//! the reasoning), others let the model write it. [`ReasoningParser::new`]
//! takes the rendered prompt to know which. The reasoning is reported without
//! its surrounding whitespace, and the answer without the whitespace that
//! follows `</think>`.

use super::markup::{partial_marker_len, trailing_whitespace_len};

/// A reasoning markup, chosen by `--reasoning-parser` or from the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasoningFormat {
    pub name: &'static str,
    pub start: &'static str,
    pub end: &'static str,
}

const THINK: (&str, &str) = ("<think>", "</think>");

/// Names `--reasoning-parser` accepts (all are the `<think>` markup; the
/// names are those vLLM users know).
pub const REASONING_PARSERS: &[&str] = &["deepseek_r1", "deepseek_v3", "qwen3", "glm45", "minimax_m2", "kimi_k2"];

impl ReasoningFormat {
    pub fn from_name(name: &str) -> Option<Self> {
        let name = REASONING_PARSERS.iter().find(|n| **n == name)?;
        Some(ReasoningFormat {
            name,
            start: THINK.0,
            end: THINK.1,
        })
    }

    /// The format a chat template implies: one that writes `</think>`
    /// belongs to a thinking model.
    pub fn detect(template_source: &str) -> Option<Self> {
        template_source.contains(THINK.1).then_some(ReasoningFormat {
            name: "think",
            start: THINK.0,
            end: THINK.1,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing decided yet: the output may open with the start tag.
    Opening,
    /// Inside the reasoning; `started` once its first non-space was seen.
    Reasoning {
        started: bool,
    },
    /// After the end tag, skipping whitespace before the answer.
    AnswerLead,
    Answer,
}

pub struct ReasoningParser {
    format: ReasoningFormat,
    state: State,
    buf: String,
}

impl ReasoningParser {
    /// `prompt`: the rendered prompt; when it ends inside an open start tag
    /// the output begins as reasoning.
    pub fn new(format: ReasoningFormat, prompt: &str) -> Self {
        let state = if prompt.trim_end().ends_with(format.start) {
            State::Reasoning { started: false }
        } else {
            State::Opening
        };
        ReasoningParser {
            format,
            state,
            buf: String::new(),
        }
    }

    /// Parses more output: `(reasoning delta, answer delta)`.
    pub fn push(&mut self, text: &str) -> (String, String) {
        self.buf.push_str(text);
        let mut reasoning = String::new();
        let mut answer = String::new();
        loop {
            match self.state {
                State::Opening => {
                    let lead = self.buf.trim_start();
                    if let Some(rest) = lead.strip_prefix(self.format.start) {
                        self.buf = rest.to_owned();
                        self.state = State::Reasoning { started: false };
                    } else if self.format.start.starts_with(lead) {
                        return (reasoning, answer);
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Reasoning { started } => {
                    let mut started = started;
                    if !started {
                        let trimmed = self.buf.trim_start().len();
                        self.buf.drain(..self.buf.len() - trimmed);
                        started = !self.buf.is_empty() && !self.buf.starts_with(self.format.end);
                        self.state = State::Reasoning { started };
                    }
                    if let Some(at) = self.buf.find(self.format.end) {
                        reasoning.push_str(self.buf[..at].trim_end());
                        self.buf.drain(..at + self.format.end.len());
                        self.state = State::AnswerLead;
                        continue;
                    }
                    let held = partial_marker_len(&self.buf, &[self.format.end]);
                    let safe = self.buf.len() - held;
                    let safe = safe - trailing_whitespace_len(&self.buf[..safe]);
                    reasoning.push_str(&self.buf[..safe]);
                    self.buf.drain(..safe);
                    return (reasoning, answer);
                }
                State::AnswerLead => {
                    let trimmed = self.buf.trim_start().len();
                    self.buf.drain(..self.buf.len() - trimmed);
                    if self.buf.is_empty() {
                        return (reasoning, answer);
                    }
                    self.state = State::Answer;
                }
                State::Answer => {
                    answer.push_str(&self.buf);
                    self.buf.clear();
                    return (reasoning, answer);
                }
            }
        }
    }

    /// Ends the output: text held back is released where it belongs.
    pub fn finish(&mut self) -> (String, String) {
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Opening | State::Answer => (String::new(), rest),
            State::Reasoning { .. } => (rest.trim_end().to_owned(), String::new()),
            State::AnswerLead => (String::new(), String::new()),
        }
    }

    /// True once the end tag was seen (the answer has begun).
    pub fn in_answer(&self) -> bool {
        matches!(self.state, State::AnswerLead | State::Answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn think() -> ReasoningFormat {
        ReasoningFormat::from_name("qwen3").unwrap()
    }

    /// Whole text, then one character at a time, then in 3-byte-ish chunks: the same split.
    fn split(prompt: &str, output: &str) -> (String, String) {
        let run = |pieces: Vec<String>| {
            let mut p = ReasoningParser::new(think(), prompt);
            let (mut r, mut a) = (String::new(), String::new());
            for piece in pieces {
                let (dr, da) = p.push(&piece);
                r += &dr;
                a += &da;
            }
            let (dr, da) = p.finish();
            (r + &dr, a + &da)
        };
        let whole = run(vec![output.to_owned()]);
        let chars = run(output.chars().map(String::from).collect());
        let mut chunks = Vec::new();
        let mut cur = String::new();
        for (i, c) in output.chars().enumerate() {
            cur.push(c);
            if i % 3 == 2 {
                chunks.push(std::mem::take(&mut cur));
            }
        }
        chunks.push(cur);
        let chunked = run(chunks);
        assert_eq!(whole, chars, "char-by-char differs for {output:?}");
        assert_eq!(whole, chunked, "chunked differs for {output:?}");
        whole
    }

    #[test]
    fn model_written_think_block_is_split_off() {
        let (r, a) = split(
            "<|im_start|>assistant\n",
            "<think>\nStep 1.\nStep 2.\n</think>\n\nThe answer is 4.",
        );
        assert_eq!(r, "Step 1.\nStep 2.");
        assert_eq!(a, "The answer is 4.");
    }

    #[test]
    fn prompt_that_opens_the_block_starts_in_reasoning() {
        let (r, a) = split("<｜Assistant｜><think>", "hmm, 2+2</think>4");
        assert_eq!(r, "hmm, 2+2");
        assert_eq!(a, "4");
    }

    #[test]
    fn output_without_reasoning_is_all_answer() {
        assert_eq!(
            split("x", "Hello <b>world</b>"),
            (String::new(), "Hello <b>world</b>".into())
        );
        assert_eq!(split("x", "  <thin"), (String::new(), "  <thin".into()));
        assert_eq!(
            split("<think>\n\n</think>\n\n", "Plain."),
            (String::new(), "Plain.".into())
        );
    }

    #[test]
    fn cut_off_reasoning_stays_reasoning() {
        let (r, a) = split("<think>", "still thinking </thi");
        assert_eq!(r, "still thinking </thi");
        assert_eq!(a, "");
    }

    #[test]
    fn markers_inside_the_answer_are_left_alone() {
        let (r, a) = split("", "<think>a</think>b </think> <think>c");
        assert_eq!(r, "a");
        assert_eq!(a, "b </think> <think>c");
    }

    #[test]
    fn names_and_detection() {
        assert!(ReasoningFormat::from_name("deepseek_r1").is_some());
        assert!(ReasoningFormat::from_name("nope").is_none());
        assert!(ReasoningFormat::detect("{{ '</think>' }}").is_some());
        assert!(ReasoningFormat::detect("{{ messages }}").is_none());
    }
}
