#!/usr/bin/env bash
# Downloads (here, where pip reaches PyPI) the wheels that gpu_check.sh installs on the lent GPU
# machine (Python 3.12, x86_64, no registry) into DIR (default .whl, git-ignored): the device
# README's list (Composer, Streaming, optimi, OmegaConf and what they import) plus what the image
# also lacks and our stages import: boto3 and its parts (Composer's and the tests' S3 code) and
# zstandard (the shards' compression). Run from the repo root: bash benchmarks/gpu_wheels.sh [DIR]
set -euo pipefail
dir=${1:-.whl}
shared=${SHARED_DEVICE:-../shared/device}
[[ -f $shared/fetch-wheels.sh ]] || {
  echo "gpu_wheels.sh: $shared/fetch-wheels.sh not found (set SHARED_DEVICE to the device README's folder)" >&2
  exit 1
}
bash "$shared/fetch-wheels.sh" "$dir" > /dev/null
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
  boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0 zstandard==0.25.0 2>&1 | grep -vi '^WARNING' || true
for pkg in mosaicml mosaicml_streaming torch_optimi omegaconf boto3 botocore zstandard; do
  compgen -G "$dir/${pkg}-*.whl" > /dev/null || { echo "gpu_wheels.sh: no $pkg wheel in $dir" >&2; exit 1; }
done
echo "$(ls "$dir"/*.whl | wc -l) wheels in $dir ($(du -sh "$dir" | cut -f1)); carry [\"$dir\", \".gpu-cache\"] with gpu_check.sh"
