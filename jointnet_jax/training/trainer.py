"""The training loop: model setup per stage, the sharded train step, checkpoints, eval, logging and export.

One ``Trainer`` per process. The train step is a pure function of (train state, frozen parameters, VAE and
text-encoder states, batch), compiled once with ``jax.jit`` over explicit FSDP shardings and a donated
train state (the modern form of pjit). Randomness comes from ``fold_in(seed, step)``, so a resumed run
reproduces the losses of an uninterrupted one.

What is trained: ``stage`` 0 the base text-to-image UNet alone (RGB; stands in for SD2.1 in the CPU demo),
stages 1-3 a ``JointNet`` (``partition.py`` says which parameters), or with ``model="direct_extend"`` the
paper's Direct Extend baseline (one widened UNet, all parameters). ``vae="none"`` works in pixel space.
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

from jointnet_jax import sharding as sh
from jointnet_jax import weights
from jointnet_jax.data import records, synthetic
from jointnet_jax.data.input_pipeline import InputPipeline, PipelineConfig, make_global_batch
from jointnet_jax.diffusion.schedule import load_schedule
from jointnet_jax.models import hub
from jointnet_jax.models.clip_text import load_text_encoder, load_tokenizer
from jointnet_jax.models.direct_extend import DirectExtend
from jointnet_jax.models.jointnet import JointNet
from jointnet_jax.models.pixel_space import branch_codecs
from jointnet_jax.models.vae import load_vae
from jointnet_jax.pretrained import load_jointnet, load_unet
from jointnet_jax.tiny_base import UNET_2LEVEL, UNET_PIXEL, ensure_tiny_base
from jointnet_jax.training import checkpoints
from jointnet_jax.training.metrics import Writer, compiled_flops, compiled_memory, device_peak_flops
from jointnet_jax.training.objective import LossSettings, joint_loss
from jointnet_jax.training.optimizer import make_optimizer
from jointnet_jax.training.partition import split_trainable

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
TINY_UNETS = {"4level": None, "2level": UNET_2LEVEL, "pixel": UNET_PIXEL}
MODELS = ("jointnet", "direct_extend")


@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: object


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state"], meta_fields=[])


def tiny_unet_config(config) -> dict | None:
    """``config.tiny_unet``: a name from ``TINY_UNETS`` or a dict of UNet config overrides."""
    value = config.get("tiny_unet", "4level")
    if isinstance(value, str):
        if value not in TINY_UNETS:
            raise ValueError(f"unknown tiny_unet {value!r}; expected one of {', '.join(TINY_UNETS)} or a dict")
        return TINY_UNETS[value]
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def pixel_space(config) -> bool:
    vae = config.get("vae", "")
    if vae not in ("", "none"):
        raise ValueError(f"config.vae must be '' (the base's vae/) or 'none' (pixel space), not {vae!r}")
    return vae == "none"


def resolve_base(base: str, workdir: Path, tiny_unet: dict | None = None, *, vae: bool = True) -> Path:
    """A local folder or a Hub id (``models.hub``). ``"tiny"`` means a tiny random SD-shaped base written once
    into the workdir (CPU configs); ``tiny_unet`` overrides its UNet config, ``vae=False`` leaves out vae/
    (pixel space)."""
    if base == "tiny":
        path = workdir / "tiny_base"
        if jax.process_index() == 0:
            ensure_tiny_base(path, unet=tiny_unet, vae=vae)
        sh.sync_processes("tiny_base")
        return path
    path = hub.resolve(
        base,
        what="base model folder (config.base)",
        subfolders=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    )
    if not path.is_dir():
        raise FileNotFoundError(f"base model folder {path} does not exist (config.base)")
    return path


def dense_channels(config) -> int | None:
    """The dense branch's channels: the base's latent channels (None) with a VAE; 1 for depth and 3 for
    normals in pixel space."""
    if not pixel_space(config):
        return None
    return 1 if config.modality == "depth" else 3


def build_model(config, base: Path, dtype):
    """Stage 0: the base UNet. Else a ``JointNet`` from ``init_from`` (an official-layout JointNet) or with
    both branches copied from the base UNet (stage 3 adds the zero-initialised masked-latent conv if the
    starting model lacks it), or the Direct Extend baseline widened from the base UNet."""
    kind = config.get("model", "jointnet")
    if kind not in MODELS:
        raise ValueError(f"config.model must be one of {', '.join(MODELS)}, not {kind!r}")
    if config.stage == 0:
        model = load_unet(base / "unet", dtype=dtype)
    elif kind == "direct_extend":
        if config.stage == 3:
            raise ValueError("Direct Extend has no masked-latent input; train it with stage 1 or 2")
        unet = load_unet(base / "unet", dtype=dtype)
        model = DirectExtend.from_unet(unet, dense_channels(config) or unet.config.in_channels)
    elif config.init_from:
        model = load_jointnet(config.init_from, dtype=dtype)
    else:
        model = JointNet.from_unet(load_unet(base / "unet", dtype=dtype), dense_channels=dense_channels(config))
    if config.stage == 3 and not model.masked_input:
        model.add_masked_latent_conv()
    if config.remat:
        model.set_remat(True)
    return model


def _synthetic(config, out: Path, indices: range) -> str:
    """Synthetic-world examples ``indices`` rendered once into ``out`` (process 0 writes)."""
    if jax.process_index() == 0 and not (out.is_dir() and records.list_shards(out, "synthetic")):
        examples = (synthetic.make_example(i, config.data.synthetic_size, seed=config.data.seed) for i in indices)
        records.write_shards(examples, out, "synthetic", num_shards=config.data.synthetic_shards)
    sh.sync_processes(f"synthetic_data_{out.name}")
    return str(out)


def training_data(config, workdir: Path) -> str:
    """``data.paths``, or the embedded synthetic world rendered once into ``workdir/data``."""
    if config.data.paths:
        return config.data.paths
    return _synthetic(config, workdir / "data", range(config.data.synthetic_num))


def eval_data(config, workdir: Path) -> str:
    """``data.eval_paths``, or held-out synthetic scenes (the indices after the training ones)."""
    if config.data.get("eval_paths", ""):
        return config.data.eval_paths
    n = config.data.synthetic_num
    return _synthetic(config, workdir / "eval_data", range(n, n + config.data.synthetic_eval_num))


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
        pixels = pixel_space(config)
        tiny_unet = tiny_unet_config(config)
        if pixels:  # a tiny pixel-space base denoises RGB images
            tiny_unet = {**(tiny_unet or {}), "in_channels": 3, "out_channels": 3}
        self.base = resolve_base(config.base, self.workdir, tiny_unet, vae=not pixels)
        self.schedule = load_schedule(self.base / "scheduler")
        model = build_model(config, self.base, dtype)
        self.channels = model.channels if config.stage else (model.config.in_channels,) * 2
        self.graphdef, trainable, frozen = split_trainable(model, config.stage)
        self.vae_def, vae_state = None, nnx.State({})  # pixel space: no VAE
        if not pixels:
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
        self.eval_data_config = None
        if config.get("eval_every", 0):
            eval_paths = eval_data(config, self.workdir)
            self.eval_data_config = dataclasses.replace(
                self.data_config, paths=eval_paths, training=False, worker_count=0, crop_scale=(1.0, 1.0), flip=False
            )
        self.manager = checkpoints.make_manager(
            self.workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints
        )
        latest = self.manager.latest_step()
        if latest is not None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
            self.state = checkpoints.restore(self.manager, latest, abstract, self.data)
            logging.info("resumed from step %d", latest)
        self._step_fn = self._compile_step()
        self._compiled, self.flops, self.step_memory, self._eval_fn = None, None, None, None
        self._stop_requested = False
        self.eval_history: list[dict] = []  # {"step", "eval_loss_rgb", ...} per evaluation

    # -----------------------------------------------------------------------------------------------

    def model(self):
        """The current model (trainable and frozen parameters merged): a JointNet, a DirectExtend, or in
        stage 0 the base UNet."""
        return nnx.merge(self.graphdef, self.state.params, self.frozen)

    def pipeline(self):
        """A sampling ``Pipeline`` over the current model. Stage 0's base UNet runs as the RGB branch of a
        fresh twin, whose RGB output is exactly the base model's (output preserving)."""
        from jointnet_jax.pipelines import Pipeline

        model = self.model()
        if self.config.stage == 0:
            model = JointNet.from_unet(model, dense_channels=dense_channels(self.config))
        return Pipeline(
            model,
            None if self.vae_def is None else nnx.merge(self.vae_def, self.vae_state),
            nnx.merge(self.text_def, self.text_state),
            self.tokenizer,
            self.schedule,
            modality=self.config.modality,
        )

    def _loss(self, settings: LossSettings):
        """The objective as a pure function of (params, frozen, vae state, text state, uncond, batch, key)."""
        graphdef, vae_def, text_def, schedule, channels = (
            self.graphdef,
            self.vae_def,
            self.text_def,
            self.schedule,
            self.channels,
        )

        def loss(params, frozen, vae_state, text_state, uncond, batch, key):
            codecs = branch_codecs(None if vae_def is None else nnx.merge(vae_def, vae_state), *channels)
            model = nnx.merge(graphdef, params, frozen)
            return joint_loss(model, codecs, nnx.merge(text_def, text_state), schedule, uncond, batch, key, settings)

        return loss

    def _in_shardings(self, first):
        shard = self.shardings
        return (
            first,
            shard(self.frozen),
            shard(self.vae_state),
            shard(self.text_state),
            sh.replicated(self.mesh),
            sh.batch_sharding(self.mesh),
        )

    def _compile_step(self):
        tx, lr_schedule, seed = self.tx, self.lr_schedule, self.config.seed
        loss = self._loss(self.loss_settings)

        def train_step(state: TrainState, frozen, vae_state, text_state, uncond, batch):
            key = jax.random.fold_in(jax.random.key(seed), state.step)

            def loss_of(params):  # differentiates the trainable partition only
                return loss(params, frozen, vae_state, text_state, uncond, batch, key)

            (loss_value, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state.params, updates)
            metrics.update(loss=loss_value, grad_norm=_global_norm(grads), lr=lr_schedule(state.step))
            return TrainState(state.step + 1, params, opt_state), metrics

        return jax.jit(
            train_step,
            in_shardings=self._in_shardings(self.state_shardings),
            out_shardings=(self.state_shardings, sh.replicated(self.mesh)),
            donate_argnums=(0,),
        )

    def _compile_eval(self):
        """Per-batch sums of the eval losses: no text drop, and noise and timesteps from a fixed key
        (``eval_seed``) and the record index, so evaluations are comparable across steps and runs."""
        loss = self._loss(dataclasses.replace(self.loss_settings, text_drop=0.0))
        key = jax.random.key(self.config.get("eval_seed", 0))

        def eval_step(params, frozen, vae_state, text_state, uncond, batch):
            _, metrics = loss(params, frozen, vae_state, text_state, uncond, batch, key)
            n = batch["valid"].astype(jnp.float32).sum()
            return {k: v * n for k, v in metrics.items()}, n

        return jax.jit(
            eval_step,
            in_shardings=self._in_shardings(self.shardings(self.state.params)),
            out_shardings=sh.replicated(self.mesh),
        )

    def evaluate(self) -> dict:
        """Mean losses over the whole held-out set (``eval_loss_rgb``, ``eval_loss_dense``, ``eval_loss``)."""
        if self.eval_data_config is None:
            raise ValueError("evaluation needs config.eval_every > 0 (and data.eval_paths or synthetic_eval_num)")
        if self._eval_fn is None:
            self._eval_fn = self._compile_eval()
        data, sums, count = InputPipeline(self.eval_data_config), {}, 0.0
        try:
            for host_batch in data:
                batch = self._global_batch(host_batch)
                metrics, n = self._eval_fn(
                    self.state.params, self.frozen, self.vae_state, self.text_state, self.uncond, batch
                )
                for k, v in jax.device_get(metrics).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += float(n)
        finally:
            data.close()
        if not count:
            raise ValueError(f"the eval set {self.eval_data_config.paths} has no valid records")
        out = {f"eval_{k}": v / count for k, v in sums.items()}
        out["eval_loss"] = sum(v for k, v in out.items())
        return out

    def _global_batch(self, host_batch):
        return make_global_batch(host_batch, sh.batch_sharding(self.mesh))

    def compiled_step(self, batch):
        """The train step compiled for this batch's shapes (once); its FLOPs (``self.flops``) and per-device
        memory (``self.step_memory``) from XLA's cost and buffer analyses."""
        if self._compiled is None:
            args = (self.state, self.frozen, self.vae_state, self.text_state, self.uncond, batch)
            self._compiled = self._step_fn.lower(*args).compile()
            self.flops = compiled_flops(self._compiled)
            self.step_memory = compiled_memory(self._compiled)
            if self.step_memory:
                logging.info(
                    "train step per device: %.2f GB arguments (state, frozen weights, batch), %.2f GB temporaries",
                    self.step_memory["argument_bytes"] / 1e9,
                    self.step_memory["temp_bytes"] / 1e9,
                )
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
        eval_every = c.get("eval_every", 0)
        try:
            if eval_every and start == 0:
                self._record_eval(0, writer)
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
                if eval_every and ((step + 1) % eval_every == 0 or step + 1 == end):  # the final model too
                    metrics.update(self._record_eval(step + 1, writer))
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

    def _record_eval(self, step: int, writer: Writer | None = None) -> dict:
        metrics = self.evaluate()
        self.eval_history.append({"step": step, **metrics})
        if writer is not None:
            writer.scalars(step, metrics)
        return metrics

    def _request_stop(self, signum, frame):
        self._stop_requested = True

    def write_samples(self, step: int, writer: Writer):
        """Fixed-prompt, fixed-seed joint samples as one grid image (RGB | depth per prompt)."""
        from jointnet_jax.io_utils import write_png_rgb

        c = self.config
        out = self.pipeline().generate(
            list(c.sample_prompts),
            steps=c.sample_steps,
            seed=0,
            progress=False,
            height=c.data.resolution,
            width=c.data.resolution,
        )
        dense = out["depth"][..., None].repeat(3, -1) if c.modality == "depth" else out["normal"]
        columns = [out["rgb"]] if c.stage == 0 else [out["rgb"], dense]  # stage 0 has no dense branch
        grid = np.concatenate([np.concatenate(row, axis=1) for row in zip(*columns, strict=True)])
        if jax.process_index() == 0:
            (self.workdir / "samples").mkdir(exist_ok=True)
            write_png_rgb(self.workdir / "samples" / f"{step:07d}.png", grid)
            writer.image(step, "samples", grid)

    def export(self, path=None) -> Path:
        """The current model (process 0 writes; written aside, then renamed): a JointNet in the official
        layout; Direct Extend as ``unet/`` with widened channels; stage 0 as a complete base folder (the
        base's text_encoder/ tokenizer/ scheduler/ [vae/] with the trained unet/), the ``base`` of stage 1."""
        path = Path(path or self.workdir / "export")
        model = self.model()
        if jax.process_index() == 0:
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if self.config.stage == 0:
                shutil.copytree(self.base, tmp, ignore=shutil.ignore_patterns("unet"))
                weights.save_folder(model, tmp / "unet", model.config.to_dict())
            else:
                model.save(tmp)
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        sh.sync_processes("export")
        return path


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
