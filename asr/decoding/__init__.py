"""Decoders over narrow model interfaces: CTC greedy/prefix beam search, attention beam search."""
