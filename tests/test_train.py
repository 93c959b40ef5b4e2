"""Training: freezing, output preservation, loss decrease, export, init_from, resume, SIGTERM, multi-host,
logging, non-finite losses and the traced step's remat and compute dtype."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jointnet_jax as jj
from configs import sd21_depth, sd21_depth_inpaint
from jointnet_jax.data.loader import Loader
from jointnet_jax.models.weights import state_tensors
from jointnet_jax.training.flops import count_flops
from jointnet_jax.training.lock import WorkdirBusy
from jointnet_jax.training.objective import joint_loss
from jointnet_jax.training.trainer import DiskFull, Stopped, Trainer

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def _config(**overrides):
    c = sd21_depth.get_config("tiny")
    c.total_steps = STEPS
    c.checkpoint_every = 2
    c.data.synthetic_num = 32
    c.mesh.data, c.mesh.fsdp = 4, 2  # one mesh everywhere: the compiled step is shared via the persistent cache
    c.tiny_unet = "2level"  # compiles several times faster than the 4-level tiny UNet
    for k, v in overrides.items():
        target = c
        *parents, leaf = k.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = v
    return c


def _cli_overrides(c):
    return [
        f"--config.total_steps={c.total_steps}",
        f"--config.checkpoint_every={c.checkpoint_every}",
        f"--config.data.synthetic_num={c.data.synthetic_num}",
        f"--config.tiny_unet={c.tiny_unet}",
        f"--config.mesh.data={c.mesh.data}",
        f"--config.mesh.fsdp={c.mesh.fsdp}",
    ]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """One uninterrupted stage-1 run on 8 devices (mesh data=4 x fsdp=2); reused by several tests."""
    assert jax.device_count() == 8
    workdir = tmp_path_factory.mktemp("stage1")
    trainer = Trainer(_config(log_every=2), workdir)  # logging is host-side: the compiled step is the same
    before = dict(state_tensors(trainer.model()))
    first_batch = trainer._global_batch(next(Loader(trainer.data_config)))
    history = trainer.train()
    return trainer, before, first_batch, history


def test_stage1_freezes_exactly_the_rgb_base(stage1):
    trainer, before, _, _ = stage1
    after = dict(state_tensors(trainer.model()))
    trainable = {k for k in after if k.startswith("jointnet.") or k.split(".")[1].startswith("jointnet_")}
    assert any(k.startswith("unet.jointnet_") for k in trainable) and any(k.startswith("jointnet.") for k in trainable)
    for k, v in after.items():
        if k in trainable:
            assert not np.array_equal(v, before[k]), f"trainable {k} did not change"
        else:
            assert k.startswith("unet.") and np.array_equal(v, before[k]), f"frozen {k} changed"
    # Optimizer state: AdamW's two moments for exactly the trainable parameters, nothing for frozen ones.
    params = jax.tree.leaves(trainer.state.params)
    moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if np.ndim(x) > 0]
    assert len(params) == len(trainable) and len(moments) == 2 * len(params)
    assert sum(x.nbytes for x in moments) == 2 * sum(v.nbytes for k, v in after.items() if k in trainable)
    # FSDP: some large parameters are really split over the fsdp axis.
    specs = {tuple(x.sharding.spec) for x in params}
    assert any("fsdp" in s for s in specs)


def _device0_bytes(tree) -> int:
    device = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def test_step_memory_reports_the_donated_state(stage1):
    """XLA's buffer analysis of the compiled step: the donated train state (device 0's shards of parameters,
    optimizer state and step) is reused in place for the new state, and the arguments hold it plus the
    frozen RGB weights (jit drops unused arguments such as the VAE decoder, so not every frozen array)."""
    trainer = stage1[0]
    memory, state = trainer.step_memory, _device0_bytes(trainer.state)
    assert memory["alias_bytes"] == state
    assert memory["argument_bytes"] >= state + _device0_bytes(trainer.frozen)
    assert 0 < memory["temp_bytes"]


def test_step0_rgb_loss_equals_base_unet_loss(stage1):
    """Output preserving: at step 0 the RGB branch's loss is the base UNet's loss on the same batch."""
    trainer, _, batch, history = stage1
    base = jj.load_unet(trainer.base / "unet")
    vae = jj.load_vae(trainer.base / "vae")
    text = jj.load_text_encoder(trainer.base / "text_encoder")
    key = jax.random.fold_in(jax.random.key(trainer.config.seed), 0)

    @jax.jit
    def base_loss(batch):
        twin_of_base = lambda x, y, t, c, *_: (base(x, t, c), base(y, t, c))  # noqa: E731
        return joint_loss(twin_of_base, vae, text, trainer.schedule, trainer.uncond, batch, key, trainer.loss_settings)

    _, metrics = base_loss(batch)
    np.testing.assert_allclose(history[0]["loss_rgb"], float(metrics["loss_rgb"]), rtol=1e-5)


def test_loss_decreases_and_export_loads(stage1):
    trainer, _, _, history = stage1
    losses = [h["loss"] for h in history]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    exported = jj.load_jointnet(trainer.workdir / "export")
    a, b = dict(state_tensors(exported)), dict(state_tensors(trainer.model()))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_after_sigkill_reproduces_losses(stage1, tmp_path):
    """A run killed (SIGKILL) after its step-4 checkpoint resumes from that checkpoint to the same losses and
    the same final parameters as the uninterrupted run."""
    trainer, _, _, history = stage1
    c = _config()
    cmd = [
        sys.executable,
        "-m",
        "jointnet_jax.train",
        "--config",
        "configs/sd21_depth.py:tiny",
        "--workdir",
        str(tmp_path),
        *_cli_overrides(c),
        "--config.total_steps=1000",
        "--config.keep_checkpoints=1000",  # a late kill must not find step 4 already garbage-collected
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "checkpoints"
    try:
        deadline = time.time() + 600
        while not (checkpoints / "4").is_dir():
            assert proc.poll() is None, "training subprocess died"
            assert time.time() < deadline, "no step-4 checkpoint in time"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The kill may land after a later save (a step takes well under the poll interval once compiled). The
    # test is about resuming from a checkpoint that a killed process wrote, so drop the finalised ones newer
    # than 4 and always resume from step 4; unfinished saves (orbax's temporary folders) stay, to be ignored.
    for d in checkpoints.iterdir():
        if d.name.isdigit() and int(d.name) > 4:
            shutil.rmtree(d)
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == proc.pid  # the killed run's lock is left over
    resumed = Trainer(c, tmp_path)  # ... and taken over: its process is gone
    start = int(resumed.state.step)
    assert start == 4 < STEPS
    tail = resumed.train()
    assert [h["step"] for h in tail] == list(range(start + 1, STEPS + 1))
    np.testing.assert_allclose([h["loss"] for h in tail], [h["loss"] for h in history[start:]], rtol=1e-5)
    final, expected = dict(state_tensors(resumed.model())), dict(state_tensors(trainer.model()))
    assert final.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_allclose(final[k], v, atol=1e-6, rtol=1e-6, err_msg=k)


def test_sigterm_saves_a_checkpoint_and_stops_and_samples_are_written(tmp_path):
    c = _config(total_steps=50, checkpoint_every=100, export=False, sample_every=2, sample_steps=2)
    handler_before = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(c, tmp_path)
    assert signal.getsignal(signal.SIGTERM) != handler_before  # a held workdir: SIGTERM asks for a stop
    data = trainer.data

    class TermAfter:  # deliver a real SIGTERM to this process while the third batch is read
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            if self.n == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return next(data)

        def get_state(self):
            return data.get_state()

    trainer.data = TermAfter()
    with pytest.raises(Stopped, match=r"stopped by SIGTERM at step 3 of 50; its checkpoint is saved in") as stopped:
        trainer.train()  # raised, so that a caller (the CLI, the demo's next phase) stops too
    history = stopped.value.history
    assert len(history) == 3 and not (tmp_path / "LOCK").exists()  # the workdir lock is released
    assert trainer.manager.all_steps() == [3]
    assert signal.getsignal(signal.SIGTERM) == handler_before  # given back with the workdir
    # sample_every=2: a fixed-prompt grid (one row per prompt: RGB | depth) was written at step 2.
    from jointnet_jax.io_utils import read_image

    grid = read_image(tmp_path / "samples" / "0000002.png")
    res = c.data.resolution
    assert grid.shape == (res * len(c.sample_prompts), 2 * res, 3)
    # SIGTERM while a trainer is being set up (it holds the workdir from its first line): train() stops
    # before its first step, with the resumed checkpoint as it was.
    resumed = Trainer(c, tmp_path)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Stopped, match=r"at step 3 of 50; its checkpoint is saved") as again:
        resumed.train()
    assert again.value.history == [] and resumed.manager.all_steps() == [3]
    assert "nothing was trained or saved yet" in str(Stopped(0, 4, tmp_path, []))


def test_init_from_official_checkpoint_stage3(official, tmp_path):
    """Stage 3 from the official fixture starts from its weights, with the masked-latent conv added at zero.
    (Building the Trainer compiles no train step; the training half is the next test, at 2 levels.)"""
    c = sd21_depth_inpaint.get_config("tiny")
    c.init_from = str(official / "rgbd_finetune")
    trainer = Trainer(c, tmp_path)
    start = dict(state_tensors(trainer.model()))
    fixture = dict(state_tensors(jj.load_jointnet(official / "rgbd_finetune")))
    assert all(np.array_equal(start[k], v) for k, v in fixture.items())
    added = start.keys() - fixture.keys()  # the masked-latent conv of each branch, weight and bias, at zero
    assert added == {f"{b}.jointnet_masked_latent_conv.{p}" for b in ("unet", "jointnet") for p in ("weight", "bias")}
    assert not any(start[k].any() for k in added)
    # The Trainer holds the workdir: a second one on it is refused (before it builds anything).
    with pytest.raises(WorkdirBusy, match=rf"workdir {tmp_path} is in use by process {os.getpid()} on host"):
        Trainer(c, tmp_path)


def test_stage3_from_an_official_layout_export_trains_the_masked_conv(stage1, tmp_path):
    """Stage 3 initialised from stage 1's export (the official layout, as the released rgbd_finetune): the
    zero masked-latent conv is trained, and so is the RGB branch."""
    export = stage1[0].workdir / "export"
    c = sd21_depth_inpaint.get_config("tiny")
    c.init_from, c.tiny_unet = str(export), "2level"
    c.mesh.data, c.mesh.fsdp = 4, 2
    c.total_steps, c.checkpoint_every, c.data.synthetic_num = 2, 2, 16
    trainer = Trainer(c, tmp_path)
    start = dict(state_tensors(trainer.model()))
    exported = dict(state_tensors(jj.load_jointnet(export)))
    assert all(np.array_equal(start[k], v) for k, v in exported.items())
    assert not start["unet.jointnet_masked_latent_conv.weight"].any()
    trainer.train()
    end = dict(state_tensors(jj.load_jointnet(tmp_path / "export")))
    assert end["unet.jointnet_masked_latent_conv.weight"].any()
    assert not np.array_equal(end["unet.conv_in.weight"], start["unet.conv_in.weight"])  # stage 3 trains all


def test_two_processes_match_one_process(stage1, tmp_path):
    """2 processes x 4 fake devices (jax.distributed on loopback) give the 1 x 8 losses."""
    _, _, _, history = stage1
    c = _config(total_steps=3, checkpoint_every=3)  # the first 3 steps of the 1 x 8 run; one checkpoint
    env = {
        **os.environ,
        "NUM_PROCESSES": "2",
        "DEVICES": "4",
        "PYTHON": sys.executable,
        "WORKDIR_LOGS": str(tmp_path / "logs"),
        "XLA_FLAGS": "",
    }
    args = [
        "--config",
        "configs/sd21_depth.py:tiny",
        "--workdir",
        str(tmp_path / "run"),
        *_cli_overrides(c),
        "--config.export=False",
        "--config.log_every=1",
    ]
    result = subprocess.run(["bash", "launch/local.sh", *args], cwd=REPO, env=env, timeout=900)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert result.returncode == 0, logs
    lines = (tmp_path / "run" / "tensorboard" / "metrics.jsonl").read_text().splitlines()
    losses = {m["step"]: m["loss"] for m in map(json.loads, lines)}
    expected = {h["step"]: h["loss"] for h in history if h["step"] in losses}
    assert len(expected) == len(losses) == c.total_steps, (losses, expected)
    assert all(abs(losses[s] - expected[s]) <= 1e-5 * abs(expected[s]) for s in expected), (
        losses,
        expected,
    )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(_config(async_checkpoints=True), tmp_path)  # the real configs' async saving
    trainer.train(num_steps=2)
    assert trainer.manager.all_steps() == [2]
    # Poison one trainable parameter: the next loss is NaN.
    leaves, treedef = jax.tree.flatten(trainer.state.params)
    leaves[0] = leaves[0] * jnp.nan
    trainer.state.params = jax.tree.unflatten(treedef, leaves)
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 3.*last good checkpoint is step 2"):
        trainer.train()
    assert trainer.manager.all_steps() == [2]
    restored = Trainer(_config(), tmp_path)
    assert int(restored.state.step) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.params))


def test_gradient_accumulation_averages_micro_batches():
    from jointnet_jax.training.optimizer import make_optimizer

    c = _config(grad_accum=2, warmup_steps=0, grad_clip=0.0, weight_decay=0.0)
    tx, _ = make_optimizer(c)
    accumulated, plain = tx.init({"w": jnp.zeros(3)}), make_optimizer(_config(warmup_steps=0, grad_clip=0.0))[0]
    g1, g2 = {"w": jnp.array([1.0, 2.0, 3.0])}, {"w": jnp.array([3.0, 0.0, -1.0])}
    u1, accumulated = tx.update(g1, accumulated, {"w": jnp.zeros(3)})
    assert not np.asarray(u1["w"]).any()  # no update on the first micro-batch
    u2, _ = tx.update(g2, accumulated, {"w": jnp.zeros(3)})
    mean = {"w": (g1["w"] + g2["w"]) / 2}
    expected, _ = plain.update(mean, plain.init({"w": jnp.zeros(3)}), {"w": jnp.zeros(3)})
    np.testing.assert_allclose(u2["w"], expected["w"], rtol=1e-6)


def test_partition_per_stage(official):
    """Stage 1 trains the dense branch and every exchange layer; stages 2 and 3 train everything."""
    from jointnet_jax.training.partition import split_trainable

    jn = jj.load_jointnet(official / "rgbd_inpaint")
    n_all = len(jax.tree.leaves(nnx.state(jn, nnx.Param)))
    _, trainable, frozen = split_trainable(jn, 1)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert "unet.jointnet_masked_latent_conv.kernel" in paths and "unet.jointnet_mid_block.kernel" in paths
    assert not any(p.startswith("unet.") and ".jointnet_" not in "." + p[5:] for p in paths)
    assert len(jax.tree.leaves(trainable)) + len(jax.tree.leaves(frozen)) == n_all
    for stage in (2, 3):
        _, trainable, frozen = split_trainable(jn, stage)
        assert len(jax.tree.leaves(trainable)) == n_all and not jax.tree.leaves(frozen)


def _flat_params(state) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}


def test_inf_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """An overflowing loss (inf, not NaN) stops training like a NaN does, and leaves the checkpoints alone."""
    trainer = Trainer(_config(), tmp_path)
    trainer.train(num_steps=2)
    assert trainer.manager.all_steps() == [2]
    checkpoints = tmp_path / "checkpoints"
    saved = {p.relative_to(checkpoints): p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()}
    folders = sorted(p.name for p in checkpoints.iterdir())
    # A large finite bias on the dense branch's output: its predictions are about 1e20, finite, and their
    # squared error (1e40) overflows float32 to +inf; no inf - inf, so the loss is inf rather than NaN.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(trainer.state.params)
    (i,) = [i for i, (p, _) in enumerate(leaves) if "['jointnet']['conv_out']['bias']" in jax.tree_util.keystr(p)]
    leaves = [v for _, v in leaves]
    leaves[i] = leaves[i] + 1e20
    trainer.state.params = jax.tree.unflatten(treedef, leaves)
    with pytest.raises(FloatingPointError, match=r"loss became inf at step 3.*last good checkpoint is step 2"):
        trainer.train()
    assert trainer.manager.all_steps() == [2]
    assert sorted(p.name for p in checkpoints.iterdir()) == folders
    assert {p.relative_to(checkpoints): p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()} == saved


def _read_tfevents(path: Path) -> dict:
    """{tag: {step: value}} of the scalars in a TensorBoard event file, read from the raw TFRecord framing
    (u64 length, masked CRC of the length, the Event proto, masked CRC of the proto)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    raw, pos, scalars = path.read_bytes(), 0, {}
    while pos < len(raw):
        header = raw[pos : pos + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", raw[pos + 8 : pos + 12])
        data = raw[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[pos + 12 + length : pos + 16 + length])
        assert header_crc == masked_crc32c(header) and data_crc == masked_crc32c(data), f"corrupt record at {pos}"
        pos += 16 + length
        event = Event.FromString(data)
        for value in event.summary.value:
            assert value.tag not in scalars or event.step not in scalars[value.tag], (value.tag, event.step)
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_and_jsonl_hold_the_logged_metrics(stage1):
    """Every log_every-th step's metrics (all of them) are in the TensorBoard event file, readable back
    through the record format, and in metrics.jsonl, equal to what train() returned."""
    trainer, _, _, history = stage1
    every = trainer.config.log_every
    logged = [h for h in history if h["step"] % every == 0]
    assert every > 1 and [h["step"] for h in logged] == list(range(every, STEPS + 1, every))
    logdir = trainer.workdir / "tensorboard"
    (events,) = logdir.glob("events.out.tfevents.*")
    scalars = _read_tfevents(events)
    names = set(history[0]) - {"step"}
    assert {"loss", "loss_rgb", "loss_dense", "grad_norm", "lr"} <= names and set(scalars) == names
    for name in names:
        # Event files store float32 (simple_value).
        assert scalars[name] == {h["step"]: float(np.float32(h[name])) for h in logged}, name
    lines = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": h["step"], **{k: h[k] for k in names}} for h in logged]


def _traced_step(trainer, batch):
    """The train step's jaxpr for its real arguments (tracing only; after a train() call it is cached)."""
    args = (trainer.state, trainer.frozen, trainer.vae_state, trainer.text_state, trainer.uncond, batch)
    return trainer._step_fn.trace(*args).jaxpr.jaxpr


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


REMAT_PRIMITIVES = ("checkpoint", "remat2")  # jax.checkpoint's primitive (its name differs across JAX versions)


def _num_blocks(model) -> int:
    """Down, mid and up blocks of both branches: each is one remat region when remat is on."""
    return sum(len(b.down_blocks) + 1 + len(b.up_blocks) for b in (model.unet, model.jointnet))


def _operand_dtypes(jaxpr, primitive) -> list[tuple[str, ...]]:
    return [tuple(str(v.aval.dtype) for v in e.invars) for e in _equations(jaxpr) if e.primitive.name == primitive]


def test_stage1_bf16_remat_accumulation_runs(stage1, tmp_path):
    """Stage 1 (frozen RGB base) with bf16 compute, fp32 parameters, remat and 2-step accumulation. The traced
    step has one remat region per UNet block and bf16 convolutions and matmuls; the fp32, remat-off
    ``stage1`` step has neither."""
    c = _config(compute_dtype="bf16", remat=True, grad_accum=2, total_steps=2, checkpoint_every=2, warmup_steps=0)
    trainer = Trainer(c, tmp_path)
    before = dict(state_tensors(trainer.model()))
    history = trainer.train()
    assert all(np.isfinite(h["loss"]) for h in history)
    after = dict(state_tensors(trainer.model()))
    assert all(v.dtype == np.float32 for v in after.values())
    np.testing.assert_array_equal(after["unet.conv_in.weight"], before["unet.conv_in.weight"])  # frozen
    assert not np.array_equal(after["jointnet.conv_in.weight"], before["jointnet.conv_in.weight"])

    jaxpr = _traced_step(trainer, trainer._global_batch(next(trainer.data)))
    remat = [e for e in _equations(jaxpr) if e.primitive.name in REMAT_PRIMITIVES]
    assert len(remat) == _num_blocks(trainer.model())
    # MFU's model FLOPs leave out the recompute: the step as compiled (remat on) counts more.
    args = trainer._args(trainer.state, trainer._global_batch(next(trainer.data)))
    assert count_flops(trainer._step_fn, *args) / jax.device_count() > 1.1 * trainer.model_flops(args[-1])
    # fp32 parameters in, bf16 compute: every convolution is bf16 x bf16, and every matmul has a bf16 operand
    # (attention multiplies its float32 softmax by bf16 values; nothing multiplies two float32 arrays).
    assert {str(v.aval.dtype) for v in jax.tree.leaves((trainer.state.params, trainer.frozen))} == {"float32"}
    convs, dots = _operand_dtypes(jaxpr, "conv_general_dilated"), _operand_dtypes(jaxpr, "dot_general")
    assert convs and set(convs) == {("bfloat16", "bfloat16")}
    assert dots and all("bfloat16" in d for d in dots)

    fp32, _, batch, _ = stage1  # tiny config: fp32 compute, remat off
    jaxpr = _traced_step(fp32, batch)
    assert not [e for e in _equations(jaxpr) if e.primitive.name in REMAT_PRIMITIVES]
    convs, dots = _operand_dtypes(jaxpr, "conv_general_dilated"), _operand_dtypes(jaxpr, "dot_general")
    assert len(convs) and set(convs) == {("float32", "float32")} and set(dots) == {("float32", "float32")}


def test_model_flops_count_the_step_as_compiled(stage1):
    """MFU's numerator (``Trainer.model_flops``) of the fp32, remat-off stage-1 step: per device, the analytic
    count of the very step the trainer compiled (traced again from a copy of its graphdef, attention as plain
    dots), and below XLA's CPU count of that step, which adds elementwise and random-number work (at the tiny
    config's widths a fifth of it: measured 0.815; on wider models ``tests/test_flops.py`` finds within 5%)."""
    trainer, _, batch, _ = stage1
    as_compiled = count_flops(trainer._step_fn, *trainer._args(trainer.state, batch)) / jax.device_count()
    assert trainer.model_flops(batch) == pytest.approx(as_compiled, rel=1e-9)
    assert 0.75 * trainer.flops <= trainer.model_flops(batch) <= trainer.flops


def test_resume_skips_a_damaged_latest_checkpoint(stage1, tmp_path, caplog):
    """A truncated file in the latest checkpoint (6): resume warns once naming it, moves it aside (nothing is
    deleted), continues from 4 with 4's parameters, and trains to 6 again."""
    trainer = stage1[0]
    workdir = tmp_path / "run"
    shutil.copytree(trainer.workdir, workdir, ignore=shutil.ignore_patterns("export"))
    state_files = sorted(p for p in (workdir / "checkpoints" / "6" / "state").rglob("*") if p.is_file())
    largest = max(state_files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        resumed = Trainer(_config(), workdir)
    assert int(resumed.state.step) == 4
    # Our own warning only: orbax's asyncio leftovers of a failed read (collected at any later time, even in
    # a later test) also name paths with "damaged" in them.
    warnings = [r.getMessage() for r in caplog.records if "trying the one before" in r.getMessage()]
    assert len(warnings) == 1 and str(workdir / "checkpoints" / "6") in warnings[0]
    assert (workdir / "checkpoints_damaged" / "6" / "state").is_dir()
    assert resumed.manager.all_steps() == [2, 4]
    history = resumed.train()  # state and data position of step 4: the uninterrupted run's last two losses
    assert [h["step"] for h in history] == [5, 6] and resumed.manager.all_steps()[-1] == 6
    expected = {h["step"]: h["loss"] for h in stage1[3]}
    np.testing.assert_allclose([h["loss"] for h in history], [expected[5], expected[6]], rtol=1e-5)


def test_a_checkpoint_another_process_cannot_read_is_set_aside_on_all(stage1, tmp_path, caplog, monkeypatch):
    """Multi-host resume agrees: when this process reads the latest checkpoint (6) but another one does not
    (``all_processes_agree`` is False for it), 6 is set aside here too and every process resumes from 4."""
    from jointnet_jax.training import checkpoints

    workdir = tmp_path / "run"
    shutil.copytree(stage1[0].workdir, workdir, ignore=shutil.ignore_patterns("export"))
    votes = []
    monkeypatch.setattr(
        checkpoints.sh, "all_processes_agree", lambda ok, name: votes.append((ok, name)) or ok and name != "restored_6"
    )
    with caplog.at_level("WARNING"):
        resumed = Trainer(_config(), workdir)
    assert int(resumed.state.step) == 4 and votes == [(True, "restored_6"), (True, "restored_4")]
    # Our own warning only: orbax's asyncio leftovers of a failed read (collected at any later time, even in
    # a later test) also name paths with "damaged" in them.
    warnings = [r.getMessage() for r in caplog.records if "trying the one before" in r.getMessage()]
    assert len(warnings) == 1 and "another process could not read it" in warnings[0]
    assert resumed.manager.all_steps() == [2, 4] and (workdir / "checkpoints_damaged" / "6").is_dir()
    resumed.close()
    assert not (workdir / "LOCK").exists()


def test_a_full_disk_is_one_sentence_naming_what_was_kept(tmp_path):
    """A real ENOSPC from the OS (``metrics.jsonl`` is ``/dev/full``) at the first logged step: one DiskFull
    sentence saying which checkpoints are kept, the cleanup's own failure does not replace it, and the lock
    is released."""
    (tmp_path / "tensorboard").mkdir()
    os.symlink("/dev/full", tmp_path / "tensorboard" / "metrics.jsonl")
    trainer = Trainer(_config(log_every=2), tmp_path)
    pattern = rf"^no space left on the device of {tmp_path} at step 2; the checkpoints kept are \[\] in "
    with pytest.raises(DiskFull, match=pattern):
        trainer.train()
    assert not (tmp_path / "LOCK").exists()
