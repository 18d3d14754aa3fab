"""Train RIDFR's content module: ``python -m ridfr_core.train --stage content|align ...``.

Two stages, as in the paper (Sec. 3.2, 3.3, 4.1):

- ``content``: the Content Injection Module (7-channel ControlNet) learns eps-prediction from the
  online-degraded LQ face, SD1.5 UNet and VAE frozen, no identity (Eq. 2).
- ``align``: Alignment Learning. The FaceID-Plus identity module (adapter + its LoRA, fused into
  the frozen UNet) is frozen at its published weights; the content module is finetuned with
  ``L = mean(L_diff(ID1), L_diff(ID2)) + align_weight * ||eps(ID1) - eps(ID2)||^2`` at the same noisy
  latent, timestep and noise (Eq. 4-6). Both eps come from one batched forward.

The same trainer fine-tunes any content backend from its published weights (``--backend restorerid --stage align
--init RestorerIDFull.ckpt``): the backend says which of its parts are trained (``--train-parts``), with which
prompt, condition dropout and identity scale it was trained, what its denoiser needs (RestorerID: identity tokens
for every face, the null identity's for dropped ones; CLIP on BGR crops) and in which format its file is written
(:class:`~ridfr_core.backends.interface.TrainingRecipe` and the training methods of ``ContentBackend``).

Every hyper-parameter has a default in :class:`~.options.TrainConfig`, the paper's content stage; a
stage's JSON config (``configs/train_content.json``, ``configs/train_align.json``) holds what differs (the
learning rate, which the paper does not give, is 1e-5 as in ControlNet and IP-Adapter training).
Multi-GPU/multi-node and mixed precision come from accelerate (``batch_size`` stays the total batch: N processes
train the weights of one, to float tolerance; on a machine without GPUs, ``--multi_gpu`` runs CPU processes over
gloo)::

    accelerate launch --multi_gpu --num_processes 8 -m ridfr_core.train --stage content --data ffhq512/ \
        --base sd15.safetensors --out runs/c

Each process computes its slice of the missing identity-cache photos; the main process writes the checkpoints,
every process's RNG state included, and a run resumes on another number of processes (one that divides
batch_size).

Checkpoints (``<out>/checkpoints/step-NNNNNNNN``) are written to a temporary folder and renamed, so
a kill leaves the previous one intact; a rerun with the same ``--out`` resumes from the newest intact
one with model, EMA, optimiser, LR schedule, loss scaler, RNG and data position restored. A new run
(``--resume none``) refuses a folder that holds one unless ``--overwrite`` (see
:mod:`ridfr_core.run_folder`). The weights users load (``<out>/<backend>-<stage>.safetensors``, in the backend's
format, with what they were fine-tuned from in the metadata) are refreshed at each checkpoint.

Modules: :mod:`.options` (TrainConfig and the command line), :mod:`.prepare` (the data of a run),
:mod:`.processes` (the accelerator and what its processes share each step), :mod:`.state` (checkpoint files and
resume), :mod:`.trainer` (the loop), :mod:`.cli` (``main``).
"""

from .cli import main
from .options import CONFIG_DIR, ConfigError, TrainConfig, build_parser, config_from_args
from .state import complete_checkpoints
from .trainer import Trainer

__all__ = ["main", "CONFIG_DIR", "ConfigError", "TrainConfig", "build_parser", "config_from_args",
           "complete_checkpoints", "Trainer"]
