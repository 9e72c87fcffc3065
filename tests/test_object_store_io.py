"""predict, evaluate and convert on an object store (the fake ``gs://`` of tests/object_store.py).

Every run here reads and writes ``gs://`` URLs; a stray ``os`` / ``open`` call on one would hit the
``gs:`` guard file in the working directory and fail. Results are compared with the same run on
local paths. Without the fake (no gcsfs installed), each CLI refuses a ``gs://`` path with one
``error:`` line naming the flag, exit status 2, and writes nothing.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from PIL import Image

from configs.demo import get_config
from prima_jax import cli, evaluate, predict
from prima_jax import workdir as workdir_lib
from prima_jax.convert import __main__ as convert
from prima_jax.convert import torch_io
from prima_jax.data import synthetic
from prima_jax.data.tokenizer import build_synthetic_tokenizers
from prima_jax.evaluation.rle import decode_rle
from prima_jax.training.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZES = [(48, 40), (30, 56)]
ANSWER = "<p> red circle </p> [SEG] (IMAGE2) <p> cube </p> [SEG] (IMAGE1)"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The tiny demo config (frozen parameters included), parameter values from another seed than the
  config's, a local workdir holding them, the prepared synthetic data and two local images."""
  root = tmp_path_factory.mktemp("object_store_io")
  config = get_config("test")
  config.train.trainable = ("seg_head/", "sam/mask_decoder/")  # the rest lives in WORKDIR/frozen
  workdir_lib.fit_vocab_sizes(config, build_synthetic_tokenizers(
      synthetic.vocabulary(), root / "tok", first_added_id=config.model.prima.first_added_id))
  rng = np.random.default_rng(7)  # not the config's seeded initialisation: a restore that fell back shows
  values = {}
  for name, var in torch_io.abstract_params(config.model).items():
    shape = var.get_value().shape
    noise = rng.normal(0, 0.05, shape).astype(np.float32)
    values[name] = 1 + noise if name.endswith("scale") else noise
  local = root / "work"
  torch_io.write_checkpoint(config, values, str(local), meta={"step": 0})
  data = root / "data"
  workdir_lib.prepare_synthetic(config, data)
  images = []
  for k, (h, w) in enumerate(IMAGE_SIZES):
    images.append(root / f"im{k}.png")
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])
  return dict(config=config, values=values, local=local, data=data, images=images, root=root)


def _gs_workdir(object_store, run, *parts):
  """The run's checkpoint written to ``gs://bucket/<parts>``; returns the URL."""
  url = object_store.url(*parts)
  torch_io.write_checkpoint(run["config"], run["values"], url, meta={"step": 0})
  return url


def _tree(directory) -> dict[str, bytes]:
  """{relative path: bytes} of every file under a local directory."""
  directory = str(directory)
  return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(directory) for f in files}


def _without(record: dict, *keys: str) -> dict:
  return {k: v for k, v in record.items() if k not in keys}


def test_predict_from_a_gs_checkpoint_and_image_to_gs(object_store, run, tmp_path):
  url = _gs_workdir(object_store, run, "runs", "predict")
  image_url = object_store.url("images", "im0.png")
  stored_image = object_store.local(image_url)
  stored_image.parent.mkdir(parents=True)
  stored_image.write_bytes(run["images"][0].read_bytes())
  out_url = object_store.url("runs", "predict", "pred")
  kw = dict(question="Which shapes are red?", max_new_tokens=32, answer_prefix=ANSWER)
  record = predict.run(checkpoint=url, image_paths=[image_url, str(run["images"][1])], out_dir=out_url, **kw)

  out = object_store.local(out_url)
  assert sorted(p.name for p in out.iterdir()) == sorted([
      predict.CONTACT_SHEET_FILE, predict.overlay_name(0), predict.overlay_name(1), predict.INDEX_FILE,
      predict.PREDICTION_FILE])
  saved = json.loads((out / "prediction.json").read_text())
  assert saved == json.loads(json.dumps(record))
  assert saved["checkpoint"] == url and saved["step"] == 0 and saved["images"][0] == image_url
  assert [s["image"] for s in saved["segs"][:2]] == [2, 1]
  for s in saved["segs"]:
    assert decode_rle(s["mask"]).shape == IMAGE_SIZES[s["image"] - 1]
  for k, (h, w) in enumerate(IMAGE_SIZES):
    scale = predict.overlay_scale(h, w)
    assert Image.open(out / predict.overlay_name(k)).size == (w * scale, h * scale)

  # The same prediction from the local workdir (written by the same code to a local path).
  local_out = tmp_path / "pred"
  local = predict.run(checkpoint=str(run["local"]), image_paths=[str(p) for p in run["images"]],
                      out_dir=str(local_out), **kw)
  assert _without(local, "checkpoint", "images", "seconds") == _without(record, "checkpoint", "images",
                                                                         "seconds")
  for k in range(len(IMAGE_SIZES)):
    assert (local_out / predict.overlay_name(k)).read_bytes() == (out / predict.overlay_name(k)).read_bytes()


@pytest.mark.parametrize("layout", ["prima", "hf"])
def test_convert_round_trip_through_gs_equals_the_local_one(object_store, run, layout, capsys):
  """to-torch gs:// workdir -> gs:// export (byte-equal to the local export), then from-torch of the
  gs:// export (and gs:// config record) -> gs:// workdir (values equal to the local import)."""
  url = _gs_workdir(object_store, run, "runs", "convert")
  export_url = object_store.url("exports", layout)
  args = ["--layout", layout, "--max_shard_size", "300KB", "--read_size", "200KB"]
  assert cli.call(convert, ["to-torch", "--checkpoint", url, "--out", export_url, *args]) == 0
  local_export = run["root"] / f"export_{layout}"
  if not local_export.exists():
    assert cli.call(convert, ["to-torch", "--checkpoint", str(run["local"]), "--out", str(local_export),
                              *args]) == 0
  exported = _tree(object_store.local(export_url))
  assert exported == _tree(local_export)
  assert sum(n.endswith(".safetensors") for n in exported) > 3  # several shards: the streaming writer ran
  assert sorted(os.listdir(object_store.local(object_store.url("exports")))) == [layout]  # no temp prefix

  imported_url = object_store.url("runs", f"imported_{layout}")
  source = ["--prima", export_url] if layout == "prima" else ["--hf", export_url]
  capsys.readouterr()
  assert cli.call(convert, ["from-torch", "--config", url + "/config.json", "--out", imported_url, *source,
                            "--strict", "--write_size", "200KB"]) == 0
  assert "freshly initialised (0): none" in capsys.readouterr().out
  local_imported = run["root"] / f"imported_{layout}"
  if not local_imported.exists():
    local_source = ["--prima", str(local_export)] if layout == "prima" else ["--hf", str(local_export)]
    assert cli.call(convert, ["from-torch", "--config", str(run["local"] / "config.json"), "--out",
                              str(local_imported), *local_source, "--strict", "--write_size", "200KB"]) == 0
  stored = object_store.local(imported_url)
  assert sorted(p.name for p in stored.iterdir()) == ["checkpoints", "config.json", "frozen"]
  got = torch_io.CheckpointParams(torch_io.find_step_dir(imported_url))
  want = torch_io.CheckpointParams(torch_io.find_step_dir(str(local_imported)))
  assert got.shapes == want.shapes and set(got.shapes) == set(run["values"])
  got, want = got.read(list(got.shapes)), want.read(list(want.shapes))
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
    np.testing.assert_array_equal(value, run["values"][name].astype(value.dtype), err_msg=name)
  # Training resumes from it: the checkpoint manager sees step 0 of the gs:// workdir.
  workdir = workdir_lib.Workdir(imported_url)
  assert workdir.checkpoint_steps() == [0] and workdir.frozen.exists()
  checkpointer = Checkpointer(workdir.checkpoints, keep=1, async_save=False)
  assert checkpointer.all_steps() == [0]
  checkpointer.close()


def test_evaluate_from_a_gs_checkpoint_to_gs_json(object_store, run):
  url = _gs_workdir(object_store, run, "runs", "evaluate")
  out_url = object_store.url("runs", "evaluate", "eval", "val.json")
  results = evaluate.run(checkpoint=url, data_dir=str(run["data"]), split="val", limit=2, out=out_url,
                         batch_size=2, max_new_tokens=8, devices=jax.devices()[:1], verbose=False)
  saved = json.loads(object_store.local(out_url).read_text())
  assert json.dumps(saved, sort_keys=True) == json.dumps(json.loads(json.dumps(results)), sort_keys=True)
  assert saved["checkpoint"] == url and saved["step"] == 0 and saved["split"] == "val"
  assert saved["examples"] + len(saved["skipped"]) == 2 and "overall" in saved["metrics"]


# --- without an object-store client --------------------------------------------------------------

NO_CLIENT = "gs:// needs gcsfs and google-cloud-storage, which are not installed (pip install gcsfs"


def _cases(image: str, local: str) -> dict[str, tuple[str, list[str]]]:
  """case -> (the flag the error must name, argv after ``python -m``), for a local image and workdir."""
  config = f"--config={ROOT}/configs/demo.py:test"
  gs = "gs://bucket/run"
  return {
      "predict --checkpoint": ("--checkpoint", ["prima_jax.predict", f"--checkpoint={gs}", f"--image={image}",
                                                "--question=q?", "--out=pred"]),
      "predict --out": ("--out", ["prima_jax.predict", config, f"--image={image}", "--question=q?",
                                  f"--out={gs}/pred"]),
      "predict --image": ("--image", ["prima_jax.predict", config, f"--image={gs}/a.png", "--question=q?",
                                      "--out=pred"]),
      "evaluate --checkpoint": ("--checkpoint", ["prima_jax.evaluate", f"--checkpoint={gs}", "--out=e.json"]),
      "evaluate --out": ("--out", ["prima_jax.evaluate", config, f"--out={gs}/eval.json"]),
      "to-torch --checkpoint": ("--checkpoint", ["prima_jax.convert", "to-torch", "--checkpoint", gs,
                                                 "--out", "export"]),
      "to-torch --out": ("--out", ["prima_jax.convert", "to-torch", "--checkpoint", local, "--out",
                                   f"{gs}/export"]),
      "from-torch --out": ("--out", ["prima_jax.convert", "from-torch", "--config", f"{local}/config.json",
                                     "--out", gs, "--prima", "export"]),
      "from-torch --prima": ("--prima", ["prima_jax.convert", "from-torch", "--config",
                                         f"{local}/config.json", "--out", "imported", "--prima",
                                         f"{gs}/model.safetensors"]),
  }


@pytest.fixture(scope="module")
def no_client_runs(run, tmp_path_factory):
  """Every case's process (started together: they spend their time importing), each in its own empty
  working directory -> (flag, returncode, stderr, what the working directory holds afterwards)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  started = {}
  for name, (flag, argv) in _cases(str(run["images"][0]), str(run["local"])).items():
    cwd = tmp_path_factory.mktemp("cwd")
    proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started[name] = (flag, cwd, proc)
  results = {}
  for name, (flag, cwd, proc) in started.items():
    _, err = proc.communicate(timeout=300)
    results[name] = (flag, proc.returncode, err, sorted(os.listdir(cwd)))
  return results


@pytest.mark.parametrize("case", list(_cases("IMAGE", "WORKDIR")))
def test_gs_path_without_a_client_is_one_error_line(no_client_runs, case):
  flag, returncode, stderr, left = no_client_runs[case]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert returncode == 2 and len(lines) == 1, stderr[-3000:]
  assert lines[0].startswith(f"error: {flag}=gs://bucket/") and NO_CLIENT in lines[0], lines[0]
  assert lines[0].endswith("nothing was written"), lines[0]
  assert left == [], left  # no local ./gs:/... directory, no output


def test_the_guard_catches_os_calls_on_urls(object_store):
  """The fake store is a real check: a plain os call on a gs:// URL fails instead of writing locally."""
  with pytest.raises(OSError):
    os.makedirs("gs://bucket/run/x", exist_ok=True)
  assert epath.Path(object_store.url("run", "x")).exists() is False
