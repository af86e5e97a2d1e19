//! Chat-template rendering checked against transformers/jinja2 output on the fixture and the real DeepSeek-V3 template, and the checks a conversation must pass.

use super::*;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/deepseek-v3"))
}

fn real_deepseek_v3() -> ChatTemplate {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/deepseek-v3-tokenizer_config.json"
    );
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let p = Path::new(path);
    ChatTemplate::new(
        cfg["chat_template"].as_str().unwrap(),
        special_token(&cfg, "bos_token", p).unwrap(),
        special_token(&cfg, "eos_token", p).unwrap(),
    )
    .unwrap()
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn chat_template_fixture_matches_transformers() {
    let t = ChatTemplate::from_model_dir(&fixture_dir()).unwrap().unwrap();
    assert_eq!(t.bos_token(), Some("<｜begin▁of▁sentence｜>"));
    assert_eq!(t.eos_token(), Some("<｜end▁of▁sentence｜>"));
    let messages = [
        msg("system", "Be brief."),
        msg("user", "Hi there"),
        msg("assistant", "Hello!"),
        msg("user", "Ça va? 🙂"),
    ];
    // tests/fixtures/summary.json -> tokenizer.chat_example.rendered
    assert_eq!(
        t.render(&messages, true).unwrap(),
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi there<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>Ça va? 🙂<｜Assistant｜>"
    );
}

// Expected strings below were produced by Python jinja2 3.1.6 set up as
// transformers does (run from /work/main, script saved as /tmp/ref.py):
//
//   import json, sys, jinja2, jinja2.sandbox, jinja2.ext
//   cfg = json.load(open("server/tests/data/deepseek-v3-tokenizer_config.json"))
//   def raise_exception(m): raise jinja2.exceptions.TemplateError(m)
//   env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
//       lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
//   env.globals["raise_exception"] = raise_exception
//   t = env.from_string(cfg["chat_template"])
//   msgs = json.loads(sys.argv[1]); agp = sys.argv[2] == "1"
//   print(json.dumps(t.render(messages=msgs, tools=None, documents=None,
//       add_generation_prompt=agp, bos_token=cfg["bos_token"]["content"],
//       eos_token=cfg["eos_token"]["content"]), ensure_ascii=False))
//
//   python3 /tmp/ref.py '[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is 2+2?"},{"role":"assistant","content":"4."},{"role":"user","content":"And 3+3?\nAnswer briefly 🙂"}]' 1
//   python3 /tmp/ref.py '[{"role":"system","content":"Rule one."},{"role":"system","content":"Rule two."},{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello."}]' 0
#[test]
fn chat_template_real_deepseek_v3_matches_jinja2() {
    let t = real_deepseek_v3();
    let messages = [
        msg("system", "You are a helpful assistant."),
        msg("user", "What is 2+2?"),
        msg("assistant", "4."),
        msg("user", "And 3+3?\nAnswer briefly 🙂"),
    ];
    assert_eq!(
        t.render(&messages, true).unwrap(),
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜>4.<｜end▁of▁sentence｜><｜User｜>And 3+3?\nAnswer briefly 🙂<｜Assistant｜>"
    );

    let messages = [
        msg("system", "Rule one."),
        msg("system", "Rule two."),
        msg("user", "Hi"),
        msg("assistant", "Hello."),
    ];
    assert_eq!(
        t.render(&messages, false).unwrap(),
        "<｜begin▁of▁sentence｜>Rule one.\n\nRule two.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜>"
    );
}

#[test]
fn chat_template_real_deepseek_v3_loads_from_dir_with_added_token_objects() {
    let dir = tmpdir();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/deepseek-v3-tokenizer_config.json"
        ),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.bos_token(), Some("<｜begin▁of▁sentence｜>"));
    assert_eq!(t.eos_token(), Some("<｜end▁of▁sentence｜>"));
    assert_eq!(
        t.render(&[msg("user", "x")], true).unwrap(),
        "<｜begin▁of▁sentence｜><｜User｜>x<｜Assistant｜>"
    );
}

#[test]
fn chat_template_list_of_parts_content() {
    let t = ChatTemplate::from_model_dir(&fixture_dir()).unwrap().unwrap();
    let messages: Vec<ChatMessage> = serde_json::from_str(
        r#"[{"role":"user","content":[{"type":"text","text":"Hello, "},{"type":"text","text":"world"}]},
            {"role":"assistant","content":""},
            {"role":"user","content":"again","name":"bob"}]"#,
    )
    .unwrap();
    assert_eq!(
        messages[0].content,
        Some(MessageContent::Parts(vec![
            ContentPart::text("Hello, "),
            ContentPart::text("world")
        ]))
    );
    assert_eq!(messages[2].name.as_deref(), Some("bob"));
    assert_eq!(
        t.render(&messages, false).unwrap(),
        "<｜begin▁of▁sentence｜><｜User｜>Hello, world<｜Assistant｜><｜end▁of▁sentence｜><｜User｜>again"
    );

    let bad: Vec<ChatMessage> = serde_json::from_str(
        r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://x/y.png"}}]}]"#,
    )
    .unwrap();
    match t.render(&bad, true) {
        Err(ChatTemplateError::InvalidMessage(m)) => assert!(m.contains("image_url"), "{m}"),
        other => panic!("expected InvalidMessage, got {other:?}"),
    }
    // Round-trips through serde unchanged.
    let json = serde_json::to_string(&bad).unwrap();
    assert_eq!(serde_json::from_str::<Vec<ChatMessage>>(&json).unwrap(), bad);
}

#[test]
fn chat_template_rejects_empty_and_unknown_roles() {
    let t = ChatTemplate::new("{{ messages | length }}", None, None).unwrap();
    match t.render(&[], true) {
        Err(ChatTemplateError::InvalidMessage(m)) => assert!(m.contains("at least one"), "{m}"),
        other => panic!("expected InvalidMessage, got {other:?}"),
    }
    match t.render(&[msg("user", "a"), msg("wizard", "b")], true) {
        Err(ChatTemplateError::InvalidMessage(m)) => assert!(m.contains("wizard"), "{m}"),
        other => panic!("expected InvalidMessage, got {other:?}"),
    }
    for role in VALID_ROLES.iter().filter(|r| **r != "tool") {
        assert_eq!(t.render(&[msg(role, "a")], true).unwrap(), "1");
    }
}

#[test]
fn chat_template_raise_exception_is_render_error() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('Tool messages are not supported: ' + m.content) }}{% endif %}{{ m.content }}{% endfor %}",
        None,
        None,
    )
    .unwrap();
    assert_eq!(t.render(&[msg("user", "ok")], false).unwrap(), "ok");
    let call: ChatMessage = serde_json::from_value(serde_json::json!(
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    ))
    .unwrap();
    let result = ChatMessage {
        tool_call_id: Some("c1".into()),
        ..msg("tool", "42")
    };
    match t.render(&[msg("user", "ok"), call, result], false) {
        Err(ChatTemplateError::Render(m)) => {
            assert_eq!(m, "Tool messages are not supported: 42")
        }
        other => panic!("expected Render, got {other:?}"),
    }
    // Other runtime failures are Render errors too.
    let t = ChatTemplate::new("{{ messages[0].content.nope.deeper }}", None, None).unwrap();
    assert!(matches!(
        t.render(&[msg("user", "a")], false),
        Err(ChatTemplateError::Render(_))
    ));
}

#[test]
fn chat_template_syntax_error() {
    assert!(matches!(
        ChatTemplate::new("{% for m in messages %}", None, None),
        Err(ChatTemplateError::Syntax(_))
    ));
    assert!(matches!(
        ChatTemplate::new("{{ ", None, None),
        Err(ChatTemplateError::Syntax(_))
    ));
}

/// The fuzzer's find (fuzz/corpus/chat_template/namespace_cycle*): a namespace stored in
/// itself leaked, and printing it overflowed the stack. Such templates are refused at load.
#[test]
fn chat_template_refuses_namespaces_used_as_values() {
    for source in [
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns %}{% endfor %}",
        "{% set ns = namespace(n=0) %}{% set ns.n = ns %}{{ ns }}{{ ns|tojson }}",
    ] {
        match ChatTemplate::new(source, None, None) {
            Err(ChatTemplateError::Refused(m)) => assert!(m.contains("namespace `ns` is used as a value"), "{m}"),
            other => panic!("{source}: {other:?}"),
        }
    }
}

#[test]
fn chat_template_whitespace_control_like_transformers() {
    // trim_blocks + lstrip_blocks: block tags on their own lines leave no
    // blank lines or indentation; a single trailing newline is dropped.
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n<u>{{ m.content }}</u>\n    {% else %}\n<a>{{ m.content }}</a>\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n<a>\n{% endif %}\n";
    let t = ChatTemplate::new(src, None, None).unwrap();
    // jinja2 ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    // renders this to exactly the same string.
    assert_eq!(
        t.render(&[msg("user", "q"), msg("assistant", "r")], true).unwrap(),
        "<u>q</u>\n<a>r</a>\n<a>\n"
    );
}

#[test]
fn chat_template_context_and_helpers() {
    // Booleans print as Python's True/False (as in jinja2).
    // Undefined special tokens print as nothing; tools/documents are none;
    // missing attributes are falsy; pycompat string methods; namespace().
    let src = "[{{ bos_token }}|{{ tools is none }}|{{ documents is none }}|{{ messages[0].tool_calls is defined }}]\
{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ m.content.strip().upper() }}{% if m.name %}({{ m.name }}){% endif %};{% endfor %}{{ ns.n }}\
{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
    let t = ChatTemplate::new(src, None, None).unwrap();
    let mut named = msg("user", " hi ");
    named.name = Some("ann".to_owned());
    assert_eq!(
        t.render(&[named, msg("assistant", "yo ")], false).unwrap(),
        "[|True|True|False]HI(ann);YO;2a=1"
    );
}

#[test]
fn chat_template_tojson_matches_python_json_dumps() {
    let t = ChatTemplate::new(
        "{{ messages[0] | tojson }}|{{ {'b': [1, 2.5, 3.0, none, true], 'a': 'é<&>\"'} | tojson(sort_keys=true) }}|{{ {'x': [1, {}], 'y': []} | tojson(indent=2) }}|{{ 'é' | tojson(ensure_ascii=true) }}",
        None,
        None,
    )
    .unwrap();
    // Python: json.dumps(..., ensure_ascii=False) with the same arguments.
    assert_eq!(
        t.render(&[msg("user", "Ça\nva")], false).unwrap(),
        "{\"role\": \"user\", \"content\": \"Ça\\nva\"}|{\"a\": \"é<&>\\\"\", \"b\": [1, 2.5, 3.0, null, true]}|{\n  \"x\": [\n    1,\n    {}\n  ],\n  \"y\": []\n}|\"\\u00e9\""
    );
}

// jinja2's loopcontrols extension, which transformers enables. minijinja
// only parses {% break %} / {% continue %} with its `loop_controls`
// feature, which the workspace Cargo.toml has to turn on.
#[test]
fn chat_template_loop_controls() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% if m.content == 'stop' %}{% break %}{% endif %}{{ m.content }};{% endfor %}",
        None,
        None,
    )
    .unwrap();
    let msgs = [
        msg("system", "s"),
        msg("user", "a"),
        msg("user", "stop"),
        msg("user", "b"),
    ];
    assert_eq!(t.render(&msgs, false).unwrap(), "a;");
}

#[test]
fn chat_template_no_file_access() {
    let t = ChatTemplate::new("{% include 'tokenizer_config.json' %}", None, None).unwrap();
    assert!(matches!(
        t.render(&[msg("user", "a")], false),
        Err(ChatTemplateError::Render(_))
    ));
    let t = ChatTemplate::new("{% import 'x.j2' as x %}", None, None).unwrap();
    assert!(matches!(
        t.render(&[msg("user", "a")], false),
        Err(ChatTemplateError::Render(_))
    ));
}

#[test]
fn chat_template_strftime() {
    // 2024-02-29 13:05:09 UTC, a Thursday.
    let ts = 1_709_211_909;
    assert_eq!(
        format_time(ts, "%Y-%m-%d %H:%M:%S %d %b %B %a %A %j %y %I%p %% %Q"),
        "2024-02-29 13:05:09 29 Feb February Thu Thursday 060 24 01PM % %Q"
    );
    assert_eq!(format_time(0, "%d %b %Y"), "01 Jan 1970");
    assert_eq!(format_time(951_782_400, "%F"), "2000-02-29");
    assert_eq!(format_time(1_735_689_599, "%F %T %j"), "2024-12-31 23:59:59 366");
    let t = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap();
    let year: i64 = t.render(&[msg("user", "a")], false).unwrap().parse().unwrap();
    assert!(year >= 2024);
}

#[test]
fn chat_template_from_model_dir_sources() {
    // No template at all -> None.
    let dir = tmpdir();
    assert!(ChatTemplate::from_model_dir(dir.path()).unwrap().is_none());
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>"}}"#,
    )
    .unwrap();
    assert!(ChatTemplate::from_model_dir(dir.path()).unwrap().is_none());

    // List form: the "default" entry.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>"},
            "chat_template": [{"name": "tool_use", "template": "T"},
                              {"name": "default", "template": "D{{ bos_token }}{{ eos_token }}"}]}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.render(&[msg("user", "a")], false).unwrap(), "D<s></s>");

    // chat_template.jinja wins over tokenizer_config.json.
    std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}\n").unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.render(&[msg("user", "a")], false).unwrap(), "J</s>");

    // List form without "default" -> Missing.
    let dir = tmpdir();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#,
    )
    .unwrap();
    assert!(matches!(
        ChatTemplate::from_model_dir(dir.path()),
        Err(ChatTemplateError::Missing(_))
    ));

    // Broken JSON -> Syntax; broken template -> Syntax; no dir -> Missing.
    std::fs::write(dir.path().join("tokenizer_config.json"), "{").unwrap();
    assert!(matches!(
        ChatTemplate::from_model_dir(dir.path()),
        Err(ChatTemplateError::Syntax(_))
    ));
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% if %}"}"#,
    )
    .unwrap();
    assert!(matches!(
        ChatTemplate::from_model_dir(dir.path()),
        Err(ChatTemplateError::Syntax(_))
    ));
    assert!(matches!(
        ChatTemplate::from_model_dir(&dir.path().join("nope")),
        Err(ChatTemplateError::Missing(_))
    ));
}

#[test]
fn chat_template_runaway_loops_run_out_of_fuel() {
    // 10^10 iterations: without a fuel budget this would spin for hours.
    let t = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        None,
        None,
    )
    .unwrap();
    let start = std::time::Instant::now();
    match t.render(&[msg("user", "a")], false) {
        Err(ChatTemplateError::Render(m)) => assert!(m.contains("fuel"), "{m}"),
        other => panic!("expected an out-of-fuel Render error, got {other:?}"),
    }
    // Generous bound for a debug build on a loaded 2-core machine.
    assert!(
        start.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    // Unbounded recursion is cut off by minijinja's recursion limit, not a stack overflow.
    let t = ChatTemplate::new("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", None, None).unwrap();
    assert!(matches!(
        t.render(&[msg("user", "a")], false),
        Err(ChatTemplateError::Render(_))
    ));
}

#[test]
fn chat_template_fuel_covers_long_real_conversations() {
    // 20k messages (far more than fit in a default 8 MiB body with real content) through the
    // real DeepSeek-V3 template stay well inside the budget.
    let t = real_deepseek_v3();
    let msgs: Vec<ChatMessage> = (0..20_000)
        .map(|i| msg(if i % 2 == 0 { "user" } else { "assistant" }, "hello there"))
        .collect();
    let out = t.render(&msgs, true).unwrap();
    assert_eq!(out.matches("hello there").count(), 20_000);
}

#[test]
fn conversations_that_break_the_rules_are_refused_naming_the_field() {
    let t = ChatTemplate::new("{{ messages | length }}", None, None).unwrap();
    let refused = |v: serde_json::Value| -> String {
        let messages: Vec<ChatMessage> = serde_json::from_value(v).unwrap();
        match t.render(&messages, true) {
            Err(ChatTemplateError::InvalidMessage(m)) => m,
            other => panic!("expected InvalidMessage, got {other:?}"),
        }
    };
    let m = refused(serde_json::json!([{"role": "user"}]));
    assert!(m.contains("messages[0].content is required"), "{m}");
    let m = refused(serde_json::json!([{"role": "system", "content": null}, {"role": "user", "content": "x"}]));
    assert!(m.contains("messages[0].content"), "{m}");
    let m = refused(
        serde_json::json!([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}]),
    );
    assert!(m.contains("messages[1].tool_call_id") && m.contains("nope"), "{m}");
    let m = refused(serde_json::json!([{"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]));
    assert!(m.contains("messages[1].tool_calls[0].function.arguments"), "{m}");
    let m = refused(serde_json::json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]));
    assert!(m.contains("messages[1].tool_call_id is required"), "{m}");
    // The well-formed version of the same conversation renders.
    let ok: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([{"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "1"}]))
    .unwrap();
    assert_eq!(t.render(&ok, true).unwrap(), "3");
}
