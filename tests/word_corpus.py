"""A small trained latency-controlled BiLSTM-CTC for decoding and streaming tests: audio
concatenated from single-word espeak-ng clips with silences of known length, so every word's
true start and end are known.

Training takes well under a minute on two cores; the model then transcribes held-out
arrangements of the same words almost perfectly, which is what tests of beam search against
a peer decoder and of word timings need (a real model's peaky, confident posteriors).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from asr.audio import SAMPLE_RATE, load_audio
from asr.bundle import Bundle, write_bundle
from asr.data.synth import Voice, synthesize, trim_silence
from asr.features import CMVNAccumulator, FeatureConfig, log_mel
from asr.models.bilstm_ctc import BiLSTMCTC, BiLSTMCTCConfig
from asr.models.las import LASConfig, las
from asr.tokenizer import Tokenizer

# Spelled as they sound: a silent letter (the g of "morning") has no acoustic cue, and a small
# character model learns to emit it at the end of the audio instead.
WORDS = ("apple", "river", "tiger", "garden", "yellow", "window", "simple", "basket", "ocean")
VOICES = ("espeak:en-us+m1", "espeak:en-us+f1")


@dataclass
class Utterance:
    audio: torch.Tensor  # (S,) 16 kHz
    words: list[tuple[str, float, float]]  # (WORD, start s, end s)

    @property
    def text(self) -> str:
        return " ".join(w for w, _, _ in self.words)


@dataclass
class WordCorpus:
    clips: dict[tuple[str, str], torch.Tensor]  # (voice, word) -> speech only, no silence

    def utterance(self, rng: random.Random) -> Utterance:
        voice = rng.choice(VOICES)
        parts = [torch.zeros(round(rng.uniform(0.05, 0.5) * SAMPLE_RATE))]
        at = parts[0].numel() / SAMPLE_RATE
        words = []
        chosen = rng.sample(WORDS, rng.randint(2, 5))
        for i, word in enumerate(chosen):
            clip = self.clips[(voice, word)]
            words.append((word.upper(), at, at + clip.numel() / SAMPLE_RATE))
            # Pauses between words, sometimes long ones (streams have them): a model that only
            # ever saw short pauses holds a word's last token back until the audio ends.
            long = i == len(chosen) - 1 or rng.random() < 0.2
            gap = torch.zeros(round(rng.uniform(0.15, 3.0 if long else 0.6) * SAMPLE_RATE))
            parts += [clip, gap]
            at += (clip.numel() + gap.numel()) / SAMPLE_RATE
        return Utterance(torch.cat(parts), words)


def synthesize_clips() -> WordCorpus:
    tmp = Path(tempfile.mkdtemp(prefix="asr-words-"))
    try:
        clips: dict[tuple[str, str], torch.Tensor] = {}
        for spec in VOICES:
            voice = Voice.parse(spec)
            for word in WORDS:
                path = tmp / f"{len(clips)}.flac"
                synthesize(word, voice, path)
                clips[(spec, word)] = trim_silence(load_audio(path), keep_s=0.0)
        return WordCorpus(clips)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def features(utterances: list[Utterance], config: FeatureConfig) -> list[torch.Tensor]:
    return [log_mel(u.audio, config) for u in utterances]


def train_model(corpus: WordCorpus, steps: int = 250, seed: int = 0) -> Bundle:
    """A BiLSTM-CTC over characters trained on random arrangements of the words."""
    # One thread: as fast for a model this small, and immune to a busy machine's contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(corpus, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(corpus: WordCorpus, steps: int, seed: int) -> Bundle:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    feature_config = FeatureConfig()
    tokenizer = Tokenizer.train([w.upper() for w in WORDS] * 4, "char", 64)
    train = [corpus.utterance(rng) for _ in range(160)]
    feats = features(train, feature_config)
    acc = CMVNAccumulator(feature_config.num_mel_bins)
    for f in feats:
        acc.add(f)
    cmvn = acc.result()
    # Latency-controlled (320 ms chunks, 160 ms look-ahead), so the model also streams.
    config = BiLSTMCTCConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=96,
        num_layers=2,
        chunk_size=8,
        right_context=4,
    )
    model = BiLSTMCTC(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    normed = [cmvn.apply(f) for f in feats]
    targets = [torch.tensor(tokenizer.encode(u.text)) for u in train]
    model.train()
    for step in range(steps):
        idx = rng.sample(range(len(train)), 16)
        x = torch.nn.utils.rnn.pad_sequence([normed[i] for i in idx], batch_first=True)
        lens = torch.tensor([normed[i].shape[0] for i in idx])
        y = torch.nn.utils.rnn.pad_sequence([targets[i] for i in idx], True, -1)
        y_lens = torch.tensor([targets[i].numel() for i in idx])
        loss = model(x, lens, y, y_lens).loss
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step == steps // 2:
            for group in optimizer.param_groups:
                group["lr"] = 1e-3
    model.eval()
    return Bundle(
        path=Path("<word-model>"),
        model_type="ctc",
        model=model,
        tokenizer=tokenizer,
        cmvn=cmvn,
        feature_config=feature_config,
        config={"decoding": {}},
    )


TRAINING = {
    "experiment": {"model": {"preset": "test"}, "data": {"train": "words.jsonl"}},
    "train_hours": 0.01,
    "wall_seconds": 60,
}


def save_bundle(bundle: Bundle, out: Path) -> Path:
    """Write an in-memory bundle (e.g. the trained word model) as a bundle directory."""
    return write_bundle(
        out,
        model_type=bundle.model_type,
        model_config=bundle.model.config.to_dict(),  # type: ignore[union-attr, operator]
        weights=bundle.model.state_dict(),
        tokenizer=bundle.tokenizer,
        cmvn=bundle.cmvn,
        feature_config=bundle.feature_config,
        training=TRAINING,
        results={},
    )


def untrained_las(word_model: Bundle, tokenizer: Tokenizer) -> Bundle:
    """An untrained LAS over the word model's features (its outputs are arbitrary but
    well-formed): a second-pass rescorer to test the plumbing with."""
    torch.manual_seed(0)
    config = LASConfig(
        vocab_size=tokenizer.vocab_size,
        listener="pyramid",
        listener_hidden=32,
        listener_layers=3,
        attention_dim=32,
        speller_hidden=32,
        embedding_dim=16,
    )
    return Bundle(
        Path("<las>"),
        "las",
        las(config).eval(),
        tokenizer,
        word_model.cmvn,
        word_model.feature_config,
        {},
    )
