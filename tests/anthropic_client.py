#!/usr/bin/env python3
"""`moe serve`'s Messages API through the official Anthropic Python client.

    python3 tests/anthropic_client.py --moe target/debug/moe   # starts and stops its own server

Serves the DeepSeek-V3 fixture with an API key (checked through `x-api-key`, which is how the
client sends it) and checks messages.create, the streamed event sequence against the whole
response, stop sequences, count_tokens, and the error shapes. Prints one line per check and
ends with `N passed, M failed`; exits non-zero on any failure.
"""

import argparse
import sys

import anthropic

from openai_client import SERVED_NAME, Checks, Server

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Héllo wörld, 你好 🙂 — how are you?"}]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", required=True, help="path of the moe binary")
    args = ap.parse_args()
    server = Server(args.moe, extra=["--api-key", KEY])
    print(f"started moe serve at {server.url} (anthropic {anthropic.__version__})")
    client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)
    checks = Checks()
    # This client (2.x) no longer types `temperature`; it still travels in the body, and the
    # server honours it (greedy, so responses can be compared).
    kw = dict(
        model=SERVED_NAME, max_tokens=12, system="You are terse.", messages=MESSAGES, extra_body={"temperature": 0}
    )
    whole = {}

    def create():
        m = client.messages.create(**kw)
        assert m.type == "message" and m.role == "assistant", m
        assert m.id.startswith("msg_"), m.id
        assert len(m.content) == 1 and m.content[0].type == "text", m.content
        assert m.stop_reason in ("end_turn", "max_tokens"), m.stop_reason
        assert m.usage.input_tokens > 0 and 1 <= m.usage.output_tokens <= 12, m.usage
        whole["m"] = m
        return f"stop {m.stop_reason}, usage {m.usage.input_tokens}+{m.usage.output_tokens}"

    def stream():
        m = whole.get("m") or client.messages.create(**kw)
        kinds, text = [], ""
        with client.messages.stream(**kw) as s:
            for ev in s:
                kinds.append(ev.type)
                if ev.type == "content_block_delta":
                    text += ev.delta.text
            final = s.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
        for k in ("content_block_start", "content_block_stop", "message_delta"):
            assert k in kinds, f"no {k} in {kinds}"
        assert text == m.content[0].text, f"streamed {text!r} != whole {m.content[0].text!r}"
        assert final.stop_reason == m.stop_reason, (final.stop_reason, m.stop_reason)
        assert final.usage.output_tokens == m.usage.output_tokens, (final.usage, m.usage)
        return f"{len(kinds)} events"

    def stop_sequence():
        m = whole.get("m") or client.messages.create(**kw)
        text = m.content[0].text
        # A stop sequence taken from the middle of the greedy answer ends it there.
        cut = next((i for i in range(1, len(text)) if text[i].isalnum()), None)
        assert cut is not None, f"answer too short to cut: {text!r}"
        stop = text[cut]
        r = client.messages.create(**{**kw, "stop_sequences": [stop]})
        assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop, (r.stop_reason, r.stop_sequence)
        assert r.content[0].text == text[: text.index(stop)], (r.content[0].text, text)
        return f"stopped at {stop!r}"

    def count_tokens():
        n = client.messages.count_tokens(model=SERVED_NAME, system="You are terse.", messages=MESSAGES)
        m = whole.get("m") or client.messages.create(**kw)
        assert n.input_tokens == m.usage.input_tokens, (n.input_tokens, m.usage.input_tokens)
        return f"{n.input_tokens} tokens"

    def bad_request(**over):
        def check():
            try:
                client.messages.create(**{**kw, **over})
            except anthropic.BadRequestError as e:
                assert e.status_code == 400, e.status_code
                assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", e.body
                return e.body["error"]["message"][:60]
            raise AssertionError(f"{over} was accepted")

        return check

    def unknown_model():
        try:
            client.messages.create(**{**kw, "model": "no-such-model"})
        except anthropic.NotFoundError as e:
            assert e.body["error"]["type"] == "not_found_error", e.body
            return "404 not_found_error"
        raise AssertionError("an unknown model was accepted")

    def wrong_key():
        other = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0, timeout=60)
        try:
            other.messages.create(**kw)
        except anthropic.AuthenticationError as e:
            assert e.body["error"]["type"] == "authentication_error", e.body
            return "401 authentication_error"
        raise AssertionError("a wrong key was accepted")

    tool = {
        "name": "get_weather",
        "description": "Weather for a city.",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1, "maximum": 14}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    }
    tool_kw = dict(
        model=SERVED_NAME, max_tokens=80, messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[tool], tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 1.0},
    )

    def check_input(inp):
        assert set(inp) == {"city", "days"}, inp
        assert isinstance(inp["city"], str) and len(inp["city"]) <= 6, inp
        assert isinstance(inp["days"], int) and 1 <= inp["days"] <= 14, inp

    def tool_use():
        m = client.messages.create(**tool_kw)
        assert m.stop_reason == "tool_use", m.stop_reason
        uses = [b for b in m.content if b.type == "tool_use"]
        assert len(uses) == 1 and uses[0].name == "get_weather", m.content
        check_input(uses[0].input)
        return f"input {uses[0].input}"

    def tool_use_stream():
        with client.messages.stream(**tool_kw) as s:
            for _ in s:
                pass
            final = s.get_final_message()
        uses = [b for b in final.content if b.type == "tool_use"]
        assert final.stop_reason == "tool_use" and len(uses) == 1, final
        check_input(uses[0].input)
        return f"input {uses[0].input}"

    def tool_result_history():
        msgs = [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo", "days": 2}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
        ]
        m = client.messages.create(model=SERVED_NAME, max_tokens=4, messages=msgs, tools=[tool])
        assert m.role == "assistant", m

    checks.run("messages.create", create)
    checks.run("tools: forced tool_use fits the schema", tool_use)
    checks.run("tools: streamed tool_use (SDK accumulates input_json_delta)", tool_use_stream)
    checks.run("tool_use + tool_result in history", tool_result_history)
    checks.run(
        "tool_result for an unknown id -> BadRequestError",
        bad_request(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}]}]),
    )
    checks.run("messages.stream == whole", stream)
    checks.run("stop_sequences -> stop_reason stop_sequence", stop_sequence)
    checks.run("messages.count_tokens", count_tokens)
    checks.run("temperature=1.5 -> BadRequestError", bad_request(extra_body={"temperature": 1.5}))
    checks.run("max_tokens=0 -> BadRequestError", bad_request(max_tokens=0))
    checks.run(
        "image block -> BadRequestError",
        bad_request(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]),
    )
    checks.run("first message from assistant -> BadRequestError", bad_request(messages=[{"role": "assistant", "content": "Hi"}]))
    checks.run("unknown model -> NotFoundError", unknown_model)
    checks.run("wrong x-api-key -> AuthenticationError", wrong_key)

    def shutdown():
        code = server.stop()
        assert code == 0, f"exit status {code}; log:\n{''.join(server.log)}"

    checks.run("SIGTERM -> clean exit", shutdown)
    print(f"{checks.passed} passed, {checks.failed} failed")
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
