#!/usr/bin/env python3
"""`moe serve` through the official OpenAI Python client.

    python3 tests/openai_client.py --moe target/debug/moe    # starts and stops its own server
    python3 tests/openai_client.py --base-url http://127.0.0.1:8000/v1 --model NAME [--api-key KEY]

With --moe, after the full checks on the DeepSeek-V3 fixture it serves every other family's
fixture in turn (Kimi K2.5, GLM-4.7-Flash, GLM-4.5, MiniMax-M2, Qwen3-MoE, Mixtral, DeepSeek-V3.2, GLM-5) and checks
a chat request, its stream, and that an image part is refused with a 400; then the trained
demo model (models/demo): `12345+67890=` gets `80235`, and 50 held-out problems get
transformers' answers.

Prints one line per check and ends with `N passed, M failed`; exits non-zero on any failure.
"""

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback

import openai
from openai import OpenAI

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "deepseek-v3")
FAMILY_FIXTURES = ["kimi-k25", "glm4-moe-lite", "glm4-moe", "minimax-m2", "qwen3-moe", "mixtral", "deepseek-v32", "glm5"]
SERVED_NAME = "tiny"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Héllo wörld, 你好 🙂 — how are you?"},
]


class Server:
    """`moe serve --port 0` as a child process; the port comes from its one stdout line."""

    PREFIX = "moe serve: listening on "

    def __init__(self, moe, fixture=FIXTURE, extra=()):
        self.proc = subprocess.Popen(
            [moe, "serve", "--model", fixture, "--port", "0", "--served-model-name", SERVED_NAME, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        self.log = []
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.log), daemon=True).start()
        lines = queue.Queue()
        threading.Thread(target=self._first_line, args=(lines,), daemon=True).start()
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            self.stop()
            raise SystemExit("moe serve printed no listening line within 60 s:\n" + "".join(self.log))
        if not line.startswith(self.PREFIX):
            self.stop()
            raise SystemExit(f"unexpected first stdout line {line!r}:\n" + "".join(self.log))
        self.url = line[len(self.PREFIX):].strip()

    @staticmethod
    def _drain(pipe, sink):
        for line in pipe:
            sink.append(line)

    def _first_line(self, out):
        out.put(self.proc.stdout.readline())
        for _ in self.proc.stdout:
            pass

    def stop(self):
        """SIGTERM, then the exit status (SIGKILL after 10 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def run(self, name, fn):
        start = time.monotonic()
        try:
            detail = fn()
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            self.failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stdout)
            return
        self.passed += 1
        ms = (time.monotonic() - start) * 1000
        print(f"ok   {name} ({ms:.0f} ms){': ' + detail if detail else ''}")


def check_usage(usage, max_completion=None):
    assert usage is not None, "no usage"
    assert usage.prompt_tokens > 0, f"prompt_tokens {usage.prompt_tokens}"
    assert usage.completion_tokens >= 1, f"completion_tokens {usage.completion_tokens}"
    if max_completion is not None:
        assert usage.completion_tokens <= max_completion, f"completion_tokens {usage.completion_tokens} > {max_completion}"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, f"total_tokens {usage}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--moe", help="path of the moe binary: start `moe serve` on the test fixture")
    src.add_argument("--base-url", help="an already-running server, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=SERVED_NAME, help="served model name (with --base-url)")
    ap.add_argument("--api-key", default="unused", help="API key (with --base-url)")
    args = ap.parse_args()

    server = None
    if args.moe:
        server = Server(args.moe)
        base_url, model = server.url + "/v1", SERVED_NAME
        print(f"started moe serve at {server.url} (openai {openai.__version__})")
    else:
        base_url, model = args.base_url, args.model
    client = OpenAI(base_url=base_url, api_key=args.api_key, max_retries=0, timeout=60)
    checks = Checks()
    greedy = {}

    def models():
        ids = [m.id for m in client.models.list()]
        assert ids == [model], f"models {ids}, want [{model!r}]"
        return f"{ids}"

    def completion():
        r = client.completions.create(model=model, prompt="Hello there, how", temperature=0, max_tokens=8)
        assert r.object == "text_completion", r.object
        assert len(r.choices) == 1, r.choices
        assert isinstance(r.choices[0].text, str) and r.choices[0].text, f"empty text: {r}"
        assert r.choices[0].finish_reason in ("length", "stop"), r.choices[0].finish_reason
        check_usage(r.usage, 8)
        again = client.completions.create(model=model, prompt="Hello there, how", temperature=0, max_tokens=8)
        assert again.choices[0].text == r.choices[0].text, "greedy completions differ between runs"
        return f"usage {r.usage.prompt_tokens}+{r.usage.completion_tokens}"

    def streamed_completion():
        kw = dict(model=model, prompt=[5, 6, 7, 8], temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
        whole = client.completions.create(**kw)
        text, usage = "", None
        for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.text
        assert text == whole.choices[0].text, f"streamed {text!r} != whole {whole.choices[0].text!r}"
        assert usage == whole.usage, f"streamed usage {usage} != {whole.usage}"
        assert usage.completion_tokens == 12, usage

    def chat():
        r = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=16)
        assert r.object == "chat.completion", r.object
        msg = r.choices[0].message
        assert msg.role == "assistant", msg.role
        assert isinstance(msg.content, str), msg
        check_usage(r.usage, 16)
        greedy["chat"] = r
        return f"finish {r.choices[0].finish_reason}, usage {r.usage.prompt_tokens}+{r.usage.completion_tokens}"

    def streamed_chat():
        whole = greedy.get("chat") or client.chat.completions.create(
            model=model, messages=MESSAGES, temperature=0, max_tokens=16
        )
        stream = client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, roles, finish = "", None, set(), []
        for chunk in stream:
            assert chunk.object == "chat.completion.chunk", chunk.object
            if chunk.usage is not None:
                assert not chunk.choices, "the usage chunk has no choices"
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.role:
                    roles.add(c.delta.role)
                if c.delta.content:
                    text += c.delta.content
                if c.finish_reason:
                    finish.append(c.finish_reason)
        assert roles == {"assistant"}, roles
        assert text == whole.choices[0].message.content, f"streamed {text!r} != whole {whole.choices[0].message.content!r}"
        assert finish == [whole.choices[0].finish_reason], f"finish reasons {finish}"
        assert usage is not None, "no usage chunk with include_usage"
        assert usage == whole.usage, f"streamed usage {usage} != whole {whole.usage}"
        return f"{len(text)} chars"

    def n_with_seed():
        kw = dict(model=model, messages=MESSAGES, n=2, seed=5, temperature=1.0, max_tokens=8)
        a = client.chat.completions.create(**kw)
        b = client.chat.completions.create(**kw)
        assert [c.index for c in a.choices] == [0, 1], a.choices
        assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices], "same seed, different output"

    def bad_request(param, **kw):
        def check():
            try:
                client.completions.create(model=model, prompt="Hi", **kw)
            except openai.BadRequestError as e:
                assert e.status_code == 400, e.status_code
                err = e.body if isinstance(e.body, dict) else {}
                assert err.get("type") == "invalid_request_error", f"error body {e.body}"
                assert err.get("param") == param, f"param {err.get('param')!r}, want {param!r}: {e.body}"
                return f"400 param={err.get('param')}"
            raise AssertionError(f"{kw} was accepted")

        return check

    def unknown_model():
        try:
            client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
        except (openai.BadRequestError, openai.NotFoundError) as e:
            assert e.code == "model_not_found", f"code {e.code!r}, body {e.body}"
            return f"{e.status_code} {e.code}"
        raise AssertionError("an unknown model was accepted")

    checks.run("models.list", models)
    checks.run("completions.create (greedy, usage)", completion)
    checks.run("completions.create stream == whole", streamed_completion)
    checks.run("chat.completions.create", chat)
    checks.run("chat stream (include_usage) == whole", streamed_chat)
    checks.run("chat n=2 with seed", n_with_seed)
    checks.run("temperature=-1 -> BadRequestError", bad_request("temperature", temperature=-1, max_tokens=4))
    checks.run("max_tokens=0 -> BadRequestError", bad_request("max_tokens", max_tokens=0))
    checks.run("top_p=0 -> BadRequestError", bad_request("top_p", top_p=0, max_tokens=4))
    checks.run("unknown model -> model_not_found", unknown_model)
    agent_checks(client, model, checks)

    if server is not None:

        def shutdown():
            start = time.monotonic()
            code = server.stop()
            secs = time.monotonic() - start
            assert code == 0, f"exit status {code}; log:\n{''.join(server.log)}"
            assert secs < 5, f"shutdown took {secs:.1f} s"
            return f"exit 0 in {secs:.2f} s"

        checks.run("SIGTERM -> clean exit", shutdown)

    if server is not None and server.proc.poll() is None:
        server.stop()
    if args.moe:
        for name in FAMILY_FIXTURES:
            family_checks(args.moe, name, checks)
        demo_checks(args.moe, checks)
    print(f"{checks.passed} passed, {checks.failed} failed")
    sys.exit(1 if checks.failed else 0)


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.", "parameters": WEATHER_SCHEMA}}]


def check_weather(args):
    assert set(args) == {"city", "days"}, args
    assert isinstance(args["city"], str) and len(args["city"]) <= 6, args
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 14, args


def agent_checks(client, model, checks):
    """Tools, streamed tool calls and response_format through the official client."""
    import json

    ask = [{"role": "user", "content": "Weather in Oslo for three days?"}]
    forced = {"type": "function", "function": {"name": "get_weather"}}

    def forced_call():
        r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice=forced, max_tokens=80, seed=3, temperature=1.0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice.finish_reason
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather", call
        check_weather(json.loads(call.function.arguments))
        return call.function.arguments

    def streamed_call():
        kw = dict(model=model, messages=ask, tools=TOOLS, tool_choice=forced, max_tokens=80, seed=4, temperature=1.0)
        whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
        name, args, ids = "", "", set()
        for chunk in client.chat.completions.create(stream=True, **kw):
            for d in chunk.choices[0].delta.tool_calls or []:
                assert d.index == 0, d
                ids.add(d.id) if d.id else None
                name += d.function.name or ""
                args += d.function.arguments or ""
        assert name == whole.function.name and args == whole.function.arguments, (name, args, whole)
        assert len(ids) == 1, ids
        return f"{len(args)} chars of arguments"

    def required_call():
        r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=80, seed=5, temperature=1.0)
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1, calls
        check_weather(json.loads(calls[0].function.arguments))

    def json_schema():
        for seed in range(5):
            r = client.chat.completions.create(
                model=model, messages=ask, max_tokens=80, seed=seed, temperature=1.0,
                response_format={"type": "json_schema", "json_schema": {"name": "weather", "strict": True, "schema": WEATHER_SCHEMA}},
            )
            check_weather(json.loads(r.choices[0].message.content))
        return "5 seeds"

    def tool_history():
        msgs = ask + [
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
        r = client.chat.completions.create(model=model, messages=msgs, tools=TOOLS, max_tokens=4)
        assert r.choices[0].message.role == "assistant"

    def bad_tool_choice():
        try:
            client.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}, max_tokens=4)
        except openai.BadRequestError as e:
            assert e.body.get("param") == "tool_choice", e.body
            return "400 param=tool_choice"
        raise AssertionError("an unknown tool_choice was accepted")

    checks.run("tools: forced call parses and fits the schema", forced_call)
    checks.run("tools: streamed call == whole", streamed_call)
    checks.run("tools: tool_choice=required", required_call)
    checks.run("response_format json_schema", json_schema)
    checks.run("tool call + tool result in history", tool_history)
    checks.run("tool_choice naming no tool -> BadRequestError", bad_tool_choice)


def family_checks(moe, name, checks):
    """A chat request, its stream, and an image refusal against `moe serve` on one fixture."""
    server = Server(moe, os.path.join(REPO, "tests", "fixtures", name))
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    kw = dict(model=SERVED_NAME, messages=MESSAGES, temperature=0, max_tokens=12)

    def chat():
        r = client.chat.completions.create(**kw)
        assert r.choices[0].message.role == "assistant", r
        assert isinstance(r.choices[0].message.content, str), r
        check_usage(r.usage, 12)
        text = "".join(
            c.delta.content or "" for chunk in client.chat.completions.create(stream=True, **kw) for c in chunk.choices
        )
        assert text == r.choices[0].message.content, f"streamed {text!r} != whole {r.choices[0].message.content!r}"
        return f"usage {r.usage.prompt_tokens}+{r.usage.completion_tokens}, stream == whole"

    def image_refused():
        image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
        try:
            client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": image}], max_tokens=4)
        except openai.BadRequestError as e:
            assert e.status_code == 400, e.status_code
            return "400"
        raise AssertionError("an image input was accepted")

    def shutdown():
        code = server.stop()
        assert code == 0, f"exit status {code}; log:\n{''.join(server.log)}"

    checks.run(f"{name}: chat.completions.create + stream", chat)
    checks.run(f"{name}: image part -> BadRequestError", image_refused)
    checks.run(f"{name}: SIGTERM -> clean exit", shutdown)


def demo_checks(moe, checks):
    """The trained demo model answers held-out problems through the client as transformers did."""
    import json

    demo = os.path.join(REPO, "models", "demo")
    server = Server(moe, demo)
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with open(os.path.join(demo, "heldout.jsonl")) as f:
        problems = [json.loads(line) for line in f][:50]

    def ask(prompt, **kw):
        messages = [{"role": "user", "content": prompt}]
        return client.chat.completions.create(model=SERVED_NAME, messages=messages, temperature=0, max_tokens=11, **kw)

    def sum_answer():
        r = ask("12345+67890=")
        assert r.choices[0].message.content == "80235", r
        assert r.choices[0].finish_reason == "stop", r
        streamed = "".join(c.delta.content or "" for chunk in ask("12345+67890=", stream=True) for c in chunk.choices)
        assert streamed == "80235", streamed
        return "80235, streamed too"

    def heldout():
        right = 0
        for p in problems:
            answer = ask(p["prompt"]).choices[0].message.content
            assert answer == p["transformers_chat"], (p, answer)
            right += answer == p["answer"]
        return f"{len(problems)} answers equal transformers', {right} right"

    def shutdown():
        code = server.stop()
        assert code == 0, f"exit status {code}; log:\n{''.join(server.log)}"

    checks.run("demo: 12345+67890= -> 80235", sum_answer)
    checks.run("demo: held-out answers == transformers'", heldout)
    checks.run("demo: SIGTERM -> clean exit", shutdown)


if __name__ == "__main__":
    main()
