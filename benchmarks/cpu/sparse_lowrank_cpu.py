"""CPU speed of the sparse_lowrank layer: fwd+bwd of the op's CPU implementation
against the reference implementation and dense ``nn.Linear``.

    python -m benchmarks.cpu.sparse_lowrank_cpu

float32, rank in/4, density 0.03, on the threads torch uses here: the element-wise random
support (on the path the cost model picks, on the CSR products, and through the
reference), a channel-wise support (``init: lost``; dense GEMMs at rank r + k) and
32x32 tiles (``block: 32``; batched tile GEMMs).
Writes benchmarks/results/sparse_lowrank_cpu.md and .json.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import structrewrite  # noqa: E402,F401
from benchmarks.harness import timeit  # noqa: E402
from structrewrite.codegen.triton import sparse_lowrank_folded as folded  # noqa: E402
from structrewrite.nn.sparse_lowrank import SparseLowRankLinear  # noqa: E402
from structrewrite.ops.sparse_lowrank_linear import reference, reference_backward  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
CASES = [(512, 256, 688), (2048, 1024, 1024), (2048, 1024, 2752)]   # (tokens, in, out)


def _median_ms(fn, repeats: int) -> float:
    return timeit(lambda i: fn(), warmup=1, reps=repeats, device="cpu")["median_ms"]


def main(repeats: int = 5) -> dict:
    torch.manual_seed(0)
    rows = []
    for M, in_f, out_f in CASES:
        layer = SparseLowRankLinear(in_f, out_f, in_f // 4, 0.03, key="bench")
        with torch.no_grad():
            layer.B.normal_(0.0, 0.02)
        dense = torch.nn.Linear(in_f, out_f)
        x = torch.randn(M, in_f, requires_grad=True)
        g = torch.randn(M, out_f)
        params = [x, layer.A, layer.B, layer.values, layer.bias]
        bufs = (layer.sparse_crow, layer.sparse_col, layer.sparse_row)

        def ours():
            return torch.autograd.grad(layer(x), params, g)

        def csr():   # the same layer kept on the CSR products
            with folded.forced("never"):
                return ours()

        def ref():
            y = reference(x, layer.A, layer.B, layer.values, *bufs, layer.bias, layer.scale)
            return y, reference_backward(g, x, layer.A, layer.B, layer.values, *bufs, layer.scale)

        def lin():
            return torch.autograd.grad(dense(x), [x, dense.weight, dense.bias], g)

        def structured(**kw):
            other = SparseLowRankLinear(in_f, out_f, in_f // 4, 0.03, key="bench", **kw)
            with torch.no_grad():
                other.B.normal_(0.0, 0.02)
            ps = [x, other.A, other.B, other.values, other.bias]
            return lambda: torch.autograd.grad(other(x), ps, g)

        t = {k: _median_ms(f, repeats if k != "reference" else max(1, repeats // 2))
             for k, f in (("ours", ours), ("csr", csr), ("reference", ref), ("dense", lin),
                          ("channel", structured(init="lost")), ("block32", structured(block=32)))}
        rows.append({"tokens": M, "in": in_f, "out": out_f, "rank": in_f // 4, "nnz": layer.nnz, **t})
        print(rows[-1], flush=True)
    meta = {"command": "python -m benchmarks.cpu.sparse_lowrank_cpu", "machine": platform.machine(),
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "repeats": repeats}
    lines = ["# sparse_lowrank on the CPU: fwd+bwd (float32)", "",
             f"Command: `{meta['command']}`; machine: {meta['machine']}, {meta['threads']} threads, "
             f"Python {meta['python']}, torch {meta['torch']}. Median of {repeats} runs "
             "(reference: fewer).", "",
             "ours: the op's CPU implementation through the layer and autograd, random "
             "element-wise support, on the path its cost model picks (folded: W built a chunk at "
             "a time and multiplied with dense GEMMs, where that beats the CSR products); csr: "
             "the same layer kept on PyTorch's CSR products; reference: the op's reference "
             "forward and backward on the same layer; dense: nn.Linear with autograd; channel: "
             "the layer with a channel-wise support (init: lost; dense GEMMs at rank r + k); "
             "block32: random 32x32 tiles (batched tile GEMMs). Rank in/4, density 0.03.", "",
             "| tokens | in -> out | rank | nnz | ours (ms) | csr (ms) | reference (ms) | dense (ms) | reference / ours | ours / dense | channel (ms) | channel / dense | block32 (ms) | block32 / dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['in']} -> {r['out']} | {r['rank']} | {r['nnz']} | "
                     f"{r['ours']:.1f} | {r['csr']:.1f} | {r['reference']:.1f} | {r['dense']:.1f} | "
                     f"{r['reference'] / r['ours']:.1f} | {r['ours'] / r['dense']:.2f} | "
                     f"{r['channel']:.1f} | {r['channel'] / r['dense']:.2f} | "
                     f"{r['block32']:.1f} | {r['block32'] / r['dense']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sparse_lowrank_cpu.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "sparse_lowrank_cpu.json").write_text(json.dumps({**meta, "cases": rows}, indent=1))
    print("\n".join(lines))
    return {"cases": rows}


if __name__ == "__main__":
    main()
