#!/usr/bin/env python3
"""One table from the GPU bundle's end-to-end runs (scripts/gpu-run.sh, phase 2).

Owns: reading the `moe-bench/1` JSON files a phase-2 run left in OUT (`e2e-grouped-c*.json`,
`e2e-reference-c*.json`, and transformers' `hf.json`), putting each concurrency's figures side
by side (output and steady-decode tokens/s, TPOT p50, tokens per joule, moe vs transformers),
and placing the decode rate against the HBM roofline of the model's config; writes
OUT/summary.json and OUT/summary.md. Does not own any measurement.

    python3 benches/gpu_summary.py OUT --model CHECKPOINT_DIR [--bandwidth-gbs 4300]

Roofline. A decode step at batch B reads every weight it uses once: the embeddings row,
attention, norms and dense MLPs, the router, the shared experts, the distinct routed experts
the B tokens pick (expected E * (1 - (1 - k/E)^B) of E with top-k routing, uniform), and the
LM head; plus each sequence's cache (context x latent row). The roofline rate is B tokens per
(bytes / bandwidth). Bandwidth: `--bandwidth-gbs`, else measured here with a device-to-device
copy through torch when a GPU is present, else unknown (the percentages are then left out).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from pathlib import Path

DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "bfloat16": 2, "float16": 2, "float32": 4}


def weight_bytes_per_step(cfg: dict, batch: int, dtype_bytes: int, context: int) -> dict:
    """Bytes a decode step of `batch` sequences at `context` cached tokens reads (DeepSeek-V2
    family config: MLA attention, first_k_dense_replace dense layers, then MoE layers)."""
    h = cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    r = cfg["kv_lora_rank"]
    q_rank = cfg.get("q_lora_rank")
    q = h * heads * (nope + rope) if not q_rank else h * q_rank + q_rank * heads * (nope + rope)
    attn = q + h * (r + rope) + r * heads * (nope + v) + heads * v * h
    dense_layers = min(cfg.get("first_k_dense_replace", 0), layers)
    moe_layers = layers - dense_layers
    dense_mlp = 3 * h * cfg["intermediate_size"]
    e, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    expert = 3 * h * cfg["moe_intermediate_size"]
    distinct = e * (1 - (1 - k / e) ** batch)
    shared = cfg.get("n_shared_experts", 0) * expert
    lm_head = cfg["vocab_size"] * h
    params = (layers * attn + dense_layers * dense_mlp + moe_layers * (e * h + shared + distinct * expert)
              + lm_head + batch * h)
    cache = batch * context * layers * (r + rope) * dtype_bytes
    return {"weights": params * dtype_bytes, "cache": cache, "distinct_experts": distinct}


def measured_bandwidth_gbs() -> float | None:
    """Device-to-device copy bandwidth (read + write) through torch, or None without a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    return 2 * n * reps / seconds / 1e9


def load(path: str) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def run_figures(run: dict) -> dict:
    energy = run.get("energy") or {}
    steady = run.get("steady_decode") or {}
    return {
        "completed": run.get("completed"),
        "failed": run.get("failed"),
        "output_tokens_per_s": run.get("output_tokens_per_s"),
        "steady_decode_tokens_per_s": steady.get("tokens_per_s"),
        "tpot_p50_ms": (run.get("tpot_ms") or {}).get("p50"),
        "ttft_p50_ms": (run.get("ttft_ms") or {}).get("p50"),
        "output_tokens_per_joule": energy.get("output_tokens_per_joule"),
        "avg_power_w": energy.get("avg_power_w"),
    }


def concurrency_of(run: dict, fallback: int) -> int:
    load_ = run.get("load")
    c = load_.get("concurrency") if isinstance(load_, dict) else None
    return int(c) if c else fallback


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the phase's output folder")
    ap.add_argument("--model", required=True, help="the checkpoint both engines ran (config.json)")
    ap.add_argument("--results", default=None,
                    help="another folder of results (an earlier phase's); the output folder's win")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="HBM bandwidth to use for the roofline")
    ap.add_argument("--context", type=int, default=None, help="mean cached tokens in decode (default: input + output/2)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    cfg_path = Path(a.model) / "config.json"
    if not cfg_path.is_file():
        ap.error(f"no config.json in {a.model}")
    cfg = json.loads(cfg_path.read_text())

    rows: dict[tuple[str, int], dict] = {}
    device = None
    workload = None
    folders = [Path(a.results)] if a.results else []
    folders.append(out)  # read last: its files replace an earlier phase's
    paths = [p for folder in folders for p in sorted(glob.glob(str(folder / "e2e-*-c*.json")))]
    for path in paths:
        m = re.search(r"e2e-(\w+)-c(\d+)\.json$", path)
        report = load(path)
        if not m or not report:
            continue
        device = report.get("device") or device
        workload = report.get("workload") or workload
        for run in report.get("runs", []):
            rows[(f"moe {m.group(1)}", concurrency_of(run, int(m.group(2))))] = run_figures(run)
    for folder in folders:
        hf = load(str(folder / "hf.json"))
        for run in (hf or {}).get("runs", []):
            rows[("transformers", concurrency_of(run, 0))] = run_figures(run)

    dtype = str((workload or {}).get("dtype") or "bf16")
    dtype_bytes = DTYPE_BYTES.get(dtype, 2)
    wl = workload or {}
    context = a.context or int((wl.get("input_len") or 512) + (wl.get("output_len") or 128) / 2)
    bandwidth = a.bandwidth_gbs or measured_bandwidth_gbs()
    for (engine, c), fig in rows.items():
        step = weight_bytes_per_step(cfg, c, dtype_bytes, context)
        fig["bytes_per_step"] = step["weights"] + step["cache"]
        if bandwidth and fig.get("steady_decode_tokens_per_s"):
            roofline = c * bandwidth * 1e9 / fig["bytes_per_step"]
            fig["roofline_tokens_per_s"] = roofline
            fig["roofline_fraction"] = fig["steady_decode_tokens_per_s"] / roofline
    for (engine, c), fig in rows.items():
        base = rows.get(("transformers", c))
        if engine != "transformers" and base and base.get("output_tokens_per_s") and fig.get("output_tokens_per_s"):
            fig["vs_transformers"] = fig["output_tokens_per_s"] / base["output_tokens_per_s"]

    summary = {
        "schema": "moe-gpu-summary/1",
        "device": device,
        "model": str(a.model),
        "bandwidth_gbs": bandwidth,
        "context_for_roofline": context,
        "rows": [{"engine": e, "concurrency": c, **fig} for (e, c), fig in sorted(rows.items(), key=lambda x: (x[0][0], x[0][1]))],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    def f(x, nd=1):
        return "-" if x is None else f"{x:.{nd}f}"

    lines = [
        f"device: {(device or {}).get('name', 'unknown')}; HBM bandwidth for the roofline: "
        f"{f(bandwidth, 0)} GB/s; model: {a.model}",
        "",
        "| engine | concurrency | ok/fail | out tok/s | decode tok/s | TPOT p50 ms | tok/J | vs transformers | % of roofline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        frac = row.get("roofline_fraction")
        lines.append(
            f"| {row['engine']} | {row['concurrency']} | {row.get('completed')}/{row.get('failed')} "
            f"| {f(row.get('output_tokens_per_s'))} | {f(row.get('steady_decode_tokens_per_s'))} "
            f"| {f(row.get('tpot_p50_ms'), 2)} | {f(row.get('output_tokens_per_joule'), 2)} "
            f"| {f(row.get('vs_transformers'), 2)} | {'-' if frac is None else f'{100 * frac:.0f}%'} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not rows:
        print("gpu_summary: no end-to-end results found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
