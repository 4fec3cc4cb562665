"""A small trained latency-controlled BiLSTM-CTC for decoding and streaming tests: audio
concatenated from single-word espeak-ng clips with silences of known length, so every word's
true start and end are known.

Training goes on until the model shows a margin on check utterances of its own (`Margin`):
then it transcribes held-out arrangements of the same words exactly on any machine, which is
what tests of exact transcripts, of beam search against a peer decoder and of word timings
need (a real model's peaky, confident posteriors). About 2-3 minutes on two cores.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from asr.audio import SAMPLE_RATE, load_audio
from asr.bundle import Bundle, write_bundle
from asr.data.synth import Voice, synthesize, trim_silence
from asr.decoding.ctc import ctc_greedy
from asr.features import CMVNAccumulator, FeatureConfig, log_mel
from asr.models.base import attach_cmvn
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


def write_clips_manifest(
    corpus: WordCorpus, root: Path, count: int, seed: int, speaker: str, name: str
) -> Path:
    """`count` random word-corpus utterances as FLACs in `root` and their manifest
    ROOT/NAME.jsonl (utt0, utt1, ..., all by `speaker`)."""
    from asr.audio import save_flac
    from asr.data.manifest import Utterance as Row
    from asr.data.manifest import write_manifest

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        utt = corpus.utterance(rng)
        path = root / f"utt{i}.flac"
        save_flac(path, utt.audio)
        rows.append(Row(f"utt{i}", str(path), utt.audio.numel() / SAMPLE_RATE, utt.text, speaker))
    write_manifest(root / f"{name}.jsonl", rows)
    return root / f"{name}.jsonl"


def features(utterances: list[Utterance], config: FeatureConfig) -> list[torch.Tensor]:
    return [log_mel(u.audio, config) for u in utterances]


# The word model's training seed. Another seed (ASR_TEST_SEED=1 make test) trains it along
# another path, as another machine's floating point does, to show that no test leans on one
# run's quirks.
SEED = int(os.environ.get("ASR_TEST_SEED", "0"))


@dataclass(frozen=True)
class Margin:
    """What the word model must show before tests may expect its exact transcripts.

    Training goes on, `check_every` steps at a time, until greedy decoding gets every check
    utterance right, each transcript's CTC loss is under `max_nll` nats (the true label
    sequence holds more than e^-0.5 = 61 % of the probability, so no rival comes close), and
    every word's last token comes within `max_delay` of the word's end: a model that holds it
    back until the next word starts is right on whole utterances, but a stream's endpoint
    cuts the token off its word (OCEA / N).
    The check utterances are never trained on: random arrangements, and every word of every
    voice at the very start and at the very end of the audio, where a model has the least
    context (one that learnt the middle said GATEN for a GARDEN 50 ms into the audio).
    """

    max_nll: float = 0.5
    max_delay: float = 0.4  # s from a word's end to its last token (endpoints wait 0.8 s)
    min_steps: int = 250
    check_every: int = 25
    max_steps: int = 750


class MarginNotReached(RuntimeError):
    pass


def edge_utterances(corpus: WordCorpus, step: int) -> list[Utterance]:
    """Each word by each voice 50 ms into the audio and again as the last word, 150 ms before
    its end, with the word `step` places on in WORDS between them."""
    lead, tail = (torch.zeros(round(s * SAMPLE_RATE)) for s in (0.05, 0.15))
    out = []
    for voice in VOICES:
        for i, first in enumerate(WORDS):
            parts, words, at = [lead], [], lead.numel()
            for word in (first, WORDS[(i + step) % len(WORDS)], first):
                clip = corpus.clips[(voice, word)]
                words.append((word.upper(), at / SAMPLE_RATE, (at + clip.numel()) / SAMPLE_RATE))
                parts += [clip, tail]
                at += clip.numel() + tail.numel()
            out.append(Utterance(torch.cat(parts), words))
    return out


def late_words(
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    utterances: list[Utterance],
    tokenizer: Tokenizer,
    frame_seconds: float,
    max_delay: float,
) -> list[str]:
    """Words whose last token the greedy path emits more than `max_delay` s after the word
    ends. log_probs (B, T', V), lengths (B,); only utterances decoded right are looked at."""
    late = []
    for b, utt in enumerate(utterances):
        best = log_probs[b, : int(lengths[b])].argmax(dim=-1).tolist()
        # The frame of each token of the greedy path (repeats merged, blanks dropped).
        frames = [t for t, tok in enumerate(best) if tok and (t == 0 or tok != best[t - 1])]
        counts = [len(tokenizer.encode(word)) for word, _, _ in utt.words]
        if len(frames) != sum(counts):
            continue  # a wrong transcript, counted as such
        last = [frames[n - 1] for n in itertools.accumulate(counts)]
        for (word, _, end), frame in zip(utt.words, last, strict=True):
            if (frame + 1) * frame_seconds > end + max_delay:
                late.append(f"{word} +{(frame + 1) * frame_seconds - end:.2f} s")
    return late


def train_model(corpus: WordCorpus, seed: int = SEED, margin: Margin = Margin()) -> Bundle:
    """A BiLSTM-CTC over characters trained on random arrangements of the words until it
    shows `margin`; raises MarginNotReached if it does not within `margin.max_steps`."""
    # At most two threads: as fast as more for a model this small (and one under
    # OMP_NUM_THREADS=1 or taskset on one core).
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        return _train(corpus, seed, margin)
    finally:
        torch.set_num_threads(threads)


def _padded(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_sequence(feats, batch_first=True), torch.tensor([f.shape[0] for f in feats])


def _train(corpus: WordCorpus, seed: int, margin: Margin) -> Bundle:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    feature_config = FeatureConfig()
    tokenizer = Tokenizer.train([w.upper() for w in WORDS] * 4, "char", 64)
    # Random arrangements, and words at the very start and end (rare among random ones).
    train = [corpus.utterance(rng) for _ in range(160)] + edge_utterances(corpus, step=2)
    feats = features(train, feature_config)
    acc = CMVNAccumulator(feature_config.num_mel_bins)
    for f in feats:
        acc.add(f)
    cmvn = acc.result()

    def batch(chosen: list[torch.Tensor], texts: list[str]) -> tuple[torch.Tensor, ...]:
        x, lens = _padded(chosen)
        y = [torch.tensor(tokenizer.encode(text)) for text in texts]
        return x, lens, pad_sequence(y, True, -1), torch.tensor([t.numel() for t in y])

    # Latency-controlled (320 ms chunks, 160 ms look-ahead), so the model also streams.
    config = BiLSTMCTCConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=96,
        num_layers=2,
        chunk_size=8,
        right_context=4,
    )
    model = BiLSTMCTC(config)
    attach_cmvn(model, cmvn)  # as a bundle's model: it takes raw log-mel features
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    check_rng = random.Random(10_000 + seed)
    check = [corpus.utterance(check_rng) for _ in range(48)] + edge_utterances(corpus, step=1)
    check_x, check_lens, _, _ = batch(features(check, feature_config), [u.text for u in check])
    check_targets = [torch.tensor(tokenizer.encode(u.text)) for u in check]
    found = "no check yet"
    for step in range(1, margin.max_steps + 1):
        model.train()
        idx = rng.sample(range(len(train)), 16)
        loss = model(*batch([feats[i] for i in idx], [train[i].text for i in idx])).loss
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step == margin.min_steps // 2:
            for group in optimizer.param_groups:
                group["lr"] = 1e-3
        if step >= margin.min_steps and step % margin.check_every == 0:
            model.eval()
            with torch.no_grad():
                log_probs, out_lens = model.log_probs(check_x, check_lens)
            hyps = [tokenizer.decode(h) for h in ctc_greedy(log_probs, out_lens)]
            wrong = [(u.text, h) for u, h in zip(check, hyps, strict=True) if h != u.text]
            nll = ctc_nll(log_probs, out_lens, check_targets)
            seconds = feature_config.hop_ms / 1000 * model.time_reduction
            late = late_words(log_probs, out_lens, check, tokenizer, seconds, margin.max_delay)
            found = (
                f"{len(wrong)} of {len(check)} wrong {wrong[:3]}, worst loss {nll.max():.2f}, "
                f"{len(late)} words late {late[:3]}"
            )
            if not wrong and nll.max() < margin.max_nll and not late:
                break
    else:
        raise MarginNotReached(f"word model after {margin.max_steps} steps: {found}")
    model.eval()
    return Bundle(
        path=Path("<word-model>"),
        model_type="ctc",
        model=model,
        tokenizer=tokenizer,
        cmvn=cmvn,
        feature_config=feature_config,
        config={"decoding": {}, "training": {"steps": step, "margin": found}},
    )


def ctc_nll(
    log_probs: torch.Tensor, lengths: torch.Tensor, targets: list[torch.Tensor]
) -> torch.Tensor:
    """Each utterance's CTC loss (nats): log_probs (B, T, V), lengths (B,) -> (B,)."""
    padded = pad_sequence(targets, batch_first=True)
    target_lens = torch.tensor([t.numel() for t in targets])
    return torch.nn.functional.ctc_loss(
        log_probs.transpose(0, 1), padded, lengths, target_lens, reduction="none"
    )


TRAINING = {
    "experiment": {"model": {"preset": "test"}, "data": {"train": "words.jsonl"}},
    "train_hours": 0.01,
    "wall_seconds": 60,
}


def save_bundle(bundle: Bundle, out: Path, **extra: Any) -> Path:
    """Write an in-memory bundle (e.g. the trained word model) as a bundle directory; `extra`:
    more `write_bundle` arguments (calibrations)."""
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
        **extra,
    )


def untrained_las(word_model: Bundle, tokenizer: Tokenizer, *, ctc_weight: float = 0.3) -> Bundle:
    """An untrained LAS over the word model's features (its outputs are arbitrary but
    well-formed): a second-pass rescorer to test the plumbing with; ctc_weight 0 has no CTC
    head."""
    torch.manual_seed(0)
    config = LASConfig(
        vocab_size=tokenizer.vocab_size,
        listener="pyramid",
        listener_hidden=32,
        listener_layers=3,
        attention_dim=32,
        speller_hidden=32,
        embedding_dim=16,
        ctc_weight=ctc_weight,
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
