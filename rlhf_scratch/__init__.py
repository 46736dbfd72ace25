"""rlhf_scratch: a from-scratch PPO / RLHF engine on TransformerLens."""

__version__ = "0.1.0"
