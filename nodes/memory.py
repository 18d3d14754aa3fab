"""RIDFR's own modules under ComfyUI's memory management: always whole, on one device.

ComfyUI loads a model partially when it gets less memory than its size (``--lowvram``, ``--novram``,
``--reserve-vram``, or any card once a group photo or a video batch raises the sampler's estimate): it streams the
layers built with its own ops (``comfy.ops``, ``comfy_cast_weights``) and leaves every other layer that does not
fit on the CPU. Newer releases page weights dynamically (``ModelPatcherDynamic``, comfy-aimdo), again through
``comfy.ops`` layers only. RIDFR's modules are diffusers / transformers modules (the content ControlNet, RestorerID's
LQ branch, the IP-Adapter projections, CLIP ViT-H): plain layers that neither mechanism streams, so a partial load
split them between the GPU and the CPU and the first forward failed with a device mismatch.

So they are loaded whole, beside a UNet that ComfyUI may stream: :class:`WholeModulePatcher` never loads or unloads
part of a module (ComfyUI unloads it whole when it needs the memory back) and is never the dynamic patcher, and
:class:`LoadWholeFirst` loads them before the sampler's own load, so that the budget ComfyUI then gives the UNet is
what is left beside them. Whole loading costs their size in VRAM while they are used (the content module and the
IP-Adapter projections during sampling, CLIP ViT-H while FaceIDEncode runs; sizes in bench/RESULTS.md); rebuilding
them from ``comfy.ops`` layers instead would copy their weights to the GPU again at every step.
"""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher

from .sockets import ModuleHolder

# ModelPatcher itself is the dynamic patcher where ComfyUI pages weights with comfy-aimdo; CoreModelPatcher is the
# classic one there (and absent from releases that only have the classic one).
ClassicModelPatcher = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


class WholeModulePatcher(ClassicModelPatcher):
    """A ModelPatcher whose module is on the load device entirely or not at all."""

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kwargs):
        return super().load(device_to, 0, force_patch_weights, True, **kwargs)

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        return 0  # freeing less than asked makes ComfyUI unload the module whole (LoadedModel.model_unload)


def whole_module_patcher(module) -> WholeModulePatcher:
    """Wrap a module so that ComfyUI loads it to the GPU and offloads it like any model, whole. The module sits in a
    plain holder because ModelPatcher sets ``.device`` on its model, a read-only property of diffusers and
    transformers models."""
    mm = comfy.model_management
    return WholeModulePatcher(ModuleHolder(module), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


class LoadWholeFirst:
    """PREPARE_SAMPLING wrapper ``(executor, model, noise_shape, conds, ...)``: loads RIDFR's modules registered under
    ``key`` with the MODEL being sampled (whole) before the sampler loads that MODEL, so that ComfyUI's budget for the
    UNet counts them."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, executor, model, *args, **kwargs):
        comfy.model_management.load_models_gpu(model.get_additional_models_with_key(self.key))
        return executor(model, *args, **kwargs)


def register_modules(patched, key: str, patchers: list) -> None:
    """Register RIDFR's module patchers with a patched MODEL: ComfyUI loads them with it (additional models), and
    :class:`LoadWholeFirst` loads them first."""
    import comfy.patcher_extension

    patched.set_additional_models(key, patchers)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, key, LoadWholeFirst(key))
