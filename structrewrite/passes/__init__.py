"""One file per rewrite; each exports its Pass object (see rewriter/registry.py).

``CANONICALIZATIONS`` run on every captured block graph, in this order, before the
rewrites match: they bring equivalent forms to the one the patterns expect.
"""
from structrewrite.passes.canonicalize_attention import canonicalize_attention

# eager softmax(QKᵀ)V -> scaled_dot_product_attention: attention passes match only SDPA
CANONICALIZATIONS = (canonicalize_attention,)
