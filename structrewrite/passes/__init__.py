"""One file per rewrite; each exports its Pass object (see rewriter/registry.py)."""
