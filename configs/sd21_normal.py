"""Stage 1 for surface normals (Omnidata labels in the records' ``normal`` field)."""

from jointnet_jax.training.config import base_config, tiny


def get_config(arg: str = ""):
    c = base_config()
    c.stage = 1
    c.modality = "normal"
    return tiny(c) if arg == "tiny" else c
