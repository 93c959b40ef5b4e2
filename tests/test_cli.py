"""The shared CLI plumbing (``jointnet_jax/cli.py``): numeric flags are finite and in range, output locations
are checked before any work, and each mistake is one sentence. No model is built: every case fails before."""

from __future__ import annotations

from pathlib import Path

import pytest

from jointnet_jax import evaluate, sample

GENERATE = ["generate", "--base", "missing-base", "--model", "missing-model", "--prompt", "x"]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--cfg", "nan", "'nan' is not a finite number"),
        ("--cfg", "-1", "-1 must be >= 0"),
        ("--steps", "0", "0 must be >= 1"),
        ("--steps", "2.5", "'2.5' is not an integer"),
        ("--eta", "inf", "'inf' is not a finite number"),
        ("--guidance-rescale", "2", "2 must be <= 1"),
        ("--height", "-64", "-64 must be >= 1"),
        ("--num-samples", "0", "0 must be >= 1"),
        ("--seed", "-1", "-1 must be >= 0"),
        ("panorama --tile", "nan", "'nan' is not an integer"),
        ("panorama --full-view-weight", "-inf", "'-inf' is not a finite number"),
    ],
)
def test_sample_numeric_flags_are_checked(flag, value, message, tmp_path, capsys):
    command, _, flag = flag.rpartition(" ")  # the tiling flags belong to the tiled commands only
    with pytest.raises(SystemExit) as exit_:
        sample.main([command or "generate", *GENERATE[1:], "--out", str(tmp_path), f"{flag}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {message}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--span", "nan", "'nan' is not a finite number"),
        ("--span", "400", "400 must be <= 360"),
        ("--near", "0", "0 must be > 0"),
        ("--far", "inf", "'inf' is not a finite number"),
        ("--shift", "nan", "'nan' is not a finite number"),
        ("--max-depth-ratio", "-1", "-1 must be >= 0"),
    ],
)
def test_mesh_numeric_flags_are_checked(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        sample.main(["mesh", "--rgb", "r.png", "--depth", "d.png", "--out", "m.glb", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {message}" in err and "Traceback" not in err


def test_depth_photo_flags_are_checked(capsys):
    photos = ["depth", "--base", "b", "--model", "m", "--image", "p/", "--out", "o"]
    for flag, value, message in [
        ("--ensemble", "0", "0 must be >= 1"),
        ("--batch-size", "nan", "'nan' is not an integer"),
        ("--processing-resolution", "-1", "-1 must be >= 0"),
    ]:
        with pytest.raises(SystemExit):
            sample.main([*photos, flag, value])
        assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_strength_and_evaluation_flags_are_checked(tmp_path, capsys):
    depth = ["depth", "--base", "b", "--model", "m", "--prompt", "x", "--image", "i.png", "--out", str(tmp_path)]
    for argv, message in [
        ([*depth, "--strength", "-0.1"], "argument --strength: -0.1 must be >= 0"),  # 0: the inputs as they are
        ([*depth, "--strength", "1.5"], "argument --strength: 1.5 must be <= 1"),
    ]:
        with pytest.raises(SystemExit):
            sample.main(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["depth", "--pred", "p", "--gt", "g", "--out", "o.json", "--subset-fraction", "nan"])
    assert "argument --subset-fraction: 'nan' is not a finite number" in capsys.readouterr().err


def test_a_bad_out_is_found_before_any_work(tmp_path, capsys):
    """``--out`` an existing file, or below one: one sentence, exit 1, before the (missing) models are read."""
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    assert sample.main([*GENERATE, "--out", str(a_file)]) == 1
    assert capsys.readouterr().err.strip() == f"error: --out {a_file} is an existing file, not a folder"
    assert sample.main([*GENERATE, "--out", str(a_file / "samples")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write to --out {a_file / 'samples'}: ") and "\n" not in err
    assert a_file.read_text() == "keep me"
    assert evaluate.main(["depth", "--pred", "p", "--gt", "g", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path} is an existing folder, not a file name"


def test_the_error_handler_maps_stops_and_run_errors(capsys):
    """``cli.run``: a stopped run is its one line and exit 143 (what the train and demo CLIs return after
    SIGTERM); the training errors they pass in are one ``error:`` sentence and exit 1; a bug keeps its traceback."""
    from jointnet_jax import cli
    from jointnet_jax.training.lock import WorkdirBusy
    from jointnet_jax.training.trainer import RUN_ERRORS, DiskFull, Stopped

    def raising(error):
        def command():
            raise error

        return command

    stop = Stopped(3, 50, Path("wd"), [])
    assert cli.run(raising(stop), errors=RUN_ERRORS, stopped=(Stopped,)) == 143
    assert capsys.readouterr().err.strip() == str(stop)
    for error in (WorkdirBusy("workdir wd is in use"), DiskFull("no space left"), FloatingPointError("loss nan")):
        assert cli.run(raising(error), errors=RUN_ERRORS, stopped=(Stopped,)) == 1
        assert capsys.readouterr().err.strip() == f"error: {error}"
    with pytest.raises(KeyError):
        cli.run(raising(KeyError("a bug")), errors=RUN_ERRORS, stopped=(Stopped,))
