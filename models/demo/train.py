#!/usr/bin/env python3
"""Trains the demo model: a tiny DeepSeek-V3 (MLA with q LoRA, sigmoid `noaux_tc` routing
with an aux-loss-free correction bias, a shared expert, a dense first layer) on two tasks
whose answers a test can check: multi-digit addition ("12345+67890=" -> "80235") and string
reversal ("rev:hello=" -> "olleh"), each both as raw text and through the chat template.

Everything is seeded: the same versions on the same CPU ISA write the same weights and
heldout.jsonl (training.json also records timings and the machine).

The committed model is two runs of this script (about 66 + 22 minutes on 2 CPU cores):

    python3 models/demo/train.py --out /tmp/demo-stage1    # 6000 steps at lr 2e-3, seed 0
    python3 models/demo/train.py --init-from /tmp/demo-stage1 --steps 2000 --lr 4e-4 --seed 1
                                                           # writes models/demo/{config.json, ...}
    python3 models/demo/train.py --eval     # only rewrites heldout.jsonl from the saved model

The tokenizer is character-level (a real `tokenizer.json`: a BPE model over single
characters with no merges, special tokens for the chat roles and end of text).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

# Pin torch's CPU kernels like the fixture scripts do, so reruns on other CPUs agree.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
SPECIALS = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<unk>"]
PAD, EOS, USER, ASSISTANT, SYSTEM, UNK = range(len(SPECIALS))
CHARS = list("0123456789+=:") + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(" .,?!-*/()'\"")
VOCAB = SPECIALS + CHARS
VOCAB_SIZE = 64
MAX_DIGITS = 5
MAX_REVERSE = 10
SEQ_LEN = 32
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def model_config() -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=True,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=PAD,
        num_nextn_predict_layers=0,
        initializer_range=0.02,
    )


def build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# ---- the tasks ------------------------------------------------------------------------


def addition(rng: random.Random) -> tuple[str, str]:
    def number() -> int:
        digits = rng.randint(1, MAX_DIGITS)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    a, b = number(), number()
    return f"{a}+{b}=", str(a + b)


def reversal(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, MAX_REVERSE)))
    return f"rev:{word}=", word[::-1]


def problem(rng: random.Random) -> tuple[str, str]:
    return addition(rng) if rng.random() < 0.85 else reversal(rng)


def heldout_problems(n: int = 500) -> list[dict]:
    """400 additions and 100 reversals from the training distribution, never trained on."""
    rng = random.Random(20261202)
    seen, out = set(), []
    while len(out) < n:
        prompt, answer = addition(rng) if len(out) < n * 4 // 5 else reversal(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "answer": answer})
    return out


def chat_prompt(prompt: str) -> str:
    return f"<|user|>{prompt}<|assistant|>"


def batch(tok, rng, size, exclude) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids [size, SEQ_LEN]; labels [size, SEQ_LEN] (-100 except on answer + EOS)."""
    ids = torch.full((size, SEQ_LEN), PAD, dtype=torch.long)
    labels = torch.full((size, SEQ_LEN), -100, dtype=torch.long)
    for row in range(size):
        prompt, answer = problem(rng)
        while prompt in exclude:
            prompt, answer = problem(rng)
        if rng.random() < 0.5:
            prompt = chat_prompt(prompt)
        p, a = encode(tok, prompt), encode(tok, answer) + [EOS]
        seq = p + a
        ids[row, : len(seq)] = torch.tensor(seq)
        # labels[t] is the token at t; the loss compares logits[t-1] with it.
        labels[row, len(p) : len(seq)] = torch.tensor(a)
    return ids, labels


# ---- aux-loss-free balancing (DeepSeek-V3, section 2.1.2) ----------------------------


class LoadCounter:
    """Counts, per MoE layer, how many real tokens each routed expert received this step."""

    def __init__(self, model, n_experts):
        self.counts, self.mask = {}, None
        self.routers = []
        for i, layer in enumerate(model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                self.routers.append((i, gate))
                gate.register_forward_hook(self.hook(i, n_experts))

    def hook(self, layer, n_experts):
        def record(_module, _inputs, output):
            indices = output[2]  # [tokens, top_k]
            if self.mask is not None and indices.shape[0] == self.mask.shape[0]:
                indices = indices[self.mask]
            self.counts[layer] = torch.bincount(indices.reshape(-1), minlength=n_experts).float()

        return record

    def update_biases(self, speed):
        """bias_i += speed * sign(mean load - load_i): under-loaded experts gain."""
        imbalance = {}
        with torch.no_grad():
            for i, gate in self.routers:
                load = self.counts[i]
                gate.e_score_correction_bias += speed * torch.sign(load.mean() - load)
                imbalance[i] = (load.max() / load.mean()).item()
        return imbalance


# ---- evaluation -----------------------------------------------------------------------


ANSWER_TOKENS = MAX_REVERSE + 1  # the longest answer (10 characters) and its EOS
EXAMPLES = ["12345+67890=", "rev:engine="]  # the READMEs' commands


@torch.no_grad()
def greedy(model, tok, prompt) -> tuple[str, float]:
    """transformers' greedy answer (up to EOS, at most ANSWER_TOKENS tokens) and its margin:
    the smallest gap between the best and the second-best logit over its steps."""
    ids = torch.tensor([encode(tok, prompt)])
    out = model.generate(
        ids, max_new_tokens=ANSWER_TOKENS, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
        output_logits=True, return_dict_in_generate=True,
    )
    gen = out.sequences[0, ids.shape[1] :].tolist()
    margin = min((lambda top: (top[0] - top[1]).item())(step[0].topk(2).values) for step in out.logits)
    if EOS in gen:
        gen = gen[: gen.index(EOS)]
    return tok.decode(gen), margin


def accuracy(model, tok, problems, chat=False):
    answers = [greedy(model, tok, chat_prompt(p["prompt"]) if chat else p["prompt"])[0] for p in problems]
    return sum(a == p["answer"] for a, p in zip(answers, problems)) / len(problems)


def evaluate(out: Path, tok, heldout) -> dict:
    """Reloads the saved model as the engine's tests see it (f32, eager attention), writes
    heldout.jsonl with transformers' answers and margins, raw and through the chat template,
    and returns the accuracies and the READMEs' examples."""
    model = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    rows = []
    for p in heldout:
        raw, raw_margin = greedy(model, tok, p["prompt"])
        chat, chat_margin = greedy(model, tok, chat_prompt(p["prompt"]))
        rows.append({**p, "transformers_raw": raw, "raw_margin": raw_margin,
                     "transformers_chat": chat, "chat_margin": chat_margin})
    with open(out / "heldout.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    n = len(rows)
    return {
        "heldout_accuracy_raw": sum(r["transformers_raw"] == r["answer"] for r in rows) / n,
        "heldout_accuracy_chat": sum(r["transformers_chat"] == r["answer"] for r in rows) / n,
        "smallest_margin": min(min(r["raw_margin"], r["chat_margin"]) for r in rows),
        "examples": {prompt: greedy(model, tok, prompt)[0] for prompt in EXAMPLES},
    }


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---- main -----------------------------------------------------------------------------


def write_tokenizer_files(tok: Tokenizer, out: Path):
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 64,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bias-speed", type=float, default=1e-3, help="aux-loss-free bias update speed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--eval", action="store_true", help="only evaluate the saved model")
    ap.add_argument("--init-from", type=Path, help="continue from this saved model (its biases too)")
    args = ap.parse_args()
    if transformers.__version__ != "5.23.0" or torch.__version__.split("+")[0] != "2.15.0":
        sys.exit(f"needs transformers 5.23.0 and torch 2.15.0 (have {transformers.__version__}, {torch.__version__})")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = build_tokenizer()
    heldout = heldout_problems()

    if args.eval:
        results = evaluate(args.out, tok, heldout)
        summary_path = args.out / "training.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary.update(results)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(results))
        return

    config = model_config()
    if args.init_from:
        model = DeepseekV3ForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        model = DeepseekV3ForCausalLM(config)
    model.train()
    counter = LoadCounter(model, config.n_routed_experts)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(200, args.steps // 10)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return 0.05 * args.lr + 0.95 * args.lr * 0.5 * (1 + math.cos(math.pi * t))

    rng = random.Random(args.seed)
    exclude = {p["prompt"] for p in heldout}
    probe = heldout[:100] + heldout[-20:]
    started = time.time()
    log = []
    for step in range(args.steps):
        ids, labels = batch(tok, rng, args.batch_size, exclude)
        counter.mask = (ids != PAD).reshape(-1)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB_SIZE), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imbalance = counter.update_biases(args.bias_speed)
        if step % 100 == 0 or step == args.steps - 1:
            entry = {"step": step, "loss": round(loss.item(), 5), "seconds": round(time.time() - started, 1),
                     "max_over_mean_load": {str(k): round(v, 3) for k, v in imbalance.items()}}
            if step % 500 == 0 or step == args.steps - 1:
                model.eval()
                entry["probe_accuracy"] = accuracy(model, tok, probe)
                model.train()
            log.append(entry)
            print(json.dumps(entry), flush=True)

    model.eval()
    counter.mask = None
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    GenerationConfig(eos_token_id=EOS, pad_token_id=PAD).save_pretrained(args.out)
    write_tokenizer_files(tok, args.out)
    train_seconds = round(time.time() - started, 1)
    summary = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} CPUs",
        "init_from": str(args.init_from) if args.init_from else None,
        "seed": args.seed,
        "lr": args.lr,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_seconds": train_seconds,
        "correction_bias": {
            str(i): [round(x, 4) for x in gate.e_score_correction_bias.tolist()] for i, gate in counter.routers
        },
        "log": log,
    }
    if args.init_from and (args.init_from / "training.json").exists():
        earlier = json.loads((args.init_from / "training.json").read_text())
        summary["initialised_from_run"] = {k: v for k, v in earlier.items() if k not in ("examples",)}
    results = evaluate(args.out, tok, heldout)
    summary.update(results)
    (args.out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
