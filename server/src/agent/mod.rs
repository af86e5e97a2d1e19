//! What an agent reads out of a model's generated text: the reasoning
//! (`<think>...</think>`), the answer, and tool calls in each family's own
//! markup, split incrementally so a stream never shows markup as content.
//!
//! [`OutputParser`] chains a [`ReasoningParser`] and a [`ToolCallParser`];
//! both take text deltas in any chunking (a character, a token, the whole
//! output) and give the same assembled result.

pub mod reasoning;
pub mod tool_calls;

mod markup;

pub use reasoning::{ReasoningFormat, ReasoningParser};
pub use tool_calls::{ParsedToolCall, ToolCallDelta, ToolCallFormat, ToolCallParser, ToolSchemas};

/// One step's worth of parsed output.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OutputDelta {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ToolCallDelta>,
}

impl OutputDelta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.tool_calls.is_empty()
    }
}

/// A whole output, assembled from its deltas.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ParsedOutput {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ParsedToolCall>,
}

impl ParsedOutput {
    /// Adds one delta (tool-call fragments are joined by index).
    pub fn absorb(&mut self, delta: OutputDelta) {
        self.reasoning.push_str(&delta.reasoning);
        self.content.push_str(&delta.content);
        for d in delta.tool_calls {
            if d.index == self.tool_calls.len() {
                self.tool_calls.push(ParsedToolCall {
                    id: d.id.unwrap_or_default(),
                    name: d.name.unwrap_or_default(),
                    arguments: d.arguments,
                });
            } else if let Some(call) = self.tool_calls.get_mut(d.index) {
                call.arguments.push_str(&d.arguments);
            }
        }
    }
}

/// Reasoning first, then tool calls in what is left; either may be off.
pub struct OutputParser {
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolCallParser>,
}

impl OutputParser {
    pub fn new(reasoning: Option<ReasoningParser>, tools: Option<ToolCallParser>) -> Self {
        OutputParser { reasoning, tools }
    }

    /// Parses the next piece of generated text.
    pub fn push(&mut self, text: &str) -> OutputDelta {
        let (reasoning, content) = match self.reasoning.as_mut() {
            Some(r) => r.push(text),
            None => (String::new(), text.to_owned()),
        };
        self.route(reasoning, content, false)
    }

    /// Ends the output: flushes whatever was held back.
    pub fn finish(&mut self) -> OutputDelta {
        let (reasoning, content) = match self.reasoning.as_mut() {
            Some(r) => r.finish(),
            None => (String::new(), String::new()),
        };
        self.route(reasoning, content, true)
    }

    fn route(&mut self, reasoning: String, content: String, last: bool) -> OutputDelta {
        match self.tools.as_mut() {
            Some(t) => {
                let mut d = t.push(&content);
                if last {
                    let tail = t.finish();
                    d.content.push_str(&tail.content);
                    d.tool_calls.extend(tail.tool_calls);
                }
                OutputDelta {
                    reasoning,
                    content: d.content,
                    tool_calls: d.tool_calls,
                }
            }
            None => OutputDelta {
                reasoning,
                content,
                tool_calls: Vec::new(),
            },
        }
    }

    /// Parses a whole output at once.
    pub fn parse_all(mut self, text: &str) -> ParsedOutput {
        let mut out = ParsedOutput::default();
        out.absorb(self.push(text));
        out.absorb(self.finish());
        out
    }
}
