"""lenvm_jax: Length Value Models in JAX / Flax NNX.

Layers look only down: config -> data -> model -> value -> train | decoding | evaluation (-> experiments/, outside).
"""
