"""GPU decoding of stored studies with nvCOMP (``nvidia-nvcomp-cu13``): the compressed slices go to
the device once and are inflated there in one batched LZ4 call, straight into the scan tensor."""

from __future__ import annotations

import numpy as np
import torch

from .shards import RawStudy

_TORCH_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16}


class NvcompDecoder:
    """``RawStudy -> [scan (D, H, W) integer tensor on device]``, decoded by nvCOMP on the GPU."""

    def __init__(self, device: torch.device | str = "cuda"):
        try:
            from nvidia import nvcomp
        except ImportError as error:
            raise RuntimeError(
                "the nvCOMP decoder needs `pip install nvidia-nvcomp-cu13` (hlip-fast[nvcomp])"
            ) from error
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"the nvCOMP decoder needs a CUDA device, got {self.device}")
        self._nvcomp = nvcomp
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self._codec = nvcomp.Codec(
            algorithm="LZ4", bitstream_kind=nvcomp.BitstreamKind.RAW, device_id=index, cuda_stream=stream
        )

    def __call__(self, raw: RawStudy) -> list[torch.Tensor]:
        grid, dtype = tuple(raw.meta["grid"]), _TORCH_DTYPES[raw.meta["dtype"]]
        host = torch.frombuffer(bytearray(raw.blob), dtype=torch.uint8)
        blob = host.pin_memory().to(self.device, non_blocking=True)
        out = torch.empty((len(raw.sizes), *grid), dtype=dtype, device=self.device)
        out_bytes = out.view(torch.uint8).reshape(len(raw.sizes), -1)
        starts = np.concatenate([[0], np.cumsum(raw.sizes)[:-1]]).tolist()
        sources = [self._nvcomp.as_array(blob[s : s + n]) for s, n in zip(starts, raw.sizes.tolist())]
        targets = [self._nvcomp.as_array(out_bytes[i]) for i in range(len(raw.sizes))]
        self._codec.decode(sources, out=targets)
        return list(torch.split(out, raw.depths))
