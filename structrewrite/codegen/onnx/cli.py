"""``structrewrite export-onnx MODEL --out FILE [--policy POLICY] [--weights STATE_DICT]``

Exports MODEL (``package.module:callable`` returning ``(model, example_inputs)``) to ONNX,
rewritten first when ``--policy`` is given (``--weights`` then loads a state dict saved by
``structrewrite rewrite``), and checks ONNX Runtime against PyTorch on the example inputs
unless ``--no-check``. The tolerance is absolute (``--atol``); by default it follows each
output's dtype and size: ``TOLERANCE[dtype] * max(1, max |output|)`` (1e-4 for float32
and float64, a few units in the last place for float16 and bfloat16). Exit code 1 when
the outputs differ by more than that; 2 with one line for a user error (the model, the
policy, weights that do not fit, an output path that cannot be written) and where ONNX
Runtime cannot run the file (its CPU kernels have no bfloat16 matrix products).
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export-onnx", help="export a (rewritten) model to ONNX; check ONNX Runtime parity",
        description="Export a model (rewritten first with --policy) to ONNX: structured ops "
                    "become com.structrewrite nodes with function bodies, run by stock ONNX "
                    "Runtime. Then check ONNX Runtime against PyTorch on the example inputs.")
    p.add_argument("model", help="package.module:callable returning (model, example_inputs)")
    p.add_argument("--out", "-o", required=True, help="output .onnx file")
    p.add_argument("--policy", "-p", help="rewrite with this YAML or JSON policy first")
    p.add_argument("--weights", help="state dict of the rewritten model (from `structrewrite rewrite`)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime parity check")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute parity tolerance (default: by dtype, scaled by the outputs' "
                        "magnitude: 1e-4 for float32)")
    p.set_defaults(func=run)
    return p


MIN_OPSET = 18   # the opset the structured ops' bodies are written in (onnxscript's opset18)

# the default tolerance's unit, by output dtype: float32's 1e-4; for 16-bit types about
# four units in the last place (ORT and PyTorch sum in other orders and round once more)
TOLERANCE = {"float16": 4e-3, "bfloat16": 3e-2}


def tolerance(ref, atol=None) -> float:
    """The tolerance for one output ``ref`` (a tensor): ``atol`` if given, else by dtype."""
    if atol is not None:
        return atol
    unit = TOLERANCE.get(str(ref.dtype).split(".")[-1], 1e-4)
    return unit * max(1.0, float(ref.abs().max()) if ref.numel() else 0.0)


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name where it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _weights(path, model) -> dict:
    """The state dict at ``path``, checked against ``model``'s keys: a user error (a missing
    file, weights of a model rewritten by another policy, or none) is one line."""
    import torch

    from structrewrite.cli import CliError

    import pickle

    try:
        state = torch.load(path, map_location="cpu")
    except pickle.UnpicklingError:
        raise CliError(f"cannot read --weights {path}: not a state dict saved by torch.save "
                       "(`structrewrite rewrite` writes one as model.pt)") from None
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise CliError(f"cannot read --weights {path}: {_first_line(e)}") from None
    if not isinstance(state, dict):
        raise CliError(f"--weights {path} holds a {type(state).__name__}, not a state dict")
    want = set(model.state_dict())
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    if missing or extra:
        shown = "; ".join(f"{what} {len(keys)} key(s) ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})"
                          for what, keys in (("missing", missing), ("unexpected", extra)) if keys)
        raise CliError(f"--weights {path} do not fit the model: {shown}; give the --policy "
                       "they were rewritten with")
    return state


def run(args) -> int:
    from pathlib import Path

    import numpy as np
    import torch
    from torch.utils import _pytree as pytree

    import structrewrite as sr
    from structrewrite.cli import CliError, example_call, load_model_spec
    from structrewrite.codegen.onnx import (custom_node_count, export_kwargs, export_onnx,
                                            ort_inputs, ort_session)

    if args.atol is not None and not args.atol >= 0:
        raise CliError(f"--atol must be 0 or more, got {args.atol}")
    if args.opset is not None and args.opset < MIN_OPSET:
        raise CliError(f"--opset must be {MIN_OPSET} or later (the structured ops' bodies use "
                       f"opset {MIN_OPSET}), got {args.opset}")
    model, raw = load_model_spec(args.model)
    if raw is None:
        raise CliError(f"{args.model} returned no example inputs; export needs (model, inputs)")
    inputs, kwargs = example_call(args.model, raw)
    if args.policy:
        model = sr.rewrite(model, args.policy, example_inputs=inputs,
                           example_kwargs=kwargs or None, inplace=True).model
    if args.weights:
        try:
            model.load_state_dict(_weights(args.weights, model))
        except (RuntimeError, ValueError) as e:   # shapes of another rank, a bad support
            first = str(e).strip().splitlines()
            raise CliError(f"--weights {args.weights} do not fit the model: "
                           f"{' '.join(line.strip() for line in first[:2])}") from None
    model.eval()
    out = Path(args.out)
    if out.is_dir():
        raise CliError(f"cannot write --out {out}: a folder")
    existed = out.exists()
    try:   # opened once before the export (permissions alone do not tell, e.g. for root)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "ab"):
            pass
    except OSError as e:
        raise CliError(f"cannot write --out {out}: {e.strerror or e}") from None
    if not existed:
        out.unlink()
    export_onnx(model, inputs, out, kwargs=kwargs, opset_version=args.opset)
    print(f"wrote {out} ({custom_node_count(out)} structured op nodes)")
    if args.no_check:
        return 0
    try:
        sess = ort_session(out)
        got = sess.run(None, ort_inputs(sess, inputs, kwargs))
    except Exception as e:   # noqa: BLE001 (ONNX Runtime's own error types)
        bf16 = any(t.dtype == torch.bfloat16 for t in (*model.parameters(), *inputs,
                                                        *kwargs.values())
                   if isinstance(t, torch.Tensor))
        hint = (" (its CPU kernels have no bfloat16 matrix products: export in float32 or "
                "float16)" if bf16 else "")
        raise CliError(f"ONNX Runtime cannot run {out}{hint}: {_first_line(e)[:300]}; the file is "
                       "written (--no-check skips this check)") from None
    with torch.no_grad():
        outputs = model(*inputs, **export_kwargs(model, kwargs))
        ref = [x for x in pytree.tree_leaves(outputs) if isinstance(x, torch.Tensor)]
    diffs = [(float(np.abs(g.astype(np.float64) - r.double().numpy()).max()) if r.numel() else 0.0,
              tolerance(r, args.atol)) for g, r in zip(got, ref)]
    worst, tol = max(diffs, key=lambda d: d[0] / d[1] if d[1] > 0 else float(d[0] > 0) * 1e300,
                     default=(0.0, 0.0))
    ok = len(got) == len(ref) and all(d <= t for d, t in diffs)
    print(f"ONNX Runtime vs PyTorch: {len(got)} output(s), max abs difference {worst:.2e} "
          f"(tolerance {tol:.1e}: {'ok' if ok else 'MISMATCH'})")
    return 0 if ok else 1
