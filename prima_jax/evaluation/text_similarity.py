"""Pluggable text similarity for the text-aware metrics (Recall, SS, S-IoU, I-SS, I-SIoU).

A similarity model is any callable ``sim(a, b) -> float64 [len(a), len(b)]`` of cosine similarities in
[-1, 1] (:class:`TextSimilarity`). Two are provided:

- :class:`LexicalSimilarity` (the default, no dependencies, deterministic): the mean of two cosines,
  one between bags of normalised words and one between bags of character 3-grams of those words.
  Normalisation lowercases, drops instance suffixes (``desk_1's drawer_1`` -> ``desk drawer``), the
  possessive ``'s``, the words ``a an the of`` and a plural ``s``, so a phrase and its paraphrase by
  word order score high (``desk_1's drawer_1`` vs ``drawer of the desk``: 1.0).
- :class:`EmbeddingSimilarity`: GLaMM's definition (docs/metrics.md): the cosine of the mean-pooled last
  hidden states of a local transformers encoder (``bert-base-uncased`` for numbers comparable with GLaMM).

``make_similarity("default")`` or ``make_similarity("/path/to/bert-base-uncased")`` picks one.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class TextSimilarity(Protocol):
  """``sim(a, b)`` -> float64 [len(a), len(b)], the cosine similarity of every pair, in [-1, 1]."""

  def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    ...


_INSTANCE_SUFFIX = re.compile(r"_\d+\b")
_POSSESSIVE = re.compile(r"'s\b")
_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset({"a", "an", "the", "of"})


def normalise_words(text: str) -> list[str]:
  """Lowercase words of ``text`` without instance suffixes (``_12``), ``'s`` and :data:`STOPWORDS`; a
  final ``s`` is dropped from words of 4+ letters not ending in ``ss`` (``chairs`` -> ``chair``)."""
  text = _POSSESSIVE.sub(" ", _INSTANCE_SUFFIX.sub(" ", text.lower()))
  words = [w for w in _WORD.findall(text.replace("_", " ")) if w not in STOPWORDS]
  return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words]


def _unit_counts(items: list[str]) -> dict[str, float]:
  """Bag of ``items`` scaled to unit L2 norm (empty bag -> empty dict)."""
  counts = collections.Counter(items)
  norm = float(np.sqrt(sum(c * c for c in counts.values())))
  return {k: c / norm for k, c in counts.items()}


def _cosine(u: dict[str, float], v: dict[str, float]) -> float:
  if len(u) > len(v):
    u, v = v, u
  return sum(x * v.get(k, 0.0) for k, x in u.items())


class LexicalSimilarity:
  """Default similarity: ``(cos(words) + cos(char 3-grams)) / 2`` of :func:`normalise_words`.

  Character 3-grams are taken per word with ``#`` boundary marks (``desk`` -> ``#de des esk sk#``), so
  inflections (``drawer``/``drawers``) still overlap. Two texts without any word (after normalisation)
  score 1.0; one such text against a non-empty one scores 0.0. Values lie in [0, 1].
  """

  def _features(self, text: str) -> tuple[dict[str, float], dict[str, float]]:
    words = normalise_words(text)
    grams = [f"#{w}#"[i:i + 3] for w in words for i in range(len(w))]
    return _unit_counts(words), _unit_counts(grams)

  def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    fa, fb = [self._features(t) for t in a], [self._features(t) for t in b]
    out = np.zeros((len(a), len(b)), np.float64)
    for i, (wa, ga) in enumerate(fa):
      for j, (wb, gb) in enumerate(fb):
        if not wa or not wb:
          out[i, j] = float(not wa and not wb)
        else:
          out[i, j] = 0.5 * (_cosine(wa, wb) + _cosine(ga, gb))
    return np.clip(out, 0.0, 1.0)


class EmbeddingSimilarity:
  """Cosine of mean-pooled last hidden states of a local transformers encoder (GLaMM's text similarity).

  Each text is tokenised alone as GLaMM does (special tokens added, truncated to ``max_length``) and its
  embedding is the mean of the encoder's last hidden states over all its tokens; batches are padded and
  the padding is masked out of the mean. Embeddings are cached (up to ``cache_size`` texts).

  Args:
    model_path: a directory holding the encoder's config, weights and tokenizer (nothing is downloaded).
    batch_size: texts per forward pass.
    max_length: truncation length in tokens (GLaMM: 512).
    device: torch device name.
    cache_size: number of text embeddings kept.
  """

  def __init__(self, model_path: str | os.PathLike, *, batch_size: int = 64, max_length: int = 512,
               device: str = "cpu", cache_size: int = 200_000):
    import torch
    import transformers

    path = os.fspath(model_path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"text similarity model directory {path!r} does not exist")
    self._torch = torch
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    self.batch_size, self.max_length, self.device = batch_size, max_length, device
    self.cache_size = cache_size
    self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

  def _encode(self, texts: list[str]) -> np.ndarray:
    """float64 [len(texts), hidden]: mean of the last hidden states over each text's tokens."""
    torch = self._torch
    inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                            max_length=self.max_length).to(self.device)
    with torch.no_grad():
      hidden = self.model(**inputs).last_hidden_state.double()
    keep = inputs["attention_mask"].unsqueeze(-1).double()
    return ((hidden * keep).sum(1) / keep.sum(1)).cpu().numpy()

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """float64 [len(texts), hidden] embeddings (cached)."""
    missing = sorted({t for t in texts if t not in self._cache}, key=len)
    for start in range(0, len(missing), self.batch_size):
      chunk = missing[start:start + self.batch_size]
      for text, emb in zip(chunk, self._encode(chunk)):
        self._cache[text] = emb
    rows = []
    for t in texts:
      self._cache.move_to_end(t)
      rows.append(self._cache[t])
    while len(self._cache) > self.cache_size:
      self._cache.popitem(last=False)
    hidden = self.model.config.hidden_size
    return np.stack(rows) if rows else np.zeros((0, hidden), np.float64)

  def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    ea, eb = self.embed(list(a)), self.embed(list(b))
    na, nb = np.linalg.norm(ea, axis=1, keepdims=True), np.linalg.norm(eb, axis=1, keepdims=True)
    ea, eb = ea / np.where(na > 0, na, 1.0), eb / np.where(nb > 0, nb, 1.0)  # zero vector -> cosine 0
    return np.clip(ea @ eb.T, -1.0, 1.0)


def make_similarity(spec: str | os.PathLike | None) -> TextSimilarity:
  """``None``, ``"default"`` or ``"lexical"`` -> :class:`LexicalSimilarity`; a directory ->
  :class:`EmbeddingSimilarity` of the encoder stored there."""
  if spec is None or str(spec) in ("default", "lexical"):
    return LexicalSimilarity()
  if os.path.isdir(spec):
    return EmbeddingSimilarity(spec)
  raise ValueError(f"text similarity {str(spec)!r} is neither 'default' nor a directory holding a "
                   "transformers encoder and its tokenizer (e.g. a local copy of bert-base-uncased)")
