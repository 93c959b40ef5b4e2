"""Stage 2: everything trains at lr 1e-5 with 50% text drop, starting from a stage-1 export."""

from jointnet_jax.training.config import base_config, tiny


def get_config(arg: str = ""):
    c = base_config()
    c.stage = 2
    c.lr = 1e-5
    c.text_drop = 0.5
    return tiny(c) if arg == "tiny" else c
