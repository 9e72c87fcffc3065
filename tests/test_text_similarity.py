"""Tests of prima_jax/evaluation/text_similarity.py: the lexical default and the transformers encoder
similarity against a direct PyTorch computation (GLaMM's get_bert_embedding, one text at a time)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prima_jax.evaluation.text_similarity import (
  EmbeddingSimilarity,
  LexicalSimilarity,
  make_similarity,
  normalise_words,
)

from parity_utils import assert_close

TEXTS = ["desk_1's drawer_1", "drawer of the desk", "the red chair_2", "chairs", "a table next to a lamp",
         "", "Cup", "cup_3 and plate_1 on the table_1 in image two"]


def test_normalise_words():
  assert normalise_words("The desk_1's Drawer_12") == ["desk", "drawer"]
  assert normalise_words("3 chairs, 2 glasses and a bus") == ["3", "chair", "2", "glasse", "and", "bus"]
  assert normalise_words("dining_table_1") == ["dining", "table"]
  assert normalise_words("the of a") == []


def test_lexical_properties_and_hand_value():
  sim = LexicalSimilarity()
  s = sim(TEXTS, TEXTS)
  assert s.shape == (len(TEXTS), len(TEXTS)) and s.dtype == np.float64
  np.testing.assert_allclose(s, s.T, atol=1e-15)
  np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-12)
  assert s.min() >= 0.0 and s.max() <= 1.0 + 1e-12
  assert sim(["desk_1's drawer_1"], ["drawer of the desk"])[0, 0] == pytest.approx(1.0)
  assert sim(["the red chair_2"], ["chairs"])[0, 0] > 0.5  # phrase-friendly
  assert sim(["Cup"], ["table"])[0, 0] == 0.0
  assert sim([""], ["the"])[0, 0] == 1.0 and sim([""], ["cup"])[0, 0] == 0.0
  # "red chair" vs "chair": words {red, chair} . {chair} = 1/sqrt(2); 3-grams: 5 shared of 8 and 5.
  expected = 0.5 * (1 / math.sqrt(2) + 5 / math.sqrt(8 * 5))
  assert sim(["red chair"], ["chair"])[0, 0] == pytest.approx(expected, abs=1e-12)
  assert sim([], ["a"]).shape == (0, 1) and sim(["a"], []).shape == (1, 0)


def test_make_similarity(tmp_path):
  assert isinstance(make_similarity(None), LexicalSimilarity)
  assert isinstance(make_similarity("default"), LexicalSimilarity)
  with pytest.raises(ValueError, match="neither 'default' nor a directory"):
    make_similarity(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    EmbeddingSimilarity(tmp_path / "missing")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  """A random 2-layer BertModel and a BertTokenizerFast over a small vocab, saved to a directory."""
  import torch
  import transformers

  path = tmp_path_factory.mktemp("tiny_bert")
  words = sorted({w for t in TEXTS for w in t.lower().replace("'", " ' ").replace("_", " _ ").split()})
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "'", "_", ",", "."]
  vocab = specials + [str(d) for d in range(10)] + words
  (path / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
  tokenizer = transformers.BertTokenizerFast.from_pretrained(path, do_lower_case=True)
  assert len(tokenizer) == len(dict.fromkeys(vocab))
  config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
  torch.manual_seed(0)
  model = transformers.BertModel(config).eval()
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return path, model, tokenizer


def direct_embedding(model, tokenizer, text: str) -> np.ndarray:
  """GLaMM's get_bert_embedding: one text, no padding, mean of the last hidden states."""
  import torch

  inputs = tokenizer(text, return_tensors="pt", max_length=512, truncation=True)
  with torch.no_grad():
    return model(**inputs).last_hidden_state[0].double().mean(0).numpy()


def test_embedding_similarity_matches_direct_torch(tiny_bert):
  path, model, tokenizer = tiny_bert
  assert tokenizer("desk_1's drawer_1").input_ids.count(1) == 0  # every word is in the vocab (no [UNK])
  sim = make_similarity(str(path))
  assert isinstance(sim, EmbeddingSimilarity)
  sim.batch_size = 3  # several padded batches
  a, b = TEXTS[:5], TEXTS[2:]
  ours = sim(a, b)
  emb = {t: direct_embedding(model, tokenizer, t) for t in TEXTS}
  cos = lambda u, v: float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
  expected = np.array([[cos(emb[x], emb[y]) for y in b] for x in a])
  assert_close("EmbeddingSimilarity vs per-text torch", ours, expected, rtol=1e-5)
  assert ours.shape == (5, 6) and np.all(np.abs(ours) <= 1.0)
  # Distinct texts are not all alike (the check above could not pass by a constant output).
  assert expected.max() - expected.min() > 1e-3
  # Cached embeddings give the same values; the cache holds each text once.
  again = sim(b, a)
  np.testing.assert_allclose(again, ours.T, atol=1e-12)
  assert len(sim._cache) == len(set(TEXTS))
  for t in TEXTS:
    assert_close(f"embedding {t!r}", sim.embed([t])[0], emb[t], rtol=1e-5)


def test_embedding_cache_is_bounded(tiny_bert):
  path, model, tokenizer = tiny_bert
  sim = EmbeddingSimilarity(path, cache_size=2)
  out = sim(TEXTS, TEXTS[:1])
  assert len(sim._cache) == 2
  expected = sim(TEXTS, TEXTS[:1])  # recomputed after eviction
  np.testing.assert_allclose(out, expected, atol=1e-12)
