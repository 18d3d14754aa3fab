"""The training state on disk: checkpoint folders written atomically (model, EMA, optimiser, LR schedule, loss
scaler, RNG per process) and read back for an exact resume."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..weights import checkpoints
from ..io.atomic import fsync_folder, write_json_atomic
from ..run_folder import checkpoint_problem
from .options import RESUMABLE_CHANGES, ConfigError

logger = logging.getLogger(__name__)


STATE_FORMAT = "ridfr-train-state"
STATE_VERSION = 1
CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")


def optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimiser state -> (tensors for safetensors, everything else as JSON)."""
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for param_id, values in state["state"].items():
        entry = meta["state"][str(param_id)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                name = f"{param_id}.{key}"
                tensors[name] = value
                entry[key] = {"tensor": name}
            else:
                entry[key] = value
    return tensors, meta


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {int(param_id): {key: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
                             for key, value in values.items()}
             for param_id, values in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Global RNG states of this process. The training loop draws nothing from them (every sample's
    randomness is derived from the seed and its number), but library code may: restoring them keeps
    a resume exact anyway."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    meta = {"python": [version, list(internal), gauss], "numpy": [numpy_state[0], int(numpy_state[2]),
                                                                   int(numpy_state[3]), float(numpy_state[4])]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, position, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in tensors]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)



def complete_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (a half-written one is still named .step-*.partial)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))




class TrainingState:
    """The checkpoint side of :class:`~.trainer.Trainer`: save, find and load its state."""

    def save_checkpoint(self) -> Path:
        """Write the full training state to a temporary folder, then rename it into place."""
        acc = self.accelerator
        final = self.checkpoint_folder / f"step-{self.step:08d}"
        partial = self.checkpoint_folder / f".step-{self.step:08d}.partial"
        try:
            self.write_partial_checkpoint(partial)
            if acc.is_main_process:
                fsync_folder(partial)
                if final.exists():
                    shutil.rmtree(final)
                os.rename(partial, final)
        except BaseException:  # failed or killed (SIGTERM, Ctrl-C): no weights-sized half checkpoint stays behind
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        if acc.is_main_process:
            fsync_folder(self.checkpoint_folder)
            if self.writer is not None:  # the loss log as far as the checkpoint survives a kill too
                self.writer.flush()
            for old in complete_checkpoints(self.checkpoint_folder)[:-max(self.config.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
            self.export_weights()
        acc.wait_for_everyone()
        return final

    def write_partial_checkpoint(self, partial: Path) -> None:
        """The main process writes the whole folder, the RNG states of every process included (gathered: one
        folder on one file system, even when the processes run on several machines)."""
        acc = self.accelerator
        states = [rng_state()]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            states = gather_object(states)
        if not acc.is_main_process:
            return
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save = checkpoints.save_safetensors_atomic
        for rank, (tensors, meta) in enumerate(states):
            save(tensors, partial / f"rng-{rank}.safetensors", {})
            write_json_atomic(partial / f"rng-{rank}.json", meta)
        save(self.content.state_dict(), partial / "content.safetensors", {})
        if self.ema is not None:
            save(self.ema.state_dict(), partial / "ema.safetensors", {})
        tensors, meta = optimizer_to_files(self.optimiser.state_dict())
        save(tensors, partial / "optimizer.safetensors", {})
        write_json_atomic(partial / "optimizer.json", meta)
        write_json_atomic(partial / "lr_scheduler.json", self.lr_scheduler.state_dict())
        write_json_atomic(partial / "config.json", self.config.to_dict())
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None
        write_json_atomic(partial / "state.json", {"format": STATE_FORMAT, "version": STATE_VERSION,
                                                   "step": self.step, "skipped_at_load": self.skipped_at_load,
                                                   "grad_scaler": scaler})

    def find_resume(self, resume: str) -> Path | None:
        if resume == "none":
            return None
        if resume == "auto":
            problems = []
            for folder in reversed(complete_checkpoints(self.checkpoint_folder)):
                problem = checkpoint_problem(folder)
                if problem is None:
                    if problems:
                        logger.warning("Damaged checkpoint(s) skipped: %s.", "; ".join(problems))
                    return folder
                problems.append(f"{folder.name}: {problem}")
            if problems:
                raise ConfigError(f"--resume auto: no intact checkpoint in {self.checkpoint_folder} "
                                  f"({'; '.join(problems)}). Pass --resume none --overwrite to start again.")
            return None
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise ConfigError(f"--resume: {path} is not a finished checkpoint folder (no state.json); pass a "
                              f"{self.checkpoint_folder}/step-NNNNNNNN folder, 'auto' or 'none'.")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ConfigError(f"--resume: {path} is damaged ({problem}); pass an intact checkpoint folder or 'auto'.")
        return path

    def load_checkpoint(self, folder: Path) -> None:
        def load_file(path: str) -> dict[str, torch.Tensor]:
            return checkpoints.read_state_dict(path, f"--resume {folder}")

        state = json.loads((folder / "state.json").read_text())
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ConfigError(f"--resume: {folder} is not a RIDFR training checkpoint of version {STATE_VERSION}.")
        saved = json.loads((folder / "config.json").read_text())
        current, defaults = self.config.to_dict(), type(self.config)().to_dict()  # an option newer than the run: default
        changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != current[k])
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise ConfigError(f"--resume: {folder} was trained with other settings ({details}). Resume with the same "
                              "options, or start a new run (--out elsewhere, or --resume none).")
        if self.config.lr_scheduler in ("linear", "cosine") and saved.get("max_steps") != self.config.max_steps:
            raise ConfigError(f"max_steps: {folder} was trained with max_steps={saved.get('max_steps')} and "
                              f"lr_scheduler={self.config.lr_scheduler!r}, whose learning rate depends on max_steps; "
                              f"resume with --max-steps {saved.get('max_steps')}, or start a new run.")
        self.content.load_state_dict(load_file(str(folder / "content.safetensors")))
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(folder / "ema.safetensors")))
        tensors = load_file(str(folder / "optimizer.safetensors"))
        self.optimiser.load_state_dict(optimizer_from_files(tensors, json.loads((folder / "optimizer.json").read_text())))
        self.lr_scheduler.load_state_dict(json.loads((folder / "lr_scheduler.json").read_text()))
        if self.accelerator.scaler is not None and state.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        rank = self.accelerator.process_index
        if (folder / f"rng-{rank}.json").is_file():
            restore_rng(load_file(str(folder / f"rng-{rank}.safetensors")),
                        json.loads((folder / f"rng-{rank}.json").read_text()))
        self.step, self.skipped_at_load = state["step"], state["skipped_at_load"]
        logger.info("Resumed from %s at step %d.", folder, self.step)
