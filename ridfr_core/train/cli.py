"""``python -m ridfr_core.train``: options -> a checked run folder -> :class:`~.trainer.Trainer`; errors as one line."""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
from pathlib import Path

from ..backends import BACKENDS
from ..weights import checkpoints
from ..data.streams import DataError
from ..io.folder_lock import FolderInUse, FolderLock
from ..run_folder import RunFolderError, check_new_run, require_writable
from .options import ConfigError, build_parser, config_from_args
from .prepare import prepare_data
from .processes import NonFiniteLoss
from .trainer import Trainer, make_accelerator


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        require_writable(Path(config.out))
        with run_lock(Path(config.out)):
            if args.prepare_only:
                accelerator = make_accelerator(config)
                prepared = prepare_data(config, accelerator)
                print(f"{prepared.image_count} usable images; report in {Path(config.out) / 'data_report.json'}")
                return 0
            check_new_run(Path(config.out), config.stage, config.weights_name, args.resume, args.overwrite,
                          config.init_content)
            path = Trainer(config).run(args.resume, args.overwrite)
    except (ConfigError, DataError, checkpoints.CheckpointError, RunFolderError, FolderInUse,
            FloatingPointError) as error:
        if not isinstance(error, NonFiniteLoss) or error.main:  # raised on every process alike: said once
            print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. the disk filled up or --out became unwritable during the run
        print(f"error: {error}. Fix that and rerun: the run resumes from its last checkpoint.", file=sys.stderr)
        return 2
    print(f"{BACKENDS[config.backend].label} content weights: {path}")
    return 0


def run_lock(out: Path):
    """One run per --out, locked by the first process of the run only: under ``accelerate launch`` every process
    runs this command (and the accelerator that knows the ranks is made later, by the Trainer), so the rank is
    read from the launcher's environment as accelerate reads it."""
    from accelerate.utils import get_int_from_env

    if get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0) != 0:
        return nullcontext()
    return FolderLock(out)


def stop_on_sigterm(signum, frame):
    """``kill``: unwind like Ctrl-C, so half-written files are removed on the way out."""
    raise SystemExit(128 + signum)
