"""Write a synthetic temporal regression set: drifting structures, the displacement in km over the sequence as target.

    python tools/make_temporal_regression.py --out=data/temporal_demo.npz --samples=800 --size=24 --channels=1
    python tools/make_temporal_regression.py --out=data/temporal.npz --samples=2000 --size=128 --channels=3

The physics (a satellite-like image sequence of a drifting field, e.g. cloud cells advected by the wind): each sample
is T frames of an H x W scene observed every `dt` minutes at a ground resolution of `s` km per pixel. One or two
structures (Gaussian blobs of random size, brightness and elongation, one colour each) drift together at a constant
velocity v (km/h) in a random direction; the background holds weak static texture and sensor noise. Between the first
and the last frame the structures move by

    D = |v| * (T - 1) * dt / 60   km     (the target `displacement_km`)

which on the image is D / s pixels. The scalars are s (km_per_pixel) and dt (minutes_between_frames): the images
alone give the motion in pixels; only with s does it become km, so the model must combine both inputs (a motion of
8 px is 4 km at 0.5 km/px and 16 km at 2 km/px). --targets=2 adds the speed |v| in km/h as a second column.
Speeds are drawn so that D / s lies in [1, size/3] px: always visible, never leaving the frame. Deterministic by seed.

Arrays written (lib/temporal_data.py reads them): frames uint8 (N, T, C, H, W), scalars float32 (N, 2), targets
float32 (N,) or (N, 2), target_names, target_units.
"""
import argparse
from pathlib import Path

import numpy as np


def make(samples, frames=5, size=24, channels=1, targets=1, seed=0):
    """The arrays of one synthetic set (see the module docstring)."""
    rng = np.random.default_rng(seed)
    km_per_px = rng.uniform(0.5, 2.0, samples)                       # s
    dt_min = rng.uniform(5.0, 15.0, samples)                         # minutes between frames
    shift_px = rng.uniform(1.0, size / 3, samples)                   # D / s: drawn in pixels so it stays in view
    angle = rng.uniform(0, 2 * np.pi, samples)
    displacement_km = shift_px * km_per_px                           # D
    speed_kmh = displacement_km / ((frames - 1) * dt_min / 60.0)     # |v|
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((samples, frames, channels, size, size), dtype=np.uint8)
    for i in range(samples):
        step = shift_px[i] / (frames - 1) * np.array([np.sin(angle[i]), np.cos(angle[i])])  # px per frame (dy, dx)
        start = rng.uniform(0, size, (1, 2)) - step * (frames - 1) / 2  # the sequence is centred on a random point
        count = rng.integers(1, 3)
        offsets = rng.normal(0, size / 6, (count, 2))
        sigma = rng.uniform(1.0, size / 10 + 1.0, (count, 2))
        bright = rng.uniform(90, 160, count)
        colour = rng.uniform(0.5, 1.0, (count, channels))
        texture = rng.normal(0, 6, (channels, size, size)).astype(np.float32)  # static: it does not move
        for t in range(frames):
            img = 40.0 + texture
            for c in range(count):
                cy, cx = start[0] + offsets[c] + step * t
                blob = np.exp(-0.5 * (((yy - cy) / sigma[c, 0]) ** 2 + ((xx - cx) / sigma[c, 1]) ** 2))
                img = img + bright[c] * colour[c][:, None, None] * blob
            img = img + rng.normal(0, 4, img.shape)                  # sensor noise, new every frame
            out[i, t] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    scalars = np.stack([km_per_px, dt_min], axis=1).astype(np.float32)
    columns = [displacement_km, speed_kmh][:targets]
    y = np.stack(columns, axis=1).astype(np.float32) if targets > 1 else displacement_km.astype(np.float32)
    names = np.array(["displacement_km", "speed_kmh"][:targets])
    units = np.array(["km", "km/h"][:targets])
    return {"frames": out, "scalars": scalars, "targets": y, "target_names": names, "target_units": units}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", type=int, default=24, help="frame height and width in px")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--targets", type=int, default=1, choices=(1, 2), help="2 adds the speed in km/h")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.frames < 2 or args.size < 8 or args.samples < 2 or args.channels < 1:
        parser.error("--frames >= 2, --size >= 8, --samples >= 2 and --channels >= 1")
    arrays = make(args.samples, args.frames, args.size, args.channels, args.targets, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: frames {arrays['frames'].shape} uint8, scalars {arrays['scalars'].shape}, targets "
          f"{arrays['targets'].shape} ({', '.join(arrays['target_names'])})")
    return out


if __name__ == "__main__":
    main()
