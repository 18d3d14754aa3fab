"""Speed and memory of the RIDFR pipeline against the plain compositions of the same components.

    python bench/bench_pipeline.py                      # CPU: reduced architecture and size
    python bench/bench_pipeline.py --arch sd15 --size 512 --device cuda --dtype fp16 --batches 1 16

Weights are random (speed does not depend on their values), so nothing needs downloading. Three
ways to run the same work, 20 UniPC steps, no guidance:
- ``ridfr``: :class:`ridfr_core.pipeline.RIDFRPipeline`;
- ``hand``: the same UNet + content ControlNet + identity adapter + UniPC stepped by hand;
- ``diffusers``: diffusers' stock ``StableDiffusionControlNetPipeline`` with a stock (hint-encoder)
  ControlNet of the same size and the IP-Adapter FaceID Plus loaded the way diffusers loads it.
It prints per-face latency, faces/s, peak memory, the time split and the ratios to ``hand``.

``--backend restorerid`` times the pipeline with RestorerID's LQ branch instead (full published widths of the
structure encoder, spade and IDBalance, random weights) with that backend's defaults: its own DDIM plan,
CFG 4, posterior sample, colour fix; e.g. ``--backend restorerid --arch sd15 --size 512 --steps 4 --batches 1``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from diffusers import (AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline,
                       UNet2DConditionModel, UniPCMultistepScheduler)
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ridfr_core.backends import RESTORERID
from ridfr_core.backends.ridfr.controlnet import ContentControlNet, lq_to_latent_size
from ridfr_core.weights.checkpoints import load_config
from ridfr_core.faces.align import estimate_alignment, ffhq_template, paste_face
from ridfr_core.identity.adapter import Identity, build_identity_adapter, encode_clip_features
from ridfr_core.pipeline import PipelineModules, RIDFRPipeline
from ridfr_core.sampling.noise import seeded_noise

SMALL = {  # SD1.5's block structure at a quarter of the width: CPU-sized
    "unet": {"block_out_channels": [64, 128, 256, 256], "cross_attention_dim": 768, "attention_head_dim": 8},
    "vae": {"block_out_channels": [32, 64, 128, 128]},
    "clip_vision": {"hidden_size": 320, "intermediate_size": 1280, "num_hidden_layers": 8, "num_attention_heads": 5},
}


TINY = {  # SD1.5's block structure at a tenth of the width: checks that a script runs, in seconds
    "unet": {"block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 64, "attention_head_dim": 4},
    "vae": {"block_out_channels": [32, 32, 32, 32]},
    "clip_vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
}
ARCHS = {"tiny": TINY, "small": SMALL, "sd15": {}}


def restorerid_branch(unet: UNet2DConditionModel, width: int = 256):
    """RestorerID's LQ branch at its published widths (EncoderUNetModelWT 256, channel_mult 1,1,2,2, attention at
    /1,/2,/4; spade/IDBalance hidden 128) for ``unet``, random weights; ``width`` < 256 shrinks it."""
    from ridfr_core.backends.restorerid.lq_branch import LQBranch
    from ridfr_core.backends.restorerid.denoiser import resnet_names

    blocks = [("conv", 4, width)]
    channels = width
    for level, mult in enumerate((1, 1, 2, 2)):
        for _ in range(2):
            blocks.append(("res+attn" if level < 3 else "res", channels, width * mult))
            channels = width * mult
        if level < 3:
            blocks.append(("down", channels, channels))
    encoder = {"model_channels": width, "emb_channels": 4 * width, "input_blocks": blocks, "middle_channels": channels,
               "fea_tran": [width, width, 2 * width, 2 * width], "out_channels": width}
    modules = dict(unet.named_modules())
    resnets = {ldm: modules[path].conv2.out_channels for path, ldm in resnet_names(unet).items()}
    return LQBranch({"encoder": encoder, "blocks": resnets, "feature_channels": width, "hidden": width // 2,
                     "context_dim": unet.config.cross_attention_dim}).eval()


def build_models(arch: str, backend: str = "ridfr") -> PipelineModules:
    torch.manual_seed(0)
    overrides = ARCHS[arch]
    unet = UNet2DConditionModel(**{**load_config("unet"), **overrides.get("unet", {})})
    vae = AutoencoderKL(**{**load_config("vae"), **overrides.get("vae", {})})
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**load_config("clip_vision"),
                                                            **overrides.get("clip_vision", {})}))
    adapter = build_identity_adapter(unet, clip.config.hidden_size)
    empty = torch.randn(1, 77, unet.config.cross_attention_dim)
    if backend == "restorerid":
        prompts = {text: torch.randn(1, 77, unet.config.cross_attention_dim)
                   for text in ("", RESTORERID.positive_prompt, RESTORERID.negative_prompt)}
        branch = restorerid_branch(unet, 32 if arch == "tiny" else 256)
        return PipelineModules(unet.eval(), vae.eval(), branch, empty, load_config("scheduler"),
                               adapter.eval(), clip.eval(), prompts=prompts)
    return PipelineModules(unet.eval(), vae.eval(), ContentControlNet.from_unet(unet).eval(), empty,
                       load_config("scheduler"), adapter.eval(), clip.eval())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` runs after one warm-up."""
    medians, results = timed_interleaved({"only": fn}, device, repeats)
    return medians["only"], results["only"]


def timed_interleaved(fns: dict, device, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds of each function, run in turn within every repeat, so that load from elsewhere on
    a shared machine falls on all of them alike instead of on whichever ran at the wrong moment."""
    results = {name: fn() for name, fn in fns.items()}  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            results[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}, results


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (Linux: KiB)


def hand_stepped(models: PipelineModules, lq: torch.Tensor, identity: Identity, steps: int, device, dtype):
    """The composition with no pipeline around it: the loop a user would write."""
    unet, content, vae = models.unet, models.content, models.vae
    batch = lq.shape[0]
    id_tokens = models.adapter.identity_tokens(identity.broadcast_to(batch)).to(dtype)
    latent_hw = (lq.shape[-2] // 8, lq.shape[-1] // 8)
    scheduler = UniPCMultistepScheduler.from_config(models.scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    text = models.empty_prompt.to(device, dtype).expand(batch, -1, -1)
    lq_small = lq_to_latent_size(lq * 2 - 1, latent_hw)
    latents = seeded_noise((batch, 4, *latent_hw), 0, device, dtype)
    for t in scheduler.timesteps:
        down, mid = content(latents, t, text, lq_small)
        eps = unet(latents, t, (text, [id_tokens]), down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
        latents = scheduler.step(eps, t, latents).prev_sample
    return ((vae.decode(latents / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)


def stock_diffusers_pipeline(models: PipelineModules, device, dtype) -> StableDiffusionControlNetPipeline:
    """diffusers' own ControlNet pipeline, IP-Adapter FaceID Plus installed as ``_load_ip_adapter_weights`` does."""
    unet = copy.deepcopy(models.unet)
    unet.set_attn_processor(AttnProcessor2_0())
    controlnet = ControlNetModel.from_unet(unet)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([copy.deepcopy(models.adapter.image_proj)])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    ours = models.adapter.processors_by_unet_name()
    processors = {}
    for name in unet.attn_processors:
        if name in ours:
            stock = IPAdapterAttnProcessor2_0(ours[name].hidden_size, ours[name].cross_attention_dim, num_tokens=(4,))
            stock.load_state_dict(ours[name].state_dict())
            processors[name] = stock
        else:
            processors[name] = AttnProcessor2_0()
    unet.set_attn_processor(processors)
    pipe = StableDiffusionControlNetPipeline(
        vae=models.vae, text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet,
        scheduler=UniPCMultistepScheduler.from_config(models.scheduler_config), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def run_stock(pipe, models: PipelineModules, lq: torch.Tensor, identity: Identity, steps: int, device, dtype):
    batch = lq.shape[0]
    # the pipeline repeats the ID embedding to the prompt batch itself, not the CLIP features set here
    clip_embeds = identity.broadcast_to(batch).clip_embeds[:, None]
    pipe.unet.encoder_hid_proj.image_projection_layers[0].clip_embeds = clip_embeds.to(device, dtype)
    return pipe(prompt_embeds=models.empty_prompt.to(device, dtype).expand(batch, -1, -1), image=lq,
                ip_adapter_image_embeds=[identity.id_embeds[:, None].to(device, dtype)], num_inference_steps=steps,
                guidance_scale=1.0, output_type="pt", height=lq.shape[-2], width=lq.shape[-1],
                generator=torch.Generator().manual_seed(0)).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(ARCHS), default="small")
    parser.add_argument("--backend", choices=["ridfr", "restorerid"], default="ridfr",
                        help="restorerid: its LQ branch and sampling defaults; only our pipeline is timed")
    parser.add_argument("--size", type=int, default=256, help="face size in pixels (512 = the paper's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-stock", action="store_true", help="skip diffusers' stock pipeline")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    models = build_models(args.arch, args.backend)
    pipeline = RIDFRPipeline(models, device, dtype)
    restorerid = args.backend == "restorerid"
    stock = None if args.skip_stock or restorerid else stock_diffusers_pipeline(models, device, dtype)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"# {args.backend} backend, {args.arch} architecture, {args.size}px, {args.steps} steps, {dtype}, {machine}")

    figures = []
    generator = torch.Generator().manual_seed(0)
    photo = np.random.default_rng(0).integers(0, 255, (args.size * 2, args.size * 2, 3), dtype=np.uint8)
    for batch in args.batches:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        lq = torch.rand(batch, 3, args.size, args.size, generator=generator).to(device, dtype)
        crops = torch.rand(1, 3, 224, 224, generator=generator)
        with torch.no_grad():
            encode_s, identity = timed(lambda: Identity(torch.nn.functional.normalize(torch.randn(1, 512), dim=-1),
                                                        encode_clip_features(models.clip_vision, crops).float()),
                                       device, args.repeats)
            tokens_s, _ = timed(lambda: pipeline.identity_tokens(identity, batch), device, args.repeats)
            variants = {"ridfr": lambda: pipeline(lq, identity, steps=args.steps)}
            if not restorerid:  # the hand-stepped composition is RIDFR's
                variants["hand"] = lambda: hand_stepped(models, lq, identity, args.steps, device, dtype)
            if stock is not None:
                variants["diffusers"] = lambda: run_stock(stock, models, lq, identity, args.steps, device, dtype)
            medians, _ = timed_interleaved(variants, device, args.repeats)
            ours_s, hand_s, stock_s = medians["ridfr"], medians.get("hand"), medians.get("diffusers")
            latents = torch.randn(batch, 4, args.size // 8, args.size // 8, device=device, dtype=dtype)
            decode_s, _ = timed(lambda: pipeline.decode(latents), device, args.repeats)
        matrix = estimate_alignment(ffhq_template(args.size) * 0.5 + args.size / 2, args.size)
        face = np.full((args.size, args.size, 3), 200, np.uint8)
        paste_s, _ = timed(lambda: paste_face(photo.copy(), face, matrix), device, args.repeats)
        row = {"batch": batch, "ridfr_s": ours_s, "hand_s": hand_s, "diffusers_s": stock_s,
               "per_face_s": (ours_s + encode_s) / batch, "faces_per_s": batch / (ours_s + encode_s),
               "ridfr_vs_hand": ours_s / hand_s if hand_s else None,
               "diffusers_vs_hand": stock_s / hand_s if stock_s else None,
               "split_s": {"identity_encoding": encode_s + tokens_s, "sampling": ours_s - decode_s,
                           "vae_decode": decode_s, "paste_back_per_face": paste_s},
               "peak_memory_gb": peak_memory_gb(device)}
        figures.append(row)
        stock_text = f"{stock_s:.3f}s ({row['diffusers_vs_hand']:.3f}x)" if stock_s else "skipped"
        hand_text = f"({row['ridfr_vs_hand']:.3f}x hand) | hand {hand_s:.3f}s" if hand_s else "| hand skipped"
        print(f"batch {batch:>2}: {args.backend} {ours_s:.3f}s {hand_text} | "
              f"diffusers {stock_text} | {row['per_face_s']:.3f} s/face, {row['faces_per_s']:.2f} faces/s | "
              f"split: id {encode_s + tokens_s:.3f}s, sampling {ours_s - decode_s:.3f}s, decode {decode_s:.3f}s, "
              f"paste {paste_s * 1000:.1f}ms/face | peak {'VRAM' if device.type == 'cuda' else 'RSS'} "
              f"{row['peak_memory_gb']:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
