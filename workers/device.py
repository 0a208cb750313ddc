"""Which torch device and dtype a worker renders on, chosen at run time."""

from __future__ import annotations

import torch


def select_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def dtype_for(device: torch.device) -> torch.dtype:
    # fp16 halves memory and doubles speed on GPUs; CPUs have no fast fp16 kernels.
    return torch.float16 if device.type == "cuda" else torch.float32


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
