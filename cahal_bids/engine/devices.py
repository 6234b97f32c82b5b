"""Where and in what arithmetic an expert runs: the torch device and the precision.

``'auto'`` picks what the machine does best: CUDA when there is a GPU, bf16 where the CPU
or GPU computes it natively. :class:`~cahal_bids.engine.inference.Enhancer` resolves both
once, when it opens a zoo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cahal_bids.core.errors import CahalError

if TYPE_CHECKING:
    import torch

__all__ = ['PRECISIONS', 'resolve_device', 'resolve_precision']

PRECISIONS = ('auto', 'fp32', 'bf16')
"""The expert arithmetic an :class:`~cahal_bids.engine.inference.Enhancer` accepts (see
:func:`resolve_precision`)."""


def resolve_device(name: str = 'auto') -> torch.device:
    """``'auto'`` picks CUDA when available, else the CPU; ``'cuda'`` without a GPU raises."""
    import torch

    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise CahalError('--device cuda was requested but no CUDA device is available')
    if name not in {'cpu', 'cuda'} and not name.startswith('cuda:'):
        raise CahalError(f'unknown device {name!r}; expected auto, cpu or cuda')
    return torch.device(name)


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), Linux only."""
    try:
        with open('/proc/cpuinfo', encoding='ascii', errors='replace') as stream:
            for line in stream:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    return bool(flags & {'avx512_bf16', 'amx_bf16'})
    except OSError:
        pass
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``'auto'`` is bf16 where the hardware computes it natively, else fp32.

    bf16 changes the validation PSNR of the shipped T1w zoo by 0.006 dB on average and
    0.02 dB at most (``benchmarks/bench_precision.py``) and halves the expert's time on
    CPUs with AVX512-BF16/AMX; where bf16 would be emulated it is
    slower than fp32, so those machines keep fp32.
    """
    import torch

    if name not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got {name!r}')
    if name != 'auto':
        return name
    if device.type == 'cuda':
        major, _ = torch.cuda.get_device_capability(device)
        return 'bf16' if major >= 8 else 'fp32'
    return 'bf16' if device.type == 'cpu' and _cpu_has_native_bf16() else 'fp32'
