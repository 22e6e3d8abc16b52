#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its image has jax, flax, optax, orbax, chex, absl-py, PyYAML, but
# no ml_collections), downloaded here into .whl/ (git-ignored) for the device call to carry.
set -eu
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "ml_collections>=1.0"
ls -l .whl
