//! The content blocks of a Messages response: `thinking`, `text` and
//! `tool_use`, whole ([`content_blocks`]) or as the stream's
//! `content_block_start` / `content_block_delta` / `content_block_stop`
//! events ([`BlockStream`]), which assemble to the same blocks.

use serde_json::{json, Value};

use crate::agent::{OutputDelta, ParsedOutput};

/// A tool call's arguments as the `input` object (an unparsable or
/// non-object argument text, from a cut-off output, becomes `{}`).
fn input_of(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({}),
    }
}

/// The whole response's `content`: thinking, then text, then tool uses; an
/// output with none of them is one empty text block.
pub(super) fn content_blocks(out: &ParsedOutput) -> Vec<Value> {
    let mut blocks = Vec::new();
    if !out.reasoning.is_empty() {
        blocks.push(json!({"type": "thinking", "thinking": out.reasoning, "signature": ""}));
    }
    if !out.content.is_empty() || (blocks.is_empty() && out.tool_calls.is_empty()) {
        blocks.push(json!({"type": "text", "text": out.content}));
    }
    for c in &out.tool_calls {
        blocks.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input_of(&c.arguments)}));
    }
    blocks
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    Thinking,
    Text,
    /// A tool use, by its call index.
    Tool(usize),
}

/// Turns output deltas into content-block events, one block open at a time.
#[derive(Default)]
pub(super) struct BlockStream {
    open: Option<Open>,
    /// Index of the open (or next) block.
    index: usize,
    started_any: bool,
}

/// `(event name, data)`.
pub(super) type BlockEvent = (&'static str, Value);

impl BlockStream {
    fn start(&mut self, kind: Open, block: Value, out: &mut Vec<BlockEvent>) {
        self.close(out);
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": self.index, "content_block": block}),
        ));
        self.open = Some(kind);
        self.started_any = true;
    }

    fn close(&mut self, out: &mut Vec<BlockEvent>) {
        if let Some(open) = self.open.take() {
            if open == Open::Thinking {
                out.push(self.delta(json!({"type": "signature_delta", "signature": ""})));
            }
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": self.index}),
            ));
            self.index += 1;
        }
    }

    fn delta(&self, delta: Value) -> BlockEvent {
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.index, "delta": delta}),
        )
    }

    /// Events for one delta of output. Within one delta, fragments of a call
    /// already open come first (the text that closes a call follows it), then
    /// reasoning, text, and calls that start here.
    pub(super) fn push(&mut self, d: &OutputDelta) -> Vec<BlockEvent> {
        let mut out = Vec::new();
        let (continuing, starting): (Vec<_>, Vec<_>) = d.tool_calls.iter().partition(|c| c.id.is_none());
        for call in continuing {
            if self.open == Some(Open::Tool(call.index)) && !call.arguments.is_empty() {
                out.push(self.delta(json!({"type": "input_json_delta", "partial_json": call.arguments})));
            }
        }
        if !d.reasoning.is_empty() {
            if self.open != Some(Open::Thinking) {
                self.start(Open::Thinking, json!({"type": "thinking", "thinking": ""}), &mut out);
            }
            out.push(self.delta(json!({"type": "thinking_delta", "thinking": d.reasoning})));
        }
        if !d.content.is_empty() {
            if self.open != Some(Open::Text) {
                self.start(Open::Text, json!({"type": "text", "text": ""}), &mut out);
            }
            out.push(self.delta(json!({"type": "text_delta", "text": d.content})));
        }
        for call in starting {
            let block = json!({"type": "tool_use", "id": call.id.clone().unwrap_or_default(),
                               "name": call.name.clone().unwrap_or_default(), "input": {}});
            self.start(Open::Tool(call.index), block, &mut out);
            if !call.arguments.is_empty() {
                out.push(self.delta(json!({"type": "input_json_delta", "partial_json": call.arguments})));
            }
        }
        out
    }

    /// Closes the last block (an output that made none gets one empty text block).
    pub(super) fn finish(&mut self) -> Vec<BlockEvent> {
        let mut out = Vec::new();
        if !self.started_any {
            self.start(Open::Text, json!({"type": "text", "text": ""}), &mut out);
        }
        self.close(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ToolCallDelta;

    /// Rebuilds the blocks from events the way a client accumulates them.
    fn assemble(events: &[BlockEvent]) -> Vec<Value> {
        let mut blocks: Vec<Value> = Vec::new();
        let mut partial = String::new();
        for (name, data) in events {
            match *name {
                "content_block_start" => {
                    blocks.push(data["content_block"].clone());
                    partial.clear();
                }
                "content_block_delta" => {
                    let b = blocks.last_mut().unwrap();
                    let d = &data["delta"];
                    match d["type"].as_str().unwrap() {
                        "text_delta" => {
                            b["text"] = json!(format!(
                                "{}{}",
                                b["text"].as_str().unwrap(),
                                d["text"].as_str().unwrap()
                            ))
                        }
                        "thinking_delta" => {
                            b["thinking"] = json!(format!(
                                "{}{}",
                                b["thinking"].as_str().unwrap(),
                                d["thinking"].as_str().unwrap()
                            ))
                        }
                        "signature_delta" => b["signature"] = d["signature"].clone(),
                        "input_json_delta" => partial.push_str(d["partial_json"].as_str().unwrap()),
                        other => panic!("{other}"),
                    }
                }
                "content_block_stop" => {
                    let b = blocks.last_mut().unwrap();
                    if b["type"] == "tool_use" {
                        b["input"] = serde_json::from_str(&partial).unwrap();
                    }
                }
                _ => {}
            }
        }
        blocks
    }

    #[test]
    fn streamed_blocks_assemble_to_the_whole_response() {
        // The last delta finishes call 0 and starts call 1 (text that closes one call and
        // opens the next arrives in one piece).
        let deltas = vec![
            OutputDelta {
                reasoning: "Let me ".into(),
                ..Default::default()
            },
            OutputDelta {
                reasoning: "check.".into(),
                content: "Checking".into(),
                ..Default::default()
            },
            OutputDelta {
                tool_calls: vec![ToolCallDelta {
                    index: 0,
                    id: Some("toolu_0".into()),
                    name: Some("get_weather".into()),
                    arguments: "{\"city\": ".into(),
                }],
                ..Default::default()
            },
            OutputDelta {
                tool_calls: vec![
                    ToolCallDelta {
                        index: 0,
                        id: None,
                        name: None,
                        arguments: "\"Oslo\"}".into(),
                    },
                    ToolCallDelta {
                        index: 1,
                        id: Some("toolu_1".into()),
                        name: Some("ping".into()),
                        arguments: "{}".into(),
                    },
                ],
                ..Default::default()
            },
        ];
        let mut whole = ParsedOutput::default();
        let mut stream = BlockStream::default();
        let mut events = Vec::new();
        for d in deltas {
            events.extend(stream.push(&d));
            whole.absorb(d);
        }
        events.extend(stream.finish());
        assert_eq!(assemble(&events), content_blocks(&whole));
        assert!(
            events.iter().all(|(_, d)| d["content_block"]["id"] != ""),
            "a tool_use block without an id"
        );
        let indices: Vec<u64> = events
            .iter()
            .filter(|(n, _)| *n == "content_block_start")
            .map(|(_, d)| d["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indices, [0, 1, 2, 3]);
    }

    #[test]
    fn text_after_a_call_in_the_same_delta_does_not_split_the_call() {
        let mut stream = BlockStream::default();
        let mut events = stream.push(&OutputDelta {
            tool_calls: vec![ToolCallDelta {
                index: 0,
                id: Some("toolu_0".into()),
                name: Some("f".into()),
                arguments: "{\"a\": ".into(),
            }],
            ..Default::default()
        });
        events.extend(stream.push(&OutputDelta {
            content: "Done".into(),
            tool_calls: vec![ToolCallDelta {
                index: 0,
                id: None,
                name: None,
                arguments: "1}".into(),
            }],
            ..Default::default()
        }));
        events.extend(stream.finish());
        let blocks = assemble(&events);
        assert_eq!(
            blocks,
            vec![
                json!({"type": "tool_use", "id": "toolu_0", "name": "f", "input": {"a": 1}}),
                json!({"type": "text", "text": "Done"})
            ]
        );
    }

    #[test]
    fn an_empty_output_is_one_empty_text_block() {
        let mut stream = BlockStream::default();
        let events = stream.finish();
        assert_eq!(assemble(&events), vec![json!({"type": "text", "text": ""})]);
        assert_eq!(
            content_blocks(&ParsedOutput::default()),
            vec![json!({"type": "text", "text": ""})]
        );
    }
}
