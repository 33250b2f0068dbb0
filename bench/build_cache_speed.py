"""build_cache.py's images/s: one renderer + denoiser per worker vs a new one per sample, 1 .. all cores.

    python bench/build_cache_speed.py               # workers 1, 2, 4, ... and the usable core count
    python bench/build_cache_speed.py --smoke       # CPU, seconds: 48x32 images, 1 and 2 workers

Both patterns run the real pipeline, build_cache.render_shards: a spawn pool, tasks of cache.chunk_size texts,
this process as the one writer of durable shards + markers into a fresh cache folder, default settings
(configs/cache_default.yaml: 224x224 grayscale, DejaVu Sans 14 px, despeckle, zlib level 6, 1024-image shards).
  fast   the pool initializer builds one renderer and one denoiser per process (what build_cache.py does)
  naive  the same classes built for every sample inside the worker, as the first version of the pipeline did:
         font file opened and parsed, word cache empty, denoiser buffers allocated per sample. Same bytes out
         (checked: the 1-worker shards of both patterns are compared).
Weak scaling: N workers render N x --samples_per_worker texts of the built-in corpus (3315 paragraphs of
Python's language reference, repeated as needed), so each worker sees about one pass of the corpus and its
word cache hit rate is one pass's, not inflated by repeats. Timed: first task to last shard written; the
pool start-up (spawn, imports, initializers) is excluded by waiting until every worker has answered a no-op.
One more line breaks one core's CPU time per image down over the corpus's first 1000 texts: render (one
renderer's first pass, the same texts again with every word cached, a new renderer per sample), building a
denoiser, denoising, zlib; and plain Pillow (font loaded once, ImageDraw.text per wrapped line, no word
cache: what one writes by hand) for reference.

Lines: {"pattern", "workers", "images", "seconds", "images_per_s", "word_hit_rate", "bytes_per_image"}, ...
Last line: {"summary": true, "speedup_vs_naive_1worker": x, "scaling_efficiency_max_workers": e,
"max_workers": n, "bytes_per_image": b, "device": "..."}.
"""
import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import build_cache  # noqa: E402
from lib.config import load_yaml, merge  # noqa: E402
from lib.textcache import worker_ready  # noqa: E402
from lib.textcorpus import Corpus, read_corpus  # noqa: E402
from lib.textrender import Denoiser, Renderer, build, load_font, resolve_font, usable_cores  # noqa: E402

SMOKE = {"data": {"limit": 256, "max_words": 6},
         "render": {"width": 48, "height": 32, "font_size": 9, "margin_x": 2, "margin_y": 2},
         "cache": {"shard_size": 32, "chunk_size": 16}}


def emit(**record):
    print(json.dumps(record), flush=True)


def device_name():
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({usable_cores()} usable cores)"


def worker_counts(cores, smoke):
    counts, n = [], 1
    while n <= cores:
        counts.append(n)
        n *= 2
    if counts[-1] != cores:
        counts.append(cores)
    return counts[:2] if smoke else counts


def wait_for_workers(pool, workers):
    """Return once every worker process has run a task (so every initializer has finished)."""
    seen = set()
    for _ in range(100):
        seen.update(pool.map(worker_ready, range(workers * 2)))
        if len(seen) >= workers:
            return
    raise RuntimeError(f"only {len(seen)} of {workers} pool workers answered")


def run_pattern(cfg, texts, workers, per_sample, folder):
    """One timed build of `texts` into a fresh cache folder; returns (record, shard sha256s)."""
    shutil.rmtree(folder, ignore_errors=True)
    corpus = Corpus(texts, list(range(len(texts))), {}, {"kind": "bench"})
    plan = build_cache.open_cache(cfg, Path(folder), corpus)
    level = plan.manifest["compress_level"]
    pool = build_cache.start_pool(workers, plan.render, cfg.denoise, level, per_sample)
    try:
        wait_for_workers(pool, workers)
        done = build_cache.render_shards(plan, cfg, pool, workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    report = build_cache.cache_report(plan)
    lookups = done["word_hits"] + done["word_misses"]
    record = {"pattern": "naive" if per_sample else "fast", "workers": workers, "images": done["images_rendered"],
              "seconds": round(done["seconds"], 3),
              "images_per_s": round(done["images_rendered"] / done["seconds"], 1),
              "word_hit_rate": round(done["word_hits"] / lookups, 4) if lookups else None,
              "bytes_per_image": report["bytes_per_image"]}
    shas = [plan.store.marker(s)["sha256"] for s in range(plan.manifest["shards"])]
    return record, shas


def plain_pillow(cfg, font_path):
    """What one writes by hand: font loaded once, greedy wrap with getlength, ImageDraw.text per line."""
    from PIL import Image, ImageDraw
    r = cfg.render
    font = load_font(font_path, r.font_size)
    ascent, descent = font.getmetrics()
    pitch = round(r.line_spacing * (ascent + descent))
    space = font.getlength(" ")

    def render(text):
        page = Image.new(r.mode, (r.width, r.height), r.background[0])
        draw = ImageDraw.Draw(page)
        lines, line, width = [], [], 0.0
        for word in text.split():
            w = font.getlength(word)
            if line and width + space + w > r.width - 2 * r.margin_x:
                lines.append(" ".join(line))
                line, width = [], 0.0
            width += (space if line else 0.0) + w
            line.append(word)
        lines.append(" ".join(line))
        for k, text_line in enumerate(lines):
            y = r.margin_y + k * pitch
            if y + ascent + descent > r.height - r.margin_y:
                break
            draw.text((r.margin_x, y), text_line, font=font, fill=r.foreground[0])
        return page
    return render


def breakdown(cfg, texts, font_path):
    """One core, in this process, CPU time per image of each step, over the corpus's first texts."""
    level = cfg.cache.compress_level
    renderer, denoiser = build(cfg.render, cfg.denoise, font_path)

    def per_image(fn):
        start = time.process_time()
        out = [fn(t) for t in texts]
        return (time.process_time() - start) / len(texts) * 1e3, out

    first_ms, images = per_image(lambda t: renderer.render(t)[0])  # a worker's first texts: cache filling
    cached_ms, _ = per_image(lambda t: renderer.render(t)[0])      # the same texts again: every word cached
    fresh_ms, _ = per_image(lambda t: Renderer(cfg.render, font_path).render(t)[0])
    it = iter(images)
    denoise_ms, cleaned = per_image(lambda t: denoiser(next(it)))
    build_denoiser_ms, _ = per_image(lambda t: Denoiser(cfg.denoise, cfg.render))
    it = iter(cleaned)
    compress_ms, _ = per_image(lambda t: zlib.compress(next(it).tobytes(), level))
    pillow = plain_pillow(cfg, font_path)
    pillow_ms, _ = per_image(pillow)
    emit(part="breakdown_cpu_ms_per_image", texts=len(texts), render_first_pass=round(first_ms, 4),
         render_all_words_cached=round(cached_ms, 4), render_new_renderer_per_sample=round(fresh_ms, 4),
         build_denoiser=round(build_denoiser_ms, 4), denoise=round(denoise_ms, 4), compress=round(compress_ms, 4),
         plain_pillow_render=round(pillow_ms, 4))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, seconds: tiny images, 1 and 2 workers")
    ap.add_argument("--samples_per_worker", type=int, default=0, help="texts per worker (0: the whole corpus)")
    ap.add_argument("--max_workers", type=int, default=0, help="largest worker count (0: usable cores)")
    args = ap.parse_args()
    cfg = merge(build_cache.Config(), load_yaml(ROOT / "configs" / "cache_default.yaml"))
    cfg = merge(cfg, {"cache": {"progress": False, "max_gb": 1000.0, "verify": False}})
    if args.smoke:
        cfg = merge(cfg, SMOKE)
    corpus = read_corpus(cfg.data).texts
    per_worker = args.samples_per_worker or (64 if args.smoke else len(corpus))
    cores = args.max_workers or usable_cores()
    counts = worker_counts(cores, args.smoke)
    font, note = resolve_font(cfg.render.font)
    emit(part="env", device=device_name(), python=platform.python_version(), font=font, font_note=note,
         worker_counts=counts, samples_per_worker=per_worker, corpus_texts=len(corpus), smoke=args.smoke,
         render=vars(cfg.render), denoise=cfg.denoise.method, compress_level=cfg.cache.compress_level,
         shard_size=cfg.cache.shard_size, chunk_size=cfg.cache.chunk_size)
    breakdown(merge(cfg, {"render": {"font": font}}), corpus[:min(len(corpus), 64 if args.smoke else 1000)], font)
    rates, shas = {}, {}
    with tempfile.TemporaryDirectory(prefix="build_cache_speed_") as tmp:
        for workers in counts:
            texts = (corpus * (-(-workers * per_worker // len(corpus))))[:workers * per_worker]
            for per_sample in (False, True):
                record, shard_shas = run_pattern(cfg, texts, workers, per_sample, Path(tmp) / "cache")
                emit(**record)
                rates[record["pattern"], workers] = record["images_per_s"]
                if workers == 1:
                    shas[record["pattern"]] = shard_shas
                    bytes_per_image = record["bytes_per_image"]
    top = counts[-1]
    emit(summary=True, speedup_vs_naive_1worker=round(rates["fast", 1] / rates["naive", 1], 3),
         scaling_efficiency_max_workers=round(rates["fast", top] / (top * rates["fast", 1]), 3), max_workers=top,
         bytes_per_image=bytes_per_image, identical_output=shas["fast"] == shas["naive"],
         fast_images_per_s_max_workers=rates["fast", top], naive_images_per_s_max_workers=rates["naive", top],
         speedup_vs_naive_max_workers=round(rates["fast", top] / rates["naive", top], 3), device=device_name())


if __name__ == "__main__":
    main()
