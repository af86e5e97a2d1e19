//! Tool calls in each family's own markup, parsed out of generated text as it
//! streams.
//!
//! A format names the marker that opens a *section* of tool calls and knows
//! how to read the calls inside it ([`ToolCallFormat::scan`]). The streaming
//! layer ([`ToolCallParser`]) passes text through as content until a section
//! opens (holding back anything that may be the start of its marker), then
//! re-reads the section as it grows and reports each call once its name is
//! known and its arguments as they extend. Formats whose arguments are JSON
//! written by the model (DeepSeek, Kimi) stream them as fragments; formats
//! that spell arguments as XML-like key/value pairs (GLM, MiniMax,
//! DeepSeek's DSML, Qwen3-Coder) report them, converted to a JSON object, when the call closes.

mod json_formats;
#[cfg(test)]
mod tests;
mod xml_formats;

use std::collections::HashMap;

use super::markup::{find_first, partial_marker_len};

/// A tool-call markup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// DeepSeek V3 / R1 (`function<｜tool▁sep｜>name` + fenced JSON) and V3.1 /
    /// V3.2 (`name<｜tool▁sep｜>{json}`), inside `<｜tool▁calls▁begin｜>`.
    DeepSeek,
    /// DeepSeek V3.2 and V4 (DSML): `<｜DSML｜invoke name="f"><｜DSML｜parameter name="k" string="true">v`.
    DeepSeekDsml,
    /// Kimi K2 / K2.5: `<|tool_call_begin|>functions.name:0<|tool_call_argument_begin|>{json}`.
    Kimi,
    /// GLM-4.5 and later: `<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>`.
    Glm,
    /// MiniMax-M2: `<minimax:tool_call><invoke name="f"><parameter name="k">v</parameter></invoke>`.
    MiniMax,
    /// Qwen3 (Hermes style): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
    Hermes,
    /// Qwen3-Coder: `<tool_call><function=f><parameter=k>v</parameter></function></tool_call>`.
    Qwen3Coder,
}

/// `--tool-call-parser` names and the format each selects.
pub const TOOL_CALL_PARSERS: &[(&str, ToolCallFormat)] = &[
    ("deepseek_v3", ToolCallFormat::DeepSeek),
    ("deepseek_v31", ToolCallFormat::DeepSeek),
    ("deepseek_r1", ToolCallFormat::DeepSeek),
    ("deepseek_v32", ToolCallFormat::DeepSeekDsml),
    ("deepseek_v4", ToolCallFormat::DeepSeekDsml),
    ("kimi_k2", ToolCallFormat::Kimi),
    ("glm45", ToolCallFormat::Glm),
    ("glm47", ToolCallFormat::Glm),
    ("minimax_m2", ToolCallFormat::MiniMax),
    ("hermes", ToolCallFormat::Hermes),
    ("qwen3", ToolCallFormat::Hermes),
    ("qwen3_coder", ToolCallFormat::Qwen3Coder),
];

impl ToolCallFormat {
    pub fn from_name(name: &str) -> Option<Self> {
        TOOL_CALL_PARSERS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    /// The format a chat template writes tool calls in, recognised by its
    /// markers (checked most specific first).
    pub fn detect(template_source: &str) -> Option<Self> {
        let t = template_source;
        if t.contains("｜DSML｜") {
            Some(Self::DeepSeekDsml)
        } else if t.contains("<｜tool▁calls▁begin｜>") {
            Some(Self::DeepSeek)
        } else if t.contains("<|tool_calls_section_begin|>") {
            Some(Self::Kimi)
        } else if t.contains("<minimax:tool_call>") {
            Some(Self::MiniMax)
        } else if t.contains("<arg_key>") {
            Some(Self::Glm)
        } else if t.contains("<function=") {
            Some(Self::Qwen3Coder)
        } else if t.contains("<tool_call>") {
            Some(Self::Hermes)
        } else {
            None
        }
    }

    /// Markers that open a section of calls.
    fn section_starts(self) -> &'static [&'static str] {
        match self {
            Self::DeepSeek => &["<｜tool▁calls▁begin｜>"],
            Self::DeepSeekDsml => &["<｜DSML｜function_calls>", "<｜DSML｜tool_calls>"],
            Self::Kimi => &["<|tool_calls_section_begin|>", "<|tool_call_section_begin|>"],
            Self::Glm | Self::Hermes | Self::Qwen3Coder => &["<tool_call>"],
            Self::MiniMax => &["<minimax:tool_call>"],
        }
    }

    /// Reads the calls in `section` (the text after the opening marker).
    /// Once the section is closed (its end marker is there, or `at_eof`: no
    /// more text will come) a call still open ends where the section does,
    /// with the arguments written so far; so a whole text and the same text
    /// in pieces read alike.
    fn scan(self, section: &str, schemas: &ToolSchemas, at_eof: bool) -> SectionScan {
        match self {
            Self::DeepSeek => json_formats::scan_deepseek(section, at_eof),
            Self::Kimi => json_formats::scan_kimi(section, at_eof),
            Self::Hermes => json_formats::scan_hermes(section),
            Self::Glm => xml_formats::scan_glm(section, schemas, at_eof),
            Self::MiniMax => xml_formats::scan_minimax(section, schemas, at_eof),
            Self::DeepSeekDsml => xml_formats::scan_dsml(section, schemas, at_eof),
            Self::Qwen3Coder => xml_formats::scan_qwen3_coder(section, schemas, at_eof),
        }
    }
}

/// Parameter types of the request's tools, which decide whether an
/// XML-spelled value is a string or JSON (`"5"` for a string parameter, `5`
/// for an integer one).
#[derive(Debug, Default, Clone)]
pub struct ToolSchemas {
    types: HashMap<String, HashMap<String, String>>,
}

impl ToolSchemas {
    /// From OpenAI `tools` (`[{"type": "function", "function": {"name", "parameters"}}]`).
    pub fn from_openai_tools(tools: &[serde_json::Value]) -> Self {
        let mut types = HashMap::new();
        for tool in tools {
            let f = tool.get("function").unwrap_or(tool);
            let Some(name) = f.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            let params = f.get("parameters").or_else(|| f.get("input_schema"));
            types.insert(name.to_owned(), property_types(params));
        }
        ToolSchemas { types }
    }

    /// The JSON type of parameter `param` of tool `tool`, when declared.
    pub fn param_type(&self, tool: &str, param: &str) -> Option<&str> {
        self.types.get(tool)?.get(param).map(String::as_str)
    }
}

fn property_types(schema: Option<&serde_json::Value>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Some(props) = schema.and_then(|s| s.get("properties")).and_then(|p| p.as_object()) else {
        return out;
    };
    for (k, v) in props {
        let ty = match v.get("type") {
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            // ["string", "null"]: a string unless it parses as null.
            Some(serde_json::Value::Array(ts)) => ts
                .iter()
                .filter_map(|t| t.as_str())
                .find(|t| *t != "null")
                .map(str::to_owned),
            _ => None,
        };
        if let Some(ty) = ty {
            out.insert(k.clone(), ty);
        }
    }
    out
}

/// One call as far as the section has been read.
#[derive(Debug, Clone, PartialEq)]
struct CallProgress {
    /// Complete: a call is listed only once its name is.
    name: String,
    /// The id the model wrote, for formats that carry one (Kimi).
    id: Option<String>,
    /// The arguments so far; only ever extended as more text arrives.
    arguments: String,
    complete: bool,
}

#[derive(Debug, Default, Clone, PartialEq)]
struct SectionScan {
    calls: Vec<CallProgress>,
    /// Bytes of the section up to and including its closing marker, once seen.
    end: Option<usize>,
}

/// A finished tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedToolCall {
    pub id: String,
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// One streamed piece of a tool call: the first for an index carries its id
/// and name, later ones append to its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallDelta {
    pub index: usize,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// Content and tool-call deltas out of one piece of text.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ToolDelta {
    pub content: String,
    pub tool_calls: Vec<ToolCallDelta>,
}

/// Where the parser is.
enum Mode {
    Content,
    /// Inside a section; `opened_with` is its marker (given back as content if
    /// the section turns out to hold no call).
    Section {
        opened_with: &'static str,
    },
}

pub struct ToolCallParser {
    format: ToolCallFormat,
    schemas: ToolSchemas,
    id_prefix: String,
    mode: Mode,
    /// Content not yet emitted, or the section read so far.
    buf: String,
    /// Calls reported so far: (arguments bytes reported) per call, in order.
    reported: Vec<usize>,
    /// Calls of the current section already reported before it (their index base).
    section_base: usize,
    /// Whitespace-only content held after a section: dropped unless text follows.
    after_calls: bool,
}

impl ToolCallParser {
    /// `id_prefix` makes the ids of calls whose format carries none:
    /// `{id_prefix}{index}` (e.g. `call_3f2a…_0`).
    pub fn new(format: ToolCallFormat, schemas: ToolSchemas, id_prefix: impl Into<String>) -> Self {
        ToolCallParser {
            format,
            schemas,
            id_prefix: id_prefix.into(),
            mode: Mode::Content,
            buf: String::new(),
            reported: Vec::new(),
            section_base: 0,
            after_calls: false,
        }
    }

    pub fn format(&self) -> ToolCallFormat {
        self.format
    }

    /// Whether any call was reported.
    pub fn saw_calls(&self) -> bool {
        !self.reported.is_empty()
    }

    /// Parses more text.
    pub fn push(&mut self, text: &str) -> ToolDelta {
        self.buf.push_str(text);
        let mut out = ToolDelta::default();
        self.advance(&mut out, false);
        out
    }

    /// Ends the text: an unclosed section keeps its complete calls, or goes
    /// back out as content when it has none.
    pub fn finish(&mut self) -> ToolDelta {
        let mut out = ToolDelta::default();
        self.advance(&mut out, true);
        out
    }

    fn advance(&mut self, out: &mut ToolDelta, last: bool) {
        loop {
            match self.mode {
                Mode::Content => {
                    let starts = self.format.section_starts();
                    if let Some((at, marker)) = find_first(&self.buf, starts) {
                        let before = self.buf[..at].to_owned();
                        self.buf.drain(..at + marker.len());
                        self.emit_content(out, &before, false);
                        self.mode = Mode::Section { opened_with: marker };
                        self.section_base = self.reported.len();
                        continue;
                    }
                    let held = if last { 0 } else { partial_marker_len(&self.buf, starts) };
                    let safe = self.buf.len() - held;
                    let text: String = self.buf.drain(..safe).collect();
                    self.emit_content(out, &text, !last);
                    return;
                }
                Mode::Section { opened_with } => {
                    let scan = self.format.scan(&self.buf, &self.schemas, last);
                    let closed = scan.end.is_some() || last;
                    let calls: Vec<&CallProgress> = if closed {
                        // A closed section keeps what was reported plus its complete calls.
                        scan.calls
                            .iter()
                            .enumerate()
                            .filter(|(i, c)| c.complete || self.section_base + i < self.reported.len())
                            .map(|(_, c)| c)
                            .collect()
                    } else {
                        scan.calls.iter().collect()
                    };
                    for (i, call) in calls.iter().enumerate() {
                        self.report(out, self.section_base + i, call);
                    }
                    if !closed {
                        return;
                    }
                    let rest = match scan.end {
                        Some(end) => self.buf.split_off(end),
                        None => String::new(),
                    };
                    if calls.is_empty() {
                        // Not a tool call after all: the text goes out as content.
                        let raw = format!("{opened_with}{}", &self.buf[..scan.end.unwrap_or(self.buf.len())]);
                        self.emit_content(out, &raw, false);
                    } else {
                        self.after_calls = true;
                    }
                    self.buf = rest;
                    self.mode = Mode::Content;
                    if self.buf.is_empty() {
                        return;
                    }
                }
            }
        }
    }

    /// Emits content. Whitespace-only text right after tool calls is not
    /// content: with `hold` it waits in the buffer for what follows (real text
    /// releases it, another section or the end drops it).
    fn emit_content(&mut self, out: &mut ToolDelta, text: &str, hold: bool) {
        if text.is_empty() {
            return;
        }
        if self.after_calls {
            if text.trim().is_empty() {
                if hold {
                    self.buf.insert_str(0, text);
                }
                return;
            }
            self.after_calls = false;
        }
        out.content.push_str(text);
    }

    fn report(&mut self, out: &mut ToolDelta, index: usize, call: &CallProgress) {
        if index == self.reported.len() {
            let id = call.id.clone().unwrap_or_else(|| format!("{}{index}", self.id_prefix));
            out.tool_calls.push(ToolCallDelta {
                index,
                id: Some(id),
                name: Some(call.name.clone()),
                arguments: call.arguments.clone(),
            });
            self.reported.push(call.arguments.len());
        } else if let Some(sent) = self.reported.get_mut(index) {
            if call.arguments.len() > *sent && call.arguments.is_char_boundary(*sent) {
                out.tool_calls.push(ToolCallDelta {
                    index,
                    id: None,
                    name: None,
                    arguments: call.arguments[*sent..].to_owned(),
                });
                *sent = call.arguments.len();
            }
        }
    }
}
