"""Training quality of the sparse + low-rank layer with different sparse supports.

    python -m benchmarks support_quality [--size small|gpu] [--steps N] [--variants ...]
                                         [--rank R] [--density D] [--lr LR] [--lr-sparse LR]
                                         [--out DIR]

SLTrain-style pretraining from scratch of one byte-level Llama (transformers
``LlamaForCausalLM`` built from ``examples.models.llama_config``, vocabulary 256, nothing
downloaded), once per variant, on the same data in the same batch order from the same
initial weights:

``dense``     the model as built;
``random``    every projection of every decoder layer (q, k, v, o, gate, up, down) a
              ``SparseLowRankLinear`` with an element-wise uniform random support (SLTrain);
``block16``   the same with a support of whole aligned 16 x 16 tiles chosen at random;
``block32``   the same with 32 x 32 tiles;
``channel``   a channel-wise support: whole input channels chosen at random, every output
              row holding the same round(density * in) channels.

All sparse variants share rank and density; their parameter counts differ slightly because
a block support holds a whole number of tiles (``round(density * out * in / block²)``) and a
channel support a whole number of channels. Every sparse variant starts as SLTrain does:
B = 0, A Kaiming-uniform, sparse values uniform in ±1/sqrt(in).

The ``random`` and ``block*`` variants are made by the compiler (``sr.rewrite`` with a
``sparse_lowrank`` policy, ``init: random``, ``block: 1/16/32``). The ``channel`` variant is
not: the pass's ``init: lost`` converts a trained weight (top-r SVD, then the residual's
channels of largest norm), which is not pretraining from scratch. Here each projection is
replaced directly by a freshly constructed ``SparseLowRankLinear(in, out, rank, density,
init="lost", key=<module name>)``, whose ``reset_parameters`` draws the channels at random
and sets B = 0 like the ``random`` init.

Data: the bytes of the Python standard library's top-level ``.py`` files
(``examples.demo.stdlib_corpus``); the last 10% are held out. The held-out loss is the mean
over a fixed set of evenly spaced windows of the training sequence length, evaluated at
step 0, a few times during training and at the end.

Training: AdamW (betas 0.9/0.999, no weight decay; fused on CUDA), gradient clipping at
norm 1, linear warm-up over 10% of the steps, then cosine decay to 10% of the peak (or
constant). One learning rate per run (``--lr``) unless ``--lr-sparse`` gives the A, B and
values parameters of the sparse layers their own. bf16 autocast on CUDA
(``SparseLowRankLinear`` computes in the autocast dtype, as ``F.linear`` does, on the
Triton kernels there); float32 on the CPU, where the op runs its CPU implementation
(PyTorch's CSR kernels). Tokens/s counts training steps only (no evaluation), after the first few steps
(Triton compilation and tile tuning on CUDA).

Sizes: ``small`` (hidden 256, 2 layers, seq 64, batch 8, 200 steps: under 2 minutes for
all five variants on 2 CPU cores) and ``gpu`` (hidden 1024, ffn 2752, 8 layers, 16 heads,
seq 512, batch 32, 360 steps: under 4 minutes for all five variants on one H200; more
steps do not fit that budget, ``--steps`` takes more). When a block variant gets fewer than
``MIN_TILES`` tiles in some layer at the size's rank and density, the output says so; the
small size uses density 0.06 for that reason (0.03 gives block 32 only 2 tiles in its
256 x 256 projections).

Writes ``<out>/support_quality.md``, ``.json`` and, with matplotlib, ``.png`` (held-out
loss against step for every variant).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.harness import RESULTS, Report, environment

NAME = "support_quality"
MIN_TILES = 4                       # fewest tiles per layer a block variant should get
SITES = ("model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj")
SITE_RE = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.[a-z]+_proj")

# variant -> (support description, options of the sparse layer); None: dense
VARIANTS = {
    "dense": ("dense", None),
    "random": ("element-wise random (SLTrain)", {"init": "random", "block": 1}),
    "block16": ("random 16x16 tiles", {"init": "random", "block": 16}),
    "block32": ("random 32x32 tiles", {"init": "random", "block": 32}),
    "block64": ("random 64x64 tiles", {"init": "random", "block": 64}),
    "channel": ("random whole input channels", {"init": "lost", "block": 1}),
}
DEFAULT_VARIANTS = ("dense", "random", "block16", "block32", "channel")

SIZES = {
    "small": dict(hidden=256, ffn=688, layers=2, heads=4, seq=64, batch=8, steps=200,
                  density=0.06, eval_windows=64, evals=4, warm_steps=2),
    "gpu": dict(hidden=1024, ffn=2752, layers=8, heads=16, seq=512, batch=32, steps=360,
                density=0.03, eval_windows=256, evals=6, warm_steps=20),
}
DENSITY_REF = 0.03                  # the SLTrain density the sizes start from


# -- models -------------------------------------------------------------------------
def build_base(cfg: dict, seed: int) -> nn.Module:
    from transformers import LlamaForCausalLM
    from examples.models import llama_config
    torch.manual_seed(seed)
    conf = llama_config(hidden=cfg["hidden"], layers=cfg["layers"], heads=cfg["heads"],
                        kv_heads=cfg["heads"], ffn=cfg["ffn"], vocab=256,
                        ctx=max(256, cfg["seq"]))
    conf.use_cache = False
    return LlamaForCausalLM(conf)


def make_variant(name: str, base: nn.Module, rank: int, density: float, seed: int) -> nn.Module:
    """A copy of ``base`` with the variant's layers; ``base`` itself is untouched."""
    opts = VARIANTS[name][1]
    if opts is None:
        return copy.deepcopy(base)
    if opts["init"] == "random":
        import structrewrite as sr
        with_ = {"rank": rank, "density": density, "init": "random", "block": opts["block"],
                 "seed": seed}
        policy = {"version": 1, "rules": [{"match": pat, "rewrite": "sparse_lowrank",
                                           "with": dict(with_)} for pat in SITES]}
        return sr.rewrite(base, policy).model
    # channel-wise support from scratch: constructed directly (see the module docstring)
    from structrewrite.nn.sparse_lowrank import SparseLowRankLinear
    model = copy.deepcopy(base)
    for fqn, mod in list(model.named_modules()):
        if SITE_RE.fullmatch(fqn) and isinstance(mod, nn.Linear):
            new = SparseLowRankLinear(mod.in_features, mod.out_features, rank, density,
                                      bias=mod.bias is not None, init="lost", seed=seed,
                                      key=fqn, device=mod.weight.device, dtype=mod.weight.dtype)
            new.train(mod.training)
            model.set_submodule(fqn, new)
    return model


def sparse_layers(model: nn.Module):
    from structrewrite.nn.sparse_lowrank import SparseLowRankLinear
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLowRankLinear)]


def support_stats(model: nn.Module) -> dict:
    """nnz, and for block supports the tiles per layer (min, max)."""
    layers = sparse_layers(model)
    if not layers:
        return {"layers": 0, "nnz": 0}
    out = {"layers": len(layers), "nnz": sum(m.nnz for _, m in layers)}
    block = layers[0][1].block
    if block > 1:
        tiles = [m.nnz // (block * block) for _, m in layers]
        out.update(tiles_min=min(tiles), tiles_max=max(tiles),
                   tiles={n: m.nnz // (block * block) for n, m in layers})
    if layers[0][1].init == "lost":
        out["channels"] = sorted({m.nnz // m.out_features for _, m in layers})
    return out


def tiles_at(cfg: dict, density: float, block: int) -> int:
    """Fewest tiles any rewritten layer of this size gets at ``density``."""
    from structrewrite.nn.sparse_lowrank import block_count
    h, f = cfg["hidden"], cfg["ffn"]
    return min(block_count(o, i, density, block) for o, i in ((h, h), (f, h), (h, f)))


# -- data and evaluation ------------------------------------------------------------
def eval_batches(held: torch.Tensor, seq: int, windows: int, batch: int) -> list[torch.Tensor]:
    starts = torch.linspace(0, held.numel() - seq - 1, windows).long().tolist()
    ids = torch.stack([held[s:s + seq] for s in starts])
    return list(ids.split(batch))


@torch.no_grad()
def evaluate(model, chunks, device, amp) -> float:
    """Mean held-out loss over the fixed windows (every window has the same length)."""
    model.eval()
    total, count = 0.0, 0
    for ids in chunks:
        ids = ids.to(device, non_blocking=True)
        with amp():
            loss = model(ids, labels=ids).loss
        total += float(loss) * ids.shape[0]
        count += ids.shape[0]
    model.train()
    return total / count


def lr_lambda(steps: int, warmup: int, schedule: str, floor: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def train_variant(name, model, train, chunks, cfg, args, device) -> dict:
    from examples.demo import batches
    cuda = device.type == "cuda"
    amp = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda
           else contextlib.nullcontext)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.to(device).train()
    sparse_ids = {id(p) for _, m in sparse_layers(model) for p in (m.A, m.B, m.values)}
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    rest = [p for p in model.parameters() if id(p) not in sparse_ids]
    groups = [{"params": rest, "lr": args.lr}]
    if sparse:
        groups.append({"params": sparse, "lr": args.lr_sparse})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0,
                            fused=cuda)
    steps, warmup = cfg["steps"], max(1, cfg["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup, args.schedule))
    stream = batches(train, cfg["batch"], cfg["seq"], torch.Generator().manual_seed(args.seed + 1))
    eval_at = sorted({round(k * steps / cfg["evals"]) for k in range(1, cfg["evals"] + 1)})
    warm = min(cfg["warm_steps"], steps - 1)

    curve = [{"step": 0, "held_loss": evaluate(model, chunks, device, amp), "train_loss": None}]
    print(f"  {name:>8} step {0:>5}  held-out {curve[0]['held_loss']:.4f}", flush=True)
    run_loss, run_n = torch.zeros((), device=device), 0
    timed_s, t_start, t0 = 0.0, None, time.perf_counter()
    for step in range(1, steps + 1):
        if step == warm + 1:
            sync()
            t_start = time.perf_counter()
        ids = next(stream).to(device, non_blocking=True)
        with amp():
            loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run_loss += loss.detach().float()
        run_n += 1
        if step in eval_at:
            sync()
            if t_start is not None:
                timed_s += time.perf_counter() - t_start
            train_loss = float(run_loss) / run_n
            held = evaluate(model, chunks, device, amp)
            curve.append({"step": step, "held_loss": held, "train_loss": train_loss})
            print(f"  {name:>8} step {step:>5}  held-out {held:.4f}  train {train_loss:.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            run_loss, run_n = torch.zeros((), device=device), 0
            sync()
            t_start = time.perf_counter() if step >= warm + 1 else None
    timed_steps = steps - warm
    tokens = timed_steps * cfg["batch"] * cfg["seq"]
    return {"curve": curve, "final_held_loss": curve[-1]["held_loss"],
            "final_train_loss": curve[-1]["train_loss"],
            "tokens_per_s": tokens / timed_s if timed_s > 0 else float("nan"),
            "timed_steps": timed_steps, "timed_s": timed_s,
            "wall_s": time.perf_counter() - t0,
            "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30) if cuda else None}


# -- report ----------------------------------------------------------------------------
def plot(results: dict, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    start = [r["curve"][0]["held_loss"] for r in results.values()]
    for name, r in results.items():
        pts = r["curve"][1:] if len(r["curve"]) > 2 else r["curve"]   # step 0 is off the scale
        ax.plot([p["step"] for p in pts], [p["held_loss"] for p in pts], marker="o", ms=3,
                label=f"{name} ({r['params'] / 1e6:.2f}M params)")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/byte)")
    if len(next(iter(results.values()))["curve"]) > 2:
        title += f"\n(step 0 not shown: held-out loss {min(start):.2f}-{max(start):.2f})"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks support_quality",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--rank", type=int, default=None, help="default hidden / 4")
    ap.add_argument("--density", type=float, default=None, help="default: the size's")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-sparse", type=float, default=None,
                    help="lr of the sparse layers' A, B, values (default: --lr)")
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    cfg = dict(SIZES[args.size])
    if args.steps is not None:
        cfg["steps"] = args.steps
    if cfg["steps"] < 1:
        ap.error("--steps must be >= 1")
    cfg["evals"] = min(cfg["evals"], cfg["steps"])
    rank = args.rank or cfg["hidden"] // 4
    density = cfg["density"] if args.density is None else args.density
    args.lr_sparse = args.lr if args.lr_sparse is None else args.lr_sparse
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    command = "python -m benchmarks support_quality " + " ".join(argv)

    from examples.demo import stdlib_corpus
    data = stdlib_corpus(1 << 40)                     # every top-level .py file
    split = int(0.9 * data.numel())
    train, held = data[:split], data[split:]
    chunks = eval_batches(held, cfg["seq"], cfg["eval_windows"], cfg["batch"])

    env = environment(command, "cuda" if device.type == "cuda" else "cpu")

    notes = []
    blocks = sorted({VARIANTS[v][1]["block"] for v in variants
                     if VARIANTS[v][1] and VARIANTS[v][1]["block"] > 1})
    for b in blocks:
        fewest = tiles_at(cfg, density, b)
        if fewest < MIN_TILES:
            notes.append(f"block {b} at density {density:g} gets only {fewest} tile(s) in "
                         f"some layer (fewer than {MIN_TILES}); raise --density or the size")
    if density != DENSITY_REF and args.density is None:
        why = ", ".join(f"block {b}: {tiles_at(cfg, DENSITY_REF, b)}" for b in blocks)
        notes.append(f"density raised from {DENSITY_REF:g} to {density:g} for --size "
                     f"{args.size} so that every block variant gets at least {MIN_TILES} "
                     f"tiles per layer (fewest tiles per layer at {DENSITY_REF:g}: {why})")

    setup = {
        "size": args.size, "device": str(device),
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "model": (f"LlamaForCausalLM, hidden {cfg['hidden']}, ffn {cfg['ffn']}, "
                  f"{cfg['layers']} layers, {cfg['heads']} heads (MHA), vocab 256 (bytes)"),
        "sparse layers": "q, k, v, o, gate, up, down of every decoder layer",
        "rank": rank, "density": density,
        "alpha (scale = alpha / rank)": 32.0,
        "steps": cfg["steps"], "batch": cfg["batch"], "seq": cfg["seq"],
        "tokens per step": cfg["batch"] * cfg["seq"],
        "optimizer": "AdamW (0.9, 0.999), weight decay 0, grad clip 1.0",
        "lr": args.lr, "lr (sparse layers' A, B, values)": args.lr_sparse,
        "schedule": (f"{args.schedule}, linear warm-up {max(1, cfg['steps'] // 10)} steps"
                     + (", cosine to 0.1 x peak" if args.schedule == "cosine" else "")),
        "data": (f"stdlib .py bytes ({sysconfig.get_paths()['stdlib']}): "
                 f"{train.numel():,} train, last {held.numel():,} held out"),
        "held-out eval": (f"mean loss over {cfg['eval_windows']} fixed windows of {cfg['seq']} "
                          f"bytes, at step 0 and {cfg['evals']} points"),
        "seed": args.seed,
    }
    print(f"support_quality: {args.size} on {device}; variants {', '.join(variants)}")
    for k, v in setup.items():
        print(f"  {k}: {v}")
    for n in notes:
        print(f"  NOTE: {n}")

    base = build_base(cfg, args.seed)
    results, t_all = {}, time.perf_counter()
    for name in variants:
        model = make_variant(name, base, rank, density, args.seed)
        params = sum(p.numel() for p in model.parameters())
        stats = support_stats(model)
        extra = (f", tiles/layer {stats['tiles_min']}-{stats['tiles_max']}"
                 if "tiles_min" in stats else "")
        print(f"== {name}: {VARIANTS[name][0]}, {params:,} parameters, "
              f"nnz {stats['nnz']:,}{extra}", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = train_variant(name, model, train, chunks, cfg, args, device)
        r.update(params=params, support=VARIANTS[name][0], **stats)
        results[name] = r
        print(f"  {name:>8} final held-out {r['final_held_loss']:.4f}, "
              f"{r['tokens_per_s']:,.0f} tokens/s, {r['wall_s']:.0f} s", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    total_s = time.perf_counter() - t_all

    report = Report(NAME, command, env=env)
    report.table("Setup", ["setting", "value"], [[k, v] for k, v in setup.items()],
                 note="\n".join(f"Note: {n}" for n in notes))
    ref = results.get("random")
    cols = ["variant", "support", "params", "nnz (all layers)", "tiles/layer",
            "held-out loss", "vs random", "train loss (last interval)", "tokens/s",
            "train wall s"]
    cuda = device.type == "cuda"
    if cuda:
        cols.append("peak GiB")
    rows = []
    for name, r in results.items():
        tiles = f"{r['tiles_min']}-{r['tiles_max']}" if "tiles_min" in r else "-"
        vs = (r["final_held_loss"] - ref["final_held_loss"]) if ref else float("nan")
        rows.append([name, r["support"], f"{r['params']:,}", f"{r['nnz']:,}", tiles,
                     f"{r['final_held_loss']:.4f}", f"{vs:+.4f}" if ref else "-",
                     f"{r['final_train_loss']:.4f}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['wall_s']:.1f}"]
                    + ([f"{r['peak_mem_gib']:.2f}"] if cuda else []))
    report.table(f"Results after {cfg['steps']} steps", cols, rows,
                 note=("Held-out loss in nats per byte, after the last step; `vs random`: "
                       "difference to the element-wise random support (SLTrain), negative is "
                       "better. tokens/s: training steps only, after the first "
                       f"{min(cfg['warm_steps'], cfg['steps'] - 1)} steps, evaluation excluded. "
                       f"All variants: {total_s:.0f} s."))
    steps_seen = [p["step"] for p in next(iter(results.values()))["curve"]]
    curve_rows = [[s] + [f"{r['curve'][i]['held_loss']:.4f}" for r in results.values()]
                  for i, s in enumerate(steps_seen)]
    report.table("Held-out loss against step", ["step"] + list(results), curve_rows)
    report.data.update(config={**cfg, "rank": rank, "density": density, "lr": args.lr,
                               "lr_sparse": args.lr_sparse, "schedule": args.schedule,
                               "seed": args.seed, "variants": variants,
                               "train_bytes": train.numel(), "held_bytes": held.numel(),
                               "setup": setup, "notes": notes},
                       variants=results, total_s=total_s)
    title = (f"{args.size}: hidden {cfg['hidden']}, {cfg['layers']} layers, rank {rank}, "
             f"density {density:g}, {cfg['steps']} steps")
    plotted = []
    out = report.write(Path(args.out),
                       plot=lambda p: (plot(results, p, title), plotted.append(p.name)))
    print(report.markdown())
    print(f"written to {out}/{NAME}.md, .json" + (", .png" if plotted else ""))
    bad = [n for n, r in results.items() if not math.isfinite(r["final_held_loss"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
