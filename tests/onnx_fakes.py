"""ONNX stand-ins for insightface's face models.

Faces (``ridfr_core.faces``): no ArcFace/SCRFD weights can be obtained here, so the tests build ONNX
models with the same inputs and outputs as insightface's ``det_10g.onnx`` (SCRFD, 9 outputs) and
``w600k_r50.onnx`` (ArcFace, 1x3x112x112 -> 1x512) and put them in a ``models/<name>/`` folder, so
that insightface's real model routing, pre- and post-processing run:

- ``scripted SCRFD``: one anchor fires at a chosen position, so detection -> alignment geometry is
  known exactly; it stays silent on an all-black image and, optionally, above a detection size.
- ``YuNet as SCRFD``: the real YuNet detector from ``../shared/models`` wrapped into SCRFD's
  input/output convention, so real photos are detected by insightface's own SCRFD code.
- ``projection ArcFace``: a fixed random projection of the pooled, mean-centred crop (deterministic,
  image dependent; not an identity model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS = 2
# Output names and order of insightface's det_10g.onnx: scores, bboxes, keypoints for strides 8/16/32.
SCRFD_OUTPUT_NAMES = ("448", "471", "494", "451", "474", "497", "454", "477", "500")
OPSET = 13


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _save(graph: onnx.GraphProto, path: Path, opset: int = OPSET) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _scrfd_outputs() -> list[onnx.ValueInfoProto]:
    widths = (1, 4, 10)
    return [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{index % 3}", widths[index // 3]])
        for index, name in enumerate(SCRFD_OUTPUT_NAMES)
    ]


def build_scripted_scrfd(path: Path, anchor_index: int, bbox_distances, kps_offsets,
                         score: float = 0.9, max_input_width: int | None = None) -> Path:
    """SCRFD whose stride-32 anchor ``anchor_index`` fires with ``score`` (distances in stride units).

    Silent on an all-black image (a "no face" photo) and, with ``max_input_width``, at detection
    sizes wider than that (to exercise the retry at smaller sizes).
    """
    nodes = [
        _const("zero_i", np.array(0, np.int64)), _const("one_i", np.array(1, np.int64)),
        _const("k", np.array(anchor_index, np.int64)), _const("score", np.array(score, np.float32)),
        _const("idx_h", np.array([2], np.int64)), _const("idx_w", np.array([3], np.int64)),
        _const("anchors", np.array(SCRFD_ANCHORS, np.int64)),
        helper.make_node("Shape", ["input.1"], ["shape"]),
        helper.make_node("Gather", ["shape", "idx_h"], ["h1"]), helper.make_node("Gather", ["shape", "idx_w"], ["w1"]),
        helper.make_node("Squeeze", ["h1"], ["h"]), helper.make_node("Squeeze", ["w1"], ["w"]),
        # gate = 1 unless the image is all black (normalised pixel 0 -> -0.996)
        helper.make_node("ReduceMax", ["input.1"], ["max"], keepdims=0),
        _const("shift", np.array(0.99, np.float32)), _const("gain", np.array(1000.0, np.float32)),
        helper.make_node("Add", ["max", "shift"], ["max_shifted"]),
        helper.make_node("Mul", ["max_shifted", "gain"], ["gate_raw"]),
        _const("lo", np.array(0.0, np.float32)), _const("hi", np.array(1.0, np.float32)),
        helper.make_node("Clip", ["gate_raw", "lo", "hi"], ["content_gate"]),
    ]
    gate = "content_gate"
    if max_input_width is not None:
        nodes += [
            _const("max_w", np.array(max_input_width, np.int64)),
            helper.make_node("LessOrEqual", ["w", "max_w"], ["small_enough"]),
            helper.make_node("Cast", ["small_enough"], ["size_gate"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["content_gate", "size_gate"], ["gate"]),
        ]
        gate = "gate"
    outputs = {}
    for stride in SCRFD_STRIDES:
        s = f"s{stride}"
        nodes += [
            _const(f"{s}_stride", np.array(stride, np.int64)),
            helper.make_node("Div", ["h", f"{s}_stride"], [f"{s}_gh"]),
            helper.make_node("Div", ["w", f"{s}_stride"], [f"{s}_gw"]),
            helper.make_node("Mul", [f"{s}_gh", f"{s}_gw"], [f"{s}_cells"]),
            helper.make_node("Mul", [f"{s}_cells", "anchors"], [f"{s}_n"]),
            helper.make_node("Range", ["zero_i", f"{s}_n", "one_i"], [f"{s}_range"]),
            _const(f"{s}_axis0", np.array([0], np.int64)),
            helper.make_node("Unsqueeze", [f"{s}_n", f"{s}_axis0"], [f"{s}_n1"]),
        ]
        if stride == 32:
            nodes += [
                helper.make_node("Equal", [f"{s}_range", "k"], [f"{s}_hit"]),
                helper.make_node("Cast", [f"{s}_hit"], [f"{s}_hitf"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{s}_hitf", "score"], [f"{s}_sc0"]),
                helper.make_node("Mul", [f"{s}_sc0", gate], [f"{s}_sc1"]),
            ]
        else:
            nodes += [
                helper.make_node("Cast", [f"{s}_range"], [f"{s}_rf"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{s}_rf", "lo"], [f"{s}_sc1"]),
            ]
        nodes.append(helper.make_node("Unsqueeze", [f"{s}_sc1", "one_i_1d"], [f"{s}_score"]))
        for kind, values in (("bbox", bbox_distances), ("kps", kps_offsets)):
            width = len(values)
            nodes += [
                _const(f"{s}_{kind}_row", np.asarray(values, np.float32).reshape(1, width)),
                _const(f"{s}_{kind}_w", np.array([width], np.int64)),
                helper.make_node("Concat", [f"{s}_n1", f"{s}_{kind}_w"], [f"{s}_{kind}_shape"], axis=0),
                helper.make_node("Expand", [f"{s}_{kind}_row", f"{s}_{kind}_shape"], [f"{s}_{kind}"]),
            ]
        outputs[stride] = (f"{s}_score", f"{s}_bbox", f"{s}_kps")
    nodes.insert(0, _const("one_i_1d", np.array([1], np.int64)))
    internal = [outputs[s][c] for c in range(3) for s in SCRFD_STRIDES]
    nodes += [helper.make_node("Identity", [src], [dst]) for src, dst in zip(internal, SCRFD_OUTPUT_NAMES)]
    graph = helper.make_graph(
        nodes, "scripted_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])], _scrfd_outputs())
    return _save(graph, path)


def build_yunet_as_scrfd(yunet_path: Path, path: Path) -> Path:
    """The real YuNet detector with SCRFD's input (RGB, (x-127.5)/128) and outputs (distances in
    stride units, two anchors per cell), so insightface's SCRFD class decodes real detections."""
    yunet = onnx.load(str(yunet_path))
    graph = yunet.graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis in range(1, len(dims)):
            if value in graph.output or axis >= 2:
                dims[axis].dim_param = f"{value.name}_d{axis}"
    # YuNet's tensors are numbered like det_10g's outputs: prefix them to keep names unique.
    def renamed(name: str) -> str:
        return "yunet_bgr" if name == "input" else f"yunet/{name}" if name else name
    for node in graph.node:
        node.input[:] = [renamed(name) for name in node.input]
        node.output[:] = [renamed(name) for name in node.output]
    for initializer in graph.initializer:
        initializer.name = renamed(initializer.name)
    preprocess = [
        _const("in_scale", np.array(128.0, np.float32)), _const("in_shift", np.array(127.5, np.float32)),
        _const("bgr_order", np.array([2, 1, 0], np.int64)),
        helper.make_node("Mul", ["input.1", "in_scale"], ["rgb_scaled"]),
        helper.make_node("Add", ["rgb_scaled", "in_shift"], ["rgb_255"]),
        helper.make_node("Gather", ["rgb_255", "bgr_order"], ["yunet_bgr"], axis=1),
    ]
    nodes = [
        _const("half", np.array(0.5, np.float32)), _const("zero_f", np.array(0.0, np.float32)),
        _const("one_f", np.array(1.0, np.float32)),
    ]
    converted = []
    for stride in SCRFD_STRIDES:
        s = f"s{stride}"
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            nodes.append(_const(f"{s}_{kind}_shape", np.array([-1, width], np.int64)))
        nodes += [
            # score = sqrt(clip(cls) * clip(obj)), as OpenCV's FaceDetectorYN decodes it
            helper.make_node("Clip", [f"yunet/cls_{stride}", "zero_f", "one_f"], [f"{s}_cls"]),
            helper.make_node("Clip", [f"yunet/obj_{stride}", "zero_f", "one_f"], [f"{s}_obj"]),
            helper.make_node("Mul", [f"{s}_cls", f"{s}_obj"], [f"{s}_prod"]),
            helper.make_node("Sqrt", [f"{s}_prod"], [f"{s}_score3"]),
            # YuNet box (dx, dy, log w, log h) -> SCRFD distances (l, t, r, b) from the cell corner
            helper.make_node("Split", [f"yunet/bbox_{stride}"], [f"{s}_dxy", f"{s}_dwh"], axis=2, split=[2, 2]),
            helper.make_node("Exp", [f"{s}_dwh"], [f"{s}_wh"]),
            helper.make_node("Mul", [f"{s}_wh", "half"], [f"{s}_half_wh"]),
            helper.make_node("Sub", [f"{s}_half_wh", f"{s}_dxy"], [f"{s}_lt"]),
            helper.make_node("Add", [f"{s}_half_wh", f"{s}_dxy"], [f"{s}_rb"]),
            helper.make_node("Concat", [f"{s}_lt", f"{s}_rb"], [f"{s}_bbox3"], axis=2),
            helper.make_node("Identity", [f"yunet/kps_{stride}"], [f"{s}_kps3"]),
        ]
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            nodes += [  # one YuNet cell -> SCRFD's two anchors per cell
                helper.make_node("Reshape", [f"{s}_{kind}3", f"{s}_{kind}_shape"], [f"{s}_{kind}2"]),
                helper.make_node("Unsqueeze", [f"{s}_{kind}2"], [f"{s}_{kind}u"], axes=[1]),
                helper.make_node("Concat", [f"{s}_{kind}u", f"{s}_{kind}u"], [f"{s}_{kind}x2"], axis=1),
                helper.make_node("Reshape", [f"{s}_{kind}x2", f"{s}_{kind}_shape"], [f"{s}_{kind}"]),
            ]
        converted.append(s)
    internal = [f"{s}_{kind}" for kind in ("score", "bbox", "kps") for s in converted]
    nodes += [helper.make_node("Identity", [src], [dst]) for src, dst in zip(internal, SCRFD_OUTPUT_NAMES)]
    merged = helper.make_graph(
        preprocess + list(graph.node) + nodes, "yunet_as_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        _scrfd_outputs(), initializer=list(graph.initializer))
    model = helper.make_model(merged, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_projection_arcface(path: Path, seed: int = 0, pool: int = 8) -> Path:
    """ArcFace-shaped recogniser (input.1: Nx3x112x112 -> 683: Nx512): a fixed random projection of
    the average-pooled, mean-centred crop. Node names avoid insightface's 'Sub'/'Mul' prefixes,
    which would mark it as an MXNet model with another input normalisation."""
    cells = (112 // pool) ** 2 * 3
    weights = np.random.default_rng(seed).standard_normal((cells, 512)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[pool, pool],
                         strides=[pool, pool], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
        helper.make_node("ReduceMean", ["flat"], ["flat_mean"], axes=[1], keepdims=1, name="mean"),
        helper.make_node("Sub", ["flat", "flat_mean"], ["centred"], name="centre"),
        helper.make_node("MatMul", ["centred", "projection"], ["683"], name="project"),
    ]
    graph = helper.make_graph(
        nodes, "projection_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])],
        initializer=[numpy_helper.from_array(weights, "projection")])
    return _save(graph, path)


# A face the scripted SCRFD reports on a 640x640 image: stride-32 anchor 2*(row*20+col), i.e. the cell
# at (col*32, row*32) = (288, 256); keypoints are the FFHQ template scaled by 0.4 and moved there.
SCRIPTED_CELL = (9, 8)  # (col, row) on the 20x20 stride-32 grid of a 640 input
SCRIPTED_ANCHOR = 2 * (SCRIPTED_CELL[1] * 20 + SCRIPTED_CELL[0])
SCRIPTED_BBOX = (2.5, 3.0, 2.5, 3.5)


def scripted_face_kps(det_size: int = 640, image_size: int = 640) -> np.ndarray:
    """Where the scripted SCRFD puts the five keypoints in an image_size square image."""
    from ridfr_core.faces.align import FFHQ_TEMPLATE_512

    centre = np.array(SCRIPTED_CELL, np.float64) * 32
    offsets = FFHQ_TEMPLATE_512.astype(np.float64) * 0.4 - np.array([256, 256]) * 0.4
    return (centre + offsets) * (image_size / det_size)


def scripted_kps_offsets() -> list[float]:
    return list((scripted_face_kps() / 32 - np.array(SCRIPTED_CELL)).reshape(-1))
