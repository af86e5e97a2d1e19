//! `moe serve` end to end over HTTP on the tiny DeepSeek-V3 fixture: greedy completions equal
//! `moe generate` (itself checked against the transformers goldens), streamed and whole
//! responses agree, n choices, models, health and metrics.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_completions_match_the_cli_and_the_goldens() {
    let (prompts, greedy) = golden(&model_dir());
    let server = Server::start(&[]);
    for (i, (prompt, want)) in prompts.iter().zip(&greedy).enumerate() {
        let (cli_ids, cli_text) = cli_generate(prompt, 12);
        assert_eq!(&cli_ids, want, "moe generate vs transformers greedy, prompt {i}");
        let body = json!({
            "model": NAME, "prompt": prompt, "temperature": 0, "max_tokens": 12, "ignore_eos": true,
        });
        let v = server.ok("/v1/completions", &body).await;
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], NAME);
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 1);
        assert_eq!(choices[0]["index"], 0);
        assert_eq!(choices[0]["finish_reason"], "length");
        assert_eq!(
            choices[0]["text"],
            cli_text.as_str(),
            "server vs moe generate, prompt {i}"
        );
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": prompt.len(), "completion_tokens": 12, "total_tokens": prompt.len() + 12})
        );
        // Deterministic, and the one-element list forms mean the same prompt.
        let again = server.ok("/v1/completions", &body).await;
        assert_eq!(again["choices"][0]["text"], choices[0]["text"]);
        let mut nested = body.clone();
        nested["prompt"] = json!([prompt]);
        let nested = server.ok("/v1/completions", &nested).await;
        assert_eq!(nested["choices"][0]["text"], choices[0]["text"]);
    }

    // Greedy logprobs: the chosen token is the most likely of the top alternatives.
    let v = server
        .ok(
            "/v1/completions",
            &json!({"model": NAME, "prompt": prompts[2], "temperature": 0, "max_tokens": 12,
                    "ignore_eos": true, "logprobs": 3}),
        )
        .await;
    let lp = &v["choices"][0]["logprobs"];
    let chosen = lp["token_logprobs"].as_array().unwrap();
    let tops = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(chosen.len(), 12, "{lp}");
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 12);
    assert_eq!(tops.len(), 12);
    for (c, top) in chosen.iter().zip(tops) {
        let c = c.as_f64().unwrap();
        assert!(c <= 0.0);
        let top = top.as_object().unwrap();
        // Token pieces can collide as text (partial UTF-8 shows as U+FFFD), so <= 3 keys.
        assert!(!top.is_empty() && top.len() <= 3, "{lp}");
        let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!(
            c >= best - 1e-4,
            "greedy token logprob {c} below a top alternative {best}: {lp}"
        );
    }

    // A text prompt goes through the tokenizer (BOS added, so at least 2 tokens).
    let v = server
        .ok(
            "/v1/completions",
            &json!({"model": NAME, "prompt": "Hello there", "temperature": 0, "max_tokens": 8}),
        )
        .await;
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() >= 2, "{v}");
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion), "{v}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_and_whole_responses_agree() {
    let server = Server::start(&[]);

    // Chat.
    let whole = server.ok("/v1/chat/completions", &chat_body(json!({}))).await;
    assert_eq!(whole["object"], "chat.completion");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let message = &whole["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    let content = message["content"].as_str().unwrap();
    assert_eq!(whole["usage"]["completion_tokens"], 16);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");

    let chunks = stream_chunks(
        &server,
        "/v1/chat/completions",
        &chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    let (usage_chunk, choice_chunks) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
    assert_eq!(usage_chunk["usage"], whole["usage"], "streamed usage vs whole usage");
    assert_eq!(choice_chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    let mut finish = vec![];
    for c in choice_chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], choice_chunks[0]["id"]);
        assert_eq!(c["model"], NAME);
        assert!(
            c.get("usage").is_none_or(Value::is_null),
            "usage only in the last chunk: {c}"
        );
        let choice = &c["choices"][0];
        assert_eq!(choice["index"], 0);
        if let Some(t) = choice["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if !choice["finish_reason"].is_null() {
            finish.push(choice["finish_reason"].clone());
        }
    }
    assert_eq!(text, content, "reassembled deltas vs whole content");
    assert_eq!(finish, vec![json!("length")]);

    // Without include_usage there is no usage chunk.
    let chunks = stream_chunks(&server, "/v1/chat/completions", &chat_body(json!({"stream": true}))).await;
    assert!(chunks.iter().all(|c| c.get("usage").is_none_or(Value::is_null)));
    assert!(chunks.iter().all(|c| !c["choices"].as_array().unwrap().is_empty()));

    // max_completion_tokens is the chat name of max_tokens.
    let v = server
        .ok(
            "/v1/chat/completions",
            &chat_body(json!({"max_tokens": null, "max_completion_tokens": 5})),
        )
        .await;
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert!(content.starts_with(v["choices"][0]["message"]["content"].as_str().unwrap()));

    // Chat logprobs.
    let v = server
        .ok(
            "/v1/chat/completions",
            &chat_body(json!({"logprobs": true, "top_logprobs": 2})),
        )
        .await;
    let entries = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(entries.len(), 16);
    for e in entries {
        assert!(
            e["token"].is_string() && e["logprob"].is_number() && e["bytes"].is_array(),
            "{e}"
        );
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2, "{e}");
    }

    // Completions.
    let body = json!({"model": NAME, "prompt": [5, 6, 7, 8], "temperature": 0, "max_tokens": 20, "ignore_eos": true});
    let whole = server.ok("/v1/completions", &body).await;
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let chunks = stream_chunks(&server, "/v1/completions", &sbody).await;
    let (usage_chunk, choice_chunks) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    let text: String = choice_chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    assert_eq!(choice_chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_generated_token_gets_its_own_chunk() {
    // The fixture's tokenizer splits multi-byte characters over several tokens, so some
    // tokens have empty text; each still gets a chunk, and `return_token_ids` names it.
    let server = Server::start(&[]);
    let mut empty_text_tokens = 0;
    for prompt in golden(&model_dir()).0 {
        let body = json!({"model": NAME, "prompt": prompt, "temperature": 0, "max_tokens": 24, "ignore_eos": true,
                          "return_token_ids": true});
        let whole = server.ok("/v1/completions", &body).await;
        let want: Vec<u64> = whole["choices"][0]["token_ids"]
            .as_array()
            .unwrap_or_else(|| panic!("no token_ids: {whole}"))
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(want.len(), 24);
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        sbody["stream_options"] = json!({"include_usage": true});
        let chunks = stream_chunks(&server, "/v1/completions", &sbody).await;
        let (usage_chunk, choice_chunks) = chunks.split_last().unwrap();
        assert_eq!(usage_chunk["usage"]["completion_tokens"], 24);
        let (closing, token_chunks) = choice_chunks.split_last().unwrap();
        assert_eq!(closing["choices"][0]["finish_reason"], "length");
        assert_eq!(closing["choices"][0]["token_ids"], json!([]));
        assert_eq!(token_chunks.len(), 24, "one chunk per token");
        empty_text_tokens += token_chunks.iter().filter(|c| c["choices"][0]["text"] == "").count();
        let streamed: Vec<u64> = token_chunks
            .iter()
            .map(|c| {
                let ids = c["choices"][0]["token_ids"].as_array().unwrap();
                assert_eq!(ids.len(), 1, "{c}");
                ids[0].as_u64().unwrap()
            })
            .collect();
        assert_eq!(streamed, want);
    }
    assert!(empty_text_tokens > 0, "the case this test is about never came up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_with_a_seed_are_reproducible() {
    let server = Server::start(&[]);
    let body = json!({"model": NAME, "prompt": [5, 6, 7], "n": 2, "seed": 7, "temperature": 1.0,
                      "max_tokens": 16, "ignore_eos": true});
    let a = server.ok("/v1/completions", &body).await;
    let choices = a["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(a["usage"]["completion_tokens"], 32, "usage sums the choices: {a}");
    assert_eq!(a["usage"]["prompt_tokens"], 3);
    let b = server.ok("/v1/completions", &body).await;
    assert_eq!(a["choices"], b["choices"], "same seed, same choices");

    // Chat with n = 2, streamed: two indexes, each ends once.
    let chunks = stream_chunks(
        &server,
        "/v1/chat/completions",
        &chat_body(json!({"n": 2, "seed": 3, "temperature": 0.8, "stream": true})),
    )
    .await;
    let mut finished = [0, 0];
    for c in &chunks {
        for choice in c["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            if !choice["finish_reason"].is_null() {
                finished[i] += 1;
            }
        }
    }
    assert_eq!(finished, [1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gqa_model_is_served_and_its_cache_is_sized_by_its_spec() {
    // Qwen3-MoE keeps K and V of 2 kv heads of 16 values in 3 layers: 768 bytes a token in f32.
    let dir = model_dir().parent().unwrap().join("qwen3-moe");
    let server = Server::start_model(&dir, &["--served-model-name", NAME, "--kv-cache-memory", "768KiB"]);
    let v = server
        .ok(
            "/v1/chat/completions",
            &chat_body(json!({"max_tokens": 5, "temperature": 0, "ignore_eos": true})),
        )
        .await;
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let m = server.metrics().await;
    assert_eq!(m["moe_kv_cache_bytes_per_token"], 768.0);
    // 768 KiB / (16 tokens x 768 bytes) = 64 blocks.
    assert_eq!(m["moe_kv_cache_blocks_total"], 64.0);
    assert_eq!(m["moe_kv_cache_bytes_total"], 768.0 * 1024.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let server = Server::start(&[]);
    let r = server.get("/health").await;
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = server.get("/v1/models").await.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], NAME);
    assert_eq!(data[0]["object"], "model");

    server
        .ok(
            "/v1/completions",
            &json!({"model": NAME, "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": true}),
        )
        .await;
    let r = server.get("/metrics").await;
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let m = parse_metrics(&r.text().await.unwrap());
    for name in [
        "moe_num_requests_running",
        "moe_num_requests_waiting",
        "moe_kv_cache_blocks_used",
        "moe_kv_cache_blocks_total",
        "moe_prompt_tokens_total",
        "moe_generation_tokens_total",
        "moe_preemptions_total",
        "moe_requests_total",
        "moe_time_to_first_token_seconds_count",
        "moe_inter_token_latency_seconds_count",
        "moe_e2e_request_latency_seconds_count",
    ] {
        assert!(m.contains_key(name), "/metrics lacks {name}: {m:?}");
    }
    assert_eq!(m["moe_requests_total"], 1.0);
    assert_eq!(m["moe_prompt_tokens_total"], 3.0);
    assert_eq!(m["moe_generation_tokens_total"], 4.0);
    assert_eq!(m["moe_e2e_request_latency_seconds_count"], 1.0);
    assert!(m["moe_kv_cache_blocks_total"] > 0.0);
    // A model on the CPU has no GPU energy: the series are absent, not zero.
    for name in [
        "moe_gpu_energy_joules_total",
        "moe_gpu_power_watts",
        "moe_output_tokens_per_joule",
    ] {
        assert!(!m.contains_key(name), "{name} on a CPU server: {m:?}");
    }
    // The cache is sized by the model's KV-cache spec: V3's latent row is 32 + 8 values in 3
    // layers, 480 bytes a token in f32, in blocks of 16 tokens.
    assert_eq!(m["moe_kv_cache_bytes_per_token"], 480.0);
    assert_eq!(
        m["moe_kv_cache_bytes_total"],
        m["moe_kv_cache_blocks_total"] * 16.0 * 480.0
    );
    assert!(m["moe_kv_cache_bytes_used"] <= m["moe_kv_cache_bytes_total"]);

    // Without --served-model-name the name is the --model argument.
    let plain = Server::start_raw(&[]);
    let v: Value = plain.get("/v1/models").await.json().await.unwrap();
    let dir = model_dir();
    assert_eq!(v["data"][0]["id"], dir.to_str().unwrap());
    plain
        .ok(
            "/v1/completions",
            &json!({"model": dir.to_str().unwrap(), "prompt": [1], "max_tokens": 1}),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_counters_in_metrics_and_the_off_switch() {
    // 40 prompt tokens in blocks of 16: a repeat reuses 32 of them.
    let prompt: Vec<u32> = (0..40).map(|i| 5 + i * 7 % 300).collect();
    let body = json!({"model": NAME, "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": true});
    for (flags, hits) in [(&[][..], 32.0), (&["--no-prefix-caching"][..], 0.0)] {
        let server = Server::start(flags);
        let first = server.ok("/v1/completions", &body).await;
        let second = server.ok("/v1/completions", &body).await;
        assert_eq!(first["choices"][0]["text"], second["choices"][0]["text"], "{flags:?}");
        assert_eq!(second["usage"]["prompt_tokens"], 40);
        let m = server.metrics().await;
        let queries = if hits > 0.0 { 80.0 } else { 0.0 };
        assert_eq!(m["moe_prefix_cache_queries_total"], queries, "{flags:?}: {m:?}");
        assert_eq!(m["moe_prefix_cache_hits_total"], hits, "{flags:?}: {m:?}");
        assert_eq!(m["moe_kv_cache_blocks_used"], 0.0);
        // The first request's 2 full prompt blocks stay cached (the repeat computed only the
        // rest of its prompt, in a block of its own).
        let cached = m["moe_kv_cache_blocks_cached"];
        assert!(
            if hits > 0.0 { cached >= 2.0 } else { cached == 0.0 },
            "{flags:?}: {m:?}"
        );
    }
}
