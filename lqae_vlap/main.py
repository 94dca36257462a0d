"""Command line: ``python -m lqae_vlap.main --config=configs/FILE.py[:ARG] --workdir=DIR``.

Override any config value with ``--config.KEY=VALUE`` (e.g. ``--config.train.steps=100``).
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py), optionally with :ARG for get_config.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for a multi-process run (default: $JAX_COORDINATOR_ADDRESS; TPU pods "
    "and SLURM are detected without it).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the run (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (default: $JAX_PROCESS_ID).")


def _methods():
    # A plain dict, no registry: each entry builds the method's ``Method`` for the trainer.
    from lqae_vlap.methods import lqae, vlap

    return {"lqae": lqae.build, "vlap": vlap.build}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if "--verbosity" not in " ".join(sys.argv) and "-v=" not in " ".join(sys.argv):
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        # orbax also logs each failure of its threads with a traceback, then raises it in the
        # caller, where the trainer turns it into the one line it prints: keep only that line.
        logging.get_absl_logger().addFilter(_drop_orbax_records)
        sys.unraisablehook = _quiet_orbax_leftovers(sys.unraisablehook)
    if config.mode == "plan":
        _fake_devices_for_plan(config)
    from lqae_vlap.train import distributed

    distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from lqae_vlap.train import trainer

    methods = _methods()
    if config.method not in methods:
        raise ValueError(f"config.method={config.method!r} is not known; use one of "
                         f"{sorted(methods)}")
    build = methods[config.method]
    if config.mode == "train":
        trainer.train_and_evaluate(config, _WORKDIR.value, build)
    elif config.mode == "eval":
        trainer.evaluate_checkpoint(config, _WORKDIR.value, build)
    elif config.mode == "plan":
        from lqae_vlap.train import plan

        plan.plan(config, build)
    else:
        raise ValueError(f"config.mode={config.mode!r} is not known; use 'train', 'eval' or "
                         "'plan'")


def _drop_orbax_records(record) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname or record.levelno >= std_logging.CRITICAL


def _quiet_orbax_leftovers(hook):
    """An unraisable-exception hook that drops what a failed orbax restore leaves behind (the
    read coroutines it abandoned, tensorstore callbacks into its closed event loop) and passes
    anything else on: the failure itself reached the trainer, which reports it in one line."""

    def quiet(unraisable) -> None:
        exc = unraisable.exc_value
        where = getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")
        if (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or \
                f"{os.sep}orbax{os.sep}" in where:
            return
        hook(unraisable)

    return quiet


def _fake_devices_for_plan(config) -> None:
    """Without an accelerator, plan on ``config.plan.num_devices`` fake CPU devices.

    Must run before JAX initialises its backends.
    """
    import glob

    if glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*"):
        return  # a GPU or TPU host: plan on the real devices
    count = int(config.plan.num_devices)
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags_ = [f for f in os.environ.get("XLA_FLAGS", "").split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags_ + [f"--xla_force_host_platform_device_count={count}"])


def _flag_error_line(error: Exception, argv: list[str]) -> str:
    """One line from absl / ml_collections flag errors, which nest tracebacks and repr()s."""
    text = str(error).replace("\\n", "\n").strip("'\"")
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if isinstance(error, (AttributeError, KeyError)) and lines:
        key = re.findall(r"[A-Za-z_]\w*", lines[0])[0]
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                     and a.split("=")[0].split(".")[-1] == key), f"--config...{key}")
        hint = f" ({lines[-1]})" if len(lines) > 1 else ""
        return f"{flag}: the config has no key {key!r}{hint}"
    if "earlier failure to load" in text:
        cause = error.__cause__ or error
        return f"--config: cannot load the config file: {' '.join(str(cause).split())}"
    if "Traceback" in text:  # an exception inside get_config(): keep the flag and the cause
        return f"{lines[0].split(': Error whilst')[0]}: get_config failed: {lines[-1]}"
    return lines[0] if len(lines) == 1 else " ".join(lines)


def _config_file_first(argv: list[str]) -> list[str]:
    """argv with ``--config=FILE`` (or ``--config FILE``) moved before every other flag:
    ml_collections defines the ``--config.KEY`` overrides only once the file flag is parsed, so
    an override written before it would otherwise be an unknown flag."""
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            break
        if arg.startswith("--config="):
            return [argv[0], arg, *argv[1:i], *argv[i + 1:]]
        if arg == "--config" and i + 1 < len(argv):
            return [argv[0], arg, argv[i + 1], *argv[1:i], *argv[i + 2:]]
    return argv


def _parse_flags(argv: list[str]) -> list[str]:
    given, argv = argv, _config_file_first(argv)
    if list(sys.argv) == list(given):
        sys.argv[:] = argv  # the config flag reads its overrides from sys.argv itself
    try:
        rest = flags.FLAGS(argv)
        config = _CONFIG.value
        if config is not None:
            config.get("method")  # a file that failed to load raises here (ml_collections' _ErrorConfig)
    except Exception as e:  # absl and ml_collections raise several types for a bad flag
        _die(f"config error: {_flag_error_line(e, argv)}")
    if config is None:
        _die("missing --config: pass --config=configs/FILE.py (see configs/)")
    if not _WORKDIR.value:
        _die("missing --workdir: pass --workdir=DIR for checkpoints and metrics")
    return rest


def _die(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def run() -> None:
    from lqae_vlap.train.checkpoint import CheckpointError
    from lqae_vlap.train.trainer import Interrupted, TrainingDiverged
    from lqae_vlap.train.workdir import WorkdirError

    own_errors = (ValueError, CheckpointError, WorkdirError, TrainingDiverged)  # say it all
    user_errors = (FileNotFoundError, KeyError, *own_errors)
    try:
        app.run(main, flags_parser=_parse_flags)
    except user_errors as e:
        # Bad input (paths, config values, checkpoints, the workdir) or a run that diverged:
        # one line that names it, no traceback.
        _die(str(e) if isinstance(e, own_errors) else f"{type(e).__name__}: {e}")
    except Interrupted as e:  # Ctrl-C, after saving (the line is empty off process 0)
        if str(e):
            print(str(e), flush=True)
        sys.exit(130)
    except KeyboardInterrupt:  # Ctrl-C while starting, or a second one while saving
        print("error: interrupted (Ctrl-C) with nothing saved since the newest complete "
              "checkpoint; run the same command again to resume from it", file=sys.stderr,
              flush=True)
        sys.exit(130)


if __name__ == "__main__":
    run()
