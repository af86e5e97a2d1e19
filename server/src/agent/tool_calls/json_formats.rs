//! Formats whose arguments are JSON the model writes itself: DeepSeek and
//! Kimi (arguments streamed as they grow) and Qwen3's Hermes-style
//! `<tool_call>{"name", "arguments"}</tool_call>` (reported when closed).

use super::super::markup::{find_first, partial_marker_len};
use super::{CallProgress, SectionScan};

const DS_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const DS_SEP: &str = "<｜tool▁sep｜>";
const DS_CALL_END: &str = "<｜tool▁call▁end｜>";
const DS_SECTION_END: &str = "<｜tool▁calls▁end｜>";

const KIMI_CALL_BEGIN: &str = "<|tool_call_begin|>";
const KIMI_ARGS_BEGIN: &str = "<|tool_call_argument_begin|>";
const KIMI_CALL_END: &str = "<|tool_call_end|>";
const KIMI_SECTION_ENDS: &[&str] = &["<|tool_calls_section_end|>", "<|tool_call_section_end|>"];

const HERMES_END: &str = "</tool_call>";

/// Where the next call of a section starts, skipping whitespace: `Ok(offset
/// after the call marker)`, `Err(Some(end))` when the section closes there,
/// `Err(None)` when neither is (yet) there.
fn next_call(section: &str, pos: usize, call_begin: &str, section_ends: &[&str]) -> Result<usize, Option<usize>> {
    let rest = &section[pos..];
    let trimmed = rest.trim_start();
    let at = pos + rest.len() - trimmed.len();
    if let Some(end) = section_ends.iter().find(|e| trimmed.starts_with(**e)) {
        return Err(Some(at + end.len()));
    }
    if trimmed.starts_with(call_begin) {
        return Ok(at + call_begin.len());
    }
    Err(None)
}

/// Arguments text at the start of `body`, up to the first of `terminators`:
/// the whole (trimmed) text once a terminator is there, else the part that
/// can no longer change (a possible partial terminator and trailing
/// whitespace held back), so successive results only extend.
fn streamed_args(body: &str, terminators: &[&str]) -> String {
    let end = terminators.iter().filter_map(|t| body.find(t)).min();
    match end {
        Some(end) => body[..end].trim().to_owned(),
        None => {
            let safe = body.len() - partial_marker_len(body, terminators);
            body[..safe].trim().to_owned()
        }
    }
}

/// Where a call's body stops: at its own end marker, at the section's end
/// marker when the model skipped the call's, or at the end of the text once
/// no more will come. `(offset in body, Some(section end marker))`.
fn call_stop<'m>(
    body: &str,
    call_end: &str,
    section_ends: &[&'m str],
    at_eof: bool,
) -> Option<(usize, Option<&'m str>)> {
    let own = body.find(call_end);
    let section = find_first(body, section_ends);
    match (own, section) {
        (Some(c), Some((s, m))) if s < c => Some((s, Some(m))),
        (Some(c), _) => Some((c, None)),
        (None, Some((s, m))) => Some((s, Some(m))),
        (None, None) if at_eof => Some((body.len(), None)),
        (None, None) => None,
    }
}

/// DeepSeek: `<｜tool▁call▁begin｜>HEAD<｜tool▁sep｜>BODY<｜tool▁call▁end｜>` repeated,
/// closed by `<｜tool▁calls▁end｜>`. V3 / R1 write HEAD `function` and BODY
/// `name\n```json\n{...}\n````; V3.1 and later write HEAD `name` and BODY `{...}`.
pub(super) fn scan_deepseek(section: &str, at_eof: bool) -> SectionScan {
    let mut scan = SectionScan::default();
    let mut pos = 0;
    loop {
        let head_start = match next_call(section, pos, DS_CALL_BEGIN, &[DS_SECTION_END]) {
            Ok(at) => at,
            Err(end) => {
                scan.end = end;
                return scan;
            }
        };
        let Some(sep) = section[head_start..].find(DS_SEP) else {
            return scan;
        };
        let head = section[head_start..head_start + sep].trim();
        let body_start = head_start + sep + DS_SEP.len();
        let body = &section[body_start..];
        let stop = call_stop(body, DS_CALL_END, &[DS_SECTION_END], at_eof);
        let call_end = stop.map(|(at, _)| at);
        let before_end = &body[..call_end.unwrap_or(body.len())];
        let fenced =
            head == "function" && !before_end.trim_start().is_empty() && !before_end.trim_start().starts_with('{');
        let (name, args) = if fenced {
            let Some(newline) = before_end.find('\n') else {
                return scan;
            };
            let name = before_end[..newline].trim().to_owned();
            let after_name = &before_end[newline + 1..];
            let args = match after_name.find("```") {
                Some(fence) => match after_name[fence..].find('\n') {
                    Some(nl) => streamed_args(&after_name[fence + nl + 1..], &["```", DS_CALL_END, DS_SECTION_END]),
                    None => String::new(),
                },
                None => String::new(),
            };
            (name, args)
        } else {
            if before_end.trim().is_empty() && call_end.is_none() {
                return scan;
            }
            let args = match call_end {
                Some(_) => before_end.trim().to_owned(),
                None => streamed_args(body, &[DS_CALL_END, DS_SECTION_END]),
            };
            (head.to_owned(), args)
        };
        if name.is_empty() {
            return scan;
        }
        scan.calls.push(CallProgress {
            name,
            id: None,
            arguments: args,
            complete: call_end.is_some(),
        });
        match stop {
            Some((e, Some(section_end))) => {
                scan.end = Some(body_start + e + section_end.len());
                return scan;
            }
            Some((e, None)) if e < body.len() => pos = body_start + e + DS_CALL_END.len(),
            _ => return scan,
        }
    }
}

/// Kimi K2: `<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{...}<|tool_call_end|>`
/// repeated, closed by `<|tool_calls_section_end|>`. The id is the model's own
/// `functions.NAME:IDX`, as Kimi's template expects it back.
pub(super) fn scan_kimi(section: &str, at_eof: bool) -> SectionScan {
    let mut scan = SectionScan::default();
    let mut pos = 0;
    loop {
        let head_start = match next_call(section, pos, KIMI_CALL_BEGIN, KIMI_SECTION_ENDS) {
            Ok(at) => at,
            Err(end) => {
                scan.end = end;
                return scan;
            }
        };
        let Some(args_at) = section[head_start..].find(KIMI_ARGS_BEGIN) else {
            return scan;
        };
        let id = section[head_start..head_start + args_at].trim().to_owned();
        let body_start = head_start + args_at + KIMI_ARGS_BEGIN.len();
        let body = &section[body_start..];
        let stop = call_stop(body, KIMI_CALL_END, KIMI_SECTION_ENDS, at_eof);
        let without_prefix = id.split_once('.').map_or(id.as_str(), |(_, rest)| rest);
        let name = without_prefix
            .rsplit_once(':')
            .map_or(without_prefix, |(n, _)| n)
            .to_owned();
        if name.is_empty() {
            return scan;
        }
        let arguments = match stop {
            Some((e, _)) => body[..e].trim().to_owned(),
            None => streamed_args(body, &[&[KIMI_CALL_END], KIMI_SECTION_ENDS].concat()),
        };
        scan.calls.push(CallProgress {
            name,
            id: Some(id),
            arguments,
            complete: stop.is_some(),
        });
        match stop {
            Some((e, Some(section_end))) => {
                scan.end = Some(body_start + e + section_end.len());
                return scan;
            }
            Some((e, None)) if e < body.len() => pos = body_start + e + KIMI_CALL_END.len(),
            _ => return scan,
        }
    }
}

#[derive(serde::Deserialize)]
struct HermesCall<'a> {
    name: String,
    #[serde(borrow, alias = "parameters")]
    arguments: Option<&'a serde_json::value::RawValue>,
}

/// Qwen3 / Hermes: one call per `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
/// The arguments keep the model's own JSON text (key order included); a
/// string holding JSON is unwrapped.
pub(super) fn scan_hermes(section: &str) -> SectionScan {
    let mut scan = SectionScan::default();
    let Some(end) = section.find(HERMES_END) else {
        return scan;
    };
    scan.end = Some(end + HERMES_END.len());
    let Ok(call) = serde_json::from_str::<HermesCall>(section[..end].trim()) else {
        return scan;
    };
    let arguments = match call.arguments {
        None => "{}".to_owned(),
        Some(raw) => match serde_json::from_str::<String>(raw.get()) {
            Ok(s) => s,
            Err(_) => raw.get().to_owned(),
        },
    };
    if !call.name.is_empty() {
        scan.calls.push(CallProgress {
            name: call.name,
            id: None,
            arguments,
            complete: true,
        });
    }
    scan
}
