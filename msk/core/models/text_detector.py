"""The learned burned-in-text detector as a torch network, for training, and its export to ONNX.

:class:`TextNet` is the network ``tools/train_text_net.py`` trains; :func:`export_onnx` writes it
as the ONNX file msk ships (``msk/core/data/weights/text_net.onnx``), with each batch norm folded
into its convolution. msk runs the file with ONNX Runtime (:mod:`msk.core.data.text_net`), so
ingest and serving workers do not import torch to scrub: torch costs about 300 MiB per process,
ONNX Runtime about 55 MiB, and it is faster on one thread (``docs/performance.md``).

Exporting needs the ``onnx`` package (the ``test`` extra); running the file does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["BN_EPS", "OPSET", "TextNet", "export_onnx"]

#: Batch norm epsilon of every :class:`TextNet` block (torch's default), used when folding.
BN_EPS = 1e-5
#: The ONNX opset the export declares.
OPSET = 17


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout, eps=BN_EPS), nn.ReLU(inplace=True))


class TextNet(nn.Module):
    """Input ``[B, 1, H, W]`` (display units in [0, 1], H and W multiples of 8); output logits
    ``[B, 1, H / 2, W / 2]``. An encoder to 1/8 with dilated convolutions (a receptive field of
    a few glyph heights, enough to see a row of glyphs) and a light top-down path back to 1/2."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.width = width
        self.s2 = nn.Sequential(_conv(1, w, 2), _conv(w, w))
        self.s4 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.s8 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w, dilation=2),
                                _conv(4 * w, 4 * w, dilation=4))
        self.up8 = nn.Conv2d(4 * w, 2 * w, 1)
        self.fuse4 = _conv(2 * w, 2 * w)
        self.up4 = nn.Conv2d(2 * w, w, 1)
        self.fuse2 = _conv(w, w)
        self.head = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) * 4.0
        f2 = self.s2(x)
        f4 = self.s4(f2)
        f8 = self.s8(f4)
        y = self.fuse4(f4 + nn.functional.interpolate(self.up8(f8), scale_factor=2.0, mode="nearest"))
        y = self.fuse2(f2 + nn.functional.interpolate(self.up4(y), scale_factor=2.0, mode="nearest"))
        return self.head(y)


def export_onnx(net: TextNet, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``net`` (its eval-mode function) to ``path`` as an ONNX graph with dynamic height and
    width: convolutions with their batch norm folded in, ReLU, nearest 2x resizes; ``metadata``
    goes into the model's metadata properties (who trained it, with what arguments)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    state = {k: v.detach().float().cpu().numpy() for k, v in net.state_dict().items()}
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        return name

    def block(prefix: str, x: str, stride: int = 1, dilation: int = 1) -> str:
        scale = state[f"{prefix}.1.weight"] / np.sqrt(state[f"{prefix}.1.running_var"] + BN_EPS)
        weight = state[f"{prefix}.0.weight"] * scale[:, None, None, None]
        bias = state[f"{prefix}.1.bias"] - state[f"{prefix}.1.running_mean"] * scale
        nodes.append(helper.make_node("Conv", [x, const(f"{prefix}.w", weight), const(f"{prefix}.b", bias)],
                                      [f"{prefix}.conv"], kernel_shape=[3, 3], strides=[stride, stride],
                                      pads=[dilation] * 4, dilations=[dilation, dilation]))
        nodes.append(helper.make_node("Relu", [f"{prefix}.conv"], [f"{prefix}.out"]))
        return f"{prefix}.out"

    def pointwise(prefix: str, x: str) -> str:
        nodes.append(helper.make_node("Conv", [x, const(f"{prefix}.w", state[f"{prefix}.weight"]),
                                               const(f"{prefix}.b", state[f"{prefix}.bias"])],
                                      [f"{prefix}.out"], kernel_shape=[1, 1]))
        return f"{prefix}.out"

    def up_add(x: str, skip: str, name: str) -> str:
        nodes.append(helper.make_node("Resize", [x, "", const(f"{name}.scales", np.array([1, 1, 2, 2]))],
                                      [f"{name}.up"], mode="nearest"))
        nodes.append(helper.make_node("Add", [skip, f"{name}.up"], [name]))
        return name

    nodes.append(helper.make_node("Sub", ["image", const("centre", np.array(0.5))], ["centred"]))
    nodes.append(helper.make_node("Mul", ["centred", const("gain", np.array(4.0))], ["x"]))
    f2 = block("s2.1", block("s2.0", "x", 2))
    f4 = block("s4.1", block("s4.0", f2, 2))
    f8 = block("s8.2", block("s8.1", block("s8.0", f4, 2), dilation=2), dilation=4)
    y = block("fuse4", up_add(pointwise("up8", f8), f4, "merge4"))
    y = block("fuse2", up_add(pointwise("up4", y), f2, "merge2"))
    nodes.append(helper.make_node("Identity", [pointwise("head", y)], ["logits"]))
    graph = helper.make_graph(
        nodes, "msk_text_net", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, "h2", "w2"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="msk")
    model.ir_version = 8  # readable by every ONNX Runtime since 1.10
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path
