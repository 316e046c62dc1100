"""kd_jax: knowledge distillation of CIFAR ResNets in JAX/Flax."""
from kd_jax import cpu_flags

cpu_flags.apply()  # before any JAX computation: XLA reads XLA_FLAGS once
