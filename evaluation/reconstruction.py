"""Image reconstruction metrics (PSNR, SSIM, LPIPS) as torchmetrics objects, for stages 1 and 3.

Inputs are images in [-1, 1] (the ``pixels`` convention of the batch contract).

LPIPS needs an ImageNet backbone that cannot be downloaded here. With ``lpips_backbone`` (a local
torchvision AlexNet state dict) the real LPIPS is computed and logged as ``lpips``. Without it a
documented fallback is used and labelled ``lpips_randnet``: the same AlexNet trunk with random
weights under a fixed seed and uniform layer weights (``lpips=False``), i.e. a random-feature
perceptual distance. It orders reconstructions sensibly (0 for identical images) but its values are
not comparable with published LPIPS numbers.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from datamodules.frozen import hold_frozen

log = logging.getLogger(__name__)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def build_lpips_net(backbone_path: str | None = None, seed: int = 0) -> tuple[nn.Module, str]:
    """An ``lpips.LPIPS`` AlexNet net and the metric name it deserves (``lpips`` or ``lpips_randnet``)."""
    import lpips

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        torch.manual_seed(seed)
        if backbone_path is None:
            net = lpips.LPIPS(net="alex", pretrained=False, lpips=False, pnet_rand=True, verbose=False)
            name = "lpips_randnet"
        else:
            # calibrated linear heads ship inside the lpips package; only the trunk needs a file
            net = lpips.LPIPS(net="alex", pretrained=True, lpips=True, pnet_rand=True, verbose=False)
            _load_alexnet_trunk(net.net, backbone_path)
            name = "lpips"
    net.eval().requires_grad_(False)
    return net, name


def _load_alexnet_trunk(trunk: nn.Module, path: str) -> None:
    """Copy a torchvision ``alexnet`` state dict (``features.N.*``) into lpips' sliced trunk."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    loaded = 0
    for slice_name, block in trunk.named_children():
        for index, layer in block.named_children():
            for pname, param in layer.named_parameters():
                key = f"features.{index}.{pname}"
                if key not in state:
                    raise KeyError(f"{path} has no {key}: expected a torchvision alexnet state dict ({slice_name})")
                param.data.copy_(state[key])
                loaded += 1
    log.info("LPIPS AlexNet trunk: %d tensors from %s", loaded, path)


class LPIPSMetric(Metric):
    """Mean LPIPS distance over all updates (images in [-1, 1], lpips' own convention)."""

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(self, backbone_path: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        net, self.label = build_lpips_net(backbone_path)
        hold_frozen(self, "lpips_net", net)  # out of state_dict and optimizers
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        with torch.no_grad():
            net = self.lpips_net.to(preds.device)
            dist = net(preds.float().clamp(-1, 1), target.float().clamp(-1, 1)).flatten()
        self.total += dist.double().sum()
        self.count += dist.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class ImagePSNR(PeakSignalNoiseRatio):
    """PSNR (dB) of [-1, 1] images, measured on their [0, 1] version."""

    def __init__(self, **kwargs: Any):
        super().__init__(data_range=1.0, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(to_unit(preds), to_unit(target))


class ImageSSIM(StructuralSimilarityIndexMeasure):
    """SSIM of [-1, 1] images, measured on their [0, 1] version."""

    def __init__(self, **kwargs: Any):
        super().__init__(data_range=1.0, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(to_unit(preds), to_unit(target))


def reconstruction_metrics(lpips_backbone: str | None = None, prefix: str = "") -> MetricCollection:
    """PSNR (dB, data range 1), SSIM and LPIPS on [-1, 1] images; keys ``psnr``, ``ssim``, ``lpips[_randnet]``."""
    lpips_metric = LPIPSMetric(lpips_backbone)
    return MetricCollection(
        {
            "psnr": ImagePSNR(),
            "ssim": ImageSSIM(),
            lpips_metric.label: lpips_metric,
        },
        prefix=prefix,
        compute_groups=False,
    )


def psnr(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One-shot PSNR of [-1, 1] images (tests and notebooks)."""
    return ImagePSNR().to(preds.device)(preds, target)
