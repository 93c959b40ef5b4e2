"""Defaults shared by every training config (paper §3.4 values where it gives them); the files in configs/
build on them. Part of the package so that installed code (the demo) can build configs too."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = ""  # SD2.1-base diffusers folder or Hub id (vae/ text_encoder/ tokenizer/ scheduler/ unet/), or "tiny"
    c.tiny_unet = "4level"  # with base "tiny": "4level" (SD2.1's block layout), "2level" (compiles faster), "pixel"
    c.init_from = ""  # optional official-layout JointNet to start from (a release or a previous export)
    c.stage = 1  # 0: the base text-to-image UNet alone (the CPU demo's stand-in for SD2.1); 1-3: paper §3.4
    c.model = "jointnet"  # or "direct_extend": the paper's baseline (one UNet widened to RGB + dense)
    c.vae = ""  # "": the base's vae/ (latent diffusion); "none": pixel space (RGB 3 channels, depth 1)
    c.modality = "depth"
    c.seed = 0
    c.batch_size = 256  # global: 4 per GPU x 64 GPUs in the paper
    c.total_steps = 10_000
    c.lr = 1e-4
    c.warmup_steps = 1000
    c.text_drop = 0.15
    c.noise_offset = 0.05
    c.grad_clip = 1.0
    c.grad_accum = 1
    c.weight_decay = 1e-2
    c.adam_b1, c.adam_b2, c.adam_eps = 0.9, 0.999, 1e-8
    c.compute_dtype = "bf16"
    c.remat = True
    # Parameters with fewer elements than min_fsdp_size stay replicated (sharding them costs more than it saves).
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "min_fsdp_size": 2**14})
    c.data = ml_collections.ConfigDict(
        {
            "paths": "",  # record shards (files, folders or globs); empty: the embedded synthetic world
            # True: paths (and eval_paths) name latent caches of jointnet-cache-latents, not labelled records;
            # the step then runs no VAE and no text encoder (crop fixed by the cache; flip needs its --flip)
            "latents": False,
            "resolution": 512,
            "seed": 0,
            "crop_scale": (0.6, 1.0),
            "flip": True,
            "worker_count": 8,
            "synthetic_num": 0,
            "synthetic_size": 64,
            "synthetic_shards": 1,
            "eval_paths": "",  # held-out record shards; empty: synthetic scenes after the training ones
            "synthetic_eval_num": 64,
        }
    )
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.log_every = 50
    c.eval_every = 0  # steps between held-out evaluations (0: none); fixed noise and timesteps from eval_seed
    c.eval_seed = 0
    c.sample_every = 1000
    c.sample_steps = 50
    c.sample_prompts = ("A living room with a picture of mountain on the wall", "A beach with palm trees")
    c.export = True
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """CPU-sized variant: tiny random SD-shaped base, the synthetic world, a few steps."""
    c.base = "tiny"
    c.batch_size = 8
    c.total_steps = 20
    c.warmup_steps = 5
    c.compute_dtype = "fp32"
    c.remat = False
    c.mesh.min_fsdp_size = 256
    c.data.resolution = 32
    c.data.worker_count = 0
    c.data.synthetic_num = 64
    c.data.synthetic_size = 48
    c.checkpoint_every = 10
    c.async_checkpoints = False
    c.log_every = 5
    c.sample_every = 0
    c.sample_steps = 4
    c.sample_prompts = ("a red sphere", "a blue box")
    return c
