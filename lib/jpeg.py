"""JPEG pipeline pieces for ImageFolder datasets: workers read bytes, the GPU decodes and augments.

Worker processes read files (or an image cache's shards) and parse JPEG headers (`read_chunk`). The main
process decodes a whole batch with nvJPEG (`torchvision.io.decode_jpeg(list, device="cuda")`), then
random-resized-crop, flip and resize run as two batched matrix products (`resized_crop_batch`). Files nvJPEG
should not see (CMYK, grayscale, progressive, PNG named .JPEG, no end marker) are decoded with PIL in the
worker instead, one by one, and counted; files PIL cannot read either are skipped, counted and replaced by the
next readable file. Selective decoding (batch mode) also makes a low-resolution scoring image per sample in
the worker from a DCT-scaled decode (`pil_draft_open`), so that only the selected samples are decoded whole.
The loader that drives this lives in lib/folderloader.py (`ImageFolderLoader`).
"""
import io
import math
import os
import warnings

import numpy as np
import torch

try:  # PIL is the CPU decoder; it is a torchvision dependency, so it is nearly always there
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

# torchvision >= 0.29 deprecates its decoders in favor of TorchCodec; 0.26 (the GPU machines) does not. The
# batched nvJPEG call is still what this pipeline wants, so the notice is silenced (message-specific).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_SCALE = (0.08, 1.0)        # random-resized-crop area fraction range (torchvision default)
RRC_RATIO = (3 / 4, 4 / 3)     # random-resized-crop aspect ratio range (torchvision default)
CENTER_CROP_FRACTION = 0.875   # validation: Resize(S / 0.875) + CenterCrop(S), done as one crop + resize
MAX_REPLACEMENTS = 16          # unreadable file: try this many following files before giving up

# JPEG start-of-frame markers; 0xC0 (baseline) and 0xC1 (extended sequential) go to nvJPEG's batched path
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


# ----------------------------------------------------------------------------- header sniffing
def sniff_jpeg(data):
    """Classify encoded bytes: ("baseline", height, width) if nvJPEG's batched decode suits them, else (reason, h, w)."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "not_jpeg", 0, 0
    i, n = 2, len(data)
    adobe_transform = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return "bad_marker", 0, 0
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker == 0xEE and data[i + 4:i + 9] == b"Adobe" and i + 15 < n:
            adobe_transform = data[i + 15]
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                return "truncated", 0, 0
            precision = data[i + 4]
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            components = data[i + 9]
            if height == 0 or width == 0:
                return "unsupported", height, width
            if components == 1:
                return "grayscale", height, width
            if components == 4:
                return "cmyk", height, width
            if components != 3 or precision != 8:
                return "unsupported", height, width
            if adobe_transform == 0:  # 3 components stored as RGB, not YCbCr
                return "unsupported", height, width
            if marker == 0xC2:
                return "progressive", height, width
            if marker not in (0xC0, 0xC1):
                return "unsupported", height, width
            # the end-of-image marker may be followed by padding; a missing one means a cut-off file
            tail = bytes(data[-64:]).rstrip(b"\x00\r\n ")
            if not tail.endswith(b"\xff\xd9"):
                return "truncated", height, width
            return "baseline", height, width
        if marker == 0xDA:  # scan data before any frame header
            return "bad_marker", 0, 0
        i += 2 + length
    return "truncated", 0, 0


# ----------------------------------------------------------------------------- crop boxes
def sample_rng(seed, epoch, index):
    """The random generator of one sample in one epoch: same numbers in any worker, any order, after resume."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def random_resized_crop_box(height, width, rng, scale=RRC_SCALE, ratio=RRC_RATIO):
    """torchvision's RandomResizedCrop.get_params with a numpy generator: (top, left, crop_h, crop_w) in px."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = rng.random(2)
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # ten misses (very elongated image): central crop at the ratio limit
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height, width, fraction=CENTER_CROP_FRACTION):
    """Validation crop: the centered square of side fraction * shorter side, (top, left, side, side)."""
    side = max(1, int(round(min(height, width) * fraction)))
    return (height - side) // 2, (width - side) // 2, side, side


def crop_params(height, width, augment, seed, epoch, index):
    """(top, left, crop_h, crop_w, flip) of one sample: random-resized-crop + coin flip, or the center crop."""
    if not augment:
        return (*center_crop_box(height, width), False)
    rng = sample_rng(seed, epoch, index)
    box = random_resized_crop_box(height, width, rng)
    return (*box, bool(rng.random() < 0.5))


# ----------------------------------------------------------------------------- CPU (PIL) path
def pil_open_rgb(data):
    """Decode encoded bytes of any PIL-readable format to an RGB image; raises OSError/ValueError if unreadable."""
    if len(data) == 0:
        raise OSError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise OSError("not an image format PIL can read") from None
    img.load()  # decode now so that truncated files fail here, not later
    return img.convert("RGB") if img.mode != "RGB" else img


def pil_resized_crop(img, top, left, crop_h, crop_w, flip, size):
    """Crop, then antialiased bilinear resize to size x size (+ mirror) with PIL: uint8 tensor (3, size, size).

    Crop first, as torchvision's resized_crop does: resize(box=...) would let the filter read outside the box.
    """
    out = img.crop((left, top, left + crop_w, top + crop_h)).resize((size, size), Image.BILINEAR)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).contiguous()  # (H, W, C) -> (C, H, W)


def pil_draft_open(data, height, width, box, size):
    """Decode encoded bytes at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the crop `box` (full-resolution
    top, left, h, w) at least `size` px on each side: (RGB image, scale). libjpeg scales while it decodes (less
    inverse-DCT and color work; the entropy decoding stays); non-JPEG bytes decode whole (scale 1)."""
    if len(data) == 0:
        raise OSError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise OSError("not an image format PIL can read") from None
    _, _, crop_h, crop_w = box
    drafted = img.draft(img.mode, (math.ceil(width * size / crop_w), math.ceil(height * size / crop_h)))
    scale = width / drafted[1][2] if drafted is not None else 1.0
    img.load()  # decode now so that truncated files fail here, not later
    return (img.convert("RGB") if img.mode != "RGB" else img), scale


def pil_scoring_image(img, box, flip, size, scale=1.0):
    """The crop `box` (full-resolution px) of `img` (decoded at 1/scale) resized to size x size with PIL's
    antialiased bilinear filter, mirrored if `flip`: uint8 array (size, size, 3). The box is mapped to the
    scaled image exactly (fractional px); the filter may read a pixel past its edge, which is harmless for
    scoring (the training crop is made from the full image, see pil_resized_crop)."""
    top, left, crop_h, crop_w = (v / scale for v in box)
    out = img.resize((size, size), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


# ----------------------------------------------------------------------------- worker side
class FileSource:
    """The encoded files of one split, read from disk: read(i) -> bytes, name(i) -> the path (for messages)."""

    def __init__(self, root, rel_paths):
        self.root, self.rel_paths = str(root), rel_paths

    def __len__(self):
        return len(self.rel_paths)

    def name(self, index):
        return os.path.join(self.root, os.fsdecode(self.rel_paths[index]))

    def read(self, index):
        with open(self.name(index), "rb") as f:
            return f.read()


def _spread(pos, share):
    """True for a `share` of positions, spread evenly (0, 1/share, 2/share, ...): deterministic, order-free."""
    return int((pos + 1) * share) > int(pos * share)


def read_chunk(source, labels, indices, *, first_pos, epoch, resolution, augment, seed, gpu_decode,
               cpu_fraction=0.0, score_px=None, score_cpu_share=0.5):
    """Read one chunk of a batch in a worker: encoded bytes + crop boxes for GPU-decodable JPEGs, PIL pixels for the
    rest, and (selective decoding, `score_px` set) the scoring images.

    `source` is a FileSource or an image cache (lib/imagecache.py); `labels` cover the whole split; `indices` are
    the dataset indices of batch positions first_pos, first_pos + 1, ... An unreadable file is replaced by the next
    readable one (index + 1, + 2, ...), so every batch stays full. `cpu_fraction` of the batch positions (spread
    evenly) are decoded here with PIL even when nvJPEG could take them.

    Selective decoding (batch mode): score_px=None decodes every GPU-decodable file whole on the GPU (`now`);
    score_px=0 (nothing is scored: the random control) defers them all until the selection asks for them;
    score_px > 0 makes a score_px scoring image of every sample: in `score_cpu_share` of the positions from a
    DCT-scaled PIL decode here (the bytes are kept for a full-resolution decode if selected), in the others from
    the whole-image GPU decode. Files nvJPEG should not see get their training crop and scoring image from one
    full PIL decode here.
    """
    blobs, boxes, sizes, flips, gpu_pos, now = [], [], [], [], [], []
    cpu_images, cpu_pos, score_images, score_pos = [], [], [], []
    out_labels, out_index, skipped, fallback = [], [], [], {}
    for pos, index in enumerate(indices, start=first_pos):
        index = int(index)
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                data = source.read(index)
                kind, height, width = sniff_jpeg(data)
                if kind == "baseline" and _spread(pos, cpu_fraction):
                    kind = "cpu_share"  # offloaded by choice, not because nvJPEG cannot read it
                if gpu_decode and kind == "baseline":
                    top, left, ch, cw, flip = crop_params(height, width, augment, seed, epoch, index)
                    decode_now = score_px is None or (score_px > 0 and not _spread(pos, score_cpu_share))
                    if not decode_now and score_px:
                        img, scale = pil_draft_open(data, height, width, (top, left, ch, cw), score_px)
                        score_images.append(pil_scoring_image(img, (top, left, ch, cw), flip, score_px, scale))
                        score_pos.append(pos)
                    blobs.append(data)
                    boxes.append((top, left, ch, cw))
                    sizes.append((height, width))
                    flips.append(flip)
                    gpu_pos.append(pos)
                    now.append(decode_now)
                else:
                    img = pil_open_rgb(data)
                    top, left, ch, cw, flip = crop_params(img.height, img.width, augment, seed, epoch, index)
                    cpu_images.append(pil_resized_crop(img, top, left, ch, cw, flip, resolution))
                    cpu_pos.append(pos)
                    if score_px:
                        score_images.append(pil_scoring_image(img, (top, left, ch, cw), flip, score_px))
                        score_pos.append(pos)
                    if gpu_decode:
                        fallback[kind] = fallback.get(kind, 0) + 1
                break
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                skipped.append(f"{source.name(index)} ({type(e).__name__}: {e})")
                index = (index + 1) % len(source)
        else:
            raise RuntimeError(f"{MAX_REPLACEMENTS + 1} files in a row from {source.name(index)} are unreadable; "
                               f"the dataset looks damaged (first errors: {skipped[:3]})")
        out_labels.append(int(labels[index]))
        out_index.append(index)
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    # All encoded files in one tensor and the small fields as numpy arrays (pickled inline): each tensor crosses
    # to the main process through its own shared-memory file and file-descriptor handshake, so keep them few.
    blob = None
    if blobs:
        blob = torch.empty(int(offsets[-1]), dtype=torch.uint8)
        view = blob.numpy()
        for data, start in zip(blobs, offsets[:-1].tolist()):
            view[start:start + len(data)] = np.frombuffer(data, dtype=np.uint8)
    scores = None
    if score_images:  # (M, S, S, 3) -> (M, 3, S, S)
        scores = torch.from_numpy(np.stack(score_images)).permute(0, 3, 1, 2).contiguous()
    return {
        "blob": blob,                                                        # (total bytes,) uint8 or None
        "offsets": offsets,                                                  # (K + 1,) file k = blob[o[k]:o[k+1]]
        "boxes": np.array(boxes, dtype=np.int64).reshape(-1, 4),             # (K, 4) top, left, crop_h, crop_w
        "sizes": np.array(sizes, dtype=np.int64).reshape(-1, 2),             # (K, 2) height, width
        "flip": np.array(flips, dtype=bool),                                 # (K,)
        "gpu_pos": np.array(gpu_pos, dtype=np.int64),                        # (K,) places in the batch
        "now": np.array(now, dtype=bool),                                    # (K,) decode at once (else if selected)
        "cpu_images": torch.stack(cpu_images) if cpu_images else None,       # (F, 3, R, R) uint8 or None
        "cpu_pos": np.array(cpu_pos, dtype=np.int64),                        # (F,)
        "score_images": scores,                                              # (M, 3, S, S) uint8 or None
        "score_pos": np.array(score_pos, dtype=np.int64),                    # (M,)
        "labels": np.array(out_labels, dtype=np.int64),                      # (n,)
        "index": np.array(out_index, dtype=np.int64),                        # (n,)
        "skipped": skipped,
        "fallback": fallback,
    }


# ----------------------------------------------------------------------------- GPU (or CPU torch) path
def resample_matrix(start, length, in_size, out_size, flip=None, device=None):
    """Rows of torch's antialiased bilinear resize of [start, start+length) to out_size px: (K, out_size, in_size).

    Same filter as F.interpolate(antialias=True) / PIL BILINEAR: a triangle widened by the downscale factor,
    normalized per output pixel; `flip` (K,) bool mirrors the output. Built sparse (a few taps per row), then
    scattered into a dense matrix so that one batched matmul applies it. `start`/`length` are CPU tensors
    (the tap count is read from them without a device sync); the matrix is built on `device`.
    """
    device = torch.device(device) if device is not None else start.device
    taps = int(math.ceil(2 * max(1.0, float(length.max()) / out_size))) + 2  # widest filter in the batch
    start = start.to(device=device, dtype=torch.float32)
    length = length.to(device=device, dtype=torch.float32)
    scale = length / out_size                                                   # (K,) input px per output px
    support = scale.clamp(min=1.0)                                              # (K,) filter half-width in px
    center = start[:, None] + scale[:, None] * (torch.arange(out_size, device=device) + 0.5)  # (K, S)
    first = torch.floor(center - support[:, None] + 0.5)                        # (K, S) first input px
    pos = first[:, :, None] + torch.arange(taps, device=device)                 # (K, S, T) input px index
    weight = (1 - (pos + 0.5 - center[:, :, None]).abs() / support[:, None, None]).clamp_(min=0)
    inside = (pos >= start[:, None, None]) & (pos < (start + length)[:, None, None])
    weight = weight * inside
    weight = weight / weight.sum(-1, keepdim=True)
    index = pos.clamp(0, in_size - 1).long()  # clamped taps carry weight 0
    matrix = torch.zeros(start.shape[0], out_size, in_size, device=device, dtype=torch.float32)
    matrix.scatter_add_(2, index, weight)
    if flip is not None:
        matrix = torch.where(flip.to(device)[:, None, None], matrix.flip(1), matrix)
    return matrix


def resized_crop_batch(images, boxes, flips, size, compute_dtype=None):
    """Crop + resize + mirror a list of differently sized (3, H, W) uint8 images to (K, 3, size, size), 0..255.

    Two batched matmuls: rows (K, S, H) @ pixels (K, H, 3*W) -> (K, S, 3*W), then @ columns^T -> (K, S, 3, S).
    Returns a (K, 3, S, S) view with [k, y, c, x] memory order; compute_dtype defaults to fp16 on CUDA
    (0..255 with fp32 accumulation) and fp32 on CPU.
    """
    device = images[0].device
    if compute_dtype is None:
        compute_dtype = torch.float16 if device.type == "cuda" else torch.float32
    k = len(images)
    max_h = max(int(img.shape[1]) for img in images)
    max_w = max(int(img.shape[2]) for img in images)
    boxes = torch.as_tensor(boxes).cpu()
    flips = torch.as_tensor(flips)
    # rows first, then channels, then columns: one matmul covers all three channels
    pixels = torch.zeros(k, max_h, 3, max_w, dtype=compute_dtype, device=device)  # (K, H, C, W)
    dst = [pixels[i, :img.shape[1], :, :img.shape[2]] for i, img in enumerate(images)]
    src = [img.permute(1, 0, 2) for img in images]  # (C, H, W) -> (H, C, W)
    torch._foreach_copy_(dst, src)
    rows = resample_matrix(boxes[:, 0], boxes[:, 2], max_h, size, None, device).to(compute_dtype)   # (K, S, H)
    cols = resample_matrix(boxes[:, 1], boxes[:, 3], max_w, size, flips, device).to(compute_dtype)  # (K, S, W)
    tmp = torch.bmm(rows, pixels.view(k, max_h, 3 * max_w))                                    # (K, S, 3*W)
    out = torch.bmm(tmp.view(k, size * 3, max_w), cols.transpose(1, 2))                       # (K, S*3, S)
    return out.view(k, size, 3, size).permute(0, 2, 1, 3)                                     # (K, 3, S, S)


def split_blob(blob, offsets):
    """The files packed in `blob` (CPU uint8) as a list of views, file k = blob[offsets[k]:offsets[k + 1]]."""
    offsets = np.asarray(offsets)
    return list(torch.split(blob[int(offsets[0]):int(offsets[-1])], np.diff(offsets).tolist()))  # one call


def decode_jpeg_list(views, device):
    """Decode a list of encoded JPEG files (CPU uint8 tensors) to (3, H, W) uint8 tensors on `device`: one batched
    nvJPEG call on CUDA, libjpeg-turbo through torchvision on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if device.type == "cuda":
        return decode_jpeg(views, mode=ImageReadMode.RGB, device=device)
    return decode_jpeg(views, mode=ImageReadMode.RGB)


def decode_jpegs(blob, offsets, device):
    """Decode the concatenated JPEG files in `blob` (CPU uint8) to a list of (3, H, W) uint8 tensors on `device`."""
    return decode_jpeg_list(split_blob(blob, offsets), device)
