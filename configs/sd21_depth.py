"""Stage 1 (paper §3.4): RGB branch frozen, dense branch + all exchange layers trained, lr 1e-4.

python -m jointnet_jax.train --config configs/sd21_depth.py --workdir DIR --config.base=/path/to/sd21-base
python -m jointnet_jax.train --config configs/sd21_depth.py:tiny --workdir DIR      # CPU-sized
"""

from jointnet_jax.training.config import base_config, tiny


def get_config(arg: str = ""):
    c = base_config()
    c.stage = 1
    return tiny(c) if arg == "tiny" else c
