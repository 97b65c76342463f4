#!/usr/bin/env python3
"""The test of scripts/collect_stats.py, where torch is installed (not in CI).

    check_collect_stats.py [MODELPRESS_BINARY]   (default target/release/modelpress)

Builds three tiny random LLaMA checkpoints with a word-level tokenizer (a
causal LM, the same with its output layer tied to the embedding, and a base
model without the `model.` prefix, which collect_stats loads into the class
with a head), collects full statistics (`--full`) from calibration text,
compresses each with the calibrated presets, and loads every output back in
transformers. Fails unless every step succeeds and, on held-out text, GPTQ's
logits are closer to the original's than round-to-nearest's (int4-g128).
Prints the relative logit errors.

Needs torch, transformers, tokenizers and safetensors.
"""
import os
import random
import subprocess
import sys
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "target", "release", "modelpress")
WORDS = ("the a model weight layer token compress quantize prune share data disk speed memory error "
         "output input matrix row column group scale zero point grid sparse dense packed format shard").split()


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def build(work):
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                               bos_token="[BOS]", eos_token="[EOS]")
    dirs = {}
    for kind in ("causal", "tied", "base"):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=768,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                       max_position_embeddings=256, tie_word_embeddings=kind == "tied")
        model = transformers.LlamaModel(cfg) if kind == "base" else transformers.LlamaForCausalLM(cfg)
        d = os.path.join(work, kind)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs[kind] = d
    return dirs, tok


def run(*args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def outputs(d, tok, texts):
    cls = transformers.AutoModel if "base" in os.path.basename(d) else transformers.AutoModelForCausalLM
    m = cls.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        res = [m(**tok(t, return_tensors="pt")) for t in texts]
    return [r.logits if hasattr(r, "logits") else r.last_hidden_state for r in res]


def main():
    rng = random.Random(1)
    work = tempfile.mkdtemp(prefix="collect-stats-")
    samples = os.path.join(work, "samples.txt")
    with open(samples, "w") as f:
        for _ in range(64):
            f.write(text(rng, rng.randint(8, 40)) + "\n")
    held_out = [text(rng, 32) for _ in range(16)]
    dirs, tok = build(work)
    ok = True
    for kind, d in dirs.items():
        stats = os.path.join(work, f"{kind}.stats.safetensors")
        print(run(sys.executable, os.path.join(HERE, "collect_stats.py"), d, samples, "-o", stats, "--full").strip())
        ref = outputs(d, tok, held_out)
        errs = {}
        for preset in ("int4-g128", "int4-g128-gptq", "sparse-2of4-int8-gptq", "deep-compression-calibrated"):
            out = os.path.join(work, f"{kind}-{preset}")
            run(BIN, "compress", d, "-o", out, "--preset", preset, "--stats", stats, "--format", "dense")
            for extra in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                if os.path.exists(os.path.join(d, extra)):
                    with open(os.path.join(d, extra), "rb") as src, open(os.path.join(out, extra), "wb") as dst:
                        dst.write(src.read())
            got = outputs(out, tok, held_out)
            errs[preset] = sum(((g - r).norm() / r.norm()).item() for g, r in zip(got, ref)) / len(ref)
        print(kind, " ".join(f"{p} {e:.4f}" for p, e in errs.items()))
        if not errs["int4-g128-gptq"] < errs["int4-g128"]:
            print(f"{kind}: gptq is not closer than round-to-nearest")
            ok = False
    print("collect_stats check", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
