"""The training tests' runs (test_train.py, test_train_resume.py): the demo's test config on a (data 4,
fsdp 1, tensor 2) mesh of the 8 fake CPU devices, and exact comparisons of parameter trees."""

import importlib.util
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def demo_test_config(data_dir, **train):
  c = load_config("demo", "test")
  c.data.data_dir = data_dir
  c.mesh.update(data=4, fsdp=1, tensor=2)
  c.logging.console = False
  # The image pretraining has its own tests (test_image_pretraining.py); here runs on different process
  # counts and meshes are compared to 1e-6, which its Adam-amplified rounding noise would blur.
  c.train.image_pretraining.steps = 0
  c.train.update(**train)
  return c


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
