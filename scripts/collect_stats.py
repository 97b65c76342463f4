#!/usr/bin/env python3
"""Collect the activation statistics modelpress's calibrated stages use
(gptq, sparsegpt, wanda, importance-weighted scales and sharing).

    collect_stats.py MODEL_DIR SAMPLES.txt -o STATS.safetensors [--full]
        [--max-length 2048] [--samples 128] [--device cuda] [--dtype float32]

MODEL_DIR is a Hugging Face model directory (or hub id); SAMPLES.txt holds
one calibration sample per line (empty lines skipped). Each sample is run
through the model alone (no padding), and a forward hook on every
nn.Linear and nn.Conv2d records its input x (a conv's input unfolded to
im2col columns, so a weight [O, C, kh, kw] sees C*kh*kw inputs):

  <module>.weight.in_sum2  F32 [d_in]        sum over tokens of x_j^2
  <module>.weight.counts   F32 [1]           tokens summed
  <module>.weight.xtx      F32 [d_in, d_in]  sum of x x^T   (with --full)

and __metadata__ {"modelpress.stats": "1", "modelpress.stats.aliases":
{...}}: weights whose statistics came out identical (q/k/v, gate/up read the
same input) are stored once, the others listed as aliases. Sums are taken in
float64 and written as float32. Grouped convolutions (groups > 1) are
skipped: their groups see different inputs.

Statistics are named as the checkpoint in MODEL_DIR names its weights: a
module path that differs only by the model's base prefix (a checkpoint of
the base model loaded into a class with a head, or the other way round) is
mapped to the checkpoint's name, and a weight the checkpoint does not hold
(an output layer tied to the embedding) is left out and reported.

Needs torch, transformers and safetensors; modelpress's CI does not run it.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F


def load_model(path, dtype, device):
    import transformers

    dt = getattr(torch, dtype)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            model = cls.from_pretrained(path, torch_dtype=dt)
            break
        except (ValueError, OSError):
            continue
    else:
        sys.exit(f"cannot load a model from {path}")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tok


def checkpoint_names(path):
    """The tensor names of the checkpoint in a model directory, or None."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return set(json.load(f)["weight_map"])
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "np") as f:
            return set(f.keys())
    return None


def checkpoint_name(weight, names, prefix):
    """`weight` (a module path + ".weight") as the checkpoint names it."""
    if names is None or weight in names:
        return weight
    if prefix and weight.startswith(prefix + ".") and weight[len(prefix) + 1:] in names:
        return weight[len(prefix) + 1:]
    if prefix and f"{prefix}.{weight}" in names:
        return f"{prefix}.{weight}"
    return None


class Stats:
    def __init__(self, d_in, full, device):
        self.in_sum2 = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(d_in, d_in, dtype=torch.float64, device=device) if full else None
        self.count = 0

    def add(self, x):
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.in_sum2 += (x * x).sum(0)
        if self.xtx is not None:
            self.xtx += x.T @ x
        self.count += x.shape[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("samples")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--full", action="store_true", help="also collect xtx (needed by gptq, sparsegpt, compensate)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--samples-max", "--samples", dest="samples_max", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from safetensors.torch import save_file

    model, tok = load_model(args.model, args.dtype, args.device)
    stats = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, inp, out, name=name):
                x = inp[0].detach()
                s = stats.setdefault(name, Stats(x.shape[-1], args.full, x.device))
                s.add(x)
        elif isinstance(mod, torch.nn.Conv2d) and mod.groups == 1:
            def hook(m, inp, out, name=name):
                x = inp[0].detach()
                if m.padding_mode != "zeros":
                    return
                cols = F.unfold(x, m.kernel_size, dilation=m.dilation,
                                padding=m.padding, stride=m.stride)  # [B, C*kh*kw, L]
                cols = cols.transpose(1, 2)
                s = stats.setdefault(name, Stats(cols.shape[-1], args.full, x.device))
                s.add(cols)
        else:
            continue
        hooks.append(mod.register_forward_hook(hook))

    with open(args.samples, encoding="utf-8") as f:
        samples = [line.strip() for line in f if line.strip()][: args.samples_max]
    if not samples:
        sys.exit(f"{args.samples} holds no samples")
    with torch.no_grad():
        for text in samples:
            enc = tok(text, return_tensors="pt", truncation=True, max_length=args.max_length)
            model(**{k: v.to(args.device) for k, v in enc.items()})
    for h in hooks:
        h.remove()

    names = checkpoint_names(args.model)
    prefix = getattr(model, "base_model_prefix", "")
    tensors, aliases, kept, missing = {}, {}, [], []
    for name, s in stats.items():
        weight = checkpoint_name(f"{name}.weight", names, prefix)
        if weight is None:
            missing.append(f"{name}.weight")
            continue
        twin = next((k for k, t in kept if t.count == s.count and torch.equal(t.in_sum2, s.in_sum2)
                     and (t.xtx is None or torch.equal(t.xtx, s.xtx))), None)
        if twin is not None:
            aliases[weight] = twin
            continue
        kept.append((weight, s))
        tensors[f"{weight}.in_sum2"] = s.in_sum2.float().cpu().contiguous()
        tensors[f"{weight}.counts"] = torch.tensor([float(s.count)], dtype=torch.float32)
        if s.xtx is not None:
            x = s.xtx
            tensors[f"{weight}.xtx"] = ((x + x.T) * 0.5).float().cpu().contiguous()
    meta = {"modelpress.stats": "1"}
    if aliases:
        meta["modelpress.stats.aliases"] = json.dumps(aliases)
    save_file(tensors, args.output, metadata=meta)
    if missing:
        print(f"left out, not in the checkpoint (tied or not saved): {', '.join(missing)}")
    print(f"{len(kept)} weights ({len(aliases)} aliases), {len(samples)} samples -> {args.output}")


if __name__ == "__main__":
    main()
