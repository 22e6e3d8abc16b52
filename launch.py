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

import errno
import logging as py_logging
import os
import sys
import threading

if __name__ == "__main__":  # before anything else: glibc reads its tunables at process start
    from alphanet_jax import malloc_tunables

    malloc_tunables.reexec_with_tunables()

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # `configs` imports from any cwd

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_string("mode", "", "Comma-separated tasks (train, evaluate, search, export, latency); default: config.run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    verbose = flags.FLAGS.verbosity >= 1  # --verbosity=1: library logs, and tracebacks for every error
    if not verbose:
        logging.set_verbosity(logging.WARNING)
        _quiet_library_noise()
    from alphanet_jax import errors, mesh, tasks  # after flag parsing: jax starts here

    mesh.hide_gpus_from_tensorflow()
    try:
        tasks.run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.mode)
    except (errors.AlphanetError, OSError) as e:
        # The package's own errors (bad inputs, stopped runs) and file operations that failed on a user's
        # path (missing, not permitted, read-only, full): one line. Anything else (a descriptor leak, a
        # dropped connection, ...) is a bug or an outage and keeps its traceback.
        if verbose or not (isinstance(e, errors.AlphanetError) or e.errno in _USER_PATH_ERRNOS):
            raise
        _finish_background_threads()
        _exit_with_error(errors.os_error_message(e) if isinstance(e, OSError) else str(e))


_USER_PATH_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                               errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG})


def _quiet_library_noise() -> None:
    """Keeps the after-effects of an error that main reports out of the output (--verbosity=1 shows them)."""
    logging.get_absl_handler().addFilter(_LibraryTracebacks())
    previous = sys.unraisablehook

    def unraisable(u):
        # TensorStore writes that complete after Orbax closed its event loop (a failed save).
        if not (u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed"):
            previous(u)

    sys.unraisablehook = unraisable


class _LibraryTracebacks(py_logging.Filter):
    """Drops the tracebacks that Orbax logs for errors in its background threads, and asyncio's
    'exception was never retrieved' about the same errors: Orbax re-raises them in the main thread,
    where they get their one line (a full disk made ~30 tracebacks around the one useful line)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.name == "asyncio" and "exception was never retrieved" in str(record.msg):
            return False
        return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def _finish_background_threads() -> None:
    """Lets Orbax's threads (a save's commit, the clean-up of temporary checkpoint directories) end before
    exiting: one still running at interpreter shutdown fails with 'cannot schedule new futures' tracebacks."""
    for t in threading.enumerate():
        if type(t).__module__.startswith("orbax.") and t is not threading.current_thread():
            threading.Thread.join(t, timeout=60)  # not Orbax's override, which re-raises the thread's error


def _exit_with_error(message: str) -> None:
    print(f"alphanet-jax: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl's parser, with a config file that cannot be loaded and config-override typos reported as one
    line instead of a traceback."""
    try:
        rest = flags.FLAGS(argv)
    except (KeyError, AttributeError, TypeError, ValueError, OSError, flags.Error) as e:
        _exit_with_error(_config_file_error(e) or _flag_error(e))
    message = _config_file_error()
    if message:
        _exit_with_error(message)
    return rest


def _config_file_error(e: Exception | None = None) -> str | None:
    """config_flags defers a config file's load error to the config's first use (an override on the
    command line, or the run): report it at once."""
    value = flags.FLAGS["config"].value
    error = None if isinstance(value, ml_collections.ConfigDict) else getattr(value, "_error", None)
    if error is None and isinstance(e, OSError) and "failure to load" in str(e):
        error = e.__cause__ or e
    if error is None:
        return None
    reason = str(error).strip().splitlines()[-1].strip()
    known = sorted(f"configs/{f}" for f in os.listdir(os.path.join(HERE, "configs"))
                   if f.endswith(".py") and not f.startswith("_") and f != "common.py")
    return f"cannot load the --config file: {reason} (the configs: {', '.join(known)})"


def _flag_error(e: Exception) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)  # a KeyError's str() adds quotes
    if "Error whilst parsing config file" in text:  # the config file's get_config(arg) raised
        flag = text.split(": Error whilst parsing config file")[0].removeprefix("flag ")
        last = text.strip().splitlines()[-1].strip()
        return f"{flag}: {last.split(': ', 1)[-1]}"
    return f"bad --config override: {text}"


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
