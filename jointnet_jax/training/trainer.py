"""The training loop: model setup per stage, the sharded train step, checkpoints, logging and export.

One ``Trainer`` per process. The train step is a pure function of (train state, frozen parameters, VAE and
text-encoder states, batch), compiled once with ``jax.jit`` over explicit FSDP shardings and a donated
train state (the modern form of pjit). Randomness comes from ``fold_in(seed, step)``, so a resumed run
reproduces the losses of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from jointnet_jax import sharding as sh
from jointnet_jax.data import records, synthetic
from jointnet_jax.data.input_pipeline import InputPipeline, PipelineConfig, make_global_batch
from jointnet_jax.diffusion.schedule import load_schedule
from jointnet_jax.models.clip_text import load_text_encoder, load_tokenizer
from jointnet_jax.models.jointnet import JointNet
from jointnet_jax.models.vae import load_vae
from jointnet_jax.pretrained import load_jointnet, load_unet
from jointnet_jax.tiny_base import UNET_2LEVEL, ensure_tiny_base
from jointnet_jax.training import checkpoints
from jointnet_jax.training.metrics import Writer, compiled_flops, device_peak_flops
from jointnet_jax.training.objective import LossSettings, joint_loss
from jointnet_jax.training.optimizer import make_optimizer
from jointnet_jax.training.partition import split_trainable

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
TINY_UNETS = {"4level": None, "2level": UNET_2LEVEL}


@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: object


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state"], meta_fields=[])


def resolve_base(base: str, workdir: Path, tiny_unet: dict | None = None) -> Path:
    """``"tiny"`` means a tiny random SD-shaped base written once into the workdir (CPU configs);
    ``tiny_unet`` overrides its UNet config."""
    if base == "tiny":
        path = workdir / "tiny_base"
        if jax.process_index() == 0:
            ensure_tiny_base(path, unet=tiny_unet)
        multihost_utils.sync_global_devices("tiny_base")
        return path
    path = Path(base)
    if not path.is_dir():
        raise FileNotFoundError(f"base model folder {path} does not exist (config.base)")
    return path


def build_jointnet(config, base: Path, dtype) -> JointNet:
    """``init_from`` (an official-layout JointNet), else both branches copied from the base UNet; stage 3
    adds the zero-initialised masked-latent conv if the starting model lacks it."""
    if config.init_from:
        jn = load_jointnet(config.init_from, dtype=dtype)
    else:
        jn = JointNet.from_unet(load_unet(base / "unet", dtype=dtype))
    if config.stage == 3 and not jn.masked_input:
        jn.add_masked_latent_conv()
    if config.remat:
        jn.set_remat(True)
    return jn


def training_data(config, workdir: Path) -> str:
    """``data.paths``, or the embedded synthetic world rendered once into ``workdir/data``."""
    if config.data.paths:
        return config.data.paths
    out = workdir / "data"
    if jax.process_index() == 0 and not (out.is_dir() and records.list_shards(out, "synthetic")):
        examples = (
            synthetic.make_example(i, config.data.synthetic_size, seed=config.data.seed)
            for i in range(config.data.synthetic_num)
        )
        records.write_shards(examples, out, "synthetic", num_shards=config.data.synthetic_shards)
    multihost_utils.sync_global_devices("synthetic_data")
    return str(out)


class Trainer:
    def __init__(self, config, workdir):
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = sh.make_mesh(config.mesh.data, config.mesh.fsdp)
        n_proc = jax.process_count()
        if config.batch_size % jax.device_count():
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {jax.device_count()} devices")
        dtype = DTYPES[config.compute_dtype]
        self.base = resolve_base(config.base, self.workdir, TINY_UNETS[config.get("tiny_unet", "4level")])
        self.schedule = load_schedule(self.base / "scheduler")
        jn = build_jointnet(config, self.base, dtype)
        self.graphdef, trainable, frozen = split_trainable(jn, config.stage)
        self.vae_def, vae_state = nnx.split(load_vae(self.base / "vae", dtype=dtype))
        self.text_def, text_state = nnx.split(load_text_encoder(self.base / "text_encoder", dtype=dtype))
        self.tokenizer = load_tokenizer(self.base / "tokenizer")
        self.tx, self.lr_schedule = make_optimizer(config)
        self.loss_settings = LossSettings(config.modality, config.text_drop, config.noise_offset, config.stage)

        self.shardings = lambda tree: sh.tree_shardings(tree, self.mesh, config.mesh.min_fsdp_size)  # noqa: E731
        place = lambda tree: jax.device_put(tree, self.shardings(tree))  # noqa: E731
        self.frozen, self.vae_state, self.text_state = place(frozen), place(vae_state), place(text_state)
        trainable = place(trainable)
        opt_shardings = self.shardings(jax.eval_shape(self.tx.init, trainable))
        opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(trainable)
        self.state = TrainState(jax.device_put(jnp.int32(0), sh.replicated(self.mesh)), trainable, opt_state)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        ids = self.tokenizer(
            [""], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="np"
        ).input_ids
        text_encoder = nnx.merge(self.text_def, self.text_state)
        self.uncond = jax.device_put(text_encoder(jnp.asarray(ids, jnp.int32)), sh.replicated(self.mesh))

        self.data_config = PipelineConfig(
            paths=training_data(config, self.workdir),
            resolution=config.data.resolution,
            batch_size=config.batch_size // n_proc,
            seed=config.data.seed,
            modality=config.modality,
            tokenizer=self.tokenizer,
            worker_count=config.data.worker_count,
            crop_scale=tuple(config.data.crop_scale),
            flip=config.data.flip,
        )
        self.data = InputPipeline(self.data_config)
        self.manager = checkpoints.make_manager(
            self.workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints
        )
        latest = self.manager.latest_step()
        if latest is not None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
            self.state = checkpoints.restore(self.manager, latest, abstract, self.data)
            logging.info("resumed from step %d", latest)
        self._step_fn = self._compile_step()
        self._compiled, self.flops = None, None
        self._stop_requested = False

    # -----------------------------------------------------------------------------------------------

    def model(self) -> JointNet:
        """The current JointNet (trainable and frozen parameters merged)."""
        return nnx.merge(self.graphdef, self.state.params, self.frozen)

    def _compile_step(self):
        graphdef, vae_def, text_def, tx = self.graphdef, self.vae_def, self.text_def, self.tx
        schedule, settings, lr_schedule, seed = self.schedule, self.loss_settings, self.lr_schedule, self.config.seed

        def train_step(state: TrainState, frozen, vae_state, text_state, uncond, batch):
            key = jax.random.fold_in(jax.random.key(seed), state.step)
            vae, text_encoder = nnx.merge(vae_def, vae_state), nnx.merge(text_def, text_state)

            def loss_of(params):  # differentiates the trainable partition only
                return joint_loss(
                    nnx.merge(graphdef, params, frozen), vae, text_encoder, schedule, uncond, batch, key, settings
                )

            (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state.params, updates)
            metrics.update(loss=loss, grad_norm=_global_norm(grads), lr=lr_schedule(state.step))
            return TrainState(state.step + 1, params, opt_state), metrics

        repl = sh.replicated(self.mesh)
        shard = self.shardings
        return jax.jit(
            train_step,
            in_shardings=(
                self.state_shardings,
                shard(self.frozen),
                shard(self.vae_state),
                shard(self.text_state),
                repl,
                sh.batch_sharding(self.mesh),
            ),
            out_shardings=(self.state_shardings, repl),
            donate_argnums=(0,),
        )

    def _global_batch(self, host_batch):
        return make_global_batch(host_batch, sh.batch_sharding(self.mesh))

    def compiled_step(self, batch):
        """The train step compiled for this batch's shapes (once), and its FLOPs from XLA's cost analysis."""
        if self._compiled is None:
            args = (self.state, self.frozen, self.vae_state, self.text_state, self.uncond, batch)
            self._compiled = self._step_fn.lower(*args).compile()
            self.flops = compiled_flops(self._compiled)
        return self._compiled

    # -----------------------------------------------------------------------------------------------

    def train(self, num_steps: int | None = None) -> list[dict]:
        """Train to ``config.total_steps`` (or ``num_steps`` more); returns the per-step metrics."""
        c = self.config
        start = int(self.state.step)
        end = c.total_steps if num_steps is None else min(c.total_steps, start + num_steps)
        writer = Writer(self.workdir / "tensorboard")
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        peak, history = device_peak_flops(), []
        from tqdm.auto import tqdm

        bar = tqdm(total=end, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
        try:
            for step in range(start, end):
                t0 = time.perf_counter()
                batch = self._global_batch(next(self.data))
                step_fn = self.compiled_step(batch)
                self.state, metrics = step_fn(
                    self.state, self.frozen, self.vae_state, self.text_state, self.uncond, batch
                )
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not np.isfinite(metrics["loss"]):
                    self.manager.wait_until_finished()
                    good = self.manager.latest_step()
                    raise FloatingPointError(
                        f"loss became {metrics['loss']} at step {step + 1}; stopping. The last good checkpoint is "
                        f"step {good} in {self.workdir / 'checkpoints'} (lower lr or check the data)."
                    )
                dt = time.perf_counter() - t0
                metrics.update(step=step + 1, step_time=dt, examples_per_s=c.batch_size / dt)
                if peak and self.flops:  # cost analysis counts one device's program
                    metrics["mfu"] = self.flops / dt / peak
                history.append(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if (step + 1) % c.log_every == 0:
                    writer.scalars(step + 1, {k: v for k, v in metrics.items() if k != "step"})
                if c.sample_every and (step + 1) % c.sample_every == 0:
                    self.write_samples(step + 1, writer)
                if (step + 1) % c.checkpoint_every == 0 or step + 1 == end or self._stop_requested:
                    checkpoints.save(self.manager, step + 1, self.state, self.data, c.to_dict())
                if self._stop_requested:
                    logging.warning("SIGTERM: saved a checkpoint at step %d, exiting", step + 1)
                    break
        finally:
            bar.close()
            self.manager.wait_until_finished()
            writer.close()
            signal.signal(signal.SIGTERM, previous)
        if int(self.state.step) >= c.total_steps and c.export:
            self.export()
        return history

    def _request_stop(self, signum, frame):
        self._stop_requested = True

    def write_samples(self, step: int, writer: Writer):
        """Fixed-prompt, fixed-seed joint samples as one grid image (RGB | depth per prompt)."""
        from jointnet_jax.io_utils import write_png_rgb
        from jointnet_jax.pipelines import Pipeline

        c = self.config
        pipe = Pipeline(
            self.model(),
            nnx.merge(self.vae_def, self.vae_state),
            nnx.merge(self.text_def, self.text_state),
            self.tokenizer,
            self.schedule,
            modality=c.modality,
        )
        out = pipe.generate(
            list(c.sample_prompts),
            steps=c.sample_steps,
            seed=0,
            progress=False,
            height=c.data.resolution,
            width=c.data.resolution,
        )
        dense = out["depth"][..., None].repeat(3, -1) if c.modality == "depth" else out["normal"]
        grid = np.concatenate([np.concatenate([r, d], axis=1) for r, d in zip(out["rgb"], dense, strict=True)])
        if jax.process_index() == 0:
            (self.workdir / "samples").mkdir(exist_ok=True)
            write_png_rgb(self.workdir / "samples" / f"{step:07d}.png", grid)
            writer.image(step, "samples", grid)

    def export(self, path=None) -> Path:
        """The current model in the official layout (process 0 writes; written aside, then renamed)."""
        path = Path(path or self.workdir / "export")
        model = self.model()
        if jax.process_index() == 0:
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save(tmp)
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        multihost_utils.sync_global_devices("export")
        return path


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
