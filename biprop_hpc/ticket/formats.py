"""A ticket as a plain PyTorch state_dict or as ONNX, each checked by running it against the ticket's network.

- torch: `torch.save` of the dense-ternary network's state_dict (`load(ticket).state_dict()`): every BIPROP
  layer's "<name>.weight" is W_eff (float32, values in {-alpha, 0, +alpha}), BN and dense entries as they are.
  A model definition with plain bias-free Conv2d/Linear layers under the same names loads it with
  `load_state_dict` (e.g. `biprop_hpc.ticket.dense_ternary(model_from_config(...))`, or one written by hand).
- onnx: the same network exported with torch.onnx (input "images" N x C x H x W float32, output "logits";
  batch, height and width dynamic: networks that flatten a feature map take only the ticket's image size),
  then run with onnxruntime on a fixed random batch and compared with the network's outputs before the file
  is written. Needs the `onnx` and `onnxruntime` packages.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from biprop_hpc.choices import TICKET_FORMATS as FORMATS  # noqa: F401  (for callers)
from biprop_hpc.files import replace_atomically
from biprop_hpc.nn import BinaryActivation
from biprop_hpc.ticket.file import TicketError

ONNX_OPSET = 17
# ONNX Runtime sums in another order than torch: logits agree to float tolerance, relative to their scale.
ONNX_RTOL = 1e-4


def check_input(ticket, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """A fixed random batch of the ticket's input geometry."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, ticket.in_channels, ticket.image_size, ticket.image_size, generator=generator)


def export_torch(module: nn.Module, out: str | Path, ticket) -> dict:
    """Write the plain state_dict, after checking that a fresh copy of the network loaded from exactly those
    bytes gives the same outputs, bit for bit, as the ticket's network."""
    state = module.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    x = check_input(ticket)
    with torch.no_grad():
        expected = module(x)
        twin = _twin(module)
        twin.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        got = twin(x)
    if not torch.equal(expected, got):
        raise TicketError(f"the network loaded from the state_dict gives other outputs than the ticket's (max "
                          f"difference {(expected - got).abs().max().item():.3g}); nothing was written")
    replace_atomically(out, lambda tmp: Path(tmp).write_bytes(data))
    return {"format": "torch", "out": str(out), "bytes": len(data), "entries": len(state),
            "checked_on": list(x.shape), "max_abs_diff": 0.0}


def _twin(module: nn.Module) -> nn.Module:
    import copy
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for tensor in list(twin.parameters()) + list(twin.buffers()):
            tensor.zero_()
    return twin


def onnx_bytes(module: nn.Module, x: torch.Tensor) -> bytes:
    """The network as an ONNX model (TorchScript-based torch.onnx exporter: no onnxscript needed)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices
        torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
                          opset_version=ONNX_OPSET)
    return buffer.getvalue()


def run_onnx(model: bytes, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def compare(expected: torch.Tensor, got: torch.Tensor, binary: bool = False) -> dict:
    """Outputs agree when every logit is within ONNX_RTOL of the logits' scale. With binary activations a
    pre-activation within rounding error of 0 can take the other sign in another runtime (a real, rare
    difference of summation order, not of the network): there the outputs agree when every sample's top-1 is
    the same and the median difference is within the tolerance."""
    diff = (expected - got).abs()
    tolerance = ONNX_RTOL * max(1.0, expected.abs().max().item())
    same_top1 = bool(torch.equal(expected.argmax(1), got.argmax(1)))
    agree = diff.max().item() <= tolerance
    if not agree and binary:
        agree = same_top1 and diff.median().item() <= tolerance
    return {"max_abs_diff": diff.max().item(), "median_abs_diff": diff.median().item(), "same_top1": same_top1,
            "samples_within_tolerance": int((diff.amax(1) <= tolerance).sum()), "within_tolerance": agree}


def export_onnx(module: nn.Module, out: str | Path, ticket) -> dict:
    """Export to ONNX, run it with onnxruntime on a fixed random batch, compare with the network, then write."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError as missing:
        raise TicketError(f"--format onnx needs the onnx and onnxruntime packages ({missing}); "
                          "pip install onnx onnxruntime") from None
    module = module.cpu()
    x = check_input(ticket)
    model = onnx_bytes(module, x[:1])
    onnx.checker.check_model(onnx.load_from_string(model))
    with torch.no_grad():
        expected = module(x)
    binary = any(isinstance(m, BinaryActivation) for m in module.modules())
    result = compare(expected, run_onnx(model, x), binary)
    if not result["within_tolerance"]:
        raise TicketError(f"the ONNX model's outputs differ from the ticket's network by "
                          f"{result['max_abs_diff']:.3g} (more than rtol {ONNX_RTOL}); nothing was written")
    replace_atomically(out, lambda tmp: Path(tmp).write_bytes(model))
    return {"format": "onnx", "out": str(out), "bytes": len(model), "opset": ONNX_OPSET,
            "checked_on": list(x.shape), **result}
