#!/usr/bin/env python3
"""Scores `moe generate --json` on the demo model's 500 held-out problems (no dependencies).

    python3 models/demo/score.py prompts [--chat] > /tmp/heldout-prompts.jsonl
    moe generate --model models/demo --prompts-file /tmp/heldout-prompts.jsonl --json > /tmp/out.jsonl
    python3 models/demo/score.py score /tmp/out.jsonl [--chat] [--min-accuracy 0.99]

`score` prints the accuracy and how many answers equal transformers' (recorded in
heldout.jsonl by train.py) as one JSON line; it exits 1 below --min-accuracy.
"""

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def problems():
    with open(HERE / "heldout.jsonl") as f:
        return [json.loads(line) for line in f]


def render(prompt, chat):
    return f"<|user|>{prompt}<|assistant|>" if chat else prompt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prompts", "score"])
    ap.add_argument("results", nargs="?", help="score: the `moe generate --json` output")
    ap.add_argument("--chat", action="store_true", help="prompts as the chat template renders them")
    ap.add_argument("--min-accuracy", type=float, default=0.0)
    args = ap.parse_args()
    held = problems()
    if args.what == "prompts":
        for p in held:
            print(json.dumps({"prompt": render(p["prompt"], args.chat), "max_tokens": 11}))
        return
    if not args.results:
        sys.exit("score: name the `moe generate --json` output file")
    with open(args.results) as f:
        outputs = [json.loads(line) for line in f if line.strip()]
    if len(outputs) != len(held):
        sys.exit(f"score: {len(outputs)} outputs for {len(held)} problems")
    key = "transformers_chat" if args.chat else "transformers_raw"
    right = sum(o["text"] == p["answer"] for o, p in zip(outputs, held))
    same = sum(o["text"] == p[key] for o, p in zip(outputs, held))
    transformers_right = sum(p[key] == p["answer"] for p in held)
    report = {
        "problems": len(held),
        "accuracy": right / len(held),
        "transformers_accuracy": transformers_right / len(held),
        "equal_to_transformers": same,
        "wrong": [{"prompt": p["prompt"], "answer": p["answer"], "got": o["text"]}
                  for o, p in zip(outputs, held) if o["text"] != p["answer"]][:20],
    }
    print(json.dumps(report))
    sys.exit(0 if report["accuracy"] >= args.min_accuracy else 1)


if __name__ == "__main__":
    main()
