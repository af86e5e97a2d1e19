#!/usr/bin/env python3
"""Hugging Face transformers baseline for `moe bench`: the same workloads, the same JSON.

Owns: running a `moe bench` workload (fixed, random or agent prompts; greedy, fixed output
length, EOS ignored) through plain transformers `generate()` on the same model config, and
printing the shared `moe-bench/1` JSON schema, so the README can put both side by side.
Does not own: anything about moe-engine itself, or its figures (the Rust `moe bench` does).

    python3 benches/hf_baseline.py --model tests/fixtures/deepseek-v3 \\
        --input-len 32 --output-len 32 --num-prompts 64 --concurrency 1,8,32,64 \\
        --output-json /tmp/hf.json

Smoke test (a few seconds on a 2-core CPU; what a reviewer or CI can afford):

    python3 benches/hf_baseline.py --model tests/fixtures/deepseek-v3 --input-len 16 \\
        --output-len 8 --num-prompts 6 --concurrency 1,4 --output-json /tmp/hf.json
    python3 benches/hf_baseline.py --model tests/fixtures/deepseek-v3 --workload agent \\
        --sessions 2 --turns 3 --agent-prefix-len 16 --turn-input-len 8 --output-len 4

Requirements: tests/fixtures/requirements.txt (torch, transformers, numpy, safetensors).
On CUDA, energy is read from NVML if `nvidia-ml-py` (benches/requirements.txt) is
installed; without it (or without a GPU) `energy` is null.

Model: `--model DIR` holds config.json. Its weights (model.safetensors or
model.safetensors.index.json) are loaded when present (`--weights checkpoint`, the default
then); otherwise, or with `--weights random`, the model is built from the config with
transformers' random init (seeded by `--seed`). `--num-layers N` keeps the first N layers
(handy for a big real config). Device: `--device auto|cpu|cuda` (auto: cuda when present),
`--gpu N`; dtype: bf16 on cuda, f32 on cpu unless `--dtype f32|bf16|f16`.

Workloads (same meaning as `moe bench`); prompt token ids are uniform in [10, vocab_size)
from numpy's `default_rng(--seed)`, drawn in this order:
  fixed   `--num-prompts` prompts of `--input-len` tokens.
  random  prompt lengths first (`--num-prompts` integers uniform in
          [int(input_len*(1-r)), int(input_len*(1+r))], at least 1, r = `--range-ratio`),
          then each prompt's ids in turn. Output length stays `--output-len`.
  agent   `--sessions S --turns T --agent-prefix-len P --turn-input-len U`: the shared
          P-token prefix, then U new ids for each (session, turn), session-major. Turn 1 is
          prefix + U ids; turn t+1 is turn t's prompt + turn t's reply ids + U ids, and
          starts only after turn t finished.
Every request generates exactly `--output-len` tokens greedily (min = max new tokens, no
EOS stop).

Load: transformers has no continuous batching, so each `--concurrency c` of the sweep
(default "1") runs static batches: up to c requests taken in order, left-padded, generated
together, then the next batch (agent: up to c sessions advance one turn together). One
short warm-up generate on the run's first batch precedes each timed run.
Per request: TTFT = batch start to its first generated token, ITL = gaps between
successive tokens (a batch shares its step times), TPOT = (e2e - TTFT) / (output_len - 1),
e2e = batch start to its last token. Step times come from a streamer (`put` is called once
per decoding step); CUDA is synchronised before each clock read. Percentiles are numpy's
default (linear interpolation between closest ranks). Fields this tool cannot know
(KV-cache usage, preemptions, prefix cache, expert load) are null; a statistic with no
samples (TPOT/ITL when output_len is 1) has null values.

Output: a table on stdout (on stderr with `--json`, which prints the JSON alone to stdout)
and `--output-json FILE`. Bad flags, a missing config.json or a concurrency of 0 print
one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

SCHEMA = "moe-bench/1"
TOOL = "hf_baseline"
MIN_TOKEN_ID = 10
DTYPES = {"f32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "f16": "float16", "float16": "float16"}
SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
STATS = ("mean", "min", "p50", "p90", "p99", "max")


def fail(message: str) -> None:
    print(f"{TOOL}: error: {message}", file=sys.stderr)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message; keep one line
        fail(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description="transformers baseline for `moe bench` (moe-bench/1 JSON)")
    p.add_argument("--model", required=True, help="directory with config.json")
    p.add_argument("--weights", choices=["random", "checkpoint"], default=None,
                   help="default: checkpoint when the directory has safetensors weights")
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--gpu", type=int, default=0, help="CUDA device index (and NVML energy)")
    p.add_argument("--dtype", default=None, help="f32|bf16|f16 (default bf16 on cuda, f32 on cpu)")
    p.add_argument("--attn-implementation", default=None,
                   help="passed to transformers (default: its own choice)")
    p.add_argument("--workload", choices=["fixed", "random", "agent"], default="fixed")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--agent-prefix-len", type=int, default=64)
    p.add_argument("--turn-input-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", default="1", help="comma-separated sweep, e.g. 1,8,64")
    p.add_argument("--prompts-per-run", type=int, default=0, metavar="N",
                   help="fixed/random: each concurrency c runs the first max(N, c) prompts "
                        "(0, the default: all of them), so a sweep from 1 to 64 need not run "
                        "64 prompts one at a time")
    p.add_argument("--output-json", default=None, metavar="FILE")
    p.add_argument("--json", action="store_true", help="print the JSON to stdout (table to stderr)")
    p.add_argument("-v", "--verbose", action="store_true", help="keep transformers' warnings")
    p.add_argument("--check", action="store_true",
                   help="validate the arguments and the model directory, then exit (no torch needed)")
    a = p.parse_args(argv)

    try:
        a.concurrency = [int(x) for x in a.concurrency.split(",")]
    except ValueError:
        fail(f"--concurrency must be comma-separated integers, got {a.concurrency!r}")
    if any(c < 1 for c in a.concurrency):
        fail(f"--concurrency values must be >= 1, got {min(a.concurrency)}")
    if a.dtype is not None:
        if a.dtype.lower() not in DTYPES:
            fail(f"--dtype must be one of f32, bf16, f16, got {a.dtype!r}")
        a.dtype = DTYPES[a.dtype.lower()]
    positive = {"--output-len": a.output_len, "--num-prompts": a.num_prompts,
                "--input-len": a.input_len, "--sessions": a.sessions, "--turns": a.turns,
                "--turn-input-len": a.turn_input_len}
    if a.workload == "agent":
        del positive["--num-prompts"], positive["--input-len"]
    else:
        del positive["--sessions"], positive["--turns"], positive["--turn-input-len"]
    for flag, value in positive.items():
        if value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    if a.workload == "agent" and a.agent_prefix_len < 0:
        fail(f"--agent-prefix-len must be >= 0, got {a.agent_prefix_len}")
    if a.workload == "random" and not 0.0 <= a.range_ratio < 1.0:
        fail(f"--range-ratio must be in [0, 1), got {a.range_ratio}")
    if a.prompts_per_run < 0:
        fail(f"--prompts-per-run must be >= 0, got {a.prompts_per_run}")
    if a.workload != "agent" and a.prompts_per_run and max(a.concurrency) > a.num_prompts:
        fail(f"--prompts-per-run needs --num-prompts >= the largest concurrency ({max(a.concurrency)})")
    if a.num_layers is not None and a.num_layers < 1:
        fail(f"--num-layers must be >= 1, got {a.num_layers}")
    if a.gpu < 0:
        fail(f"--gpu must be >= 0, got {a.gpu}")
    model_dir = Path(a.model)
    if not (model_dir / "config.json").is_file():
        fail(f"no config.json in {a.model}")
    return a


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------

def make_prompts(a: argparse.Namespace, vocab_size: int):
    """fixed/random: list of prompts (lists of ids). agent: (prefix, new[s][t])."""
    import numpy as np

    rng = np.random.default_rng(a.seed)
    ids = lambda n: rng.integers(MIN_TOKEN_ID, vocab_size, size=n).tolist()  # noqa: E731
    if a.workload == "fixed":
        return [ids(a.input_len) for _ in range(a.num_prompts)]
    if a.workload == "random":
        lo = max(1, int(a.input_len * (1 - a.range_ratio)))
        hi = max(lo, int(a.input_len * (1 + a.range_ratio)))
        lens = rng.integers(lo, hi, size=a.num_prompts, endpoint=True).tolist()
        return [ids(n) for n in lens]
    prefix = ids(a.agent_prefix_len)
    new = [[ids(a.turn_input_len) for _ in range(a.turns)] for _ in range(a.sessions)]
    return prefix, new


def max_total_len(a: argparse.Namespace, prompts) -> int:
    if a.workload == "agent":
        return a.agent_prefix_len + a.turns * (a.turn_input_len + a.output_len)
    return max(len(p) for p in prompts) + a.output_len


def workload_json(a: argparse.Namespace) -> dict:
    agent = a.workload == "agent"
    return {
        "kind": a.workload,
        "input_len": None if agent else a.input_len,
        "output_len": a.output_len,
        "num_prompts": None if agent else a.num_prompts,
        "range_ratio": a.range_ratio if a.workload == "random" else None,
        "sessions": a.sessions if agent else None,
        "turns": a.turns if agent else None,
        "agent_prefix_len": a.agent_prefix_len if agent else None,
        "turn_input_len": a.turn_input_len if agent else None,
        "seed": a.seed,
    }


# --------------------------------------------------------------------------------------
# Model, device, energy
# --------------------------------------------------------------------------------------

def has_checkpoint(model_dir: Path) -> bool:
    # Not any *.safetensors: our fixtures keep golden.safetensors beside the weights.
    return (model_dir / "model.safetensors").is_file() or (
        model_dir / "model.safetensors.index.json").is_file()


def pick_device(a: argparse.Namespace):
    import torch

    if a.device == "cpu" or (a.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        fail("--device cuda but torch sees no CUDA device")
    if a.gpu >= torch.cuda.device_count():
        fail(f"--gpu {a.gpu} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", a.gpu)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def load_model(a: argparse.Namespace, device, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(a.model)
    config = AutoConfig.from_pretrained(model_dir)
    if a.num_layers is not None:
        if a.num_layers > config.num_hidden_layers:
            fail(f"--num-layers {a.num_layers} > the config's {config.num_hidden_layers} layers")
        config.num_hidden_layers = a.num_layers
    weights = a.weights or ("checkpoint" if has_checkpoint(model_dir) else "random")
    if weights == "checkpoint" and not has_checkpoint(model_dir):
        fail(f"--weights checkpoint but {a.model} has no model.safetensors(.index.json)")
    kwargs = {"dtype": dtype}
    if a.attn_implementation:
        kwargs["attn_implementation"] = a.attn_implementation
    # Built on the CPU, then moved: placing it directly (device_map) needs `accelerate`.
    if weights == "checkpoint":
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, **kwargs)
    else:
        if hasattr(config, "quantization_config"):  # random weights: nothing to dequantize
            del config.quantization_config
        torch.manual_seed(a.seed)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.to(device).eval(), config, weights


class Energy:
    """NVML's total-energy counter of one GPU (mJ since driver load), or nothing."""

    def __init__(self, device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml  # nvidia-ml-py, optional
        except ImportError:
            print(f"{TOOL}: note: nvidia-ml-py not installed, energy is null", file=sys.stderr)
            return
        try:
            pynvml.nvmlInit()
            self.handle = self._handle(pynvml, device)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.nvml = pynvml
        except Exception as e:  # no NVML, or the GPU does not report energy
            print(f"{TOOL}: note: NVML energy unavailable ({e}), energy is null", file=sys.stderr)
            self.handle = None

    @staticmethod
    def _handle(pynvml, device):
        import torch

        # Match by PCI bus id (CUDA_VISIBLE_DEVICES may renumber); fall back to the index.
        try:
            props = torch.cuda.get_device_properties(device)
            bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
        except Exception:
            return pynvml.nvmlDeviceGetHandleByIndex(device.index)

    def read_mj(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:
            return None


# --------------------------------------------------------------------------------------
# Timed generation
# --------------------------------------------------------------------------------------

def make_step_clock(sync):
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        """Records a timestamp each time generate() hands over a step's new tokens."""

        def __init__(self):
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # the first put is the prompt itself
                self.prompt_seen = True
                return
            sync()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return StepClock()


class Generator:
    def __init__(self, model, config, device, output_len: int):
        import torch
        from transformers import GenerationConfig

        self.torch = torch
        self.model = model
        self.device = device
        self.output_len = output_len
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            eos = getattr(config, "eos_token_id", None)
            pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        self.pad = int(pad)
        # generate() falls back to model.generation_config for an unset eos: clear it there
        # too, so nothing ends a request before output_len tokens.
        model.generation_config.eos_token_id = None
        self.gen_config = GenerationConfig(
            do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=self.pad,
            bos_token_id=getattr(config, "bos_token_id", None))
        if device.type == "cuda":
            self.sync = lambda: torch.cuda.synchronize(device)
        else:
            self.sync = lambda: None

    def run(self, prompts: list[list[int]], max_new: int | None = None):
        """Generate for one static batch. Returns (t0, step times, new ids per request)."""
        torch = self.torch
        n = self.output_len if max_new is None else max_new
        width = max(len(p) for p in prompts)
        ids = [[self.pad] * (width - len(p)) + p for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        attention_mask = torch.tensor(mask, dtype=torch.long, device=self.device)
        clock = make_step_clock(self.sync)
        self.sync()
        t0 = time.perf_counter()
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  generation_config=self.gen_config, max_new_tokens=n,
                                  min_new_tokens=n, streamer=clock)
        self.sync()
        new = out[:, width:].tolist()
        if len(clock.times) != n or any(len(r) != n for r in new):
            raise RuntimeError(f"generate made {len(clock.times)} steps / "
                               f"{[len(r) for r in new]} tokens, expected {n}")
        return t0, clock.times, new


class Record:
    """One request's outcome."""

    def __init__(self, input_tokens: int):
        self.input_tokens = input_tokens
        self.ok = False
        self.output_tokens = 0
        self.ttft = self.e2e = 0.0
        self.tpot: float | None = None
        self.itl: list[float] = []

    def finish(self, t0: float, times: list[float], produced: int) -> None:
        self.ok = True
        self.output_tokens = produced
        self.ttft = times[0] - t0
        self.e2e = times[-1] - t0
        self.itl = [b - a for a, b in zip(times, times[1:])]
        if produced > 1:
            self.tpot = (self.e2e - self.ttft) / (produced - 1)


def run_batch(gen: Generator, prompts: list[list[int]], records: list[Record]):
    """Generate one batch and fill its records; on failure mark them failed. New ids or None."""
    try:
        t0, times, new = gen.run(prompts)
    except Exception as e:  # e.g. out of memory: count the batch as failed, go on
        print(f"{TOOL}: batch of {len(prompts)} failed: {str(e).splitlines()[0]}", file=sys.stderr)
        if gen.device.type == "cuda":
            gen.torch.cuda.empty_cache()
        return None
    for rec, ids in zip(records, new):
        rec.finish(t0, times, len(ids))
    return new


class Window:
    """The timed part of a run: wall clock and the energy counter, read together."""

    def __init__(self, gen: Generator, energy: Energy):
        self.gen, self.energy = gen, energy

    def __enter__(self):
        self.gen.sync()
        self.e0 = self.energy.read_mj()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.gen.sync()
        self.duration = time.perf_counter() - self.start
        self.e1 = self.energy.read_mj()


def run_prompts(gen: Generator, energy: Energy, prompts: list[list[int]], c: int):
    gen.run(prompts[:c], max_new=min(2, gen.output_len))  # warm-up
    records = [Record(len(p)) for p in prompts]
    with Window(gen, energy) as w:
        for i in range(0, len(prompts), c):
            run_batch(gen, prompts[i:i + c], records[i:i + c])
    return records, w


def run_agent(gen: Generator, energy: Energy, prefix, new, c: int):
    sessions = len(new)
    gen.run([prefix + new[s][0] for s in range(min(c, sessions))],
            max_new=min(2, gen.output_len))  # warm-up
    records: list[Record] = []
    with Window(gen, energy) as w:
        for g in range(0, sessions, c):
            run_group(gen, prefix, new, list(range(g, min(g + c, sessions))), records)
    return records, w


def run_group(gen: Generator, prefix, new, group: list[int], records: list[Record]) -> None:
    """Advance these sessions through all their turns, one turn per batch."""
    turns = len(new[0])
    history = {s: list(prefix) for s in group}  # everything before this turn's new ids
    for t in range(turns):
        prompts = [history[s] + new[s][t] for s in group]
        recs = [Record(len(p)) for p in prompts]
        records += recs
        replies = run_batch(gen, prompts, recs)
        if replies is None:  # the batch failed: these sessions' later turns fail too
            records += [Record(0) for _ in group for _ in range(t + 1, turns)]
            return
        for s, prompt, reply in zip(group, prompts, replies):
            history[s] = prompt + reply


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def stats_ms(values_s: list[float]) -> dict:
    import numpy as np

    if not values_s:
        return {k: None for k in STATS}
    v = np.asarray(values_s, dtype=np.float64) * 1e3
    q = np.percentile(v, [50, 90, 99])
    return {"mean": round(float(v.mean()), 4), "min": round(float(v.min()), 4),
            "p50": round(float(q[0]), 4), "p90": round(float(q[1]), 4),
            "p99": round(float(q[2]), 4), "max": round(float(v.max()), 4)}


def run_json(c: int, records: list[Record], duration: float, output_len: int,
             energy_mj: tuple[int | None, int | None]) -> dict:
    done = [r for r in records if r.ok]
    inp = sum(r.input_tokens for r in done)
    out = sum(r.output_tokens for r in done)
    expected = len(records) * output_len
    if out != expected:
        print(f"{TOOL}: warning: concurrency {c}: {out} output tokens, expected {expected}",
              file=sys.stderr)
    energy = None
    e0, e1 = energy_mj
    if e0 is not None and e1 is not None and e1 > e0:
        joules = (e1 - e0) / 1e3
        energy = {"joules": round(joules, 4), "avg_power_w": round(joules / duration, 4),
                  "output_tokens_per_joule": round(out / joules, 6)}
    rate = lambda x: round(x / duration, 4)  # noqa: E731
    return {
        "load": {"mode": "concurrency", "concurrency": c, "request_rate": None},
        "num_requests": len(records), "completed": len(done), "failed": len(records) - len(done),
        "duration_s": round(duration, 6), "requests_per_s": rate(len(done)),
        "input_tokens": inp, "output_tokens": out, "expected_output_tokens": expected,
        "input_tokens_per_s": rate(inp), "output_tokens_per_s": rate(out),
        "total_tokens_per_s": rate(inp + out),
        "ttft_ms": stats_ms([r.ttft for r in done]),
        "tpot_ms": stats_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": stats_ms([x for r in done for x in r.itl]),
        "e2e_ms": stats_ms([r.e2e for r in done]),
        "peak_kv_cache_usage": None, "preemptions": None, "prefix_cache": None,
        "energy": energy, "expert_load": None,
    }


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(report: dict, file) -> None:
    m, d, e = report["model"], report["device"], report["engine"]
    print(f"model: {m['path']} ({m['dtype']}, {report['weights']} weights), device: {d['kind']} "
          f"{d['name']}, transformers {e['transformers']}, torch {e['torch']}, "
          f"attn {e['attn_implementation']}, static batches", file=file)
    w = report["workload"]
    print("workload: " + ", ".join(f"{k}={v}" for k, v in w.items() if v is not None), file=file)
    head = (f"{'conc':>5} {'reqs':>5} {'fail':>4} {'secs':>8} {'req/s':>7} {'out tok/s':>10} "
            f"{'tot tok/s':>10} {'ttft p50':>9} {'ttft p99':>9} {'tpot p50':>9} {'itl p50':>8} "
            f"{'e2e p50':>9} {'J':>8} {'tok/J':>7}")
    print(head, file=file)
    for r in report["runs"]:
        en = r["energy"] or {}
        print(f"{r['load']['concurrency']:>5} {r['num_requests']:>5} {r['failed']:>4} "
              f"{r['duration_s']:>8.2f} {r['requests_per_s']:>7.2f} "
              f"{r['output_tokens_per_s']:>10.1f} {r['total_tokens_per_s']:>10.1f} "
              f"{fmt(r['ttft_ms']['p50']):>9} {fmt(r['ttft_ms']['p99']):>9} "
              f"{fmt(r['tpot_ms']['p50'], '.2f'):>9} {fmt(r['itl_ms']['p50'], '.2f'):>8} "
              f"{fmt(r['e2e_ms']['p50']):>9} {fmt(en.get('joules')):>8} "
              f"{fmt(en.get('output_tokens_per_joule'), '.3f'):>7}", file=file)
    print("(times in ms; CPU figures are not GPU figures)" if d["kind"] == "cpu"
          else "(times in ms)", file=file)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.check:
        print(f"{TOOL}: arguments ok ({a.model})", file=sys.stderr)
        return 0
    started_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    import torch
    import transformers

    if not a.verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    device = pick_device(a)
    dtype_name = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model, config, weights = load_model(a, device, getattr(torch, dtype_name))
    vocab = int(config.vocab_size)
    if vocab <= MIN_TOKEN_ID:
        fail(f"vocab_size {vocab} leaves no ids in [{MIN_TOKEN_ID}, vocab_size)")
    prompts = make_prompts(a, vocab)
    longest = max_total_len(a, prompts)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        fail(f"sequences reach {longest} tokens, beyond max_position_embeddings {limit}")

    gen = Generator(model, config, device, a.output_len)
    energy = Energy(device)
    runs = []
    for c in a.concurrency:
        print(f"{TOOL}: concurrency {c} ...", file=sys.stderr)
        if a.workload == "agent":
            records, w = run_agent(gen, energy, prompts[0], prompts[1], c)
        else:
            subset = prompts[:max(a.prompts_per_run, c)] if a.prompts_per_run else prompts
            records, w = run_prompts(gen, energy, subset, c)
        runs.append(run_json(c, records, w.duration, a.output_len, (w.e0, w.e1)))

    report = {
        "schema": SCHEMA,
        "tool": TOOL,
        "started_at": started_at,
        "device": {"kind": device.type,
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else cpu_name(),
                   "gpu_index": device.index if device.type == "cuda" else None},
        "model": {"name": Path(a.model).resolve().name, "path": str(Path(a.model).resolve()),
                  "dtype": SHORT_DTYPE[dtype_name]},
        "workload": workload_json(a),
        "engine": {"framework": "transformers", "transformers": transformers.__version__,
                   "torch": torch.__version__,
                   "attn_implementation": str(model.config._attn_implementation),
                   "batching": "static"},
        "runs": runs,
    }
    table = dict(report, weights=weights)
    print_table(table, sys.stderr if a.json else sys.stdout)
    text = json.dumps(report, indent=2)
    if a.output_json:
        Path(a.output_json).write_text(text + "\n")
    if a.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
