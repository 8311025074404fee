"""Dequantizes a checkpoint in the released V4 format (BF16/F32, FP8 + 128x128 E8M0 scales, MXFP4) to FP32."""
import torch

FP4_TABLE = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _scale(t):
    if t.dtype == torch.float8_e8m0fnu:
        return torch.pow(2.0, t.view(torch.uint8).float() - 127)
    return t.float()


def dequantized(tensors):
    out = {}
    for name, t in tensors.items():
        if name.endswith(".scale"):
            continue
        sname = name.removesuffix(".weight") + ".scale"
        if t.dtype == torch.float8_e4m3fn:
            s = _scale(tensors[sname])
            s = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            out[name] = t.float() * s
        elif t.dtype == torch.int8 and sname in tensors:
            u = t.view(torch.uint8)
            vals = torch.stack([FP4_TABLE[(u & 0xF).long()], FP4_TABLE[(u >> 4).long()]], -1).flatten(1)
            out[name] = vals * _scale(tensors[sname]).repeat_interleave(32, 1)
        elif t.dtype in (torch.int64, torch.int32):
            out[name] = t
        else:
            out[name] = t.float()
    return out
