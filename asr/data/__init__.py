"""Data: LibriSpeech layout reader, JSONL manifests, datasets, batch sampling, synthetic corpora."""
