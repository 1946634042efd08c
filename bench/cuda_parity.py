"""BIPROP layers on CUDA against the CPU: mask (with ties), effective weight, output and score gradient."""
import torch

from biprop_hpc.nn import BipropConv2d

torch.manual_seed(0)
layer = BipropConv2d(16, 32, 3, padding=1, keep_ratio=0.3)
with torch.no_grad():  # many exact ties at the threshold exercise the tie-break
    layer.scores.copy_(torch.randint(-4, 5, layer.scores.shape).float())
x = torch.randn(8, 16, 12, 12)
results = {}
for device in ("cpu", "cuda"):
    layer.to(device)
    layer.scores.grad = None
    out = layer(x.to(device))
    out.square().sum().backward()
    results[device] = tuple(t.detach().to("cpu", copy=True) for t in
                            (layer.mask(), layer.effective_weight(), out, layer.scores.grad))
for name, a, b in zip(("mask", "W_eff", "output", "score grad"), results["cpu"], results["cuda"]):
    same = torch.equal(a, b) if name == "mask" else torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    diff = 0 if name == "mask" else (a - b).abs().max().item()
    print(f"{name:10} cpu == cuda: {same}  max |diff| {diff:.2e}")

from biprop_hpc.nn.layers import kth_largest  # noqa: E402

values = torch.randn(100_003, device="cuda")
reference = values.sort(descending=True).values
assert all(kth_largest(values, k) == reference[k - 1] for k in (1, 7, 50_000, 50_002, 99_999, 100_003))
print("kth_largest on CUDA == sort: True")
