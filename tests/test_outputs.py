"""No silent overwrites and no stale files: predict --out DIR and evaluate --out FILE; bad inputs at
these entry points are one error line naming the file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_images import png_header_only

from prima_jax import evaluate, paths, predict
from prima_jax.inference.grounding import Prediction, SegPrediction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prediction(sizes, rng) -> Prediction:
  segs = [SegPrediction(f"thing_{k}", k, rng.random(hw) > 0.5, 0.5, k) for k, hw in enumerate(sizes)]
  return Prediction("answer", segs, [], [], True, len(sizes), list(sizes))


def write(out, sizes, seed):
  rng = np.random.default_rng(seed)
  images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in sizes]
  return predict.write_outputs(out, prediction(sizes, rng), images, [f"im{k}.png" for k in range(len(sizes))],
                               "q?", {})


def test_a_previous_prediction_is_refused_unless_overwrite(tmp_path):
  out = tmp_path / "pred"
  predict.check_out(out, overwrite=False)  # absent: fine
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  predict.check_out(out, overwrite=False)  # other files only: fine
  write(out, [(8, 8)], 0)
  with pytest.raises(FileExistsError, match=r"holds a previous prediction \(contact_sheet.png, "
                                            r"image1_overlay.png, index.html, prediction.json\); "
                                            r"pass --overwrite"):
    predict.check_out(out, overwrite=False)
  predict.check_out(out, overwrite=True)
  with pytest.raises(paths.PathError, match="is a file, not a directory"):
    predict.check_out(out / "notes.txt", overwrite=True)


def test_a_smaller_result_leaves_no_stale_file_beside_it(tmp_path):
  out = tmp_path / "pred"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  (out / "image10_overlay.png.bak").write_text("not ours")
  write(out, [(8, 8), (9, 7), (6, 6), (5, 5), (8, 9)], 0)
  assert len(list(out.glob("image*_overlay.png"))) == 5
  record = write(out, [(10, 12), (7, 9)], 1)
  assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "image10_overlay.png.bak",
                                                   "image1_overlay.png", "image2_overlay.png", "index.html",
                                                   "notes.txt", "prediction.json"]
  assert json.loads((out / "prediction.json").read_text()) == json.loads(json.dumps(record))
  scale = predict.overlay_scale(10, 12)
  assert Image.open(out / "image1_overlay.png").size == (12 * scale, 10 * scale)  # the new one
  assert not list(out.glob(".*tmp*"))


def test_evaluate_refuses_an_existing_out_before_building_the_model(tmp_path):
  out = tmp_path / "results.json"
  out.write_text("{}")
  with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
    evaluate.run(config=None, out=str(out))
  with pytest.raises(paths.PathError, match="is a directory"):
    evaluate.run(config=None, out=str(tmp_path))
  assert out.read_text() == "{}"


def cli(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  return proc.returncode, errors


def test_cli_bad_outputs_and_images_are_one_error_line(tmp_path):
  previous = tmp_path / "pred"
  write(previous, [(8, 8)], 0)
  before = {p.name: p.read_bytes() for p in previous.iterdir()}
  image = tmp_path / "im.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  common = ["--config=configs/demo.py:test", "--question=What?"]
  assert cli("prima_jax.predict", *common, f"--image={image}", f"--out={previous}") == (2, [
      f"error: --out={previous} holds a previous prediction (contact_sheet.png, image1_overlay.png, "
      "index.html, prediction.json); pass --overwrite to replace it"])
  assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
  huge = tmp_path / "huge.png"
  huge.write_bytes(png_header_only(10000, 9000))
  assert cli("prima_jax.predict", *common, f"--image={huge}", f"--out={tmp_path / 'new'}") == (2, [
      f"error: cannot read image {huge}: 10000x9000 = 90000000 pixels, over the limit of 67108864 "
      "(prima_jax.data.images.MAX_IMAGE_PIXELS)"])
  assert not (tmp_path / "new").exists()
  results = tmp_path / "results.json"
  results.write_text("{}")
  assert cli("prima_jax.evaluate", "--config=configs/demo.py:test", f"--out={results}") == (2, [
      f"error: --out={results} exists; pass --overwrite to replace it"])
  assert results.read_text() == "{}"
