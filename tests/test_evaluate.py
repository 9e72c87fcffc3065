"""The evaluate entry point on a tiny random-weight model and a few synthetic examples."""

import json
import math

import jax
import numpy as np
import pytest

from configs.demo import get_config
from prima_jax import evaluate
from prima_jax import workdir as workdir_lib
from prima_jax.data.m4seg import decode_example
from prima_jax.evaluation.text_similarity import make_similarity
from prima_jax.inference.engine import Predictor
from prima_jax.inference.loading import load, open_run

N = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  config = get_config("test")
  directory = str(tmp_path_factory.mktemp("eval_data"))
  workdir_lib.prepare_synthetic(config, directory)
  return directory


def _same(a, b):
  assert a.keys() == b.keys()
  for cat in a:
    for k, v in a[cat].items():
      assert (math.isnan(v) and math.isnan(b[cat][k])) or v == b[cat][k], (cat, k, v, b[cat][k])


def test_evaluate_runs_and_reports_overall_and_categories(data_dir, tmp_path):
  out = tmp_path / "results.json"
  results = evaluate.run(config=get_config("test"), data_dir=data_dir, split="val", limit=N, out=str(out),
                         batch_size=2, max_new_tokens=8, devices=jax.devices()[:1], verbose=True)
  assert out.exists()
  metrics = results["metrics"]
  assert "overall" in metrics and len(metrics) >= 2
  assert results["examples"] + len(results["skipped"]) == N
  assert metrics["overall"]["examples"] == results["examples"]
  categories = {c: m for c, m in metrics.items() if c not in ("overall", "multi-image")}
  assert sum(m["examples"] for m in categories.values()) == results["examples"]
  assert results["examples_per_s"] > 0
  # Each scored example's texts, by id, with the reference as the dataset holds it.
  answers = results["answers"]
  assert [a["example_id"] for a in answers] == sorted(a["example_id"] for a in answers)
  assert len(answers) == results["examples"]
  src = workdir_lib.open_split(data_dir, "val")
  by_id = {ex.example_id: ex for ex in (decode_example(src[i]) for i in range(N))}
  for a in answers:
    assert a["reference"] == by_id[a["example_id"]].answer
    assert a["question"] == by_id[a["example_id"]].question
    assert isinstance(a["answer"], str)
  assert json.loads(out.read_text())["answers"] == answers


def test_metrics_do_not_depend_on_devices_or_hosts(data_dir):
  """Teacher-forced (so there are masks to score): 1 device vs 8 devices vs 2 simulated hosts."""
  config = get_config("test")
  loaded = load(open_run(config), data_dir=data_dir)
  source = workdir_lib.open_split(data_dir, "val")
  sim = make_similarity("default")
  from prima_jax.sharding import make_mesh

  predictors = {}

  def records(devices, shard_index, shard_count, batch):
    if len(devices) not in predictors:  # one compiled predictor per mesh, reused across shards
      mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
      predictors[len(devices)] = Predictor(
          loaded.model, loaded.tokenizers, max_new_tokens=160, batch_size=batch, mesh=mesh,
          max_question_length=config.data.max_question_length)
    predictor = predictors[len(devices)]
    return evaluate.evaluate_split(predictor, source, evaluate.local_indices(N, shard_index, shard_count),
                                   similarity=sim, teacher_forced=True)[0]

  one = evaluate.summarize(records(jax.devices()[:1], 0, 1, 8))
  eight = evaluate.summarize(records(jax.devices()[:8], 0, 1, 8))
  hosts = evaluate.summarize(records(jax.devices()[:1], 0, 2, 8) + records(jax.devices()[:1], 1, 2, 8))
  assert one["metrics"]["overall"]["pred masks"] > 0
  assert one["metrics"]["overall"]["pred masks"] == one["metrics"]["overall"]["ref masks"]
  _same(one["metrics"], eight["metrics"])
  _same(one["metrics"], hosts["metrics"])
  assert one["examples"] == eight["examples"] == hosts["examples"] == N - len(one["skipped"])


def test_local_indices_pad_shards_to_equal_length():
  shards = [evaluate.local_indices(7, i, 3) for i in range(3)]
  assert [len(s) for s in shards] == [3, 3, 3]
  assert sorted(i for s in shards for i in s if i is not None) == list(range(7))
  assert np.sum([i is None for s in shards for i in s]) == 2
