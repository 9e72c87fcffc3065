"""Can the image side see what the synthetic benchmark asks about? Trains it alone, in about a minute.

  python -m prima_jax.tools.vision_probe --config=configs/demo.py --data_dir=W/data/source

The image side of ``--config``'s model (from its initialisation), its Q-Former reading each record's
question as in training (``--noquestions``: an empty text), with a linear read-out, is trained on what
each image shows: colours, classes, (colour, class) pairs, counts of a class, which half an object is
in (``prima_jax.training.image_pretraining``, the stage ``train.image_pretraining`` runs before a
demo's first step); the val split is scored against the majority baseline at ``--evals`` evenly spaced
steps. A setting under which it cannot tell the classes apart is one under which the LLM cannot name
them (docs/demo.md). ``--through=eva_features`` reads EVA's features instead, averaged over patches
(no SQuARE / Q-Former). ``--json``: one JSON object on stdout at the end instead of the report lines.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from collections.abc import Sequence

from absl import flags
from etils import epath
from ml_collections import config_flags

from prima_jax import cli
from prima_jax import workdir as workdir_lib
from prima_jax.data.prompt import encode_question
from prima_jax.training import image_pretraining


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``fv`` (see ``prima_jax.cli.call``)."""
  config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]); its `model` is probed.",
                                  lock_config=False, flag_values=fv)
  flags.DEFINE_string("data_dir", None, "Synthetic benchmark directory (python -m prima_jax.data.synthetic "
                      "--out DIR; a demo run's WORKDIR/data/source).", flag_values=fv)
  flags.DEFINE_integer("steps", 600, "Training steps.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 32, "Records (of 2-5 images) per step.", flag_values=fv)
  flags.DEFINE_float("learning_rate", 2e-3, "Adam's learning rate.", flag_values=fv)
  flags.DEFINE_enum("through", image_pretraining.THROUGH[0], list(image_pretraining.THROUGH),
                    "Read out the image tokens (after the projection) or EVA's features.", flag_values=fv)
  flags.DEFINE_integer("evals", 3, "Evaluations on the val split, evenly spaced.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Initialisation and batch-order seed.", flag_values=fv)
  flags.DEFINE_bool("questions", True, "The Q-Former reads each record's question (through the synthetic "
                    "tokenizers next to --data_dir, a demo run's WORKDIR/data/tokenizers, else built for the "
                    "benchmark's vocabulary, as a run builds them); --noquestions: an empty text.",
                    flag_values=fv)
  flags.DEFINE_bool("eval_questions", None, "Whether the val scores read the questions (default: as "
                    "--questions): --noquestions --eval_questions shows what a question does to image tokens "
                    "trained without one.", flag_values=fv)
  flags.DEFINE_bool("json", False, "Print one JSON object at the end instead of the report lines.",
                    flag_values=fv)
  flags.mark_flags_as_required(["config", "data_dir"], flag_values=fv)


def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int | None:
  """The probe on parsed flags ``fv``."""
  if cli.unexpected_arguments(argv):
    return 2
  for name in ("steps", "batch_size", "evals"):
    if fv[name].value < 1:
      print(f"error: --{name} must be >= 1, got {fv[name].value}", file=sys.stderr)
      return 2
  config, data_dir = fv.config, epath.Path(fv.data_dir)
  with tempfile.TemporaryDirectory() as scratch:
    # The run's vocabulary sizes with or without questions: the two initialise the same model.
    tokenizers = workdir_lib.load_tokenizers(config, data_dir.parent, fallback_dir=scratch)
    workdir_lib.fit_vocab_sizes(config, tokenizers)
    eval_questions = fv.questions if fv.eval_questions is None else fv.eval_questions
    encode = functools.partial(encode_question, tokenizers[1],
                               max_question_length=int(config.data.max_question_length))
    try:
      result, _ = image_pretraining.run_probe(
          config.model, data_dir, steps=fv.steps, batch_size=fv.batch_size,
          learning_rate=fv.learning_rate, through=fv.through, evals=fv.evals, seed=fv.seed,
          encode_question=encode, train_questions=fv.questions, eval_questions=eval_questions,
          report=(lambda line: None) if fv.json else print)
    except image_pretraining.ProbeDataError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  if fv.json:
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)
