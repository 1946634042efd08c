"""Where a WideResNet-50-2 BIPROP training step spends GPU time (bf16 AMP, channels_last, batch 64)."""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from biprop_hpc.models import LayerBuilder, build_model
from biprop_hpc.nn import biprop_layers

torch.backends.cudnn.benchmark = True
model = build_model("wide_resnet50_2", LayerBuilder(keep_ratio=0.2, weight_init="sc"), in_channels=3,
                    num_classes=1000, image_size=224).cuda().to(memory_format=torch.channels_last)
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.875)
x = torch.randn(64, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (64,), device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def masks_only():
    for _, layer in biprop_layers(model):
        layer.effective_weight()


for name, fn in (("step", step), ("all masks + W_eff, grad on", masks_only)):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    print(f"{name}: {(time.perf_counter() - start) / 10 * 1000:.1f} ms")

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
