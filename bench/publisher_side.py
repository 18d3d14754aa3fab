"""The publisher's side of ``bench_vs_publisher.py``: RestorerID's own code, driven over stdin/stdout.

Runs in the publisher's environment (the venv of ``../shared/restorerid-golden/README.md``) on a checkout of
github YingJiacheng/RestorerID named by ``RESTORERID_SRC``; the project never imports it. Their classes are
built offline with the import shims of ``../shared/tools/restorerid/rid_env.py`` (``RESTORERID_TOOLS``): stubs for
packages their modules import but inference never calls, CLIP towers built from their hub configs. The flow of
each stage is their ``scripts/Inference.py`` (``model.Adapter``, ``cond_stage_model``, ``encode_first_stage``,
``DDIMSampler.p_sample_ddim_sr_t``, ``decode_first_stage``, ``wavelet_reconstruction``); the random draws come
from the coordinator's inputs (as ``pub_side.py`` does for the golden bundle), so both sides sample the same.

One JSON object per line in, one per line out; their prints go to stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import resource
import sys
import time

TOOLS = os.environ.get("RESTORERID_TOOLS", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tools",
                                                         "restorerid"))
sys.path.insert(0, os.path.abspath(TOOLS))
import rid_env  # noqa: E402

POSITIVE = "best quality, high quality"
NEGATIVE = "cartoon, 3d, paint, monochrome, lowres, bad anatomy, worst quality, low quality"
GUIDANCE = 4
REPLY = sys.stdout
sys.stdout = sys.stderr  # their code prints; the protocol owns the real stdout

rid_env.install_stubs()
sys.modules["torchvision.transforms"].ToTensor = sys.modules["torchvision.transforms"].ToPILImage = None
rid_env.patch_transformers()
import numpy as np  # noqa: E402
import torch  # noqa: E402

ddpm = rid_env.import_ldm()
from ldm.models.diffusion import ddim as ddim_module  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler, space_timesteps  # noqa: E402
from ldm.modules.distributions import distributions  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from scripts.wavelet_color_fix import wavelet_reconstruction  # noqa: E402

torch.set_grad_enabled(False)
DRAWS = {"step": None, "posterior": None}
ddim_module.noise_like = lambda shape, device, repeat=False: DRAWS["step"].pop(0).reshape(shape)
distributions.DiagonalGaussianDistribution.sample = lambda self: self.mean + self.std * DRAWS["posterior"]
DDIMSampler.register_buffer = lambda self, name, attr: setattr(self, name, attr)  # upstream moves them to cuda


def rss_gb() -> dict:
    with open("/proc/self/status") as status:
        current = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {"rss_gb": current / 2**20, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def build_model():
    config = OmegaConf.load(os.path.join(rid_env.SRC, "configs/v15/v15-RestorerID.yaml"))
    with contextlib.redirect_stdout(io.StringIO()):
        return instantiate_from_config(config.model)


class Publisher:
    def __init__(self):
        self.model = self.sampler = None
        self.state = {}

    def make_checkpoint(self, path: str, seed: int = 0) -> dict:
        """Their full-size model with every float tensor re-drawn at random (their zero-initialised convs too),
        saved as RestorerIDFull.ckpt is: ``{"state_dict": ...}``, the Adapter in float16 as they build it."""
        torch.manual_seed(seed)
        model, generator = build_model(), torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            draw = torch.randn(param.shape, generator=generator)
            value = ((1 + 0.02 * draw) if name.endswith("weight") else 0.02 * draw) if param.dim() == 1 \
                else draw / math.sqrt(max(1, param[0].numel()))
            param.copy_(value.to(param.dtype))
        torch.save({"state_dict": model.state_dict()}, path)
        return {"bytes": os.path.getsize(path)}

    def load(self, path: str, adapter_dtype: str = "float16", tokenizer_dir: str = "") -> dict:
        """As Inference.py's ``load_model_from_config`` and schedule set-up (on the CPU). ``adapter_dtype``
        float32 runs their Adapter (CLIP ViT-H and the FaceID projection) in float32, as ours on the CPU."""
        from transformers import CLIPTokenizer

        start = time.perf_counter()
        state = torch.load(path, map_location="cpu")["state_dict"]
        model = build_model()
        model.load_state_dict(state, strict=False)
        del state
        model.eval()
        if adapter_dtype != "float16":
            model.Adapter.torch_dtype = getattr(torch, adapter_dtype)
            model.Adapter.to(model.Adapter.torch_dtype)
        model.cond_stage_model.tokenizer = CLIPTokenizer(os.path.join(tokenizer_dir, "vocab.json"),
                                                         os.path.join(tokenizer_dir, "merges.txt"),
                                                         pad_token="<|endoftext|>")
        model.cond_stage_model.device = "cpu"
        self.model = model
        return {"seconds": time.perf_counter() - start, **rss_gb()}

    def schedule(self, steps: int) -> None:
        """Inference.py's sampler and schedule for ``steps`` DDIM steps (eta 1)."""
        model = self.model
        model.register_schedule(given_betas=None, beta_schedule="linear", timesteps=1000, linear_start=0.00085,
                                linear_end=0.0120, cosine_s=8e-3)
        model.num_timesteps = 1000
        self.sampler = DDIMSampler(model)
        with contextlib.redirect_stdout(io.StringIO()):
            self.sampler.make_schedule(ddim_num_steps=steps, ddim_eta=1.0, verbose=False)
        self.timesteps = np.array(sorted(set(space_timesteps(1000, [steps]))))
        use, last, betas = set(space_timesteps(1000, [1000])), 1.0, []
        for i, alpha in enumerate(model.alphas_cumprod):
            if i in use:
                betas.append(1 - alpha / last)
                last = alpha
        model.register_schedule(given_betas=np.array([b.cpu().numpy() for b in betas]), timesteps=len(betas))
        model.num_timesteps = 1000

    def inputs(self, path: str) -> dict:
        self.state = {"inputs": torch.load(path, weights_only=True)}
        return {}

    # ---- the stages of one restoration (Inference.py main()), each timed by the coordinator's request
    def identity(self) -> None:
        given = self.state["inputs"]
        crop = given["ref_crop"].numpy()  # (224, 224, 3) uint8 BGR, as cv2 and norm_crop give it
        self.state["ref_c"], self.state["uncon_ref_c"] = self.model.Adapter(given["id_embeds"], crop)

    def prompts(self) -> None:
        model = self.model
        self.state["positive"] = torch.cat([model.cond_stage_model([POSITIVE]), self.state["ref_c"].float()], 1)
        self.state["negative"] = torch.cat([model.cond_stage_model([NEGATIVE]), self.state["uncon_ref_c"].float()], 1)

    def encode(self) -> None:
        DRAWS["posterior"] = self.state["inputs"]["post_noise"]
        lq = self.state["inputs"]["lq01"] * 2 - 1
        self.state["lq_latent"] = self.model.get_first_stage_encoding(self.model.encode_first_stage(lq))

    def step(self, index: int) -> None:
        """One guided DDIM step of the plan (``index`` counts down from steps - 1, as theirs does)."""
        state, given = self.state, self.state["inputs"]
        x = state.get("latents", given["x_T"])
        DRAWS["step"] = [given["step_noise"][0]]
        t = torch.full((x.shape[0],), int(self.timesteps[index]), dtype=torch.long)
        state["step_out"], _ = self.sampler.p_sample_ddim_sr_t(
            x, state["positive"], state["lq_latent"], given["identity_scale"], t, index=index,
            unconditional_guidance_scale=GUIDANCE, unconditional_conditioning=state["negative"])

    def sample(self) -> None:
        state, given = self.state, self.state["inputs"]
        DRAWS["step"] = list(given["step_noise"])
        with contextlib.redirect_stderr(io.StringIO()):
            state["latents"], _ = self.sampler.ddim_sampling_sr_t(
                cond=state["positive"], struct_cond=state["lq_latent"], ipscale=given["identity_scale"],
                shape=state["lq_latent"].shape, unconditional_conditioning=state["negative"],
                unconditional_guidance_scale=GUIDANCE, timesteps=self.timesteps, x_T=given["x_T"].clone())

    def decode(self) -> None:
        self.state["decoded"] = self.model.decode_first_stage(self.state["latents"])

    def color_fix(self) -> None:
        lq = self.state["inputs"]["lq01"] * 2 - 1
        self.state["image"] = torch.clamp((wavelet_reconstruction(self.state["decoded"], lq) + 1) / 2, 0, 1)

    def run(self, stage: str, **options) -> dict:
        start = time.perf_counter()
        getattr(self, stage)(**options)
        return {"seconds": time.perf_counter() - start}

    def save(self, path: str, names: list[str]) -> dict:
        torch.save({name: self.state[name] for name in names}, path)
        return {}


def main() -> None:
    publisher = Publisher()
    actions = {"make_checkpoint": publisher.make_checkpoint, "load": publisher.load, "inputs": publisher.inputs,
               "schedule": lambda steps: publisher.schedule(steps) or {}, "run": publisher.run,
               "save": publisher.save, "memory": rss_gb}
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        try:
            reply = {"ok": True, **actions[request["cmd"]](**request.get("args", {}))}
        except Exception as err:  # reported to the coordinator, which stops with it
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        REPLY.write(json.dumps(reply) + "\n")
        REPLY.flush()


if __name__ == "__main__":
    main()
