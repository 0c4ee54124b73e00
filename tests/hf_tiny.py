"""Tiny HF models built from configs (no downloads) and a one-rule policy, shared by tests."""
import torch


def tiny_llama(seed: int = 0, **config):
    import transformers
    cfg = transformers.LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                             max_position_embeddings=64, use_cache=False), **config})
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, **config):
    import transformers
    cfg = transformers.GPT2Config(**{**dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                            use_cache=False, bos_token_id=0, eos_token_id=0), **config})
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def policy(match, rank=8, density=0.05, init="svd"):
    """One sparse_lowrank rule over ``match``."""
    return {"version": 1, "rules": [{"match": match, "rewrite": "sparse_lowrank",
                                     "with": {"rank": rank, "density": density, "init": init}}]}
