"""The demo's configuration: the Trainer config shared by its phases plus ``demo.*`` (steps, learning rates,
evaluation). Pixel space on the synthetic world, sized for about 15 minutes on a 2-core CPU.

In the package (not only in ``configs/demo.py``, which wraps it) so the installed package and the notebooks
can build it.
"""

import ml_collections

from jointnet_jax.training.config import base_config


def default_config(arg: str = ""):
    """``""``: the full demo (~15 min on a 2-core CPU); ``"tiny"``: a smoke-sized run (tests, notebook)."""
    c = base_config()
    c.base = "tiny"  # a random-weight base folder: pixel UNet (below), tiny frozen random CLIP text encoder
    c.tiny_unet = "pixel"
    c.vae = "none"  # pixel space: RGB 3 channels, depth 1
    c.batch_size = 16
    c.compute_dtype = "fp32"
    c.remat = False
    c.mesh.min_fsdp_size = 2**20
    c.data.resolution = 32
    c.data.synthetic_size = 48
    c.data.synthetic_num = 4000
    c.data.synthetic_eval_num = 64
    c.data.worker_count = 0
    c.eval_every = 40
    c.checkpoint_every = 10**9  # one checkpoint at the end of each run
    c.async_checkpoints = False
    c.log_every = 20
    c.sample_every = 0
    c.demo = ml_collections.ConfigDict(
        {
            "base_steps": 450,  # stage 0, from scratch
            "base_lr": 1e-3,
            "joint_steps": 200,  # stage 1 and Direct Extend each
            "joint_lr": 3e-4,
            "warmup_steps": 20,
            "num_scenes": 32,  # held-out scenes for image->depth
            "probe_scenes": 8,  # the first held-out captions: the same-seed probe and the report's grids
            "probe_every": 100,  # stage-1 steps between same-seed probes (and one at step 0 and at the end)
            "sample_steps": 25,
            # image -> depth samples per scene, merged as for photos (Pipeline.depth(ensemble=K)); K chosen on
            # the validation scenes after the held-out ones (benchmarks/ensemble.py, RESULTS.md)
            "ensemble": 4,
            "cfg": 3.0,
            "seed": 0,
        }
    )
    if arg == "tiny":
        c.tiny_unet = "2level"  # compiles fastest
        c.data.synthetic_num = 64
        c.data.synthetic_eval_num = 8
        c.batch_size = 8
        c.eval_every = 3  # not a divisor of the steps: the final evaluation must still happen
        c.demo.update(base_steps=4, joint_steps=4, num_scenes=2, sample_steps=2, warmup_steps=1)
        c.demo.update(probe_scenes=2, probe_every=2, ensemble=2)
    elif arg:
        raise ValueError(f"unknown demo config argument {arg!r}; use '' or 'tiny'")
    return c
