"""The Vicuna v1 prompt of PRIMA (docs/model.md) and its encoding into the model's unbatched example format.

Text: ``SYSTEM USER: The <image> (IMAGE1) and <image> (IMAGE2) provide an overview of the
pictures.\\n{question} ASSISTANT: {answer}</s>``. Tokens: ``<s>``, the prompt with each ``<image>``
expanded to ``<im_start>`` + ``num_query_tokens`` image slots + ``<im_end>``, the answer, ``</s>``;
labels cover the answer and ``</s>`` only. Each ``[SEG]`` of the answer is routed to the image named
by the ``(IMAGEk)`` tag that follows it. The Q-Former reads the bare question as InstructBLIP does:
``[CLS] question [SEP]``, truncated from the left.
"""

from __future__ import annotations

import re

import numpy as np

from prima_jax.data.tokenizer import Tokenizer
from prima_jax.models.batch import IGNORE_LABEL
from prima_jax.models.configs import VICUNA_V1_SYSTEM

SYSTEM = VICUNA_V1_SYSTEM   # the default of model.prima.system_prompt
ROLES = ("USER", "ASSISTANT")
SEP, SEP2 = " ", "</s>"
IMAGE_TOKEN = "<image>"
SEG_TOKEN = "[SEG]"
_SEG_ROUTE = re.compile(r"\[SEG\](\s*\(IMAGE(\d+)\))?")


class PromptError(ValueError):
  """An example that cannot be turned into a prompt (the pipeline drops and counts these)."""


class PromptTooLong(PromptError):
  """The encoded example is longer than the token budget."""

  def __init__(self, length: int, max_length: int, prompt_length: int, answer_length: int):
    self.length, self.max_length = length, max_length
    self.prompt_length, self.answer_length = prompt_length, answer_length
    super().__init__(f"prompt too long: {length} tokens ({prompt_length} prompt incl. image slots + "
                     f"{answer_length} answer) > max_length {max_length}")


class SegRoutingError(PromptError):
  """A ``[SEG]`` without a following ``(IMAGEk)`` tag, or with k out of range."""


def image_intro(num_images: int) -> str:
  """The first user turn's opening, e.g. ``The <image> (IMAGE1) provides an overview of the picture.\\n``."""
  if num_images < 1:
    raise ValueError(f"num_images must be >= 1, got {num_images}")
  tags = [f"{IMAGE_TOKEN} (IMAGE{k + 1})" for k in range(num_images)]
  if num_images == 1:
    return f"The {tags[0]} provides an overview of the picture.\n"
  listed = f"{tags[0]} and {tags[1]}" if num_images == 2 else ", ".join(tags[:-1]) + f", and {tags[-1]}"
  return f"The {listed} provide an overview of the pictures.\n"


def system_prompt(model_cfg) -> str:
  """The model config's ``prima.system_prompt``; the Vicuna v1 message for a config recorded before
  the field existed (the prompt such a run was trained with)."""
  return str(model_cfg.prima.get("system_prompt", SYSTEM))


def conversation(question: str, answer: str | None, num_images: int, system: str = SYSTEM
                 ) -> tuple[str, str]:
  """(prompt_text, answer_text) of a one-turn Vicuna v1 conversation; their concatenation is the text.

  ``prompt_text`` = system + ``" USER: "`` + intro + question + ``" ASSISTANT: "`` (an empty
  ``system``: from ``"USER: "`` on); ``answer_text`` = answer + ``"</s>"``. With ``answer=None``
  (generation), the prompt ends ``" ASSISTANT:"`` and the answer text is empty, as LLaVA's
  ``get_prompt`` writes an empty last message.
  """
  head = f"{system}{SEP}" if system else ""
  user = f"{head}{ROLES[0]}: {image_intro(num_images)}{question}{SEP}{ROLES[1]}:"
  if answer is None:
    return user, ""
  return user + " ", answer + SEP2


def seg_routing(answer: str, num_images: int) -> list[int]:
  """0-based image index of each ``[SEG]`` in ``answer``, from the ``(IMAGEk)`` tag following it.

  Raises:
    SegRoutingError naming the [SEG] (its ordinal and text offset) when the tag is missing or k is
    not in 1..num_images.
  """
  route = []
  for j, m in enumerate(_SEG_ROUTE.finditer(answer)):
    where = f"[SEG] {j} at character {m.start()} of the answer"
    context = answer[max(0, m.start() - 30):m.end() + 12]
    if m.group(2) is None:
      raise SegRoutingError(f"{where} is not followed by an (IMAGEk) tag: ...{context!r}...")
    k = int(m.group(2))
    if not 1 <= k <= num_images:
      raise SegRoutingError(f"{where} is routed to (IMAGE{k}) but the example has {num_images} images")
    route.append(k - 1)
  return route


def encode_prompt(llm_tok: Tokenizer, text: str, *, num_query_tokens: int, image_token_id: int) -> list[int]:
  """Token ids of prompt text (no BOS) with each ``<image>`` expanded to its image slots.

  Whitespace next to ``<image>`` is dropped, as next to any added token (tokenizer.py).
  """
  im_start, im_end = llm_tok.token_to_id("<im_start>"), llm_tok.token_to_id("<im_end>")
  block = [im_start] + [image_token_id] * num_query_tokens + [im_end]
  chunks = text.split(IMAGE_TOKEN)
  ids: list[int] = []
  for i, chunk in enumerate(chunks):
    if i > 0:
      ids += block
      chunk = chunk.lstrip()
    if i < len(chunks) - 1:
      chunk = chunk.rstrip()
    ids += llm_tok.encode(chunk) if chunk else []
  return ids


def encode_question(qformer_tok: Tokenizer, question: str, max_question_length: int) -> list[int]:
  """Q-Former text ids: ``[CLS] question [SEP]``, question tokens truncated from the left to fit
  ``max_question_length`` in all (LAVIS InstructBLIP: BertTokenizer(truncation_side="left"))."""
  if max_question_length < 3:
    raise ValueError(f"max_question_length must be >= 3, got {max_question_length}")
  ids = qformer_tok.encode(question)
  keep = max_question_length - 2
  ids = ids[len(ids) - keep:] if len(ids) > keep else ids
  return [qformer_tok.token_to_id("[CLS]")] + ids + [qformer_tok.token_to_id("[SEP]")]


def encode_example(llm_tok: Tokenizer, qformer_tok: Tokenizer, question: str, answer: str | None,
                   num_images: int, *, num_query_tokens: int, image_token_id: int, max_length: int,
                   max_question_length: int, system: str = SYSTEM) -> dict[str, np.ndarray]:
  """One example's text in the unbatched format of ``prima_jax.models.batch.collate``.

  Args:
    llm_tok, qformer_tok: from tokenizer.py (LLaMA + added tokens; BERT + [DEC]).
    question: the question (no image intro).
    answer: grounded answer, each mask as ``<p> phrase </p> [SEG] (IMAGEk)``; None for generation.
    num_images: images of the example (1..).
    num_query_tokens: image slots per ``<image>`` (cfg.qformer.num_query_tokens).
    image_token_id: id held by image slots (cfg.prima.image_token_id).
    max_length: token budget of ``input_ids`` (image slots included).
    max_question_length: Q-Former text budget (cfg.qformer.max_text_length).
    system: the system message (:func:`system_prompt` of the model config).

  Returns:
    int32 arrays: ``input_ids`` [l] (BOS + prompt + answer + EOS), ``labels`` [l] (answer + EOS,
    -100 elsewhere), ``seg_positions`` [m], ``seg_image_index`` [m] (0-based), ``qformer_input_ids`` [t].

  Raises:
    PromptTooLong when l > max_length (nothing is cut); SegRoutingError for a [SEG] without an
    ``(IMAGEk)`` tag or k out of range; PromptError for ``[SEG]`` / ``<image>`` in the question or
    ``<image>`` in the answer.
  """
  for field, text in (("question", question), ("answer", answer or "")):
    if IMAGE_TOKEN in text:
      raise PromptError(f"{field} contains {IMAGE_TOKEN!r}; image slots come from the intro only")
  if SEG_TOKEN in question:
    raise PromptError(f"question contains {SEG_TOKEN!r}; only the answer may hold [SEG] tokens")
  route = seg_routing(answer, num_images) if answer is not None else []
  prompt_text, answer_text = conversation(question, answer, num_images, system)
  prompt = [llm_tok.bos_id] + encode_prompt(llm_tok, prompt_text.rstrip(), num_query_tokens=num_query_tokens,
                                            image_token_id=image_token_id)
  if answer is None:
    reply = []
  else:
    assert answer_text.endswith(SEP2)
    reply = llm_tok.encode(answer_text[:-len(SEP2)].strip()) + [llm_tok.eos_id]
  length = len(prompt) + len(reply)
  if length > max_length:
    raise PromptTooLong(length, max_length, len(prompt), len(reply))
  input_ids = np.asarray(prompt + reply, np.int32)
  labels = np.full(length, IGNORE_LABEL, np.int32)
  labels[len(prompt):] = input_ids[len(prompt):]
  seg_id = llm_tok.token_to_id(SEG_TOKEN)
  seg_positions = np.flatnonzero(input_ids == seg_id).astype(np.int32)
  if len(seg_positions) != len(route) or (len(route) and seg_positions[0] < len(prompt)):
    raise PromptError(f"{len(seg_positions)} [SEG] ids in the tokens but {len(route)} [SEG] in the "
                      "answer (tokeniser does not split [SEG] out as one token?)")
  return dict(
      input_ids=input_ids,
      labels=labels,
      seg_positions=seg_positions,
      seg_image_index=np.asarray(route, np.int32),
      qformer_input_ids=np.asarray(encode_question(qformer_tok, question, max_question_length), np.int32),
  )
