"""Model factories for the CLI (``structrewrite plan examples.models:llama_small ...``)."""
import torch


def llama_config(hidden=128, layers=4, heads=4, kv_heads=2, ffn=344, vocab=256, ctx=256):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=ctx,
                       tie_word_embeddings=False)


def llama_small():
    """A small byte-level Llama and example inputs: (model, (input_ids,))."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    return model, (torch.randint(0, 256, (2, 32)),)


def llama_7b_meta():
    """LLaMA-7B shapes (32 layers, d=4096, ffn 11008) on the meta device: no weights allocated."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)
