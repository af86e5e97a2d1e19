"""moe-engine against llama.cpp on the CPU: the same checkpoint, the same machine, one run.

    python3 benches/llama_cpp_compare.py --llama-cpp LLAMA_CPP_DIR --model HF_DIR \
        [--moe target/release/moe] [--dtypes f32,bf16] [--batches 1,8,32] \
        [--input-len 128] [--output-len 32] [--threads 2] [--gguf-dir DIR] [--json OUT]

LLAMA_CPP_DIR is a llama.cpp source tree with `build/bin/llama-batched-bench` built (the
`llama-cpp-python` sdist on PyPI carries the source under vendor/llama.cpp; build with CMake,
`-DGGML_CUDA=OFF -DLLAMA_CURL=OFF`). HF_DIR is a Hugging Face DeepSeek-V2-family checkpoint
with its tokenizer (benches/make_synthetic.py --config ... --tokenizer ... writes one).

For each dtype the checkpoint is converted once with llama.cpp's own convert_hf_to_gguf.py
(`--outtype f32|bf16`, cached in --gguf-dir). llama.cpp's DeepSeek-V2 loader reads
`attention.q_lora_rank` unless the model has 26 or 27 layers (the "lite" variants), so for a
shortened V2-Lite without a q LoRA the converter is run with that key written as 0 (which is
what "no q LoRA" means to the loader).

llama.cpp: `llama-batched-bench -npp IN -ntg OUT -npl B -t THREADS`, decode tok/s = S_TG and
prefill tok/s = S_PP of its table. moe: `moe bench --input-len IN --output-len OUT
--num-prompts B --concurrency B --no-prefix-caching`, decode tok/s = its `steady_decode`
rate (tokens received while all B requests were decoding, none still in prefill: the same
quantity as S_TG) and prefill tok/s = B x IN / TTFT max of its JSON (moe-bench/1). The table
also gives B / TPOT p50, the figure used before `steady_decode` existed: with every prompt
sent at once it counts, for the requests whose prompts were read first, the steps that read
the others, so at batch 32 it runs well below the decode rate. Both engines read the weights into
RAM (llama.cpp after a small warm-up run, so its mmap finds the file in the page cache;
moe bench warms up itself); the two never run at once. Prints a markdown table and writes JSON with --json.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def convert(llama_dir: Path, model: Path, dtype: str, out: Path) -> Path:
    if out.exists():
        return out
    config = json.loads((model / "config.json").read_text())
    layers = config["num_hidden_layers"]
    needs_key = config.get("q_lora_rank") is None and layers not in (26, 27)
    # The converter names the pre-tokenizer by hashing a test string's tokens; transformers 5
    # tokenizes DeepSeek's text slightly differently from the version the table was made
    # with, so an unrecognised hash falls back to DeepSeek-V2's own ("deepseek-llm"). It only
    # decides how llama.cpp splits text; the benchmark feeds token ids.
    pre_tokenizer = "deepseek-llm"
    # Run the converter in a child with its own tree on sys.path; when the loader needs the
    # key, wrap DeepseekV2Model.set_gguf_parameters to add it (the converter itself unchanged).
    runner = f"""
import sys
sys.path.insert(0, {str(llama_dir)!r})
sys.argv = ["convert_hf_to_gguf.py", {str(model)!r}, "--outtype", {dtype!r}, "--outfile", {str(out)!r}]
if {needs_key!r}:
    import conversion.deepseek as ds
    original = ds.DeepseekV2Model.set_gguf_parameters
    def with_q_lora_rank(self):
        original(self)
        self.gguf_writer.add_q_lora_rank(0)
    ds.DeepseekV2Model.set_gguf_parameters = with_q_lora_rank
import conversion.base as base
recognise = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return recognise(self, tokenizer)
    except NotImplementedError:
        return {pre_tokenizer!r}
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""
    subprocess.run([sys.executable, "-c", runner], check=True)
    return out


def llama_cpp_warm_up(llama_dir: Path, gguf: Path, a: argparse.Namespace) -> None:
    """The whole file read once, then one small run, so the measured runs find every weight
    in the page cache (a small run alone leaves most experts unread; moe bench reads all its
    weights at load and warms up inside its own run)."""
    with open(gguf, "rb") as f:
        while f.read(64 << 20):
            pass
    cmd = [str(llama_dir / "build" / "bin" / "llama-batched-bench"), "-m", str(gguf), "-c", "256",
           "-npp", "8", "-ntg", "2", "-npl", "1", "-t", str(a.threads)]
    subprocess.run(cmd, capture_output=True, check=True)


def llama_cpp(llama_dir: Path, gguf: Path, a: argparse.Namespace, batch: int) -> dict:
    cmd = [
        str(llama_dir / "build" / "bin" / "llama-batched-bench"),
        "-m", str(gguf),
        "-c", str(batch * (a.input_len + a.output_len) + 64),
        "-b", "2048", "-ub", "512",
        "-npp", str(a.input_len), "-ntg", str(a.output_len), "-npl", str(batch),
        "-t", str(a.threads),
        "--output-format", "jsonl",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise SystemExit(f"llama-batched-bench printed no result:\n{run.stdout}\n{run.stderr[-2000:]}")
    row = rows[-1]
    return {"decode_tok_s": row["speed_tg"], "prefill_tok_s": row["speed_pp"], "raw": row}


def moe(binary: str, model: Path, dtype: str, a: argparse.Namespace, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [
            binary, "bench", "--model", str(model), "--dtype", dtype,
            "--input-len", str(a.input_len), "--output-len", str(a.output_len),
            "--num-prompts", str(batch), "--concurrency", str(batch),
            "--max-num-seqs", str(max(batch, 1)), "--max-model-len", str(a.input_len + a.output_len + 64),
            "--no-prefix-caching", "--output-json", str(out),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        report = json.loads(out.read_text())
    run = report["runs"][0]
    tpot_rate = batch * 1e3 / run["tpot_ms"]["p50"]
    steady = run.get("steady_decode")
    return {
        "decode_tok_s": steady["tokens_per_s"] if steady else tpot_rate,
        "tpot_tok_s": tpot_rate,
        # Every prompt arrives at once: the last first token ends the batch's prefill.
        "prefill_tok_s": batch * a.input_len * 1e3 / run["ttft_ms"]["max"],
        "raw": run,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, type=Path)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--moe", default="target/release/moe")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gguf-dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--engines", default="llama.cpp,moe")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    engines = a.engines.split(",")
    results = []
    for dtype in a.dtypes.split(","):
        gguf = None
        if "llama.cpp" in engines:
            gguf = convert(a.llama_cpp, a.model, dtype, a.gguf_dir / f"{a.model.name}-{dtype}.gguf")
            llama_cpp_warm_up(a.llama_cpp, gguf, a)
        for batch in map(int, a.batches.split(",")):
            row = {"dtype": dtype, "batch": batch}
            if gguf:
                row["llama.cpp"] = llama_cpp(a.llama_cpp, gguf, a, batch)
            if "moe" in engines:
                row["moe"] = moe(a.moe, a.model, dtype, a, batch)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items()}, default=str)[:400], file=sys.stderr)
    print("| dtype | batch | llama.cpp decode tok/s | moe decode tok/s | moe / llama.cpp | moe B / TPOT p50 | llama.cpp prefill tok/s | moe prefill tok/s | moe / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        l, m = r.get("llama.cpp"), r.get("moe")
        cell = lambda e, key: f"{e[key]:.1f}" if e and e.get(key) else "-"
        ratio = lambda key: f"{m[key] / l[key]:.2f}" if l and m and l.get(key) and m.get(key) else "-"
        print(
            f"| {r['dtype']} | {r['batch']} | {cell(l, 'decode_tok_s')} | {cell(m, 'decode_tok_s')} | {ratio('decode_tok_s')} | {cell(m, 'tpot_tok_s')} "
            f"| {cell(l, 'prefill_tok_s')} | {cell(m, 'prefill_tok_s')} | {ratio('prefill_tok_s')} |"
        )
    if a.json:
        a.json.write_text(json.dumps({"input_len": a.input_len, "output_len": a.output_len, "threads": a.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
