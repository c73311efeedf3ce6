"""The packed-sequence core: packing rows, their block-sparse attention mask, and per-token logprobs."""
