"""Mixture-of-Experts parts: routers (TimeExpert adaptive-k, top-k baseline), routing records,
auxiliary losses, and the MoE layer that megatron-core's transformer layer uses through its spec."""
