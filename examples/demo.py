"""The built-in example: rewrite a Llama-shaped model, report, and pretrain it on text.

    python examples/demo.py --out demo_out

1. builds a small byte-level Llama (transformers, from a config: no download);
2. rewrites it with examples/policies/llama_sltrain.yaml (SLTrain: low rank + sparse);
3. prints the report and saves it (JSON, Markdown) under --out;
4. trains the dense and the rewritten model side by side on the Python standard
   library's own sources (an offline text corpus), printing both losses;
5. exports the rewritten model to ONNX and checks ONNX Runtime against PyTorch
   (when the ONNX exporter of the package is present).
"""
from __future__ import annotations

import argparse
import copy
import sys
import sysconfig
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import structrewrite as sr  # noqa: E402
from examples.models import llama_config  # noqa: E402


def stdlib_corpus(max_bytes: int) -> torch.Tensor:
    """Bytes of the standard library's .py files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        idx = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[i:i + seq] for i in idx.tolist()])


@torch.no_grad()
def evaluate(model, data, seq=64, n=16) -> float:
    model.eval()
    starts = torch.linspace(0, data.numel() - seq - 1, n).long().tolist()
    ids = torch.stack([data[s:s + seq] for s in starts])
    loss = model(ids, labels=ids).loss.item()
    model.train()
    return loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--policy", default=str(HERE / "policies" / "llama_sltrain.yaml"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from transformers import LlamaForCausalLM
    dense = LlamaForCausalLM(llama_config())
    example = (torch.randint(0, 256, (2, 32)),)

    print(f"== plan ({args.policy})")
    print(sr.plan(dense, args.policy))
    print("== rewrite")
    result = sr.rewrite(dense, args.policy, example_inputs=example)
    print(result.report)
    (out / "report.json").write_text(result.report.to_json())
    (out / "report.md").write_text(result.report.to_markdown())
    print(f"report saved to {out / 'report.json'} and {out / 'report.md'}")

    data = stdlib_corpus(3_000_000)
    split = int(0.95 * data.numel())
    train, held = data[:split], data[split:]
    print(f"== training on {train.numel():,} bytes of the standard library "
          f"({sysconfig.get_paths()['stdlib']}), held out {held.numel():,}")
    models = {"dense": copy.deepcopy(dense), "sparse_lowrank": result.model}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0) for k, m in models.items()}
    streams = {k: batches(train, 16, 64, torch.Generator().manual_seed(1)) for k in models}
    for k, m in models.items():
        m.train()
        n = sum(p.numel() for p in m.parameters())
        print(f"   {k}: {n:,} parameters, held-out loss at start {evaluate(m, held):.3f}")
    first, last = {}, {}
    t0 = time.time()
    print(f"   {'step':>5} " + " ".join(f"{k:>16}" for k in models))
    for step in range(1, args.steps + 1):
        row = []
        for k, m in models.items():
            ids = next(streams[k])
            loss = m(ids, labels=ids).loss
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            first.setdefault(k, loss.item())
            last[k] = loss.item()
            row.append(loss.item())
        if step == 1 or step % 25 == 0:
            print(f"   {step:>5} " + " ".join(f"{v:>16.3f}" for v in row))
    print(f"   trained {args.steps} steps each in {time.time() - t0:.0f} s")
    ok = True
    for k, m in models.items():
        held_loss = evaluate(m, held)
        falling = last[k] < first[k]
        ok &= falling
        print(f"   {k}: train loss {first[k]:.3f} -> {last[k]:.3f}, held-out {held_loss:.3f}"
              f" ({'falling' if falling else 'NOT falling'})")

    ok &= export_and_check(result.model, out)
    return 0 if ok else 1


def export_and_check(model, out: Path) -> bool:
    if not hasattr(sr, "export_onnx"):
        print("== ONNX export: not available in this build")
        return True
    from structrewrite.codegen.onnx import custom_node_count, ort_inputs, ort_session
    import numpy as np
    model.eval()
    ids = torch.randint(0, 256, (2, 40))
    path = out / "model.onnx"
    print(f"== ONNX export to {path}")
    sr.export_onnx(model, (ids,), path)
    sess = ort_session(path)
    print(f"   {custom_node_count(path)} com.structrewrite nodes (one per rewritten site), "
          f"{path.stat().st_size / 1e6:.1f} MB")
    other = torch.randint(0, 256, (3, 17))     # dynamic batch and sequence length
    worst = 0.0
    for x in (ids, other):
        with torch.no_grad():
            ref = model(x).logits.numpy()
        got = sess.run(None, ort_inputs(sess, (x,)))[0]
        worst = max(worst, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)))
    ok = worst < 1e-4
    print(f"   ONNX Runtime vs PyTorch: max relative difference {worst:.2e} "
          f"({'ok' if ok else 'MISMATCH'}) at shapes {tuple(ids.shape)} and {tuple(other.shape)}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
