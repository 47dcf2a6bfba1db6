"""Host-side plans for the DALI pipeline: every random choice of a batch, drawn in numpy from (seed, epoch, shard,
batch), so the batches of an epoch are a pure function of those and never of DALI's own RNG state.

Why the augmentation is planned here rather than with `nvidia.dali.auto_aug.rand_augment` (speed target): on a
2-core machine auto_aug's per-op conditionals and one linear `warp_affine` per geometric op ran at 0.5-0.9x the
torchvision loader. Here each sample's random-resized-crop, flip and RandAugment geometry (shear, translate,
rotate) fold into ONE affine matrix; the colour ops fold into one brightness/contrast step, one saturation step,
one 3x3 sharpen kernel and one posterize/solarize expression; the pipeline runs only the stages a sample needs.
The op set and magnitudes are torchvision's RandAugment (num_magnitude_bins=31). Deviations, all small: pointwise
ops run after the geometric ones in a fixed order (Brightness, Contrast and Color commute exactly, up to
clamping), the same op drawn twice is applied once with a combined strength, and a sample with a geometric op is
warped (bilinear) at min(crop, output) size before one antialiased resize to the output: exact in spirit when
upscaling (128-px sources to 176/192), slightly aliased for crops much larger than the output. Equalize is DALI's
(OpenCV's) formula, which rounds its lookup table differently from PIL's.
"""

from __future__ import annotations

import math

import numpy as np

# torchvision.transforms.RandAugment's op list, in its order (the index drawn picks the op).
RA_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
          "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
_GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
_SIGNED = _GEOMETRIC | {"Brightness", "Color", "Contrast", "Sharpness"}  # torchvision flips these with p=0.5
NUM_BINS = 31
# PIL's ImageFilter.SMOOTH, the "degenerate" image of ImageEnhance.Sharpness.
SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
_IDENTITY3 = np.zeros((3, 3), np.float32)
_IDENTITY3[1, 1] = 1.0


def magnitude(op: str, m: int, size: int) -> float:
    """torchvision's RandAugment magnitude of `op` at bin m (0..30) for a size x size image, before the sign."""
    f = m / (NUM_BINS - 1)
    if op in ("ShearX", "ShearY"):
        return 0.3 * f
    if op in ("TranslateX", "TranslateY"):
        return 150.0 / 331.0 * size * f
    if op == "Rotate":
        return 30.0 * f
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * f
    if op == "Posterize":
        return float(8 - int(round(m / ((NUM_BINS - 1) / 4))))
    if op == "Solarize":
        return 255.0 * (1.0 - f)
    return 0.0


def inverse_affine(center, angle, translate, shear) -> np.ndarray:
    """torchvision's `_get_inverse_affine_matrix` (scale 1) as a 3x3: output coords -> input coords."""
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return np.array([m[:3], m[3:], [0.0, 0.0, 1.0]], np.float64)


def geometric_matrix(op: str, mag: float, size: int) -> np.ndarray:
    """Inverse map (output -> input, continuous pixel coords) of torchvision's RandAugment geometric `op`."""
    if op == "ShearX":  # torchvision shears about the origin, like the original AutoAugment
        return inverse_affine((0, 0), 0.0, (0, 0), (math.degrees(math.atan(mag)), 0.0))
    if op == "ShearY":
        return inverse_affine((0, 0), 0.0, (0, 0), (0.0, math.degrees(math.atan(mag))))
    if op == "TranslateX":
        return inverse_affine((size / 2, size / 2), 0.0, (int(mag), 0), (0.0, 0.0))
    if op == "TranslateY":
        return inverse_affine((size / 2, size / 2), 0.0, (0, int(mag)), (0.0, 0.0))
    if op == "Rotate":  # PIL rotates counter-clockwise about the centre: affine angle is -angle
        return inverse_affine((size / 2, size / 2), -mag, (0, 0), (0.0, 0.0))
    raise AssertionError(op)


def random_resized_crop(rng: np.random.Generator, sizes: np.ndarray, scale, ratio) -> np.ndarray:
    """torchvision `RandomResizedCrop.get_params` for each (W, H) in `sizes`: int64 [B, 4] = (top, left, h, w)."""
    n = len(sizes)
    W = sizes[:, 0:1].astype(np.float64)
    H = sizes[:, 1:2].astype(np.float64)
    area = W * H
    log_r = np.log(ratio)
    target = area * rng.uniform(scale[0], scale[1], (n, 10))
    aspect = np.exp(rng.uniform(log_r[0], log_r[1], (n, 10)))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    cw, ch = w[rows, first], h[rows, first]
    # Fallback when 10 tries fail: the central crop with the aspect ratio clamped into `ratio`.
    fw, fh = W[:, 0].copy(), H[:, 0].copy()
    in_ratio = fw / fh
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fh[narrow] = np.round(fw[narrow] / min(ratio))
    fw[wide] = np.round(fh[wide] * max(ratio))
    found = ok.any(axis=1)
    cw, ch = np.where(found, cw, fw), np.where(found, ch, fh)
    u = rng.random((n, 2))
    top = np.where(found, np.floor(u[:, 0] * (H[:, 0] - ch + 1)), (H[:, 0] - ch) // 2)
    left = np.where(found, np.floor(u[:, 1] * (W[:, 0] - cw + 1)), (W[:, 0] - cw) // 2)
    return np.stack([top, left, ch, cw], axis=1).astype(np.int64)


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _scale(sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0])


class _SampleRA:
    """One sample's RandAugment draws reduced to the pipeline's stages."""

    def __init__(self):
        self.geom = np.eye(3)
        self.has_geom = False
        self.brightness = self.contrast = self.color = self.sharp = 1.0
        self.autocontrast = self.equalize = False
        self.post_bits = 8
        self.sol_thresh: float | None = None

    def add(self, op: str, mag: float, size: int) -> None:
        if op in _GEOMETRIC:
            self.geom = self.geom @ geometric_matrix(op, mag, size)  # op applied first is leftmost
            self.has_geom = True
        elif op == "Brightness":
            self.brightness *= 1.0 + mag
        elif op == "Contrast":
            self.contrast *= 1.0 + mag
        elif op == "Color":
            self.color *= 1.0 + mag
        elif op == "Sharpness":
            self.sharp *= 1.0 + mag
        elif op == "AutoContrast":
            self.autocontrast = True
        elif op == "Equalize":
            self.equalize = True
        elif op == "Posterize":
            self.post_bits = min(self.post_bits, int(mag))
        elif op == "Solarize":
            self.sol_thresh = mag if self.sol_thresh is None else min(self.sol_thresh, mag)


def plan_train_batch(rng: np.random.Generator, sizes: np.ndarray, *, img_size: int, scale, ratio, hflip: float,
                     randaugment: tuple[int, int] | None, ops: np.ndarray | None = None,
                     negative: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-sample inputs of the train pipeline for images of `sizes` ((W, H) each); see `dali.py` for their use.

    `ops` ([B, num_ops] indices into RA_OPS) and `negative` (signs) replace the random draw (tests use this).
    """
    n, S = len(sizes), img_size
    crop = random_resized_crop(rng, sizes, scale, ratio)
    flip = rng.random(n) < hflip
    if randaugment is not None and randaugment[0] > 0:
        num_ops = randaugment[0]
        drawn_ops = rng.integers(0, len(RA_OPS), (n, num_ops))
        drawn_negative = rng.random((n, num_ops)) < 0.5
        ops = drawn_ops if ops is None else ops
        negative = drawn_negative if negative is None else negative
    else:
        ops = negative = np.zeros((n, 0), np.int64)
    out = {k: np.zeros(n, np.bool_) for k in ("geom", "bc", "color", "sharp", "autocontrast", "equalize", "postsol")}
    out.update(
        warp=np.zeros((n, 2, 3), np.float32), warp_size=np.zeros((n, 2), np.float32),
        pad_h=np.zeros(n, np.float32), pad_w=np.zeros(n, np.float32), roi_start=np.zeros((n, 2), np.float32),
        roi_end=np.zeros((n, 2), np.float32), brightness=np.ones(n, np.float32), contrast=np.ones(n, np.float32),
        saturation=np.ones(n, np.float32), kernel=np.repeat(_IDENTITY3[None], n, 0),
        post_mask=np.full(n, 255, np.uint8), sol_thresh=np.zeros(n, np.uint8), sol_inv=np.zeros(n, np.uint8),
    )
    for i in range(n):
        top, left, h, w = (float(v) for v in crop[i])
        ra = _SampleRA()
        for k in range(ops.shape[1]):
            op = RA_OPS[ops[i, k]]
            mag = magnitude(op, randaugment[1], S)
            ra.add(op, -mag if negative[i, k] and op in _SIGNED else mag, S)
        x0, x1 = (left + w, left) if flip[i] else (left, left + w)
        if ra.has_geom:
            # Resample the crop once, geometry included, at min(crop, output) size; the resize then fills SxS.
            hh, ww = min(h, S), min(w, S)
            to_out = _scale(S / ww, S / hh)                       # intermediate -> output coords
            to_src = _translate(x0, top) @ _scale((x1 - x0) / S, h / S)   # output -> source (flip folded in)
            m = _translate(1.0, 1.0) @ to_src @ ra.geom @ to_out  # +1: the source gets a 1-px black border
            out["warp"][i] = m[:2]
            out["warp_size"][i] = (hh, ww)
            out["roi_start"][i], out["roi_end"][i] = (0.0, 0.0), (hh, ww)
        else:
            out["roi_start"][i], out["roi_end"][i] = (top, x0), (top + h, x1)
        out["pad_h"][i], out["pad_w"][i] = sizes[i, 1] + 2, sizes[i, 0] + 2
        out["geom"][i] = ra.has_geom
        out["bc"][i] = ra.brightness != 1.0 or ra.contrast != 1.0
        out["brightness"][i], out["contrast"][i] = ra.brightness, ra.contrast
        out["color"][i], out["saturation"][i] = ra.color != 1.0, ra.color
        out["sharp"][i] = ra.sharp != 1.0
        out["kernel"][i] = ra.sharp * _IDENTITY3 + (1.0 - ra.sharp) * SMOOTH
        out["autocontrast"][i], out["equalize"][i] = ra.autocontrast, ra.equalize
        out["post_mask"][i] = (0xFF << (8 - ra.post_bits)) & 0xFF
        if ra.sol_thresh is not None:  # PIL inverts pixels >= threshold
            out["sol_thresh"][i], out["sol_inv"][i] = min(255, math.ceil(ra.sol_thresh)), 255
        out["postsol"][i] = ra.post_bits < 8 or ra.sol_thresh is not None
    return out



def plan_eval_batch(sizes: np.ndarray, *, img_size: int, crop_pct: float) -> dict[str, np.ndarray]:
    """ROI of torchvision's Resize(int(img_size / crop_pct)) + CenterCrop(img_size), mapped back to the source.

    Resizing only the region that survives the crop gives the same sampling positions and filter as resizing the
    whole image and cropping, at a fraction of the cost.
    """
    S, short = img_size, int(img_size / crop_pct)
    W = sizes[:, 0].astype(np.float64)
    H = sizes[:, 1].astype(np.float64)
    # torchvision's _compute_resized_output_size: the shorter side becomes `short`, the longer is truncated.
    wide = W >= H
    rw = np.where(wide, np.floor(short * W / H), short)
    rh = np.where(wide, short, np.floor(short * H / W))
    # CenterCrop: offset int(round((resized - S) / 2)) (negative: torchvision pads; the ROI then reaches outside).
    top = np.round((rh - S) / 2.0)
    left = np.round((rw - S) / 2.0)
    sy, sx = H / rh, W / rw
    start = np.stack([top * sy, left * sx], axis=1)
    end = np.stack([(top + S) * sy, (left + S) * sx], axis=1)
    return {"roi_start": start.astype(np.float32), "roi_end": end.astype(np.float32)}
