"""PRIMA on M⁴Seg: the full-size model (SPEC §1).

``--config=configs/m4seg.py`` gives the published sizes; ``--config=configs/m4seg.py:tiny`` the
same schema at test size. Fields are overridable from flags (``--config.model.lora.rank=16``).
"""

import ml_collections

from prima_jax.models.configs import full_config, tiny_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "full", "tiny"):
    raise ValueError(f"configs/m4seg.py: unknown variant {arg!r}; use 'full' or 'tiny'")
  config = ml_collections.ConfigDict()
  config.model = tiny_config() if arg == "tiny" else full_config()
  return config
