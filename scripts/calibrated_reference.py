#!/usr/bin/env python3
"""Plain numpy GPTQ and SparseGPT: the reference the Rust kernels are timed
against (scripts/bench-calibrated.sh).

Follows IST-DASLab gptq.py / sparsegpt.py line by line (H = X^T X, dead
columns, damp = 0.01 * mean diag, upper Cholesky factor of H^-1, blocks of
128 columns with lazy updates, group grids refit at each group boundary),
with modelpress's integer grid: symmetric scale = absmax / (2^(b-1) - 1),
q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1) (min-max, no search).

    calibrated_reference.py gptq|sparsegpt ROWS COLS W.f32 XTX.f32 [OUT.f32]

W.f32 and XTX.f32 are raw little-endian f32 (row-major); prints one JSON
line with the seconds and the relative output error tr(dW H dW^T) / tr(W H W^T).
"""
import json
import sys
import time

import numpy as np


def inverse_factor(H, damp=0.01):
    H = H.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    d = damp * np.mean(np.diag(H))
    H[np.diag_indices_from(H)] += d
    L = np.linalg.cholesky(H)
    Linv = np.linalg.inv(L)
    Hinv = Linv.T @ Linv
    return np.linalg.cholesky(Hinv).T.astype(np.float32), dead


def sym_grid(w, bits):
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(w).max(axis=1, keepdims=True)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    return scale


def quantize(w, scale, bits):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (np.clip(np.round(w / scale[:, 0]), qmin, qmax) * scale[:, 0]).astype(np.float32)


def gptq(W, H, bits=4, groupsize=128, blocksize=128):
    W = W.copy()
    rows, cols = W.shape
    Hinv, dead = inverse_factor(H)
    W[:, dead] = 0
    Q = np.zeros_like(W)
    scale = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if (i1 + i) % groupsize == 0:
                scale = sym_grid(W1[:, i:i + groupsize], bits)
            q = quantize(w, scale, bits)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def sparsegpt(W, H, sparsity=0.5, blocksize=128):
    W = W.copy()
    rows, cols = W.shape
    Hinv, dead = inverse_factor(H)
    W[:, dead] = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1 ** 2 / (np.diag(Hinv1).reshape((1, -1))) ** 2
        k = int(tmp.size * sparsity)
        thresh = np.partition(tmp.ravel(), k)[k]
        mask1 = tmp <= thresh
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.copy()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def output_error(W, Q, H):
    D = Q - W
    return float(np.einsum("ij,ij->", D @ H, D) / np.einsum("ij,ij->", W @ H, W))


def main():
    method, rows, cols, wpath, hpath = sys.argv[1:6]
    rows, cols = int(rows), int(cols)
    W = np.fromfile(wpath, dtype="<f4").reshape(rows, cols)
    H = np.fromfile(hpath, dtype="<f4").reshape(cols, cols)
    start = time.perf_counter()
    Q = gptq(W, H) if method == "gptq" else sparsegpt(W, H)
    seconds = time.perf_counter() - start
    if len(sys.argv) > 6:
        Q.astype("<f4").tofile(sys.argv[6])
    print(json.dumps({"impl": "numpy", "method": method, "rows": rows, "cols": cols,
                      "seconds": seconds, "output_error": output_error(W, Q, H)}))


if __name__ == "__main__":
    main()
