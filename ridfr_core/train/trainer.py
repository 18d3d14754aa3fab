"""The training loop: models, data, optimiser, the losses of both stages, validation and logging."""

from __future__ import annotations

import copy
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import BACKENDS, load_content, sd15_part
from ..weights import adapter_files, checkpoints
from ..data.datasets import AlignDataset, FaceDataset, NoiseSpec, StepBatchSampler, make_loader
from ..data.streams import STREAM_VALIDATION, sample_rng
from ..data.degrade import DegradationConfig
from ..pipeline import place
from ..run_folder import check_new_run, clear_previous_run, remove_leftovers
from .options import ConfigError, TrainConfig
from .prepare import prepare_data
from .processes import losses_of_every_process, make_accelerator
from .state import TrainingState

logger = logging.getLogger(__name__)


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
        """Base, content module, identity module and the denoiser, as the backend builds them; only the parts the
        backend names for ``train_parts`` require gradients."""
        from diffusers import DDPMScheduler

        c = self.config
        backend = self.backend = BACKENDS[c.backend]
        recipe = self.recipe = backend.training
        # the training prompt and those the validation samples with
        base = checkpoints.load_base(c.base, c.config_dir, c.cache_dir, prompts=backend.prompt_tokens, sd15_part=sd15_part)
        self.prompts = {text: states.to(self.device) for text, states in base.prompts.items()}
        self.scheduler_config = base.scheduler_config
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        if self.noise_scheduler.config.prediction_type != "epsilon":
            raise ConfigError(f"base: {c.base} has prediction_type={self.noise_scheduler.config.prediction_type!r}; "
                              "RIDFR trains eps-prediction on Stable Diffusion 1.5 (prediction_type 'epsilon').")
        # A new content module starts from the plain UNet (stage 1 never sees the FaceID LoRA).
        content = load_content(c.init_content, c.cache_dir) if c.init_content else backend.new_content(base.unet)
        if c.stage == "align" and not c.init_content:
            logger.warning("init_content is not set: alignment starts from a fresh content module. The paper "
                           "finetunes the weights of stage 'content' (pass --init-content <out>/ridfr-content.safetensors).")
        backend.check_fits(content, base.unet, f"--init {c.init_content}")
        self.adapter = self.null_tokens = None
        if c.stage == "align":
            shortcut = backend.faceid_shortcut(Path(c.adapter))
            self.adapter, lora = adapter_files.load_identity_adapter(c.adapter, base.unet, shortcut)
            adapter_files.fuse_lora(base.unet, lora, 1.0)
            place(self.adapter, self.device, self.weight_dtype).requires_grad_(False).eval()
        self.unet = place(base.unet, self.device, self.weight_dtype).requires_grad_(False).eval()
        self.vae = place(base.vae, self.device, self.weight_dtype).requires_grad_(False).eval()
        self.text = self.prompts[recipe.prompt]
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        content = place(content, self.device, torch.float32).requires_grad_(False).train()
        try:
            self.trainable = backend.trainable_parameters(content, c.parts())
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for param in self.trainable:
            param.requires_grad_(True)
        if c.stage == "align" and (backend.null_identity_tokens or recipe.identity_dropout):
            self.null_tokens = self.compute_null_tokens()
        self.denoiser = backend.make_denoiser(self.unet, content, self.adapter)
        if c.gradient_checkpointing:
            backend.enable_gradient_checkpointing(self.denoiser)
        self.ema = copy.deepcopy(content).requires_grad_(False).eval() if c.ema_decay > 0 else None
        self.content = content
        trained = [name for name, param in content.named_parameters() if param.requires_grad]
        logger.info("Training %d of %d tensors of the %s (%.1fM of %.1fM parameters); everything else is frozen.",
                    len(trained), len(list(content.parameters())), backend.label,
                    sum(p.numel() for p in self.trainable) / 1e6, sum(p.numel() for p in content.parameters()) / 1e6)

    def compute_null_tokens(self) -> torch.Tensor:
        """The null identity's tokens (zero ArcFace embedding, CLIP features of a blank image), once: frozen."""
        from ..identity.adapter import null_identity

        clip_vision = checkpoints.load_clip_vision(self.config.clip_vision, self.config.config_dir).to(self.device)
        with torch.no_grad():
            tokens = self.adapter.identity_tokens(null_identity(clip_vision))
        del clip_vision
        return tokens

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
        optimiser = optimiser_class(self.trainable, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                    weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
        # Stepped once per optimiser step by us (not accelerate, which would step it once per process).
        self.lr_scheduler = get_scheduler(c.lr_scheduler, optimiser, num_warmup_steps=c.lr_warmup_steps,
                                          num_training_steps=c.max_steps)
        # The whole denoiser is the model (DDP syncs only what requires gradients): a backend's content module
        # need not be called through its own forward.
        self.model, self.optimiser = self.accelerator.prepare(self.denoiser, optimiser)

    # -- losses
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Eq. 2 (content) or Eq. 6 (align) for one micro-batch from the data loader."""
        device, dtype = self.device, self.weight_dtype
        with torch.no_grad():
            posterior = self.vae.encode(batch["target"].to(device, dtype)).latent_dist
            latents = posterior.mean + posterior.std * batch["posterior_noise"].to(device, posterior.mean.dtype)
            # contiguous: the VAE may return channels-last latents, whose backward through the UNet crashes
            # PyTorch's CPU kernels (a segfault in the RestorerID denoiser's backward)
            latents = latents.float().contiguous() * self.vae.config.scaling_factor
        noise = batch["noise"].to(device)
        timesteps = batch["timestep"].to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.no_grad():  # once, not once per ID reference
            # a backend that reads the LQ latent samples its VAE posterior with the sample's own noise (as
            # RestorerID's get_first_stage_encoding): resumes and any number of processes draw the same
            posterior_noise = batch["lq_posterior_noise"] if self.backend.sample_posterior else None
            lq = self.backend.content_input(self.content, batch["lq"].to(device), self.vae, noisy.shape[-2:],
                                            posterior_noise)
        draws = batch.get("condition_draws")
        if draws is not None and self.recipe.content_dropout:
            lq = torch.where((draws[:, 1] < self.recipe.content_dropout).to(device).view(-1, 1, 1, 1), 0, lq)
        text = self.text.expand(noisy.shape[0], -1, -1)
        if self.config.stage == "content":
            eps = self.model(noisy, timesteps, text, lq).float()
            diffusion = F.mse_loss(eps, noise)
            return {"loss": diffusion, "diffusion": diffusion}
        from ..identity.adapter import Identity

        twice = lambda x: torch.cat([x, x])  # noqa: E731 - one forward for both references
        with torch.no_grad():
            # float32 before cat: CPU autocast refuses float64 inputs to the ops it promotes
            identity = Identity(torch.cat([batch["id1_embed"].float(), batch["id2_embed"].float()]).to(device),
                                torch.cat([batch["id1_clip"].float(), batch["id2_clip"].float()]).to(device))
            id_tokens = self.adapter.identity_tokens(identity)
            if draws is not None and self.recipe.identity_dropout:  # both references: the align term is 0 there
                dropped = twice(draws[:, 0] < self.recipe.identity_dropout).to(device).view(-1, 1, 1)
                id_tokens = torch.where(dropped, self.null_tokens.to(id_tokens.dtype), id_tokens)
        eps_id1, eps_id2 = self.model(twice(noisy), twice(timesteps), twice(text), twice(lq), id_tokens,
                                      1.0, self.recipe.identity_scale).float().chunk(2)
        diffusion = (F.mse_loss(eps_id1, noise) + F.mse_loss(eps_id2, noise)) / 2
        align = F.mse_loss(eps_id1, eps_id2)
        return {"loss": diffusion + self.config.align_weight * align, "diffusion": diffusion, "align": align}

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches; returns the step's mean losses
        over every process."""
        totals: dict[str, torch.Tensor] = {}
        count, skipped = len(micro_batches), 0
        for index, batch in enumerate(micro_batches):
            last = index == count - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    losses = self.compute_losses(batch)
                self.accelerator.backward(losses["loss"] / count)
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach() / count
            skipped += int(batch["skipped"].sum())
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimiser.step()
        if not self.optimiser.step_was_skipped:  # fp16 loss scaler found inf/NaN gradients: no step taken
            self.lr_scheduler.step()
        self.optimiser.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for shadow, param in zip(self.ema.parameters(), self.content.parameters()):
                    if param.requires_grad:  # frozen ones stay equal
                        shadow.lerp_(param, 1.0 - self.config.ema_decay)
        self.step += 1
        losses, skipped = losses_of_every_process(self.accelerator, totals, skipped, self.step)
        self.skipped_at_load += skipped
        return losses

    def exported_path(self) -> Path:
        return self.out / self.config.weights_name

    def export_weights(self) -> None:
        """The backend's content file that the CLI, eval and LoadRIDFR read (EMA weights when EMA is on)."""
        module = self.ema if self.ema is not None else self.content
        c = self.config
        init = Path(c.init_content) if c.init_content else None
        self.backend.save_trained(module, self.exported_path(), {
            "stage": c.stage, "step": str(self.step), "ema": str(self.ema is not None),
            "base": Path(c.base).name, "adapter": Path(c.adapter).name if c.adapter else "",
            "trainer": "ridfr_core.train", **(self.provenance() if init else {})}, init)

    def provenance(self) -> dict[str, str]:
        """What the exported file was fine-tuned from and with (init file's name, size and sha256, computed once)."""
        if not hasattr(self, "_provenance"):
            import hashlib

            c, init = self.config, Path(self.config.init_content)
            digest = hashlib.sha256()
            with open(init, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
            self._provenance = {
                "fine_tuned_from": init.name, "fine_tuned_from_size": str(init.stat().st_size),
                "fine_tuned_from_sha256": digest.hexdigest(), "align_weight": str(c.align_weight),
                "train_parts": ",".join(c.parts() or self.recipe.parts), "learning_rate": str(c.learning_rate),
                "batch_size": str(c.batch_size), "data": Path(c.data).name,
                "data_images": str(self.data.image_count), "data_identities": str(len(self.data.groups)),
                "identity_scale": str(self.recipe.identity_scale),
                "identity_dropout": str(self.recipe.identity_dropout),
                "content_dropout": str(self.recipe.content_dropout)}
        return self._provenance

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
        models = PipelineModules(self.unet, self.vae, content, self.prompts[""], self.scheduler_config, self.adapter,
                                 prompts=self.prompts, null_tokens=self.null_tokens)
        pipeline = RIDFRPipeline(models, self.device, dtype=self.weight_dtype)
        identity = None
        if self.adapter is not None:
            identity = Identity(batch["id1_embed"], batch["id1_clip"].float())
        lq = (batch["lq"] + 1) / 2
        restored = pipeline(lq.to(self.device), identity, steps=self.config.validation_steps, seed=self.config.seed,
                            identity_scale=self.recipe.identity_scale)
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
        check_new_run(self.out, c.stage, c.weights_name, resume, overwrite, c.init_content)
        if acc.is_main_process:
            remove_leftovers(self.out)
            if overwrite:
                clear_previous_run(self.out, c.stage, c.weights_name)
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

        with tqdm(total=c.max_steps, initial=self.step, desc=f"{self.backend.label} {c.stage}", unit="step",
                  disable=not acc.is_main_process, dynamic_ncols=True) as bar:  # closed on an error too
            window_start, window_steps = time.perf_counter(), 0
            while self.step < c.max_steps:
                losses = self.train_step([next(batches) for _ in range(c.gradient_accumulation_steps)])
                window_steps += 1
                bar.update(1)
                learning_rate = self.lr_scheduler.get_last_lr()[0]
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()} | {"lr": f"{learning_rate:.1e}"})
                if c.log_every and self.step % c.log_every == 0:
                    elapsed = time.perf_counter() - window_start
                    self.log(losses, window_steps * c.batch_size / max(elapsed, 1e-9))
                    window_start, window_steps = time.perf_counter(), 0
                if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
                if c.validation_every and self.step % c.validation_every == 0:
                    self.validate()
        if not (c.checkpoint_every and self.step % c.checkpoint_every == 0):
            self.save_checkpoint()
        if not (c.validation_every and self.step % c.validation_every == 0):
            self.validate()
        if self.writer is not None:
            self.writer.close()
        return self.exported_path()

    def log(self, losses: dict[str, float], samples_per_second: float) -> None:
        """Main process: TensorBoard scalars (the losses are already the means over every process)."""
        if self.writer is None:
            return
        for key, value in losses.items():
            self.writer.add_scalar(f"train/{key}", value, self.step)
        self.writer.add_scalar("train/lr", self.lr_scheduler.get_last_lr()[0], self.step)
        self.writer.add_scalar("train/samples_per_second", samples_per_second, self.step)
        self.writer.add_scalar("data/skipped_at_load", self.skipped_at_load, self.step)
