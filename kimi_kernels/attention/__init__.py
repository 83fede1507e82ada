"""MLA's causal attention: the Triton flash attention with the per-head max logit, and its textbook oracle."""
