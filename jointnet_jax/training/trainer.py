"""The training loop: the sharded train step, checkpoints and resume, held-out evaluation, logging, sample
grids and the final export.

One ``Trainer`` per process. What is trained and with what comes from ``setup.py`` (by the stage table of
``stages.py``), the data from ``datasets.py``, the pure step functions from ``steps.py``, the export and
sample grids from ``export.py``. The train step is compiled once with ``jax.jit`` over explicit FSDP
shardings and a donated train state (the modern form of pjit). With ``data.latents`` the batches come from a
latent cache (``loader.LatentLoader``) and the step holds no VAE and no text encoder (``objective.cached_loss``).
"""

from __future__ import annotations

import dataclasses
import errno
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jointnet_jax import sharding as sh
from jointnet_jax.data.loader import LatentLoader, Loader, make_global_batch
from jointnet_jax.models import attention, functional
from jointnet_jax.models.jointnet import JointNet
from jointnet_jax.training import checkpoints
from jointnet_jax.training.compile import compile_step
from jointnet_jax.training.datasets import loader_configs
from jointnet_jax.training.export import export_model, sample_grid, write_sample_grid
from jointnet_jax.training.flops import count_flops
from jointnet_jax.training.lock import WorkdirBusy, WorkdirLock
from jointnet_jax.training.metrics import (
    Writer,
    compiled_flops,
    compiled_memory,
    device_peak_flops,
    logged_evals,
)
from jointnet_jax.training.objective import LossSettings
from jointnet_jax.training.optimizer import make_optimizer
from jointnet_jax.training.setup import build_models, dense_channels
from jointnet_jax.training.stages import get_stage
from jointnet_jax.training.steps import TrainState, make_eval_step, make_loss, make_train_step


class Stopped(Exception):
    """SIGTERM stopped training once the checkpoint of the current step was saved. ``Trainer.train`` raises
    it so that whatever called it (the train CLI, the demo's next phase, a notebook cell) stops too, instead
    of going on with an unfinished model; ``history`` holds the steps that call ran."""

    def __init__(self, step: int, total: int, workdir: Path, history: list[dict]):
        if step:
            kept = (
                f"its checkpoint is saved in {workdir / 'checkpoints'}, and rerunning the same command resumes from it"
            )
        else:
            kept = "nothing was trained or saved yet, and rerunning the same command starts it again"
        super().__init__(f"stopped by SIGTERM at step {step} of {total}; {kept}")
        self.step, self.total, self.history = step, total, history


class DiskFull(OSError):
    """The device holding the workdir is full: one sentence with what was kept (see ``Trainer.train``)."""


def _disk_full(error: BaseException | None) -> bool:
    """ENOSPC anywhere in the exception's chain (orbax and tensorstore wrap it in their own errors)."""
    while error is not None:
        text = str(error)
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _finish(*cleanups) -> None:
    """Run the cleanups of a training loop. While an error is already on its way out (a full disk, say),
    a cleanup that fails too is logged, so that the first error is the one reported."""
    failing = sys.exc_info()[1] is not None
    for cleanup in cleanups:
        try:
            cleanup()
        except OSError as e:
            if not failing:
                raise
            logging.warning("while stopping: %s", e)


# A run's failures that are the user's to mend (a diverged loss, a busy workdir, a full disk): the CLIs print
# them as one sentence (``cli.run(..., errors=RUN_ERRORS, stopped=(Stopped,))``).
RUN_ERRORS = (FloatingPointError, WorkdirBusy, DiskFull)


class Trainer:
    def __init__(self, config, workdir):
        self.config, self.workdir = config, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if config.batch_size % jax.device_count():
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {jax.device_count()} devices")
        self.lock = WorkdirLock(self.workdir)  # released when train() ends; taken again by the next train()
        self._stop_requested, self._previous_handler = False, None
        try:
            self._hold()
            self._setup(config)
        except BaseException:  # a trainer that could not be built does not keep the workdir
            self._let_go()
            raise

    def _setup(self, config):
        """Models, optimizer, data, checkpoints (resumed) and the train step, placed on the mesh."""
        self.mesh = sh.make_mesh(config.mesh.data, config.mesh.fsdp)
        self.stage = get_stage(config.stage)
        self.models = m = build_models(config, self.workdir)
        self.cached = bool(config.data.get("latents", False))  # batches from a latent cache: no encoders in the step
        self._loader = LatentLoader if self.cached else Loader
        self.base, self.schedule, self.tokenizer = m.base, m.schedule, m.tokenizer
        self.loss_settings = LossSettings(config.modality, config.text_drop, config.noise_offset, self.stage.masks)
        self.tx, self.lr_schedule = make_optimizer(config)
        self._place(m)
        self.data_config, self.eval_data_config = loader_configs(config, self.workdir, self.tokenizer)
        self.data = self._loader(self.data_config)
        if self.cached:
            try:
                self._use_cache(self.data)
            except BaseException:
                self.data.close()
                raise
        self.manager = checkpoints.make_manager(
            self.workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints
        )
        self._resume()
        self._step_fn = functional.jit(
            make_train_step(make_loss(m, self.loss_settings, self.cached), self.tx, self.lr_schedule, config.seed),
            in_shardings=self._in_shardings(self.state_shardings),
            out_shardings=(self.state_shardings, sh.replicated(self.mesh)),
            donate_argnums=(0,),
        )
        self._compiled, self.flops, self.step_memory, self._eval_fn = None, None, None, None
        self._model_flops = None

    def _hold(self) -> None:
        """Take the workdir: SIGTERM now asks for a stop at the next safe point (after the current step's
        checkpoint, or before the first step), then the lock is taken. The handler comes first so that a
        signal sent once ``WORKDIR/LOCK`` exists is never the default, immediate kill."""
        if self._previous_handler is None:
            self._previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        if not self.lock.held:
            self.lock.acquire()

    def close(self) -> None:
        """Let go of the workdir (its lock and the SIGTERM handler) without training; ``train`` takes it again."""
        self._let_go()

    def _let_go(self) -> None:
        """Release the workdir and give SIGTERM back to whoever handled it before."""
        self.lock.release()
        self._stop_requested = False  # acted on: a later train() call of this trainer runs again
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def _shardings(self, tree):
        return sh.tree_shardings(tree, self.mesh, self.config.mesh.min_fsdp_size)

    def _place(self, m):
        """Frozen parameters, codec and text encoder, a fresh train state and the empty prompt's embedding,
        placed on the mesh with FSDP shardings."""
        place = lambda tree: jax.device_put(tree, self._shardings(tree))  # noqa: E731
        self.frozen, self.vae_state, self.text_state = place(m.frozen), place(m.vae_state), place(m.text_state)
        trainable = place(m.trainable)
        opt_shardings = self._shardings(jax.eval_shape(self.tx.init, trainable))
        opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(trainable)
        self.state = TrainState(jax.device_put(jnp.int32(0), sh.replicated(self.mesh)), trainable, opt_state)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.uncond = jax.device_put(m.uncond_embedding(), sh.replicated(self.mesh))

    def _use_cache(self, data: LatentLoader) -> None:
        """Text drop targets the cache's empty-prompt embedding; the cache must fit this run's VAE and text
        encoder (its scaling factor and embedding shape)."""
        info, where = data.info, data.config.paths
        if info["scaling_factor"] != self.models.scaling_factor():
            raise ValueError(
                f"the latent cache {where} was made with a VAE of scaling factor {info['scaling_factor']}, "
                f"not this base's {self.models.scaling_factor()}"
            )
        if tuple(data.uncond.shape) != tuple(self.uncond.shape):
            raise ValueError(
                f"the latent cache {where} holds text embeddings {tuple(data.uncond.shape[1:])}, not this base's "
                f"{tuple(self.uncond.shape[1:])}"
            )
        self.uncond = jax.device_put(jnp.asarray(data.uncond), sh.replicated(self.mesh))

    def _resume(self):
        """Continue from the newest good checkpoint of the workdir, if there is one (state and data position);
        damaged ones are set aside in ``checkpoints_damaged/`` (see ``checkpoints.restore_newest_good``)."""
        self.eval_history: list[dict] = []  # {"step", "eval_loss_rgb", ...} per evaluation, kept across resumes
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        damaged = self.workdir / "checkpoints_damaged"
        restored = checkpoints.restore_newest_good(self.manager, abstract, self.data, damaged)
        if restored is not None:
            step, self.state = restored
            self.eval_history = logged_evals(self.workdir / "tensorboard", up_to=step)
            logging.info("resumed from step %d", step)

    # -----------------------------------------------------------------------------------------------

    def model(self):
        """The current model (trainable and frozen parameters merged): a JointNet, a DirectExtend, or in
        stage 0 the base UNet."""
        return nnx.merge(self.models.graphdef, self.state.params, self.frozen)

    def pipeline(self):
        """A sampling ``Pipeline`` over the current model. The base UNet of stage 0 runs as the RGB branch of
        a fresh twin, whose RGB output is exactly the base model's (output preserving)."""
        from jointnet_jax.pipelines import Pipeline

        model = self.model()
        if self.stage.base:
            model = JointNet.from_unet(model, dense_channels=dense_channels(self.config))
        vae = None if self.models.vae_def is None else nnx.merge(self.models.vae_def, self.vae_state)
        text_encoder = nnx.merge(self.models.text_def, self.text_state)
        return Pipeline(model, vae, text_encoder, self.tokenizer, self.schedule, modality=self.config.modality)

    def _in_shardings(self, first):
        shard = self._shardings
        frozen = (shard(self.frozen), *map(shard, self._encoder_states()))
        return (first, *frozen, sh.replicated(self.mesh), sh.batch_sharding(self.mesh))

    def _global_batch(self, host_batch):
        return make_global_batch(host_batch, sh.batch_sharding(self.mesh))

    def _args(self, first, batch):
        return (first, self.frozen, *self._encoder_states(), self.uncond, batch)

    def _encoder_states(self):
        """The VAE and text-encoder states the step takes: none (empty states) when it reads a latent cache."""
        return (nnx.State({}), nnx.State({})) if self.cached else (self.vae_state, self.text_state)

    def compiled_step(self, batch):
        """The train step compiled for this batch's shapes (once, within the host's memory: ``compile.py``);
        its FLOPs (``self.flops``) and per-device memory (``self.step_memory``) from XLA's analyses."""
        if self._compiled is None:
            self._compiled = compile_step(self._step_fn.lower(*self._args(self.state, batch)))
            # Processes finish compiling at different times (on CPU one can lag by a minute), and Gloo gives
            # up on a first collective reached 30 s apart: wait on the host before the first step runs.
            sh.sync_processes("train_step_compiled")
            self.flops = compiled_flops(self._compiled)
            self.step_memory = compiled_memory(self._compiled)
            if self.step_memory:
                logging.info(
                    "train step per device: %.2f GB arguments (state, frozen weights, batch), %.2f GB temporaries",
                    self.step_memory["argument_bytes"] / 1e9,
                    self.step_memory["temp_bytes"] / 1e9,
                )
        return self._compiled

    def model_flops(self, batch) -> float:
        """Model FLOPs of one train step per device, the numerator of MFU: the analytic count of
        ``training/flops.py`` (the step's matrix work, traced with remat off so that its recompute is not
        counted, as PaLM's MFU defines it, and with attention as plain dots) over the devices. Unlike XLA's
        count (``self.flops``), it includes the convolutions a GPU hands to cuDNN. Traced once, nothing is
        compiled."""
        if self._model_flops is None:
            model = nnx.merge(self.models.graphdef, self.state.params, self.frozen)
            model.set_remat(False)
            models = dataclasses.replace(self.models, graphdef=nnx.split(model)[0])
            c = self.config
            step = make_train_step(
                make_loss(models, self.loss_settings, self.cached), self.tx, self.lr_schedule, c.seed
            )
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._args(self.state, batch))
            with attention.auto_as("xla"):  # cuDNN attention would be one uncounted call
                self._model_flops = count_flops(step, *shapes) / jax.device_count()
        return self._model_flops

    def evaluate(self) -> dict:
        """Mean losses over the whole held-out set (``eval_loss_rgb``, ``eval_loss_dense``, ``eval_loss`` their
        sum, and ``eval_loss_rgb_marginal``: the RGB loss with an uninformative dense input, see
        ``LossSettings.marginal``), with no text drop and the fixed noise and timesteps of ``eval_seed``."""
        if self.eval_data_config is None:
            raise ValueError("evaluation needs config.eval_every > 0 (and data.eval_paths or synthetic_eval_num)")
        if self._eval_fn is None:
            settings = dataclasses.replace(self.loss_settings, text_drop=0.0, marginal=True)
            loss = make_loss(self.models, settings, self.cached)
            in_shardings = self._in_shardings(self._shardings(self.state.params))
            self._eval_fn = functional.jit(
                make_eval_step(loss, self.config.eval_seed),
                in_shardings=in_shardings,
                out_shardings=sh.replicated(self.mesh),
            )
        data, sums, count = self._loader(self.eval_data_config), {}, 0.0
        try:
            for host_batch in data:
                metrics, n = self._eval_fn(*self._args(self.state.params, self._global_batch(host_batch)))
                for k, v in jax.device_get(metrics).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += float(n)
        finally:
            data.close()
        if not count:
            raise ValueError(f"the eval set {self.eval_data_config.paths} has no valid records")
        out = {f"eval_{k}": v / count for k, v in sums.items()}
        out["eval_loss"] = sum(v for k, v in out.items() if k in ("eval_loss_rgb", "eval_loss_dense"))
        return out

    # -----------------------------------------------------------------------------------------------

    def train(self, num_steps: int | None = None) -> list[dict]:
        """Train to ``config.total_steps`` (or ``num_steps`` more) and export; returns the per-step metrics.
        SIGTERM saves a checkpoint after the current step and raises ``Stopped``; a non-finite loss raises
        FloatingPointError with the last good checkpoint kept. The workdir lock is held meanwhile."""
        self._hold()
        try:
            history = self._train_loop(num_steps)
            if self._stop_requested:
                raise Stopped(int(self.state.step), self.config.total_steps, self.workdir, history)
            if int(self.state.step) >= self.config.total_steps and self.config.export:
                self.export()
            return history
        except (OSError, ValueError) as e:  # tensorstore reports a full disk as a ValueError
            if not _disk_full(e):
                raise
            where = getattr(e, "filename", None) or self.workdir
            raise DiskFull(
                f"no space left on the device of {where} at step {int(self.state.step)}; "
                f"the checkpoints kept are {self.manager.all_steps()} in {self.workdir / 'checkpoints'} (an "
                "unfinished save is removed on the next start). Free some space and rerun to resume"
            ) from e
        finally:
            self._let_go()

    def _train_loop(self, num_steps: int | None) -> list[dict]:
        c = self.config
        start = int(self.state.step)
        end = c.total_steps if num_steps is None else min(c.total_steps, start + num_steps)
        writer, history = Writer(self.workdir / "tensorboard"), []
        from tqdm.auto import tqdm

        bar = tqdm(total=end, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
        try:
            if c.eval_every and start == 0 and not self._stop_requested:
                self._record_eval(0, writer)
            for step in range(start + 1, end + 1):
                if self._stop_requested:  # asked before this call's first step: nothing new to save
                    break
                history.append(self._train_step(step, end, writer))
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
                if self._stop_requested:
                    logging.warning("SIGTERM: saved a checkpoint at step %d, exiting", step)
                    break
        finally:
            bar.close()
            _finish(self.manager.wait_until_finished, writer.close)
        return history

    def _train_step(self, step: int, end: int, writer: Writer) -> dict:
        """One optimizer step (to ``step``) and its bookkeeping: eval, logs, samples and checkpoint."""
        c, t0 = self.config, time.perf_counter()
        batch = self._global_batch(next(self.data))
        self.state, metrics = self.compiled_step(batch)(*self._args(self.state, batch))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(metrics["loss"]):
            self.manager.wait_until_finished()
            raise FloatingPointError(
                f"loss became {metrics['loss']} at step {step}; stopping. The last good checkpoint is step "
                f"{self.manager.latest_step()} in {self.workdir / 'checkpoints'} (lower lr or check the data)."
            )
        dt = time.perf_counter() - t0
        metrics.update(step=step, step_time=dt, examples_per_s=c.batch_size / dt)
        peak = device_peak_flops()
        if peak:  # a known accelerator (none on the CPU)
            metrics["mfu"] = self.model_flops(batch) / dt / peak
        if c.eval_every and (step % c.eval_every == 0 or step == end):  # the final model too
            metrics.update(self._record_eval(step, writer))
        if step % c.log_every == 0:
            writer.scalars(step, {k: v for k, v in metrics.items() if k != "step"})
        if c.sample_every and step % c.sample_every == 0:
            self.write_samples(step, writer)
        if step % c.checkpoint_every == 0 or step == end or self._stop_requested:
            checkpoints.save(self.manager, step, self.state, self.data, c.to_dict())
        return metrics

    def _record_eval(self, step: int, writer: Writer | None = None) -> dict:
        metrics = self.evaluate()
        self.eval_history.append({"step": step, **metrics})
        if writer is not None:
            writer.scalars(step, metrics)
        return metrics

    def _request_stop(self, signum, frame):
        self._stop_requested = True

    def write_samples(self, step: int, writer: Writer):
        """Fixed-prompt, fixed-seed joint samples as one grid image (RGB | dense per prompt)."""
        grid = sample_grid(self.pipeline(), self.config, len(self.models.channels))
        write_sample_grid(grid, self.workdir, step)
        writer.image(step, "samples", grid)

    def export(self, path=None) -> Path:
        """The current model, written by ``export.export_model`` (default ``WORKDIR/export``)."""
        return export_model(self.model(), Path(path or self.workdir / "export"), self.base)
