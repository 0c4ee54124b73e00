"""Data-parallel training of a rewritten model: two processes (gloo, CPU) under
``DistributedDataParallel`` and under FSDP2 (``fully_shard``, the parameters sharded
between them) take three AdamW steps on halves of a batch, and end with the parameters
of one process that takes the same steps on the whole batch.

Every kind of sparse support (random, 16x16 tiles, channel-wise) in one tiny HF Llama;
the supports are index buffers, which both processes build alike from the policy's seed
and the site names."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import structrewrite as sr  # noqa: E402
from hf_tiny import tiny_llama  # noqa: E402

SUPPORTS = {"random": {"init": "random"}, "block16": {"init": "random", "block": 16},
            "lost": {"init": "lost"}}
STEPS = 3


def _model(kind):
    """A tiny HF Llama, its projections rewritten with ``kind``'s support, and a batch."""
    policy = {"version": 1, "rules": [{"match": "model.layers.*.*.*_proj", "rewrite": "sparse_lowrank",
                                       "with": {"rank": 8, "density": 0.1, **SUPPORTS[kind]}}]}
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    model = sr.rewrite(tiny_llama(seed=0), policy, example_inputs=(ids[:1],)).model.train()
    return model, ids


def _state(module) -> dict:
    return {k.removeprefix("module."): (v.full_tensor() if hasattr(v, "full_tensor") else v)
            .detach().clone() for k, v in module.state_dict().items()}


def _worker(rank, world, mode, init, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = {}
    for kind in SUPPORTS:
        model, ids = _model(kind)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        half = ids[rank * 2:(rank + 1) * 2]
        for _ in range(STEPS):
            model(input_ids=half, labels=half).loss.backward()
            opt.step()
            opt.zero_grad()
        result[kind] = _state(model)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def _one_process(kind):
    model, ids = _model(kind)
    start = _state(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(STEPS):   # the mean of the halves' losses: what the two processes average
        loss = (model(input_ids=ids[:2], labels=ids[:2]).loss
                + model(input_ids=ids[2:], labels=ids[2:]).loss) / 2
        loss.backward()
        opt.step()
        opt.zero_grad()
    return start, _state(model)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_matches_one_process(mode, tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "states.pt"
    mp.spawn(_worker, args=(2, mode, f"file://{tmp_path}/rendezvous", str(out)), nprocs=2)
    got = torch.load(out)
    for kind in SUPPORTS:
        start, want = _one_process(kind)
        assert set(got[kind]) == set(want), kind
        moved = 0
        for name, w in want.items():
            if not w.is_floating_point():   # the supports: the same indices everywhere
                assert torch.equal(got[kind][name], w), (kind, name)
                continue
            # the same sums in the same order up to the collectives' float32 rounding
            torch.testing.assert_close(got[kind][name], w, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{mode} {kind} {name}: {m}")
            moved += not torch.equal(w, start[name])
        sparse = [n for n in want if n.endswith(".values")]
        assert sparse and moved > len(want) // 2, (kind, moved)   # the steps trained them
