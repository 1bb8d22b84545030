"""A small ONNX graph, run by torch: DNSMOS's two networks on any device torch has, without a second CUDA stack.

onnxruntime runs DNSMOS on the CPU; on a GPU it would need ``onnxruntime-gpu``, a CUDA build of its own beside
torch's. The two networks that ship in the speechmos wheel (``sig_bak_ovr.onnx``, ``model_v8.onnx``) are small
graphs of 17 operator types (an STFT as two 1-D convolutions, a log power, seven 2-D convolutions with max
pooling, three dense layers). :class:`TorchGraph` reads a graph with the ``onnx`` package (its weights and
nodes) and runs its nodes in order with the torch operations that ONNX's operator definitions name, so the same
weights give the same outputs (tested against onnxruntime on the CPU). The well-kept converter, ``onnx2torch``,
imports torchvision when it loads, and PyPI's torchvision does not load beside the CPU build of torch we install;
these graphs need none of what torchvision brings.

Operators outside :data:`OPS` are refused when the graph is read, naming them, never guessed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv(x, w, b=None, attrs=None):
    attrs = attrs or {}
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        raise ValueError(f"Conv auto_pad {attrs['auto_pad']!r} is not supported")
    dims = w.dim() - 2
    pads = list(attrs.get("pads", [0] * (2 * dims)))
    if pads[:dims] != pads[dims:]:
        raise ValueError(f"Conv with asymmetric pads {pads} is not supported")
    conv = F.conv1d if dims == 1 else F.conv2d
    return conv(x, w, b, stride=tuple(attrs.get("strides", [1] * dims)), padding=tuple(pads[:dims]),
                dilation=tuple(attrs.get("dilations", [1] * dims)), groups=attrs.get("group", 1))


def _maxpool(x, attrs):
    if attrs.get("ceil_mode", 0) or any(attrs.get("pads", [])):
        raise ValueError("MaxPool with ceil_mode or pads is not supported")
    return F.max_pool2d(x, tuple(attrs["kernel_shape"]), tuple(attrs.get("strides", attrs["kernel_shape"])))


def _slice(x, starts, ends, axes=None, steps=None):
    axes = axes.tolist() if axes is not None else list(range(len(starts)))
    steps = steps.tolist() if steps is not None else [1] * len(axes)
    index = [slice(None)] * x.dim()
    for axis, start, end, step in zip(axes, starts.tolist(), ends.tolist(), steps):
        index[axis] = slice(start, min(end, x.shape[axis]), step)
    return x[tuple(index)]


def _reshape(x, shape):
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape.tolist())]  # 0: keep that dimension
    return x.reshape(shape)


OPS = {
    "Add": lambda a, b, attrs: a + b,
    "Mul": lambda a, b, attrs: a * b,
    "Div": lambda a, b, attrs: a / b,
    "Pow": lambda a, b, attrs: torch.pow(a, b),
    "Max": lambda a, b, attrs: torch.maximum(a, b),
    "MatMul": lambda a, b, attrs: a @ b,
    "Sqrt": lambda a, attrs: torch.sqrt(a),
    "Log": lambda a, attrs: torch.log(a),
    "Relu": lambda a, attrs: torch.relu(a),
    "Transpose": lambda a, attrs: a.permute(*attrs["perm"]),
    "Unsqueeze": lambda a, attrs: a.reshape(_unsqueezed(a.shape, attrs["axes"])),
    "Concat": lambda *xs: torch.cat(xs[:-1], dim=xs[-1]["axis"]),
    "ReduceMax": lambda a, attrs: torch.amax(a, dim=tuple(attrs["axes"]), keepdim=bool(attrs.get("keepdims", 1))),
    "MaxPool": lambda a, attrs: _maxpool(a, attrs),
    "Conv": lambda *xs: _conv(*xs[:-1], attrs=xs[-1]),
    "Slice": lambda *xs: _slice(*xs[:-1]),
    "Reshape": lambda a, shape, attrs: _reshape(a, shape),
}


def _unsqueezed(shape, axes) -> list[int]:
    out = list(shape)
    for axis in sorted(a if a >= 0 else a + len(shape) + len(axes) for a in axes):
        out.insert(axis, 1)
    return out


class TorchGraph(torch.nn.Module):
    """An ONNX file's graph as a torch module: ``graph(x)`` → its first output. Weights are buffers, so
    ``.to(device)`` moves them; inputs of any batch size (the graph's ``N``)."""

    def __init__(self, path: str | Path):
        import onnx
        from onnx import numpy_helper

        super().__init__()
        model = onnx.load(str(path))
        graph = model.graph
        unknown = sorted({n.op_type for n in graph.node} - set(OPS))
        if unknown:
            raise ValueError(f"{path}: operators {', '.join(unknown)} are not supported by TorchGraph")
        self.names: dict[str, str] = {}  # initializer name → buffer name (ONNX names hold '/' and ':')
        for i, init in enumerate(graph.initializer):
            array = numpy_helper.to_array(init)
            tensor = torch.from_numpy(np.array(array))
            self.register_buffer(f"w{i}", tensor)
            self.names[init.name] = f"w{i}"
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]
        self.input_name, self.output_name = graph.input[0].name, graph.output[0].name
        self.path = Path(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {self.input_name: x}
        for name, buffer in self.names.items():
            values[name] = getattr(self, buffer)
        for op, inputs, outputs, attrs in self.nodes:
            args = [values[i] if i else None for i in inputs]
            values[outputs[0]] = OPS[op](*args, attrs)
        return values[self.output_name]
