"""RIDFR as ComfyUI nodes: patches on ComfyUI's own MODEL, sampled by ComfyUI's samplers.

- :mod:`.loading`: ``LoadRIDFR`` (the content file, the SD1.5 base and identity modules that go with it);
  :mod:`.model_files`: the model folders and what each "auto" choice stands for (``files_needed``).
- :mod:`.identity_nodes`: ``FaceIDEncode`` (references -> identity), ``MatchIdentities`` (several people).
- :mod:`.condition_nodes`: ``ContentCondition`` and ``IdentityCondition`` (patched MODEL clones).
- :mod:`.sampling_nodes`: ``RIDFRSample`` (convenience sampler) and ``PasteFaces`` (for KSampler users).
- :mod:`.ranking_nodes`: ``RankByIdentity`` (best-of-N: restored faces sorted by an independent recogniser).
- :mod:`.patches`: the content-ControlNet wrapper and the identity attention replacement themselves.
- :mod:`.restorerid_patches`: RestorerID's LQ branch as ResBlock object patches (the second content backend).
- :mod:`.validation`: one validation message per node; :mod:`.downloads`: the in-UI model download routes
  (with the frontend extension in ``web/``), offering what :mod:`.model_needs` says the graph's nodes need.
"""

from comfy_api.latest import ComfyExtension, io

from .condition_nodes import ContentCondition, IdentityCondition
from .identity_nodes import FaceIDEncode, MatchIdentities
from .loading import LoadRIDFR, register_model_folders
from .ranking_nodes import RankByIdentity
from .sampling_nodes import PasteFaces, RIDFRSample
from .validation import prompt_server, register as register_validation

NODES = [LoadRIDFR, FaceIDEncode, MatchIdentities, ContentCondition, IdentityCondition, RIDFRSample, PasteFaces,
         RankByIdentity]


class RIDFRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> RIDFRExtension:
    register_model_folders()
    register_validation(node.__name__ for node in NODES)
    server = prompt_server()
    if server is not None:
        from .downloads import register_routes

        register_routes(server)
    return RIDFRExtension()
