"""Quantized weight formats: quantize, dequantize, and the int4 packing (the truth every
quantized kernel is tested against). A leaf module under `gptfast.ops`: every backend may import it.

Formats (the lead's contract for issue #20; gptfast.quantize names them "int8", "int8-g32",
"int4-g32", "int4-g32-zp", ...):

- int8, per output channel (gpt-fast's `WeightOnlyInt8Linear`, github.com/pytorch-labs/gpt-fast):
  qweight int8 (N, K), scale float32 (N,): w[n, k] = q[n, k] * scale[n].
- int8, group-wise (llama.cpp's q8_0 when g = 32, github.com/ggerganov/llama.cpp ggml-quants.c):
  qweight int8 (N, K), scale float16 (N, K/g): w[n, k] = q[n, k] * scale[n, k // g].
- int4, group-wise, packed two per byte: qweight uint8 (N, K/2), scale float16 (N, K/g), zero
  float16 (N, K/g) or None: w[n, k] = (u[n, k] - 8) * scale[n, k // g] (+ zero[n, k // g]), u the
  unsigned nibble 0..15 (gpt-fast's int4 convention; symmetric with g = 32 is exactly llama.cpp's
  q4_0).

int4 packing (llama.cpp q4_0's, per block of 32 consecutive k): byte j (0..15) of block b, i.e.
qweight[n, 16 b + j], holds k = 32 b + j in its low nibble and k = 32 b + j + 16 in its high
nibble. So K % 32 == 0 for int4.

Quantization (symmetric): int8 scale = max|w| / 127 over the row (per channel) or the group;
int4 (llama.cpp q4_0's rule, one more level than max|w| / 7): scale = m / -8 where m is the
group's element of largest magnitude (the first one on a tie), signed, so that m itself maps to
q = -8; q = clamp(round(w / scale), -8, 7), u = q + 8. Zero point (int4): scale = (max - min) / 15,
zero = min + 8 scale, u = clamp(round((w - zero) / scale) + 8, 0, 15). Scales (and zeros) are
stored in float16 for groups, float32 per channel, and q is computed with the STORED (rounded)
values, the ones every kernel dequantizes with. A group whose scale is 0 (all its weights equal:
0 for the symmetric formats) stores scale 0 and q = 0 (u = 8); the zero-point format stores the
group's value as its zero. `round` is torch.round (half to even); the arithmetic runs in float64.
"""

from __future__ import annotations

import torch

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)  # group-wise formats; None = per output channel (int8 only)
INT4_BLOCK = 32  # k values per packed block (16 bytes): llama.cpp's QK4_0

_ROW_CHUNK = 2048  # rows quantized at a time (bounds the float64 temporaries)


def _fail_type(fn: str, name: str, expected: str, got) -> TypeError:
    return TypeError(f"{fn}: {name} must be {expected}, got {got}")


def check_format(fn: str, bits, group_size, zero_point: bool = False) -> None:
    """Raise ValueError naming the argument unless (bits, group_size, zero_point) is a format:
    bits 8 with group_size None (per channel) or one of GROUP_SIZES; bits 4 with one of
    GROUP_SIZES; zero_point only with bits 4."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{fn}: bits must be one of {BITS}, got {bits!r}")
    if group_size is None:
        if bits == 4:
            raise ValueError(f"{fn}: group_size must be one of {GROUP_SIZES} for bits=4 "
                             "(int4 is group-wise only), got None")
    elif isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(f"{fn}: group_size must be None (per output channel, bits=8) or one of "
                         f"{GROUP_SIZES}, got {group_size!r}")
    if zero_point and bits != 4:
        raise ValueError(f"{fn}: zero_point is an int4 option (bits=4), got bits={bits}")


def _check_k(fn: str, name: str, K: int, bits: int, group_size: int | None) -> None:
    if group_size is not None and K % group_size != 0:
        raise ValueError(f"{fn}: {name} has K = {K} columns, not divisible by group_size {group_size}")
    if bits == 4 and K % INT4_BLOCK != 0:
        raise ValueError(f"{fn}: {name} has K = {K} columns; int4 packing needs K % {INT4_BLOCK} == 0")


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Pack unsigned nibbles u (N, K) uint8 in 0..15, K % 32 == 0, into (N, K/2) uint8 in
    llama.cpp q4_0's order (see the module docstring)."""
    fn = "pack_int4"
    if not isinstance(u, torch.Tensor):
        raise _fail_type(fn, "u", "a torch.Tensor", type(u).__name__)
    if u.dtype != torch.uint8:
        raise _fail_type(fn, "u", "a uint8 tensor of nibbles 0..15", f"dtype {u.dtype}")
    if u.dim() != 2 or u.shape[1] % INT4_BLOCK != 0:
        raise ValueError(f"{fn}: u must be 2-D (N, K) with K % {INT4_BLOCK} == 0, got shape {tuple(u.shape)}")
    if u.numel() and int(u.max()) > 15:
        raise ValueError(f"{fn}: u must hold nibbles 0..15, got a value {int(u.max())}")
    N, K = u.shape
    blocks = u.reshape(N, K // INT4_BLOCK, INT4_BLOCK)
    half = INT4_BLOCK // 2
    packed = blocks[..., :half] | (blocks[..., half:] << 4)  # (N, K/32, 16)
    return packed.reshape(N, K // 2).contiguous()


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: (N, K/2) uint8 -> (N, K) uint8 nibbles 0..15."""
    fn = "unpack_int4"
    if not isinstance(p, torch.Tensor):
        raise _fail_type(fn, "p", "a torch.Tensor", type(p).__name__)
    if p.dtype != torch.uint8:
        raise _fail_type(fn, "p", "a uint8 tensor (packed int4)", f"dtype {p.dtype}")
    half = INT4_BLOCK // 2
    if p.dim() != 2 or p.shape[1] % half != 0:
        raise ValueError(f"{fn}: p must be 2-D (N, K/2) with K/2 % {half} == 0, got shape {tuple(p.shape)}")
    N, Kh = p.shape
    blocks = p.reshape(N, Kh // half, half)
    u = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1)  # (N, K/32, 32): low nibbles, then high
    return u.reshape(N, 2 * Kh)


def _stored(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale as it will be stored, back in float64 (the value kernels dequantize with)."""
    return scale.to(dtype).double()


def _quantize_rows(w: torch.Tensor, bits: int, group_size: int | None, zero_point: bool):
    """w (n, K) float64 -> (q or u, scale, zero) for these rows; see `quantize_weight`."""
    n, K = w.shape
    if group_size is None:  # int8 per output channel, float32 scales
        amax = w.abs().amax(dim=1)  # (n,)
        scale = _stored(amax / 127.0, torch.float32)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(w / safe[:, None]), -127, 127)
        q = torch.where(scale[:, None] == 0, torch.zeros_like(q), q)
        return q.to(torch.int8), scale.float(), None
    g = w.reshape(n, K // group_size, group_size)  # (n, G, g)
    zero = None
    if bits == 8:
        scale = _stored(g.abs().amax(dim=-1) / 127.0, torch.float16)  # (n, G)
        lo, hi, offset = -127, 127, 0
        shift = torch.zeros_like(scale)
    elif not zero_point:  # llama.cpp q4_0: d = m / -8, m the signed element of largest |w|
        idx = g.abs().argmax(dim=-1, keepdim=True)  # the first on a tie
        m = torch.gather(g, -1, idx).squeeze(-1)
        scale = _stored(m / -8.0, torch.float16)
        lo, hi, offset = -8, 7, 8
        shift = torch.zeros_like(scale)
    else:  # int4 with a zero point: u = round((w - zero) / scale) + 8
        mn, mx = g.amin(dim=-1), g.amax(dim=-1)
        scale = _stored((mx - mn) / 15.0, torch.float16)
        zero = _stored(mn + 8.0 * scale, torch.float16)
        zero = torch.where(scale == 0, _stored(mn, torch.float16), zero)  # a constant group
        lo, hi, offset = -8, 7, 8
        shift = zero
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round((g - shift[..., None]) / safe[..., None]), lo, hi)
    q = torch.where(scale[..., None] == 0, torch.zeros_like(q), q).reshape(n, K)
    if bits == 8:
        return q.to(torch.int8), scale.half(), None
    return (q + offset).to(torch.uint8), scale.half(), None if zero is None else zero.half()


@torch.no_grad()
def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None, zero_point: bool = False):
    """Quantize a weight matrix w (N, K) (`nn.Linear` layout, any float dtype, finite) to
    (qweight, scale, zero) in the layouts of the module docstring: int8 (N, K) / packed uint8
    (N, K/2); scale float32 (N,) per channel or float16 (N, K/g); zero float16 (N, K/g) or None.
    Vectorized (rows in chunks of a few thousand, for memory)."""
    fn = "quantize_weight"
    if not isinstance(w, torch.Tensor):
        raise _fail_type(fn, "w", "a torch.Tensor", type(w).__name__)
    if not w.is_floating_point():
        raise _fail_type(fn, "w", "a floating-point tensor", f"dtype {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{fn}: w must be 2-D (N, K) (nn.Linear layout), got shape {tuple(w.shape)}")
    check_format(fn, bits, group_size, zero_point)
    N, K = w.shape
    _check_k(fn, "w", K, bits, group_size)
    if K == 0:
        raise ValueError(f"{fn}: w must have K > 0 columns, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{fn}: w must be finite, got NaN or inf")
    limit = torch.finfo(torch.float16).max
    qs, ss, zs = [], [], []
    for start in range(0, N, _ROW_CHUNK):  # chunks of rows (not a loop over rows)
        q, s, z = _quantize_rows(w[start:start + _ROW_CHUNK].double(), bits, group_size, zero_point)
        qs.append(q), ss.append(s), zs.append(z)
    q, scale = torch.cat(qs), torch.cat(ss)
    zero = None if zs[0] is None else torch.cat(zs)
    if not bool(torch.isfinite(scale).all()) or (zero is not None and not bool(torch.isfinite(zero).all())):
        raise ValueError(f"{fn}: w has values too large for {scale.dtype} scales "
                         f"(max |w| {w.abs().max().item():.3g}; float16 holds up to {limit})")
    if bits == 4:
        q = pack_int4(q)
    return q.contiguous(), scale.contiguous(), None if zero is None else zero.contiguous()


def check_quantized(fn: str, qweight, scale, zero, bits: int, group_size: int | None) -> tuple[int, int]:
    """Validate a quantized weight's tensors for (bits, group_size) (see the module docstring);
    return (N, K). TypeError for a wrong type / dtype, ValueError for a shape or layout, each
    naming the argument, the expected and the got."""
    check_format(fn, bits, group_size, zero is not None)
    if not isinstance(qweight, torch.Tensor):
        raise _fail_type(fn, "qweight", "a torch.Tensor", type(qweight).__name__)
    want_q = torch.int8 if bits == 8 else torch.uint8
    if qweight.dtype != want_q:
        raise _fail_type(fn, "qweight", f"{want_q} for bits={bits}", f"dtype {qweight.dtype}")
    if qweight.dim() != 2:
        raise ValueError(f"{fn}: qweight must be 2-D ({'N, K' if bits == 8 else 'N, K/2'}), "
                         f"got shape {tuple(qweight.shape)}")
    N, K = qweight.shape[0], qweight.shape[1] * (8 // bits)
    _check_k(fn, "qweight", K, bits, group_size)
    if not isinstance(scale, torch.Tensor):
        raise _fail_type(fn, "scale", "a torch.Tensor", type(scale).__name__)
    want_s = torch.float32 if group_size is None else torch.float16
    shape_s = (N,) if group_size is None else (N, K // group_size)
    if scale.dtype != want_s:
        raise _fail_type(fn, "scale", f"{want_s} ({'per channel' if group_size is None else 'per group'})",
                         f"dtype {scale.dtype}")
    if tuple(scale.shape) != shape_s:
        raise ValueError(f"{fn}: scale must have shape {shape_s}, got {tuple(scale.shape)}")
    if zero is not None:
        if not isinstance(zero, torch.Tensor):
            raise _fail_type(fn, "zero", "a torch.Tensor or None", type(zero).__name__)
        if zero.dtype != torch.float16:
            raise _fail_type(fn, "zero", "torch.float16", f"dtype {zero.dtype}")
        if tuple(zero.shape) != shape_s:
            raise ValueError(f"{fn}: zero must have shape {shape_s}, got {tuple(zero.shape)}")
    for name, t in (("scale", scale), ("zero", zero)):
        if t is not None and t.device != qweight.device:
            raise ValueError(f"{fn}: {name} must be on qweight's device {qweight.device}, got {t.device}")
    for name, t in (("qweight", qweight), ("scale", scale), ("zero", zero)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous (a packed layout), got strides {t.stride()}")
    return N, K


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      bits: int, group_size: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (N, K) weight in `dtype` (see the module docstring's formulas). Computed in
    float64 for a float64 `dtype`, else in float32 (exact there for int8 x float16 and int4 x
    float16; one rounding for per-channel float32 scales and for + zero), then cast."""
    fn = "dequantize_weight"
    N, K = check_quantized(fn, qweight, scale, zero, bits, group_size)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{fn}: dtype must be a floating-point torch.dtype, got {dtype!r}")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if bits == 8:
        q = qweight.to(acc)
    else:
        q = unpack_int4(qweight).to(acc) - 8.0
    if group_size is None:
        w = q * scale.to(acc)[:, None]
    else:
        G = K // group_size
        w = q.view(N, G, group_size) * scale.to(acc)[..., None]
        if zero is not None:
            w = w + zero.to(acc)[..., None]
        w = w.view(N, K)
    return w.to(dtype)


__all__ = ["BITS", "GROUP_SIZES", "INT4_BLOCK", "check_format", "check_quantized", "dequantize_weight",
           "pack_int4", "quantize_weight", "unpack_int4"]
