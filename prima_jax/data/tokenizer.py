"""Tokenisers: the LLaMA/Vicuna vocabulary with PRIMA's added tokens, BERT WordPiece, synthetic pairs.

Every tokeniser is a :class:`Tokenizer`: a base model (sentencepiece ``tokenizer.model``, HF
``tokenizer.json`` or WordPiece ``vocab.txt``) plus *added tokens* with fixed ids that are split
out of the text before the base model sees it. For the LLM these are the model's seven tokens
(``configs.ADDED_TOKENS``) at consecutive ids from the model's ``prima.first_added_id`` (32000 for
Vicuna: vocab_size 32007; the tiny model's 1024: 1031), whatever the size of the base vocabulary,
whose pieces must all lie below that id. The loaders take ``first_added_id`` from the model config
(``workdir.load_tokenizers``), so the tokenizer and the model cannot disagree.

Added tokens encode to exactly one id each. Never take ``tokenizer("[SEG]").input_ids[0]`` as the
[SEG] id: with a sentencepiece base that is the leading-space piece ``▁`` (GLaMM#73, LISA#55).
Whitespace next to an added token is dropped and each text chunk is encoded on its own (so it gets
sentencepiece's dummy ``▁`` prefix) [I]: the behaviour of the slow ``LlamaTokenizer`` of the
transformers versions GLaMM and LISA pinned, for tokens added with ``add_tokens``.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from prima_jax.models import configs

LLM_ADDED_TOKENS: tuple[str, ...] = configs.ADDED_TOKENS
LLM_UNK_ID, LLM_BOS_ID, LLM_EOS_ID = 0, 1, 2
DEC_TOKEN = "[DEC]"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

PathLike = str | os.PathLike


class _SentencePieceBase:
  """A sentencepiece ``tokenizer.model``."""

  def __init__(self, path: Path):
    import sentencepiece as spm
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=str(path))
    self.size = self.sp.get_piece_size()
    self.unk_id, self.bos_id, self.eos_id = self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return list(self.sp.encode(text, out_type=int))

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode(list(ids))

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(i)

  def piece_to_id(self, piece: str) -> int | None:
    i = self.sp.piece_to_id(piece)
    return None if i == self.unk_id and piece != self.sp.id_to_piece(self.unk_id) else i


class _HFBase:
  """An HF ``tokenizers`` tokenizer (``tokenizer.json`` or a WordPiece built from ``vocab.txt``)."""

  def __init__(self, tok, path: Path, *, unk: str, bos: str | None, eos: str | None):
    self.tok = tok
    self.path = path
    # Special tokens in user text stay text (no "</s>" injection); we add BOS/EOS ourselves.
    tok.encode_special_tokens = True
    self.size = tok.get_vocab_size(with_added_tokens=True)
    self.unk_id = tok.token_to_id(unk)
    self.bos_id = tok.token_to_id(bos) if bos else None
    self.eos_id = tok.token_to_id(eos) if eos else None

  def encode(self, text: str) -> list[int]:
    return list(self.tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    piece = self.tok.id_to_token(i)
    if piece is None:
      raise KeyError(f"id {i} is not in {self.path}")
    return piece

  def piece_to_id(self, piece: str) -> int | None:
    return self.tok.token_to_id(piece)


class Tokenizer:
  """Text <-> ids: a base tokeniser plus added tokens with fixed ids, split out of text first.

  Attributes:
    bos_id, eos_id, pad_id, unk_id: special ids (the LLM: 1, 2, 0 = unk, 0).
    vocab_size: ids lie in [0, vocab_size) (the LLM: 32007, whatever the base size).
    added_tokens: {token: id} of the added tokens.
    name: the file it was loaded from (for error messages).
  """

  def __init__(self, base, added_tokens: Mapping[str, int], *, bos_id: int, eos_id: int, pad_id: int,
               vocab_size: int, name: str):
    self._base = base
    self.added_tokens = dict(added_tokens)
    self._added_by_id = {i: t for t, i in self.added_tokens.items()}
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, base.unk_id
    self.vocab_size = vocab_size
    self.name = name
    alternatives = sorted(self.added_tokens, key=len, reverse=True)  # longest match first
    self._split = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

  def __repr__(self) -> str:
    return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``; no BOS/EOS added. Each added token becomes exactly one id."""
    if self._split is None:
      return self._base.encode(text) if text else []
    ids: list[int] = []
    start, after_added = 0, False
    for m in self._split.finditer(text):
      ids += self._encode_chunk(text[start:m.start()], lstrip=after_added, rstrip=True)
      ids.append(self.added_tokens[m.group()])
      start, after_added = m.end(), True
    ids += self._encode_chunk(text[start:], lstrip=after_added, rstrip=False)
    return ids

  def _encode_chunk(self, chunk: str, *, lstrip: bool, rstrip: bool) -> list[int]:
    if lstrip:
      chunk = chunk.lstrip()
    if rstrip:
      chunk = chunk.rstrip()
    return self._base.encode(chunk) if chunk else []

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    """Text of ``ids``; added tokens are set off by single spaces. BOS/EOS render as ``<s>``/``</s>``
    unless ``skip_special_tokens``."""
    parts: list[str] = []
    run: list[int] = []

    def flush():
      if run:
        text = self._base.decode(run)
        if text:
          parts.append(text)
        run.clear()

    for i in (int(i) for i in ids):
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"{self.name}: id {i} is outside the vocabulary [0, {self.vocab_size})")
      if i in self._added_by_id or i in (self.bos_id, self.eos_id):
        flush()
        if i in self._added_by_id:
          parts.append(self._added_by_id[i])
        elif not skip_special_tokens:
          parts.append(self.id_to_token(i))
      elif skip_special_tokens and i == self.pad_id:
        continue
      else:
        run.append(i)
    flush()
    return " ".join(parts)

  def token_to_id(self, token: str) -> int:
    """Id of an added token or a base piece (e.g. ``"▁the"``); KeyError when unknown."""
    if token in self.added_tokens:
      return self.added_tokens[token]
    i = self._base.piece_to_id(token)
    if i is None:
      raise KeyError(f"{self.name}: no token {token!r}")
    return i

  def id_to_token(self, i: int) -> str:
    """The added token or base piece of id ``i``."""
    i = int(i)
    if i in self._added_by_id:
      return self._added_by_id[i]
    if not 0 <= i < self._base.size:
      raise KeyError(f"{self.name}: id {i} is not a token")
    return self._base.id_to_piece(i)


def _llm_file(path: Path) -> Path:
  if path.is_dir():
    for name in ("tokenizer.model", "tokenizer.json"):
      if (path / name).is_file():
        return path / name
    raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json")
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such tokenizer file")
  return path


def llm_added_ids(first_added_id: int = configs.VICUNA_FIRST_ADDED_ID) -> dict[str, int]:
  """{token: id} of the LLM's added tokens from ``first_added_id`` (the model's ``prima.first_added_id``)."""
  return {token: first_added_id + k for k, token in enumerate(LLM_ADDED_TOKENS)}


def _check_added_ids(name: str, found: Mapping[str, int], ours: Mapping[str, int]) -> None:
  """Raises when a file already maps an id of ours to another token, or one of ours to another id."""
  by_id = {i: t for t, i in ours.items()}
  for token, i in found.items():
    if token in ours and i != ours[token]:
      raise ValueError(f"{name}: {token!r} has id {i}, the model expects {ours[token]}")
    if i in by_id and token != by_id[i]:
      raise ValueError(f"{name}: id {i} is {token!r}, the model expects {by_id[i]!r}")


def load_llama_tokenizer(path: PathLike, *,
                         first_added_id: int = configs.VICUNA_FIRST_ADDED_ID) -> Tokenizer:
  """The Vicuna/LLaMA tokeniser with the model's added tokens at ``first_added_id`` .. + 6.

  Args:
    path: a sentencepiece ``tokenizer.model``, an HF ``tokenizer.json``, or a directory holding one
      (``tokenizer.model`` preferred). An ``added_tokens.json`` beside it is checked against our ids.
    first_added_id: the model's ``prima.first_added_id`` (32000 for Vicuna).

  Returns:
    A Tokenizer with bos 1, eos 2, pad = unk = 0 and vocab_size ``first_added_id + 7`` (32007).

  Raises:
    ValueError naming the file when its special ids differ from LLaMA's, when its base pieces do not
    all lie below ``first_added_id``, or when it already maps an added token to another id.
  """
  ours = llm_added_ids(first_added_id)
  vocab_size = first_added_id + len(ours)
  file = _llm_file(Path(path))
  if file.suffix == ".json":
    import tokenizers
    base = _HFBase(tokenizers.Tokenizer.from_file(str(file)), file, unk="<unk>", bos="<s>", eos="</s>")
  else:
    base = _SentencePieceBase(file)
  name = str(file)
  got = (base.unk_id, base.bos_id, base.eos_id)
  if got != (LLM_UNK_ID, LLM_BOS_ID, LLM_EOS_ID):
    raise ValueError(f"{name}: (unk, bos, eos) ids are {got}, the model expects "
                     f"({LLM_UNK_ID}, {LLM_BOS_ID}, {LLM_EOS_ID})")
  found = {t: base.piece_to_id(t) for t in LLM_ADDED_TOKENS if base.piece_to_id(t) is not None}
  sidecar = file.parent / "added_tokens.json"
  if sidecar.is_file():
    extra = json.loads(sidecar.read_text())
    _check_added_ids(str(sidecar), {str(t): int(i) for t, i in extra.items()}, ours)
  _check_added_ids(name, found, ours)
  extra_ids = sorted(i for i in range(first_added_id, base.size) if i not in found.values())
  if base.size > vocab_size or extra_ids:
    raise ValueError(f"{name}: {base.size} pieces; the base vocabulary must fit in "
                     f"[0, {first_added_id}) (ids {first_added_id}.. are PRIMA's added tokens: "
                     "model.prima.first_added_id)")
  return Tokenizer(base, ours, bos_id=LLM_BOS_ID, eos_id=LLM_EOS_ID, pad_id=LLM_UNK_ID,
                   vocab_size=vocab_size, name=name)


def load_bert_tokenizer(vocab_path: PathLike) -> Tokenizer:
  """bert-base-uncased-style WordPiece (lower-cased) from ``vocab.txt``, plus ``[DEC]`` appended.

  ``[DEC]`` (bos) gets id = number of lines (30522 for bert-base-uncased, so vocab_size 30523) unless
  the file already lists it. eos is ``[SEP]``, pad ``[PAD]``; ``[CLS]`` via ``token_to_id``.
  Truncation (InstructBLIP: from the left) is the caller's.
  """
  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers
  file = Path(vocab_path)
  if not file.is_file():
    raise FileNotFoundError(f"{file}: no such vocab file")
  lines = file.read_text(encoding="utf-8").splitlines()
  vocab: dict[str, int] = {}
  for i, tok in enumerate(lines):
    vocab.setdefault(tok, i)
  missing = [t for t in BERT_SPECIALS if t not in vocab]
  if missing:
    raise ValueError(f"{file}: missing special tokens {missing}")
  tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  base = _HFBase(tok, file, unk="[UNK]", bos=None, eos="[SEP]")
  dec_id = vocab.get(DEC_TOKEN, len(lines))
  size = max(len(lines), dec_id + 1)
  return Tokenizer(base, {DEC_TOKEN: dec_id}, bos_id=dec_id, eos_id=vocab["[SEP]"], pad_id=vocab["[PAD]"],
                   vocab_size=size, name=str(file))


# ------------------------------------------------------------------------------------- synthetic

# Words of the Vicuna v1 template and the image intro (prompt.py), always in the synthetic vocabulary.
_TEMPLATE_TEXT = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                  "gives helpful, detailed, and polite answers to the human's questions. USER: ASSISTANT: "
                  "The IMAGE provides an overview of the picture. provide pictures")
_SYNTH_SCORE, _SYNTH_RARE = -1.0, -1e6


def _words(words: Iterable[str]) -> list[str]:
  """Sorted distinct word-like pieces (letters/digits runs) of ``words`` and the template."""
  pieces = set()
  for text in [*words, _TEMPLATE_TEXT]:
    pieces.update(re.findall(r"[A-Za-z0-9]+", str(text)))
  return sorted(pieces)


def build_synthetic_tokenizers(words: Iterable[str], out_dir: PathLike, *,
                               first_added_id: int = configs.VICUNA_FIRST_ADDED_ID
                               ) -> tuple[Tokenizer, Tokenizer]:
  """Writes a small deterministic tokeniser pair to ``out_dir`` and loads it.

  ``tokenizer.json``: a LLaMA-style unigram model (``▁`` word-boundary pieces, byte fallback, so any
  text round-trips) over the special pieces, printable ASCII, and every word of ``words`` and of the
  prompt template, with and without ``▁``; loaded by :func:`load_llama_tokenizer`, so the added
  tokens have ids ``first_added_id`` .. + 6 (the files do not depend on it). ``vocab.txt``: a
  lower-case WordPiece vocabulary over the same words; loaded by :func:`load_bert_tokenizer`
  (``[DEC]`` appended). The files depend only on the set of words.

  Returns:
    (llm_tokenizer, bert_tokenizer).
  """
  import tokenizers
  from tokenizers import decoders, models, normalizers
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  words = _words(words)
  chars = [c for c in string.printable if not c.isspace()]

  rare = [("<unk>", _SYNTH_RARE), ("<s>", _SYNTH_RARE), ("</s>", _SYNTH_RARE)]
  rare += [(f"<0x{b:02X}>", _SYNTH_RARE) for b in range(256)]
  pieces = ["▁"] + chars + [f"▁{c}" for c in chars]
  for w in words:
    pieces += [w, f"▁{w}"]
  seen, vocab = set(), list(rare)
  for p in pieces:
    if p not in seen and all(p != r for r, _ in rare):
      seen.add(p)
      vocab.append((p, _SYNTH_SCORE))
  if len(vocab) > first_added_id:
    raise ValueError(f"{len(vocab)} synthetic pieces; at most model.prima.first_added_id={first_added_id} "
                     "fit below the added tokens")
  llm = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
  llm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  llm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  llm.save(str(out / "tokenizer.json"), pretty=False)

  bert_chars = [c for c in chars if not c.isupper()]
  bert = list(BERT_SPECIALS) + bert_chars + [f"##{c}" for c in bert_chars if c.isalnum()]
  lower = sorted({w.lower() for w in words} - set(bert))
  bert += lower + sorted({f"##{w}" for w in lower} - set(bert))
  (out / "vocab.txt").write_text("\n".join(bert) + "\n", encoding="utf-8")
  return load_synthetic_tokenizers(out, first_added_id=first_added_id)


def load_synthetic_tokenizers(directory: PathLike, *, first_added_id: int = configs.VICUNA_FIRST_ADDED_ID
                              ) -> tuple[Tokenizer, Tokenizer]:
  """(llm, bert) tokenisers from a directory written by :func:`build_synthetic_tokenizers`."""
  d = Path(directory)
  return (load_llama_tokenizer(d / "tokenizer.json", first_added_id=first_added_id),
          load_bert_tokenizer(d / "vocab.txt"))
