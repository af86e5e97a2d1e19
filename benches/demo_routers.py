#!/usr/bin/env python3
"""Swaps the trained demo model's expert routing from the command line and reports what each
router does to its held-out accuracy and expert load (a markdown table; `--json` for JSON).

    python3 benches/demo_routers.py --moe target/release/moe [--router SPEC ...] [--dtype bf16]

Each router runs `moe generate --model models/demo --prompts-file ... --json --routing-stats`
over the 500 held-out problems (raw prompts), then scores the answers against
models/demo/heldout.jsonl. Without --router it runs the checkpoint's routing and a few
variants: no correction bias, top-1, top-3, plain sigmoid top-2 without groups.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "models", "demo")
DEFAULT_ROUTERS = [
    None,
    "noaux_tc:bias=false",
    "noaux_tc:top_k=1",
    "noaux_tc:top_k=3",
    "greedy:scoring=sigmoid",
]


def run(moe, router, dtype, prompts, work):
    stats = os.path.join(work, "routing.json")
    cmd = [moe, "generate", "--model", DEMO, "--prompts-file", prompts, "--json", "--dtype", dtype,
           "--no-prefix-caching", "--routing-stats", stats]
    if router:
        cmd += ["--router", router]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    answers = [json.loads(line)["text"] for line in out.stdout.splitlines() if line.strip()]
    with open(stats) as f:
        load = json.load(f)
    return answers, load


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", required=True, help="the moe binary")
    ap.add_argument("--router", action="append", help="a --router SPEC (repeatable); default: a set of variants")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with open(os.path.join(DEMO, "heldout.jsonl")) as f:
        problems = [json.loads(line) for line in f]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        prompts = os.path.join(work, "prompts.jsonl")
        with open(prompts, "w") as f:
            for p in problems:
                f.write(json.dumps({"prompt": p["prompt"], "max_tokens": 11}) + "\n")
        for router in args.router or DEFAULT_ROUTERS:
            answers, load = run(args.moe, router, args.dtype, prompts, work)
            right = [a == p["answer"] for a, p in zip(answers, problems)]
            adds = [r for r, p in zip(right, problems) if not p["prompt"].startswith("rev:")]
            revs = [r for r, p in zip(right, problems) if p["prompt"].startswith("rev:")]
            rows.append({
                "router": router or "checkpoint (noaux_tc, trained bias)",
                "accuracy": sum(right) / len(right),
                "addition_accuracy": sum(adds) / len(adds),
                "reversal_accuracy": sum(revs) / len(revs),
                "mean_imbalance": load["mean_imbalance"],
                "max_imbalance": load["max_imbalance"],
                "imbalance_per_layer": {str(l["layer"]): l["imbalance"] for l in load["layers"]},
            })
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"| router ({args.dtype}) | accuracy | addition | reversal | imbalance mean / max |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['router']}` | {r['accuracy']:.1%} | {r['addition_accuracy']:.1%} | "
              f"{r['reversal_accuracy']:.1%} | {r['mean_imbalance']:.2f} / {r['max_imbalance']:.2f} |")


if __name__ == "__main__":
    main()
