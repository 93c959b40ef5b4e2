"""Stage 3: as stage 2 plus the zero-initialised masked-latent conv and per-example masks (rgb2j, j2rgb,
box, none). Set ``init_from`` to the stage-2 export (or the released rgbd_finetune_sd21b)."""

from jointnet_jax.training.config import base_config, tiny


def get_config(arg: str = ""):
    c = base_config()
    c.stage = 3
    c.lr = 1e-5
    c.text_drop = 0.5
    return tiny(c) if arg == "tiny" else c
