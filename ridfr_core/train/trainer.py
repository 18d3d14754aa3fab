"""The training loop: models, data, optimiser, the losses of both stages, validation and logging."""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import load_content
from ..backends.ridfr import files as content_files
from ..backends.ridfr.denoiser import RIDFRDenoiser
from ..weights import adapter_files, checkpoints
from ..backends.ridfr.controlnet import ContentControlNet, lq_to_latent_size
from ..data.datasets import AlignDataset, FaceDataset, NoiseSpec, StepBatchSampler, make_loader
from ..data.streams import STREAM_VALIDATION, sample_rng
from ..data.degrade import DegradationConfig
from ..pipeline import place
from ..run_folder import check_new_run, clear_previous_run, remove_leftovers
from .options import ConfigError, TrainConfig
from .prepare import prepare_data
from .state import TrainingState

logger = logging.getLogger(__name__)


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    has_gpu = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    if config.mixed_precision != "no" and not has_gpu:
        # Half-precision training is for GPUs: CPU half kernels are slow (fp16 several times slower than fp32).
        # The tests still drive CPU training steps in fp16/bf16 with their own Accelerator, to catch dtype bugs.
        raise ConfigError(f"mixed_precision: '{config.mixed_precision}' needs a GPU; on CPU use "
                          "--set mixed_precision=no.")
    return Accelerator(mixed_precision=config.mixed_precision, project_dir=config.out)


class Trainer(TrainingState):
    """One training run: models, data, optimiser and state, built from a validated :class:`TrainConfig`."""

    def __init__(self, config: TrainConfig, accelerator=None):
        self.config = config
        self.accelerator = accelerator or make_accelerator(config)
        self.out = Path(config.out)
        self.checkpoint_folder = self.out / "checkpoints"
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision,
                                                                                torch.float32)
        self.step = 0
        self.skipped_at_load = 0
        self.writer = None  # TensorBoard, main process only, opened by run()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.load_models()
        self.data = prepare_data(config, self.accelerator)
        self.dataset = self.make_dataset()
        self.make_optimiser()

    # -- setup
    def load_models(self) -> None:
        from diffusers import DDPMScheduler

        c = self.config
        base = checkpoints.load_base(c.base, c.config_dir, c.cache_dir)
        self.scheduler_config = base.scheduler_config
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        if self.noise_scheduler.config.prediction_type != "epsilon":
            raise ConfigError(f"base: {c.base} has prediction_type={self.noise_scheduler.config.prediction_type!r}; "
                              "RIDFR trains eps-prediction on Stable Diffusion 1.5 (prediction_type 'epsilon').")
        # The content module starts from the plain UNet (stage 1 never sees the FaceID LoRA).
        content = load_content(c.init_content) if c.init_content else ContentControlNet.from_unet(base.unet)
        if c.stage == "align" and not c.init_content:
            logger.warning("init_content is not set: alignment starts from a fresh content module. The paper "
                           "finetunes the weights of stage 'content' (pass --init-content <out>/ridfr-content.safetensors).")
        self.adapter = None
        if c.stage == "align":
            self.adapter, lora = adapter_files.load_identity_adapter(c.adapter, base.unet)
            adapter_files.apply_weight_deltas(base.unet, lora, 1.0)
            place(self.adapter, self.device, self.weight_dtype).requires_grad_(False).eval()
        self.unet = place(base.unet, self.device, self.weight_dtype).requires_grad_(False).eval()
        self.vae = place(base.vae, self.device, self.weight_dtype).requires_grad_(False).eval()
        self.empty_prompt = base.empty_prompt.to(self.device)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        content = place(content, self.device, torch.float32).requires_grad_(True).train()
        if c.gradient_checkpointing:
            content.enable_gradient_checkpointing()
            self.unet.enable_gradient_checkpointing()  # gradients flow through the frozen UNet to the residuals
        self.ema = copy.deepcopy(content).requires_grad_(False).eval() if c.ema_decay > 0 else None
        self.content = content

    def make_dataset(self) -> FaceDataset:
        c = self.config
        noise = NoiseSpec(self.unet.config.in_channels, c.resolution // self.vae_factor,
                          self.noise_scheduler.config.num_train_timesteps)
        degradation = DegradationConfig.from_dict(c.degradation)
        if c.stage == "content":
            return FaceDataset(self.data.paths, c.resolution, degradation, noise, c.seed)
        return AlignDataset(self.data.groups, self.data.cache, self.data.root, c.resolution, degradation, noise, c.seed)

    def make_optimiser(self) -> None:
        from diffusers.optimization import get_scheduler

        c = self.config
        optimiser_class = torch.optim.AdamW
        if c.use_8bit_adam:
            try:
                import bitsandbytes
            except ImportError:
                raise ConfigError("use_8bit_adam: bitsandbytes is not installed; pip install bitsandbytes (CUDA "
                                  "GPUs), or set use_8bit_adam=false.") from None
            optimiser_class = bitsandbytes.optim.AdamW8bit
        optimiser = optimiser_class(self.content.parameters(), lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                    weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
        # Stepped once per optimiser step by us (not accelerate, which would step it once per process).
        self.lr_scheduler = get_scheduler(c.lr_scheduler, optimiser, num_warmup_steps=c.lr_warmup_steps,
                                          num_training_steps=c.max_steps)
        self.model, self.optimiser = self.accelerator.prepare(self.content, optimiser)
        self.denoiser = RIDFRDenoiser(self.unet, self.model, self.adapter)

    # -- losses
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Eq. 2 (content) or Eq. 6 (align) for one micro-batch from the data loader."""
        device, dtype = self.device, self.weight_dtype
        with torch.no_grad():
            posterior = self.vae.encode(batch["target"].to(device, dtype)).latent_dist
            latents = posterior.mean + posterior.std * batch["posterior_noise"].to(device, posterior.mean.dtype)
            latents = latents.float() * self.vae.config.scaling_factor
        noise = batch["noise"].to(device)
        timesteps = batch["timestep"].to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        lq = lq_to_latent_size(batch["lq"].to(device), noisy.shape[-2:])  # once, not once per ID reference
        text = self.empty_prompt.expand(noisy.shape[0], -1, -1)
        if self.config.stage == "content":
            eps = self.denoiser(noisy, timesteps, text, lq).float()
            diffusion = F.mse_loss(eps, noise)
            return {"loss": diffusion, "diffusion": diffusion}
        from ..identity.adapter import Identity

        with torch.no_grad():
            # float32 before cat: CPU autocast refuses float64 inputs to the ops it promotes
            identity = Identity(torch.cat([batch["id1_embed"].float(), batch["id2_embed"].float()]).to(device),
                                torch.cat([batch["id1_clip"].float(), batch["id2_clip"].float()]).to(device))
            id_tokens = self.adapter.identity_tokens(identity)
        twice = lambda x: torch.cat([x, x])  # noqa: E731 - one forward for both references
        eps_id1, eps_id2 = self.denoiser(twice(noisy), twice(timesteps), twice(text), twice(lq), id_tokens).float().chunk(2)
        diffusion = (F.mse_loss(eps_id1, noise) + F.mse_loss(eps_id2, noise)) / 2
        align = F.mse_loss(eps_id1, eps_id2)
        return {"loss": diffusion + self.config.align_weight * align, "diffusion": diffusion, "align": align}

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches; returns local mean losses."""
        totals: dict[str, torch.Tensor] = {}
        count = len(micro_batches)
        for index, batch in enumerate(micro_batches):
            last = index == count - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    losses = self.compute_losses(batch)
                self.accelerator.backward(losses["loss"] / count)
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach() / count
            self.skipped_at_load += int(batch["skipped"].sum())
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimiser.step()
        if not self.optimiser.step_was_skipped:  # fp16 loss scaler found inf/NaN gradients: no step taken
            self.lr_scheduler.step()
        self.optimiser.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for shadow, param in zip(self.ema.parameters(), self.content.parameters()):
                    shadow.lerp_(param, 1.0 - self.config.ema_decay)
        self.step += 1
        return dict(zip(totals, torch.stack(list(totals.values())).tolist()))  # one device sync per step

    def exported_path(self) -> Path:
        return self.out / f"ridfr-{self.config.stage}.safetensors"

    def export_weights(self) -> None:
        """The RIDFR content file LoadRIDFR reads (EMA weights when EMA is on)."""
        module = self.ema if self.ema is not None else self.content
        c = self.config
        content_files.save_content(module, self.exported_path(), {
            "stage": c.stage, "step": str(self.step), "ema": str(self.ema is not None),
            "base": Path(c.base).name, "adapter": Path(c.adapter).name if c.adapter else "",
            "trainer": "ridfr_core.train"})

    # -- validation
    def validation_batch(self) -> dict:
        samples = [self.dataset_validation_sample(i) for i in range(self.config.validation_count)]
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def dataset_validation_sample(self, number: int) -> dict:
        """Fixed samples spread over the data, with their own fixed degradation and ID photos."""
        from ..data.datasets import read_face

        dataset = self.dataset
        index = number * len(dataset) // max(self.config.validation_count, 1)
        image = read_face(dataset.paths[index], self.config.resolution)
        return dataset.make_sample(image, index, sample_rng(self.config.seed, STREAM_VALIDATION, number))

    @torch.no_grad()
    def validate(self) -> None:
        """Restore the fixed validation LQs; write ``samples/step-N.png`` (LQ | restored | target rows)."""
        if self.config.validation_count == 0 or not self.accelerator.is_main_process:
            return
        from PIL import Image

        from ..identity.adapter import Identity
        from ..pipeline import PipelineModules, RIDFRPipeline

        if not hasattr(self, "_validation"):
            self._validation = self.validation_batch()
        batch = self._validation
        # The trained module's forward carries accelerate's autocast + fp32-output wrapper: its fp32
        # residuals would meet the fp16 UNet outside autocast. Sample with a plain copy, as users do.
        source = self.ema if self.ema is not None else self.content
        content = place(self.accelerator.unwrap_model(copy.deepcopy(source), keep_fp32_wrapper=False), self.device,
                        self.weight_dtype)
        models = PipelineModules(self.unet, self.vae, content, self.empty_prompt, self.scheduler_config, self.adapter)
        pipeline = RIDFRPipeline(models, self.device, dtype=self.weight_dtype)
        identity = None
        if self.adapter is not None:
            identity = Identity(batch["id1_embed"], batch["id1_clip"].float())
        lq = (batch["lq"] + 1) / 2
        restored = pipeline(lq.to(self.device), identity, steps=self.config.validation_steps, seed=self.config.seed)
        rows = torch.cat([lq, restored.float().cpu(), (batch["target"] + 1) / 2], dim=3)  # side by side
        grid = torch.cat(list(rows), dim=1).clamp(0, 1)
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        if self.writer is not None:
            self.writer.add_image("validation/lq_restored_target", grid, self.step)
        del pipeline, content

    # -- the loop
    def run(self, resume: str = "auto", overwrite: bool = False) -> Path:
        """Train to max_steps; ``overwrite`` (with ``resume='none'``) first deletes the run already in ``out``.
        A new run over an earlier one is refused here too (the CLI checks before loading the models)."""
        c, acc = self.config, self.accelerator
        check_new_run(self.out, c.stage, resume, overwrite, c.init_content)
        if acc.is_main_process:
            remove_leftovers(self.out)
            if overwrite:
                clear_previous_run(self.out, c.stage)
        acc.wait_for_everyone()
        folder = self.find_resume(resume)
        if folder is not None:
            self.load_checkpoint(folder)
        if acc.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "logs" / c.stage))
        if self.step >= c.max_steps:
            logger.info("Already at step %d of max_steps=%d; nothing to train.", self.step, c.max_steps)
            if acc.is_main_process:
                self.export_weights()
            return self.exported_path()
        sampler = StepBatchSampler(c.batch_size, c.gradient_accumulation_steps, acc.num_processes, acc.process_index,
                                   self.step, c.max_steps)
        batches = iter(make_loader(self.dataset, sampler, c.num_workers, self.device.type == "cuda"))
        from tqdm.auto import tqdm

        bar = tqdm(total=c.max_steps, initial=self.step, desc=f"RIDFR {c.stage}", unit="step",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        window_start, window_steps = time.perf_counter(), 0
        while self.step < c.max_steps:
            losses = self.train_step([next(batches) for _ in range(c.gradient_accumulation_steps)])
            window_steps += 1
            if not all(math.isfinite(v) for v in losses.values()):
                raise FloatingPointError(f"step {self.step}: loss is {losses}; lower learning_rate, use "
                                         "mixed_precision=bf16/no, or check --init-content and --base for NaN "
                                         "weights. The last checkpoint is intact.")
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()} | {"lr": f"{self.lr_scheduler.get_last_lr()[0]:.1e}"})
            if c.log_every and self.step % c.log_every == 0:
                elapsed = time.perf_counter() - window_start
                self.log(losses, window_steps * c.batch_size / max(elapsed, 1e-9))
                window_start, window_steps = time.perf_counter(), 0
            if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                self.save_checkpoint()
            if c.validation_every and self.step % c.validation_every == 0:
                self.validate()
        bar.close()
        if not (c.checkpoint_every and self.step % c.checkpoint_every == 0):
            self.save_checkpoint()
        if not (c.validation_every and self.step % c.validation_every == 0):
            self.validate()
        if self.writer is not None:
            self.writer.close()
        return self.exported_path()

    def log(self, losses: dict[str, float], samples_per_second: float) -> None:
        reduced = {k: self.accelerator.reduce(torch.tensor(v, device=self.device), "mean").item()
                   for k, v in losses.items()}
        if self.writer is None:
            return
        for key, value in reduced.items():
            self.writer.add_scalar(f"train/{key}", value, self.step)
        self.writer.add_scalar("train/lr", self.lr_scheduler.get_last_lr()[0], self.step)
        self.writer.add_scalar("train/samples_per_second", samples_per_second, self.step)
        self.writer.add_scalar("data/skipped_at_load", self.skipped_at_load, self.step)
