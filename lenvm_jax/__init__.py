"""lenvm_jax: Length Value Models in JAX / Flax NNX. Data flow: data -> model -> train -> infer."""
