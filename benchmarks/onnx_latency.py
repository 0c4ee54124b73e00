"""ONNX Runtime CPU latency: dense Llama-shaped model vs its sparse + low-rank rewrite.

    python -m benchmarks.onnx_latency [--hidden 512 --layers 4 --seq 128 --batches 1 8]

Both models are exported with ``sr.export_onnx`` (the rewritten one carries
``com.structrewrite::SparseLowRankLinear`` nodes that ONNX Runtime runs through their
function bodies, no plugin) and timed in the same run, on the same inputs, with the same
session options. Writes ``benchmarks/results/onnx_latency.md`` and ``.json``: machine,
versions, command, median latency per case, the ratio, and the FLOP ratio from the cost
model beside it (of the rewritten layers, and of the whole forward pass per token).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import cpu_model, timeit

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "onnx_latency"


def llama(hidden: int, layers: int, vocab: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 64, max_position_embeddings=max(seq, 256),
                      tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def forward_flops_per_token(model, seq: int) -> float:
    """Matmul FLOPs per token of a forward pass: every nn.Linear (2·in·out), and the two
    attention products (2·2·seq·hidden per layer, full seq, no causal halving)."""
    cfg = model.config
    linear = sum(2 * m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, torch.nn.Linear))
    return float(linear + cfg.num_hidden_layers * 4 * seq * cfg.hidden_size)


def policy_for(rank: int, density: float, init: str) -> dict:
    """SLTrain's 60M setting scaled to the model: every attention and MLP projection.
    ``init`` may carry a tile size: ``svd:block16`` is ``init: svd, block: 16``."""
    init, _, tiles = init.partition(":block")
    opts = {"rank": rank, "density": density, "init": init, **({"block": int(tiles)} if tiles else {})}
    return {"version": 1, "rules": [{
        "match": "re:model\\.layers\\.\\d+\\.(self_attn|mlp)\\.\\w+_proj",
        "rewrite": "sparse_lowrank", "with": opts}]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.03)
    ap.add_argument("--inits", nargs="+", default=["svd", "lost", "svd:block16"],
                    help="one rewritten model per init: svd (scattered support), lost (whole "
                         "input channels), svd:blockK (whole K x K tiles)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case")
    ap.add_argument("--reps", type=int, default=5,
                    help="timed runs per round and model (at least 2: the quartiles need them)")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.reps < 2:
        ap.error("--reps must be at least 2 (the quartiles of each round need two runs)")

    import onnxruntime as ort

    import structrewrite as sr
    from structrewrite.codegen.onnx import custom_node_count, ort_inputs, ort_session

    dense = llama(args.hidden, args.layers, args.vocab, args.seq)
    model_dense_flops = forward_flops_per_token(dense, args.seq)
    models = {"dense": dense}
    variants = {"dense": {"params": sum(p.numel() for p in dense.parameters()),
                          "flops_per_token": model_dense_flops, "flop_ratio": 1.0}}
    for init in args.inits:
        name = f"sparse_lowrank[{init}]"
        result = sr.rewrite(dense, policy_for(args.rank, args.density, init))
        t = result.report.totals()
        flops = model_dense_flops - t["before"]["flops"] + t["after"]["flops"]
        models[name] = result.model
        variants[name] = {
            "policy": policy_for(args.rank, args.density, init), "sites": len(result.report.sites),
            "params": result.report.model_params_after,
            "rewritten_layers_flops_ratio": t["after"]["flops"] / t["before"]["flops"],
            "flops_per_token": flops, "flop_ratio": flops / model_dense_flops}

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        example = (torch.randint(0, args.vocab, (2, args.seq)),)
        sessions = {}
        for name, model in models.items():
            path = Path(tmp) / f"{len(sessions)}.onnx"
            sr.export_onnx(model, example, path)
            variants[name]["custom_nodes"] = custom_node_count(path)
            sessions[name] = ort_session(path, threads=args.threads)
        for batch in args.batches:
            ids = torch.randint(0, args.vocab, (batch, args.seq),
                                generator=torch.Generator().manual_seed(batch))
            feed = ort_inputs(sessions["dense"], (ids,))
            row = {"batch": batch, "seq": args.seq, "models": {}}
            for name, sess in sessions.items():
                got = sess.run(None, feed)[0]
                with torch.no_grad():
                    ref = models[name](ids).logits.numpy()
                row["models"][name] = {"ort_vs_torch_max_abs": float(np.abs(got - ref).max())}
            # interleave the peers so that drift in machine load affects all alike
            rounds = {n: [] for n in sessions}
            for _ in range(args.rounds):
                for n, sess in sessions.items():
                    rounds[n].append(timeit(lambda i: sess.run(None, feed), warmup=1, reps=args.reps,
                                            device="cpu")["median_ms"])
            for n in sessions:
                row["models"][n].update(median_ms=statistics.median(rounds[n]), rounds_ms=rounds[n])
            base = row["models"]["dense"]["median_ms"]
            for n in sessions:
                row["models"][n]["speedup_vs_dense"] = base / row["models"][n]["median_ms"]
            cases.append(row)
            print(f"batch {batch} seq {args.seq}: " + ", ".join(
                f"{n} {m['median_ms']:.1f} ms ({m['speedup_vs_dense']:.2f}x)"
                for n, m in row["models"].items()), flush=True)

    env = {
        "cpu": cpu_model(), "logical_cores": os.cpu_count(),
        "ort_threads": args.threads or "default (all cores)",
        "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": ort.__version__, "onnx": __import__("onnx").__version__,
        "onnxscript": __import__("onnxscript").__version__,
        "structrewrite": sr.__version__, "platform": platform.platform(),
    }
    command = "python -m benchmarks.onnx_latency " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {
        "name": NAME, "command": command.strip(), "environment": env,
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "ffn": dense.config.intermediate_size, "heads": dense.config.num_attention_heads},
        "timing": {"rounds": args.rounds, "reps_per_round": args.reps},
        "variants": variants, "cases": cases,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(data, indent=2))
    (out / f"{NAME}.md").write_text(markdown(data))
    print(f"wrote {out / (NAME + '.md')} and {out / (NAME + '.json')}")
    return 0


def markdown(d: dict) -> str:
    env, m, v = d["environment"], d["model"], d["variants"]
    lines = [
        "# ONNX Runtime CPU latency: dense vs sparse + low-rank (Llama-shaped)",
        "",
        f"Command: `{d['command']}`  ",
        f"Machine: {env['cpu']}, {env['logical_cores']} logical cores, ORT threads: "
        f"{env['ort_threads']}; {env['platform']}  ",
        f"Versions: Python {env['python']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
        f"onnx {env['onnx']}, onnxscript {env['onnxscript']}, structrewrite {env['structrewrite']}",
        "",
        f"Model: LlamaForCausalLM, hidden {m['hidden']}, {m['layers']} layers, ffn {m['ffn']}, "
        f"{m['heads']} heads, vocab {m['vocab']}, fp32, no KV cache (one full forward pass), "
        "exported with `sr.export_onnx` (batch and sequence dynamic: one file per model).",
        "",
        "| model | rewrite | params | FLOPs/token | FLOP ratio | custom nodes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, x in v.items():
        rule = x.get("policy", {"rules": [{}]})["rules"][0]
        what = (f"`{rule['match']}` -> `{rule['rewrite']}` {rule['with']}, {x['sites']} sites"
                if rule else "-").replace("|", "\\|")
        lines.append(f"| {name} | {what} | {x['params']:,} | {x['flops_per_token']:,.0f} | "
                     f"{x['flop_ratio']:.3f} | {x.get('custom_nodes', 0)} |")
    names = list(v)
    lines += [
        "",
        "FLOPs per token: every linear layer (2·in·out, the rewritten ones from the cost model) "
        "plus the attention products (4·seq·hidden per layer). The `com.structrewrite` nodes run "
        "through their function bodies in stock ONNX Runtime (no plugin).",
        "",
        f"Latency: median over {d['timing']['rounds']} interleaved rounds (each the median of "
        f"{d['timing']['reps_per_round']} runs) of every model, same inputs and session options, "
        "all measured in this run. Speedup = dense / model; FLOP ratio beside it.",
        "",
        "| batch | seq | " + " | ".join(f"{n} (ms)" for n in names) + " | " +
        " | ".join(f"speedup {n} (FLOP ratio)" for n in names[1:]) + " | max abs ORT vs PyTorch |",
        "|---:|---:|" + "---:|" * (len(names) + len(names) - 1 + 1),
    ]
    for c in d["cases"]:
        ms = c["models"]
        lines.append(
            f"| {c['batch']} | {c['seq']} | " + " | ".join(f"{ms[n]['median_ms']:.1f}" for n in names)
            + " | " + " | ".join(f"{ms[n]['speedup_vs_dense']:.2f}x ({v[n]['flop_ratio']:.3f})"
                                 for n in names[1:])
            + f" | {max(ms[n]['ort_vs_torch_max_abs'] for n in names):.1e} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
