"""kd_jax: knowledge distillation of CIFAR ResNets in JAX/Flax."""
