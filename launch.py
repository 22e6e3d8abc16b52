r"""Train, evaluate, search and export AlphaNet supernets.

  python launch.py --config=configs/quickstart.py --workdir=/tmp/alphanet-quickstart
  python launch.py --config=configs/alphanet.py --workdir=DIR --config.data.root=/data/imagenet
  python launch.py --config=configs/alphanet.py --workdir=DIR --mode=evaluate --config.eval.subnets=a0,a6
  python launch.py --config=configs/alphanet.py --workdir=DIR --mode=search
  python launch.py --config=configs/alphanet.py --workdir=DIR --mode=export --config.export.max_mflops=400

Multi-host GPU clusters: add --config.distributed.coordinator_address=HOST:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I on every host (TPU pods and
SLURM: --config.distributed.auto=True).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `configs` imports from any cwd

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_string("mode", "", "Comma-separated tasks (train, evaluate, search, export); default: config.run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from alphanet_jax import mesh, tasks  # after flag parsing: jax starts here

    mesh.hide_gpus_from_tensorflow()
    try:
        tasks.run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.mode)
    except (ValueError, FileNotFoundError, tasks.TrainingError) as e:
        # Bad inputs (config, subnet, data, checkpoint) and stopped runs: one clear line, no traceback.
        if flags.FLAGS.verbosity >= 1:
            raise
        print(f"alphanet-jax: error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv):
    """absl's parser, with config-override typos reported as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"alphanet-jax: error: bad --config override: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
