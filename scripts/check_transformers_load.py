#!/usr/bin/env python3
"""Loads a compressed-tensors output and its original with
`transformers.AutoModel.from_pretrained` (default settings: no
`run_compressed` switch, no `CompressedTensorsConfig`) and prints the mean
cosine similarity of their mean-pooled last hidden states on a few inputs.

    pip install torch transformers compressed-tensors
    modelpress compress ORIG -o OUT --preset int4-g128 --format compressed-tensors
    python3 scripts/check_transformers_load.py OUT ORIG [--min-cosine 0.9]

Exits 1 when loading reports missing or newly initialised weights of the
compressed model, or when the cosine is under --min-cosine.
"""
import argparse
import sys

import torch
from transformers import AutoConfig, AutoModel


def pooled(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return out.last_hidden_state.float().mean(dim=1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("original_dir")
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--min-cosine", type=float, default=0.0)
    args = ap.parse_args()

    config = AutoConfig.from_pretrained(args.original_dir)
    compressed, info = AutoModel.from_pretrained(args.out_dir, output_loading_info=True)
    original = AutoModel.from_pretrained(args.original_dir)
    compressed.eval()
    original.eval()

    # Only weights of the base model matter: heads present in the checkpoint
    # but not in AutoModel's class show up as unexpected and are fine.
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k]
    mismatched = info.get("mismatched_keys", [])
    quantization = getattr(compressed.config, "quantization_config", None)
    print(f"quantization_config: {'present' if quantization else 'absent'}")
    if missing or mismatched:
        print(f"missing keys: {missing[:10]} ({len(missing)})")
        print(f"mismatched keys: {mismatched[:10]} ({len(mismatched)})")

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.inputs, args.length), generator=gen)
    a = pooled(compressed, ids)
    b = pooled(original, ids)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    print(
        f"{type(compressed).__name__}: mean cosine {cos.mean().item():.6f} "
        f"(min {cos.min().item():.6f}) over {args.inputs} inputs of {args.length} tokens"
    )
    if missing or mismatched:
        return 1
    return 0 if cos.mean().item() >= args.min_cosine else 1


if __name__ == "__main__":
    sys.exit(main())
