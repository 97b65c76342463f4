#!/usr/bin/env python3
"""Checks a compressed-tensors output against the dense output of the same job
with the `compressed-tensors` package itself: its model-free dequantizer must
restore every tensor to exactly the dense values (f32 inputs).

    pip install compressed-tensors
    modelpress compress IN -o CT --preset int4-g128 --format compressed-tensors
    modelpress compress IN -o DENSE --preset int4-g128 --format dense
    python3 scripts/check_compressed_tensors.py CT DENSE
"""
import sys

import torch
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
    CompressedTensorsDequantizer,
)
from safetensors.torch import load_file


def main(ct_dir: str, dense_dir: str) -> int:
    tensors = load_file(f"{ct_dir}/model.safetensors")
    dense = load_file(f"{dense_dir}/model.safetensors")
    restored = CompressedTensorsDequantizer(ct_dir, dtype=torch.float32).validate(tensors)
    if set(restored) != set(dense):
        print("tensor names differ:", sorted(set(restored) ^ set(dense)))
        return 1
    bad = 0
    for name, want in dense.items():
        got = restored[name].to(want.dtype)
        if got.shape != want.shape or not torch.equal(got, want):
            diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else None
            print(f"{name}: differs (shape {tuple(got.shape)} vs {tuple(want.shape)}, max |diff| {diff})")
            bad += 1
    print(f"{len(dense)} tensors checked, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
