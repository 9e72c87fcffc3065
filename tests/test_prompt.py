"""The Vicuna v1 prompt: intros, golden token sequences, labels, [SEG] routing, budgets, batch contract.

The golden file pins the full tokens of a 2- and a 3-image example (synthetic tokeniser built from
WORDS below). After an intended change, rewrite it with ``PRIMA_UPDATE_GOLDEN=1 pytest tests/test_prompt.py``
and review the diff of the pieces.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from prima_jax.data import prompt as pr
from prima_jax.data.tokenizer import build_synthetic_tokenizers
from prima_jax.models import batch as batch_lib
from prima_jax.models import configs

GOLDEN = Path(__file__).parent / "fixtures" / "prompt_golden.json"
WORDS = ["which", "Which", "object", "objects", "appears", "appear", "in", "every", "image", "images",
         "chair", "table", "mug", "handle", "drawer", "desk", "has", "more", "the", "The", "is", "and",
         "both", "second", "first", "third", "red", "blue", "roll", "can", "ball"]
NQ, SLOT = 32, -200
# GLaMM's Vicuna ids of <im_start>, <im_end> and [SEG] (the tokenizers' default first_added_id 32000).
IM_START_ID, IM_END_ID, SEG_ID = 32000, 32001, 32004
EXAMPLES = {
    "two_images": dict(
        question="Which object appears in both images?",
        answer="The <p> chair_1 </p> [SEG] (IMAGE1) and <p> chair_2 </p> [SEG] (IMAGE2) appear in both.",
        num_images=2),
    "three_images": dict(
        question="Which image has more red objects, and what is the handle of the mug?",
        answer=("The third image has more: <p> ball_1 </p> [SEG] (IMAGE3) and <p> mug_2 </p> [SEG] (IMAGE3). "
                "The handle is <p> mug_2's handle_1 </p> [SEG] (IMAGE3); the first has "
                "<p> table_1 </p> [SEG] (IMAGE1), again (IMAGE1)."),
        num_images=3),
}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
  return build_synthetic_tokenizers(WORDS, tmp_path_factory.mktemp("synth_tok"))


def _encode(toks, question, answer, num_images, *, nq=NQ, max_length=512, max_question_length=128):
  llm, bert = toks
  return pr.encode_example(llm, bert, question, answer, num_images, num_query_tokens=nq, image_token_id=SLOT,
                           max_length=max_length, max_question_length=max_question_length)


def _pieces(tok, ids):
  return ["<image_slot>" if i == SLOT else tok.id_to_token(i) for i in ids]


def test_image_intros():
  assert pr.image_intro(1) == "The <image> (IMAGE1) provides an overview of the picture.\n"
  assert pr.image_intro(2) == ("The <image> (IMAGE1) and <image> (IMAGE2) provide an overview of the "
                               "pictures.\n")
  assert pr.image_intro(3) == ("The <image> (IMAGE1), <image> (IMAGE2), and <image> (IMAGE3) provide an "
                               "overview of the pictures.\n")
  assert pr.image_intro(5).count("<image>") == 5
  assert ", <image> (IMAGE4), and <image> (IMAGE5) provide" in pr.image_intro(5)
  with pytest.raises(ValueError, match="num_images"):
    pr.image_intro(0)


def test_conversation_text():
  prompt, answer = pr.conversation("Q?", "A [SEG] (IMAGE1).", 1)
  assert prompt == ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                    "gives helpful, detailed, and polite answers to the human's questions. USER: The <image> "
                    "(IMAGE1) provides an overview of the picture.\nQ? ASSISTANT: ")
  assert answer == "A [SEG] (IMAGE1).</s>"
  assert pr.conversation("Q?", None, 2) == (prompt.replace(pr.image_intro(1), pr.image_intro(2))[:-1], "")
  # Without a system message (model.prima.system_prompt=""): the same turn from "USER:" on.
  assert pr.conversation("Q?", "A [SEG] (IMAGE1).", 1, system="") == (prompt[prompt.index("USER:"):], answer)


def test_the_system_message_is_the_model_config_s_in_training_and_inference(toks):
  """The pipeline and the inference engine build the prompt from model.prima.system_prompt; a config
  recorded before the field has the Vicuna v1 message."""
  cfg = configs.tiny_config()
  assert pr.system_prompt(cfg) == pr.SYSTEM
  del cfg.prima["system_prompt"]
  assert pr.system_prompt(cfg) == pr.SYSTEM
  cfg = configs.tiny_config()
  cfg.prima.system_prompt = ""
  llm, _ = toks
  full = _encode(toks, "Which object?", "A [SEG] (IMAGE1).", 1)
  short = pr.encode_example(*toks, "Which object?", "A [SEG] (IMAGE1).", 1, num_query_tokens=NQ,
                            image_token_id=SLOT, max_length=512, max_question_length=128,
                            system=pr.system_prompt(cfg))
  cut = len(full["input_ids"]) - len(short["input_ids"])
  assert cut == len(llm.encode(pr.SYSTEM))     # the message's pieces, nothing else
  assert short["input_ids"].tolist() == [llm.bos_id] + full["input_ids"][1 + cut:].tolist()
  assert llm.decode(short["input_ids"][1:3]) == "USER:"
  assert (short["seg_positions"] == full["seg_positions"] - cut).all()


def _golden_entry(toks, name):
  llm, bert = toks
  ex = EXAMPLES[name]
  out = _encode(toks, **ex)
  return dict(
      **ex, num_query_tokens=NQ, image_token_id=SLOT,
      input_ids=out["input_ids"].tolist(), pieces=_pieces(llm, out["input_ids"]),
      answer_start=int(np.flatnonzero(out["labels"] != batch_lib.IGNORE_LABEL)[0]),
      seg_positions=out["seg_positions"].tolist(), seg_image_index=out["seg_image_index"].tolist(),
      qformer_input_ids=out["qformer_input_ids"].tolist(),
      qformer_pieces=[bert.id_to_token(i) for i in out["qformer_input_ids"]])


def test_golden_token_sequences(toks):
  got = {name: _golden_entry(toks, name) for name in EXAMPLES}
  if os.environ.get("PRIMA_UPDATE_GOLDEN"):
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(dict(words=WORDS, examples=got), indent=1) + "\n")
  golden = json.loads(GOLDEN.read_text())
  assert golden["words"] == WORDS
  for name, want in golden["examples"].items():
    have = got[name]
    for key in want:
      if key in ("input_ids", "pieces"):  # token by token, with a readable first difference
        for k, (h, w) in enumerate(zip(have[key], want[key])):
          assert h == w, f"{name} {key}[{k}]: {h!r} != {w!r}; context {want['pieces'][max(0, k - 5):k + 5]}"
      assert have[key] == want[key], f"{name}: {key}"


def test_golden_structure(toks):
  """What the golden pieces must look like, independent of the stored file."""
  llm, _ = toks
  for name, ex in EXAMPLES.items():
    out = _encode(toks, **ex)
    ids, n = out["input_ids"].tolist(), ex["num_images"]
    assert ids[0] == llm.bos_id and ids[-1] == llm.eos_id and ids.count(llm.eos_id) == 1
    starts = [k for k, i in enumerate(ids) if i == IM_START_ID]
    assert len(starts) == n and ids.count(IM_END_ID) == n, name
    for k in starts:
      assert ids[k + 1:k + 1 + NQ] == [SLOT] * NQ and ids[k + 1 + NQ] == IM_END_ID
    assert ids.count(SLOT) == n * NQ
    # each image block is followed by its own (IMAGEk) tag
    for j, k in enumerate(starts):
      assert llm.decode(ids[k + NQ + 2:k + NQ + 6]) == f"(IMAGE{j + 1})"
    text_ids = [i for i in ids[1:-1] if i != SLOT]
    want = "".join(pr.conversation(ex["question"], ex["answer"], n))[:-len("</s>")]
    assert llm.decode(text_ids) == want.replace("<image>", "<im_start> <im_end>")


def test_labels_cover_exactly_the_answer(toks):
  llm, _ = toks
  for ex in EXAMPLES.values():
    out = _encode(toks, **ex)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.shape == labels.shape and ids.dtype == labels.dtype == np.int32
    supervised = np.flatnonzero(labels != batch_lib.IGNORE_LABEL)
    start = supervised[0]
    np.testing.assert_array_equal(supervised, np.arange(start, len(ids)))  # contiguous up to EOS
    np.testing.assert_array_equal(labels[start:], ids[start:])
    assert labels[-1] == llm.eos_id
    assert llm.decode(labels[start:-1]) == ex["answer"]
    assert llm.decode(ids[start - 2:start]) == "ASSISTANT:"  # the role is not supervised


def test_seg_count_positions_and_routing(toks):
  for ex in EXAMPLES.values():
    out = _encode(toks, **ex)
    ids = out["input_ids"]
    n_seg = ex["answer"].count("[SEG]")
    assert (ids == SEG_ID).sum() == n_seg == len(out["seg_positions"]) == len(out["seg_image_index"])
    assert (ids[out["seg_positions"]] == SEG_ID).all()
    assert out["seg_positions"].dtype == out["seg_image_index"].dtype == np.int32
  three = _encode(toks, **EXAMPLES["three_images"])
  assert three["seg_image_index"].tolist() == [2, 2, 2, 0]  # repeated "(IMAGE1)" adds no [SEG]


def test_no_answer_for_generation(toks):
  llm, _ = toks
  out = _encode(toks, "Which object?", None, 2)
  assert (out["labels"] == batch_lib.IGNORE_LABEL).all()
  assert len(out["seg_positions"]) == 0 and out["seg_image_index"].shape == (0,)
  assert llm.decode(out["input_ids"][-2:]) == "ASSISTANT:" and out["input_ids"][-1] != llm.eos_id


def test_prompt_too_long(toks):
  ex = EXAMPLES["three_images"]
  length = len(_encode(toks, **ex)["input_ids"])
  assert len(_encode(toks, **ex, max_length=length)["input_ids"]) == length
  with pytest.raises(pr.PromptTooLong, match=rf"{length} tokens .* > max_length {length - 1}") as err:
    _encode(toks, **ex, max_length=length - 1)
  assert (err.value.length, err.value.max_length) == (length, length - 1)
  assert err.value.prompt_length + err.value.answer_length == length
  assert err.value.prompt_length > 3 * NQ
  assert isinstance(err.value, ValueError)


def test_prompt_too_long_message_counts(toks):
  ex = EXAMPLES["two_images"]
  with pytest.raises(pr.PromptTooLong) as err:
    _encode(toks, **ex, max_length=10)
  assert str(err.value).startswith(f"prompt too long: {err.value.length} tokens (")


@pytest.mark.parametrize("answer, match", [
    ("The <p> chair </p> [SEG] in the first.", r"\[SEG\] 0 .* not followed by an \(IMAGEk\) tag"),
    ("A [SEG] (IMAGE1) and B [SEG].", r"\[SEG\] 1 .* not followed by an \(IMAGEk\) tag"),
    ("The <p> chair </p> [SEG] (IMAGE3).", r"\[SEG\] 0 .* routed to \(IMAGE3\) but the example has 2 images"),
    ("The <p> chair </p> [SEG] (IMAGE0).", r"routed to \(IMAGE0\)"),
    ("The <p> chair </p> (IMAGE1) [SEG].", r"not followed by an \(IMAGEk\) tag"),
])
def test_bad_seg_routing(toks, answer, match):
  with pytest.raises(pr.SegRoutingError, match=match):
    _encode(toks, "Which object?", answer, 2)


def test_bad_text_fields(toks):
  with pytest.raises(pr.PromptError, match="question contains '\\[SEG\\]'"):
    _encode(toks, "Where is [SEG]?", "It is <p> x </p> [SEG] (IMAGE1).", 2)
  with pytest.raises(pr.PromptError, match="answer contains '<image>'"):
    _encode(toks, "Which?", "This <image> (IMAGE1).", 2)
  with pytest.raises(pr.PromptError, match="question contains '<image>'"):
    _encode(toks, "Which <image>?", "None.", 2)


def test_question_truncated_from_the_left(toks):
  _, bert = toks
  question = "which object in the first image has more red and the second image has the blue ball"
  full = bert.encode(question)
  assert len(full) > 10
  out = _encode(toks, question, "The <p> ball </p> [SEG] (IMAGE2).", 2, max_question_length=8)
  cls, sep = bert.token_to_id("[CLS]"), bert.token_to_id("[SEP]")
  assert out["qformer_input_ids"].tolist() == [cls] + full[-6:] + [sep]
  assert bert.decode(out["qformer_input_ids"][1:-1]) == "second image has the blue ball"
  short = _encode(toks, "Which object?", "None.", 2, max_question_length=8)["qformer_input_ids"].tolist()
  assert short == [cls] + bert.encode("which object?") + [sep]


def test_encoded_examples_pass_the_batch_contract(tmp_path):
  cfg = configs.tiny_config()
  llm, bert = build_synthetic_tokenizers(WORDS, tmp_path, first_added_id=cfg.prima.first_added_id)
  cfg.qformer.vocab_size = bert.vocab_size
  assert cfg.llm.vocab_size == llm.vocab_size
  nq, s, size = cfg.qformer.num_query_tokens, cfg.sam.image_size, cfg.vision.image_size
  rng = np.random.default_rng(0)
  examples = []
  for ex in (EXAMPLES["two_images"], EXAMPLES["three_images"], dict(
      question="Which object?", answer="<p> mug </p> [SEG] (IMAGE1).", num_images=1)):
    out = pr.encode_example(llm, bert, ex["question"], ex["answer"], ex["num_images"],
                            num_query_tokens=nq, image_token_id=cfg.prima.image_token_id,
                            max_length=cfg.llm.max_position_embeddings,
                            max_question_length=cfg.qformer.max_text_length)
    n, m = ex["num_images"], len(out["seg_positions"])
    assert m <= cfg.prima.max_masks
    out.update(eva_images=rng.standard_normal((n, size, size, 3)).astype(np.float32),
               sam_images=rng.standard_normal((n, s, s, 3)).astype(np.float32),
               sam_sizes=np.full((n, 2), s, np.int32),
               gt_masks=(rng.random((m, s, s)) < 0.3).astype(np.float32))
    examples.append(out)
  batch = batch_lib.collate(examples, cfg, num_images=cfg.prima.max_images, max_masks=cfg.prima.max_masks,
                            text_length=cfg.qformer.max_text_length)
  batch_lib.validate_batch(batch, cfg, training=True)
  text = batch["input_ids"][batch["attention_mask"] & (batch["input_ids"] != cfg.prima.image_token_id)]
  assert text.min() >= 0 and text.max() < cfg.llm.vocab_size
  q = batch["qformer_input_ids"][batch["qformer_attention_mask"]]
  assert q.min() >= 0 and q.max() < cfg.qformer.vocab_size
  # the routed image of each [SEG] is the one its answer names
  assert batch["seg_image_index"][1, :4].tolist() == [2, 2, 2, 0]
  # a deliberately misrouted [SEG] is caught by the contract
  examples[2]["seg_image_index"] = np.asarray([2], np.int32)
  bad = batch_lib.collate(examples, cfg, num_images=cfg.prima.max_images, max_masks=cfg.prima.max_masks)
  with pytest.raises(ValueError, match="routed to padding image"):
    batch_lib.validate_batch(bad, cfg, training=True)
