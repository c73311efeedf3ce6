"""packrl: GRPO recipes for torchtune on packed multi-prompt sequences."""

__version__ = "0.1.0"
