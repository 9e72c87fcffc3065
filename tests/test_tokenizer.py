"""Tokenisers: added tokens are one id each and the model's id; round trips; BERT [DEC]; synthetic pair."""

import json

import ml_collections
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, trainers

from prima_jax.data import tokenizer as tk
from prima_jax.models import configs

# GLaMM's ids for its tokens added to Vicuna's 32000 pieces (written out, not taken from the code).
MODEL_IDS = {"<im_start>": 32000, "<im_end>": 32001, "<bbox>": 32002, "<point>": 32003, "[SEG]": 32004,
             "<p>": 32005, "</p>": 32006}
SEG_ID, P_END_ID = MODEL_IDS["[SEG]"], MODEL_IDS["</p>"]
LINES = ["A chat between a curious human and an artificial intelligence assistant.",
         "The chair is next to the table in the first image (IMAGE1).",
         "Which object can roll? The red ball rolls, the desk_1's drawer_2 does not.",
         "USER: what is the drawer of the desk? ASSISTANT: the handle",
         "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 ;:,.?!()_'<>/[]"] * 10
WORDS = ["chair", "table", "desk_1's", "drawer_2", "ball", "red", "roll", "Which", "object", "handle"]
TEXTS = ["the chair is red",
         "Which object can roll? The red ball.",
         "The <p> desk_1's drawer_2 </p> [SEG] (IMAGE2) and <p> chair </p> [SEG] (IMAGE1); again (IMAGE2).",
         "<im_start> <im_end> <bbox> <point> [SEG] <p> </p>"]


def _train_sentencepiece(prefix):
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(LINES), model_prefix=str(prefix), vocab_size=340, model_type="bpe",
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
      minloglevel=2)


def _llama_style_json(path, extra_tokens=()):
  """A tiny BPE tokenizer.json laid out like LLaMA's (▁ prefix normaliser, <unk> <s> </s> = 0 1 2)."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
  tok.train_from_iterator(LINES, trainer)
  tok.add_special_tokens(["<unk>", "<s>", "</s>"])
  if extra_tokens:
    tok.add_tokens(list(extra_tokens))
  tok.save(str(path))
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  (root / "sp").mkdir()
  _train_sentencepiece(root / "sp" / "tokenizer")
  _llama_style_json(root / "tokenizer.json")
  tk.build_synthetic_tokenizers(WORDS, root / "synth")
  return root


@pytest.fixture(params=["sentencepiece", "tokenizer.json", "synthetic"])
def llm_tok(request, files):
  path = {"sentencepiece": files / "sp" / "tokenizer.model", "tokenizer.json": files / "tokenizer.json",
          "synthetic": files / "synth" / "tokenizer.json"}[request.param]
  return tk.load_llama_tokenizer(path)


def test_added_tokens_are_one_id_each_and_the_models_id(llm_tok):
  assert tk.llm_added_ids() == MODEL_IDS == configs.added_token_ids(configs.full_config().prima)
  for token, model_id in MODEL_IDS.items():
    assert llm_tok.encode(token) == [model_id], token
    assert llm_tok.token_to_id(token) == model_id
    assert llm_tok.id_to_token(model_id) == token
    ids = llm_tok.encode(f"the chair {token} the table")
    assert ids.count(model_id) == 1
    k = ids.index(model_id)
    # no lone leading-space piece on either side of the added token
    assert llm_tok.id_to_token(ids[k - 1]) != "▁" and llm_tok.id_to_token(ids[k + 1]) != "▁"


def test_seg_trap_base_model_splits_seg_with_leading_space_piece(files):
  """Why the test above matters: the plain sentencepiece model's first piece of "[SEG]" is "▁"."""
  sp = spm.SentencePieceProcessor(model_file=str(files / "sp" / "tokenizer.model"))
  pieces = sp.encode("[SEG]", out_type=str)
  assert len(pieces) > 1 and pieces[0] == "▁"
  tok = tk.load_llama_tokenizer(files / "sp")
  assert tok.encode("[SEG]")[0] == SEG_ID != sp.piece_to_id(pieces[0])


def test_special_ids_and_size(llm_tok):
  assert (llm_tok.bos_id, llm_tok.eos_id, llm_tok.pad_id, llm_tok.unk_id) == (1, 2, 0, 0)
  assert llm_tok.vocab_size == 32007
  assert llm_tok.id_to_token(1) == "<s>" and llm_tok.id_to_token(2) == "</s>"
  assert 1 not in llm_tok.encode("the chair") and 2 not in llm_tok.encode("the chair")
  # "</s>" written in user text stays text, never becomes EOS
  assert llm_tok.eos_id not in llm_tok.encode("the </s> chair")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(llm_tok, text):
  ids = llm_tok.encode(text)
  assert all(0 <= i < llm_tok.vocab_size for i in ids)
  assert llm_tok.decode(ids) == text
  for token, model_id in MODEL_IDS.items():
    assert ids.count(model_id) == text.count(token), token


def test_added_tokens_split_without_spaces(llm_tok):
  ids = llm_tok.encode("x[SEG](IMAGE1)</p>y")
  assert ids.count(SEG_ID) == 1 and ids.count(P_END_ID) == 1
  assert llm_tok.decode(ids) == "x [SEG] (IMAGE1) </p> y"
  assert llm_tok.decode([1] + ids + [2], skip_special_tokens=True) == "x [SEG] (IMAGE1) </p> y"
  assert llm_tok.decode([1, 2]) == "<s> </s>"


def test_decode_rejects_ids_outside_vocab(llm_tok):
  with pytest.raises(ValueError, match="outside the vocabulary"):
    llm_tok.decode([5, -200])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    llm_tok.decode([32007])


def test_loader_errors(files, tmp_path):
  with pytest.raises(FileNotFoundError):
    tk.load_llama_tokenizer(tmp_path)
  # a tokenizer.json that already holds [SEG] at another id
  bad = _llama_style_json(tmp_path / "tokenizer.json", extra_tokens=["[SEG]"])
  with pytest.raises(ValueError, match=r"'\[SEG\]' has id \d+, the model expects 32004"):
    tk.load_llama_tokenizer(bad)
  # an added_tokens.json beside tokenizer.model that disagrees with the model's ids
  d = tmp_path / "sp"
  d.mkdir()
  (d / "tokenizer.model").write_bytes((files / "sp" / "tokenizer.model").read_bytes())
  (d / "added_tokens.json").write_text(json.dumps({"<im_start>": 32000, "<pad>": 32004}))
  with pytest.raises(ValueError, match="id 32004 is '<pad>'"):
    tk.load_llama_tokenizer(d)
  (d / "added_tokens.json").write_text(json.dumps(MODEL_IDS))
  assert tk.load_llama_tokenizer(d).encode("[SEG]") == [SEG_ID]


def test_loader_rejects_other_special_ids(tmp_path):
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(LINES), model_prefix=str(tmp_path / "tokenizer"), vocab_size=120,
      unk_id=3, bos_id=0, eos_id=1, pad_id=2, minloglevel=2)
  with pytest.raises(ValueError, match=r"\(unk, bos, eos\) ids are \(3, 0, 1\)"):
    tk.load_llama_tokenizer(tmp_path / "tokenizer.model")


@pytest.fixture
def bert_vocab(tmp_path):
  lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "chair", "red", "is", "which", "object",
           "roll", "##s", "?", ".", "_", "1", "'", "s", "desk"]
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(lines) + "\n")
  return path, lines


def test_bert_tokenizer(bert_vocab):
  path, lines = bert_vocab
  tok = tk.load_bert_tokenizer(path)
  dec = len(lines)
  assert tok.bos_id == tok.token_to_id("[DEC]") == dec and tok.vocab_size == dec + 1
  assert (tok.pad_id, tok.eos_id, tok.token_to_id("[CLS]"), tok.unk_id) == (0, 3, 2, 1)
  ids = tok.encode("Which object ROLLS?")
  assert ids == [lines.index(w) for w in ("which", "object", "roll", "##s", "?")]
  assert tok.decode(ids) == "which object rolls?"
  assert tok.encode("[DEC]") == [dec]
  assert tok.encode("the desk_1's chair [DEC]").count(dec) == 1
  assert tok.encode("zebra") == [tok.unk_id]


def test_bert_tokenizer_rejects_vocab_without_specials(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("[PAD]\n[UNK]\nthe\n")
  missing = r"vocab.txt: missing special tokens \['\[CLS\]', '\[SEP\]', '\[MASK\]'\]"
  with pytest.raises(ValueError, match=missing):
    tk.load_bert_tokenizer(path)


def test_synthetic_is_deterministic_and_complete(tmp_path):
  a_llm, a_bert = tk.build_synthetic_tokenizers(WORDS, tmp_path / "a")
  tk.build_synthetic_tokenizers(list(reversed(WORDS)) + WORDS[:3], tmp_path / "b")
  for name in ("tokenizer.json", "vocab.txt"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  llm, bert = tk.load_synthetic_tokenizers(tmp_path / "b")
  assert llm.vocab_size == 32007 and a_llm.vocab_size == 32007
  assert bert.vocab_size == a_bert.vocab_size == bert.bos_id + 1
  for word in ("chair", "table", "ball", "Which", "handle", "ASSISTANT", "assistant", "overview"):
    ids = llm.encode(word)
    assert [llm.id_to_token(i) for i in ids] == [f"▁{word}"], word
    assert bert.encode(word) == [bert.token_to_id(word.lower())], word
  text = "Ünïcode ☃ and\nnewlines\tstay (IMAGE3) <p> x </p> [SEG]"
  assert llm.decode(llm.encode(text)) == text
  assert llm.encode("The chair") == a_llm.encode("The chair")


def test_added_ids_follow_the_models_first_added_id(files, tmp_path):
  """The tiny model's ids (1024..1030): encoded, decoded and checked against the model at start-up."""
  from prima_jax import workdir
  from prima_jax.training import validate

  cfg = configs.tiny_config()
  llm, bert = tk.load_synthetic_tokenizers(files / "synth", first_added_id=cfg.prima.first_added_id)
  assert llm.vocab_size == 1031 == cfg.llm.vocab_size
  assert llm.encode("<p> ball </p> [SEG]")[-1] == 1028 == cfg.prima.seg_token_id
  assert llm.decode([1024, 1025]) == "<im_start> <im_end>"
  assert max(i for t in TEXTS for i in llm.encode(t) if i not in llm.added_tokens.values()) < 1024
  # A sentencepiece base of 340 pieces does not fit below 300.
  with pytest.raises(ValueError, match=r"340 pieces.*first_added_id"):
    tk.load_llama_tokenizer(files / "sp", first_added_id=300)
  # Tokenizer and model must agree: Vicuna's ids against the tiny model are refused by name.
  config = ml_collections.ConfigDict(dict(model=cfg, data=dict(tokenizer="synthetic")))
  workdir.fit_vocab_sizes(config, (llm, bert))
  vicuna_ids = tk.load_synthetic_tokenizers(files / "synth")
  config.model.llm.vocab_size = 32007
  with pytest.raises(ValueError, match=r"first_added_id=1024\) expects"):
    workdir.fit_vocab_sizes(config, vicuna_ids)
  # The model's own ids must follow first_added_id, and fit its vocabulary.
  validate.check_model(ml_collections.ConfigDict(dict(model=configs.tiny_config())))
  bad = configs.tiny_config()
  bad.prima.seg_token_id = 5
  with pytest.raises(validate.ConfigError, match=r"model.prima.seg_token_id=5 but \[SEG\] is id 1028"):
    validate.check_model(ml_collections.ConfigDict(dict(model=bad)))
  small = configs.tiny_config()
  small.llm.vocab_size = 1030
  with pytest.raises(validate.ConfigError, match=r"1024..1030, which must lie in \[3, model.llm.vocab_size="):
    validate.check_model(ml_collections.ConfigDict(dict(model=small)))
