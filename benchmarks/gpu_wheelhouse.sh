#!/usr/bin/env bash
# The wheelhouse for a GPU machine that reaches no package registry: the packages of the real training and
# sampling path (grain, array_record, tfds, ml_collections, ...) that its image lacks, as wheels for its Python.
#
#   PYVER=3.12 bash benchmarks/gpu_wheelhouse.sh [DEST]        # default DEST: .whl (git-ignored)
#
# Then, on the device, before anything imports jointnet_jax (gpu.sh does this when it finds DEST):
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site DEST/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# The image is assumed to hold JAX with its CUDA plugin, torch, transformers, safetensors, huggingface_hub,
# Pillow, tqdm, absl, etils, protobuf, pyarrow, tensorstore and the rest of the scientific stack; everything
# else that the package and its benchmarks import is here, pinned to the versions the CPU tests run with.
# flax, optax and orbax-checkpoint are carried too, so that the device runs the same versions as the tests
# (they are pure Python); jax itself cannot be: its CUDA plugin is far over the carry limit, so the device's
# own jax runs. Wheels are fetched without their dependencies (--no-deps) so that nothing the image already
# has is replaced; the list below is the closure of what it lacks. promise publishes no wheel: it is built
# here from its sdist (pure Python). The whole folder must stay under the device's 64 MiB carry limit.
set -euo pipefail
PYVER=${PYVER:-3.12}
DEST=${1:-.whl}
PIP=${PIP:-python3 -m pip}
PKGS=(
  # the data path: records, the loader, tfds protos, config files
  grain==0.2.18 array_record==0.8.6 tensorflow-datasets==4.9.10 ml_collections==1.1.0
  dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring_parser==0.18.0
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
  portpicker==1.6.0 importlib_metadata==10.2.0 importlib_resources==6.5.2
  # the model stack, pinned as in the tests
  flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
  # the CLIs' outputs and the torch baselines of the benchmarks
  trimesh==5.2.0 tensorboardX==2.6.5 diffusers==0.42.1
)
PLATFORMS=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
mkdir -p "$DEST"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" "${PKGS[@]}"
$PIP wheel -q --no-deps --no-build-isolation -w "$DEST" promise==2.3
count=$(find "$DEST" -name '*.whl' | wc -l)
size=$(du -sm "$DEST" | cut -f1)
echo "$DEST: $count wheels, ${size} MiB (Python $PYVER)"
if [ "$size" -ge 64 ]; then
  echo "$DEST is ${size} MiB, over the device's 64 MiB carry limit" >&2
  exit 1
fi
