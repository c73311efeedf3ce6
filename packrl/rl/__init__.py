"""The RL math: group-relative advantages, the clipped GRPO loss, and the reference model."""
