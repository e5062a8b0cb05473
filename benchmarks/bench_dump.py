"""Benchmark `blda dump-logits`: throughput against the model's pure forward throughput.

Target (real-inputs issue): on CPU with a small model, dump-logits reaches >= 90% of the
model's pure forward throughput on the same images, i.e. decoding, the resize to label
resolution and the HDF5 writing hide behind compute.

All three get the same warm-up: one forward pass in the main thread before the timing (the
streams' threads are new in both, so their first pass is timed in both). Each figure is
measured in a fresh process, as a user runs one command (a process that has
already run the model holds its activations' memory, which a fork of the loader workers would
then make copy-on-write). Every process first applies the allocator setting the dump applies
(`keep_freed_memory`), so that the three figures differ only in what they run:

- pure forward, one stream: `model(image)` on images decoded and normalised in memory, batch 1,
  torch's default threads, after a warm-up;
- pure forward, the dump's streams: the same images split over the threads the dump uses
  (`default_streams`: two streams of one thread each on 2 cores);
- dump-logits: whole-image inference at native size (no resize), float16, uncompressed, timed
  from the first image to the closed store (`DumpSummary.seconds`: model loading excluded).

The ratio is taken against the faster forward figure. A last fresh process runs the forward
and each step the dump adds to it one image at a time in one thread, and prints their CPU
times: decode (image and label PNGs), normalise, resize+cast (the model's logits resized to
label resolution and cast to the store's float16 rows in one pass, `inference.upsample`, with
their largest magnitude), prepare (checks, the labels' rows and the image's record,
`LogitWriter.prepare_map_rows`), append (the HDF5 writes, a commit a second). While the
forward keeps every core busy, nothing is left to hide the dump's steps behind, and
forward / (forward + steps) bounds the ratio. Target: the steps <= 10 % of the forward.

200 images by default: a dump's pipeline fills at its start and drains at its end (one stream
idles while the other finishes the last image), which weighs 3-4 points on 48 images and less
on real splits (Cityscapes val: 500 images); `--images 48` shows it.

    python benchmarks/bench_dump.py [--model tiny|segformer_mitb0] [--images 200]
        [--size 256x512] [--workers N] [--repeats 3]

`--decode-resize` instead times, per image and in one thread, decoding a PNG and resizing it
to a protocol's size (default 1024x2048 images to 512x1024, the DAFormer protocol) both ways:
today's path, mmcv's way (decode, OpenCV bilinear on uint8, then normalise:
`inference.resize.resize_uint8`), against the older one (decode, normalise, torch bilinear on
the float tensor):

    python benchmarks/bench_dump.py --decode-resize [--size 1024x2048] [--to 512x1024]
        [--images 20]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from limits import copy_bandwidth, cpu_model
from PIL import Image

NUM_CLASSES = 19
# What `measure_parts` times: the forward, then the steps the dump adds to it, in dump order.
PARTS = ("forward", "decode", "normalise", "resize+cast", "prepare", "append")


def write_dataset(root: Path, count: int, height: int, width: int) -> None:
    """`count` random images with label ids in the Cityscapes layout."""
    generator = np.random.default_rng(0)
    for index in range(count):
        stem = f"bench_000000_{index:06d}"
        image = root / "leftImg8bit" / "val" / "bench" / f"{stem}_leftImg8bit.png"
        label = root / "gtFine" / "val" / "bench" / f"{stem}_gtFine_labelIds.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        # Smooth-ish content so PNG decoding costs about what a photo costs.
        pixels = generator.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((width, height), Image.BILINEAR).save(image)
        ids = generator.integers(0, 34, (height // 16, width // 16), dtype=np.uint8)
        Image.fromarray(ids).resize((width, height), Image.NEAREST).save(label)


def cpu_seconds() -> float:
    """CPU time used so far by this process (all threads) and its finished children."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ---------------------------------------------------------------- measured in a child process


def measure_forward(args, streams: int) -> dict:
    """Pure forward on decoded, normalised images, in `streams` threads (1: torch's threads)."""
    from blda_tools.datasets import build_dataset
    from blda_tools.models import load_model, normalize

    dataset = build_dataset("cityscapes", args.root, "val")
    images = [normalize(dataset[i].image[None]) for i in range(len(dataset))]
    model = load_model(args.model, NUM_CLASSES, args.checkpoint).eval()

    def forward(part):
        with torch.inference_mode():
            for image in part:
                model(image)

    forward(images[:1])  # the warm-up the dump gets: one image, in this thread
    if streams > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // streams))
    parts = [images[stream::streams] for stream in range(streams)]
    start, cpu_start = time.perf_counter(), cpu_seconds()
    run_threads(parts, forward)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    return {"images_per_second": len(images) / elapsed, "cpu_per_image": cpu / len(images)}


def run_threads(parts, function) -> None:
    threads = [threading.Thread(target=function, args=(part,)) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def measure_dump(args) -> dict:
    """A dump from its first image to its closed store (the CPU time includes the workers)."""
    from blda_tools.inference.dump import prepare_dump
    from blda_tools.inference.predict import InferenceSettings
    from blda_tools.models import normalize

    job = prepare_dump(
        args.model,
        args.checkpoint,
        "cityscapes",
        args.root,
        "val",
        args.out,
        inference=InferenceSettings(mode="whole"),
        workers=args.workers,
        device="cpu",
    )
    with torch.inference_mode():  # the warm-up the forward figures get
        job.model(normalize(job.dataset[0].image[None]))
    cpu_start = cpu_seconds()
    summary = job.run()
    return {
        "images_per_second": summary.images_per_second,
        "cpu_per_image": (cpu_seconds() - cpu_start) / summary.images_written,
        "workers": job.workers,
        "streams": job.streams,
        "threads_per_stream": job.threads_per_stream,
    }


def measure_parts(args) -> dict:
    """Thread CPU per image of the forward and of each step the dump adds, one image at a time
    in one thread with nothing else running: the least CPU time the dump adds to a forward."""
    from blda_tools.datasets import build_dataset
    from blda_tools.inference.dump import COMMIT_SECONDS
    from blda_tools.inference.loader import decode
    from blda_tools.inference.upsample import upsample_to_float16_rows
    from blda_tools.models import load_model, normalize
    from blda_tools.store import LogitWriter

    torch.set_num_threads(1)
    dataset = build_dataset("cityscapes", args.root, "val")
    model = load_model(args.model, NUM_CLASSES, args.checkpoint).eval()
    seconds = dict.fromkeys(PARTS, 0.0)

    def timed(part, function, *arguments):
        start = time.thread_time()
        result = function(*arguments)
        seconds[part] += time.thread_time() - start
        return result

    writer = LogitWriter(args.out, dataset.class_names, commit_interval=COMMIT_SECONDS)
    with torch.inference_mode(), writer:
        model(normalize(dataset[0].image[None]))  # the thread's first pass costs extra
        # The kernel's first call in this process loads it (or compiles it, once): untimed.
        upsample_to_float16_rows(np.zeros((NUM_CLASSES, 2, 2), np.float32), (4, 4))
        for index in range(len(dataset)):
            sample, _ = timed("decode", decode, dataset, index)
            images = timed("normalise", normalize, torch.from_numpy(sample.image)[None])
            low_resolution = timed("forward", model, images)
            # As `DumpJob._prepare_image` does for a full map into a float16 store on the CPU.
            size = sample.label.shape
            rows, largest = timed(
                "resize+cast", upsample_to_float16_rows, low_resolution[0].float().numpy(), size
            )
            prepared = timed(
                "prepare",
                functools.partial(writer.prepare_map_rows, largest=largest),
                *(rows, sample.label, sample.name, size),
            )
            timed("append", writer.append, prepared)
    return {part: total / len(dataset) for part, total in seconds.items()}


def measure_decode_resize(args) -> None:
    """Thread CPU per image of decode + resize + normalise, OpenCV (uint8) vs torch (float)."""
    import torch.nn.functional as F

    from blda_tools.datasets import build_dataset
    from blda_tools.inference.resize import resize_uint8
    from blda_tools.models import normalize

    height, width = (int(v) for v in args.size.lower().split("x"))
    target = tuple(int(v) for v in args.to.lower().split("x"))
    torch.set_num_threads(1)
    paths = {
        "opencv, uint8 (mmcv's way)": lambda image: normalize(resize_uint8(image, target)),
        "torch, normalised float (old)": lambda image: F.interpolate(
            normalize(image), size=target, mode="bilinear", align_corners=False
        ),
    }
    with tempfile.TemporaryDirectory() as temporary:
        write_dataset(Path(temporary), args.images, height, width)
        dataset = build_dataset("cityscapes", temporary, "val")
        dataset[0]  # warm caches
        best = {}
        for _ in range(args.repeats):
            for name, resize in paths.items():
                decode = work = 0.0
                for index in range(len(dataset)):
                    start = time.thread_time()
                    image = dataset[index].image[None]
                    middle = time.thread_time()
                    resize(image)
                    decode += middle - start
                    work += time.thread_time() - middle
                runs = best.setdefault(name, [])
                runs.append((decode / len(dataset), work / len(dataset)))
    print(
        f"decode + resize {height}x{width} -> {target[0]}x{target[1]}, {args.images} PNG images, "
        f"one thread, CPU ms/image, best of {args.repeats}:"
    )
    for name, runs in best.items():
        decode, work = min(runs, key=sum)
        print(
            f"  {name:30s}: decode (image + label) {decode * 1000:6.1f} + resize, normalise "
            f"{work * 1000:6.1f}"
            f" = {(decode + work) * 1000:6.1f}"
        )


def child(args) -> None:
    from blda_tools.runtime.process import keep_freed_memory

    applied = keep_freed_memory()
    if args.child == "dump":
        result = measure_dump(args)
    elif args.child == "parts":
        result = measure_parts(args)
    else:
        from blda_tools.inference.streams import default_streams

        streams = 1 if args.child == "forward" else default_streams(torch.device("cpu"))[0]
        result = measure_forward(args, streams)
    print(json.dumps({**result, "allocator_setting": applied}))


# ---------------------------------------------------------------- the parent


def in_fresh_process(kind: str, args, root: Path, checkpoint: Path, out: Path) -> dict:
    command = [
        *(sys.executable, __file__, "--child", kind, "--model", args.model),
        *("--root", str(root), "--checkpoint", str(checkpoint), "--out", str(out)),
        *("--workers", str(args.workers)),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        sys.exit(f"{kind} process failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def traffic_floor(height: int, width: int, bandwidth: float) -> tuple[float, int]:
    """Seconds per image the dump's steps after the forward need at least, moving their bytes
    at `bandwidth`: the fused resize and cast writes the float16 rows (its float32 sums stay
    in cache), the append copies them (and the labels) to the file."""
    values = NUM_CLASSES * height * width
    moved = values * 2 + (values * 2 + height * width)
    return moved / bandwidth, moved


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="256x512", help="HEIGHTxWIDTH")
    parser.add_argument(
        "--workers", type=int, default=2, help="loader processes (the dump's default)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-resize", action="store_true", help="see the module doc")
    parser.add_argument(
        "--parts-only", action="store_true", help="only the per-step CPU times (no dump runs)"
    )
    parser.add_argument("--to", default="512x1024", help="--decode-resize target HxW")
    parser.add_argument(
        "--child", choices=["forward", "forward-streams", "dump", "parts"], help=argparse.SUPPRESS
    )
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


KINDS = ("forward", "forward-streams", "dump")


def run_all(args, height: int, width: int) -> tuple[dict[str, list[dict]], dict]:
    """Every repeat of the three whole runs (alternated) and the per-step times, each in a
    fresh process, on a dataset and checkpoint written to a temporary folder."""
    from blda_tools.models import create_model

    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary) / "data"
        write_dataset(root, args.images, height, width)
        torch.manual_seed(0)
        checkpoint = Path(temporary) / "model.pth"
        torch.save(create_model(args.model, NUM_CLASSES).state_dict(), checkpoint)
        # Alternated, so a change in the machine's load affects all figures alike.
        for repeat in range(0 if args.parts_only else args.repeats):
            for kind in KINDS:
                out = Path(temporary) / f"dump{repeat}.h5"
                results[kind].append(in_fresh_process(kind, args, root, checkpoint, out))
        parts = in_fresh_process("parts", args, root, checkpoint, Path(temporary) / "parts.h5")
    return results, parts


def print_rates(args, results: dict[str, list[dict]], height: int, width: int) -> None:
    dump = results["dump"][0]
    print(
        f"{args.model} on {args.images} images {height}x{width}, CPU, whole image, float16 "
        f"store, {dump['workers']} loader worker(s), {dump['streams']} stream(s) x "
        f"{dump['threads_per_stream']} thread(s), allocator setting applied: "
        f"{dump['allocator_setting']}; best of {args.repeats} fresh processes each"
    )
    # Best of the repeats: the highest rate and the lowest CPU time of each.
    rate = {kind: max(r["images_per_second"] for r in results[kind]) for kind in KINDS}
    cpu = {kind: min(r["cpu_per_image"] for r in results[kind]) for kind in KINDS}
    labels = {
        "forward": "pure forward, one stream",
        "forward-streams": "pure forward, dump's streams",
        "dump": "dump-logits",
    }
    for kind in KINDS:
        runs = ", ".join(f"{r['images_per_second']:.2f}" for r in results[kind])
        print(
            f"{labels[kind]:30s}: {rate[kind]:6.2f} images/s  CPU {cpu[kind] * 1000:4.0f} ms/image"
            f"  (runs: {runs})"
        )
    baseline = max(rate["forward"], rate["forward-streams"])
    print(
        f"dump-logits / faster pure forward: {rate['dump'] / baseline:.0%} (target >= 90%); "
        f"/ one-stream forward: {rate['dump'] / rate['forward']:.0%}"
    )


def print_parts(parts: dict, height: int, width: int) -> None:
    """The CPU the dump adds beside the forward, per step, and the memory-traffic floor."""
    added = sum(parts[part] for part in PARTS[1:])
    steps = ", ".join(f"{part} {parts[part] * 1000:.1f}" for part in PARTS[1:])
    print(
        f"one thread, alone, CPU ms/image: forward {parts['forward'] * 1000:.1f}; the dump adds "
        f"{steps} = {added * 1000:.1f}. While the forward keeps every core busy, the dump can "
        f"reach at most forward / (forward + added) = "
        f"{parts['forward'] / (parts['forward'] + added):.0%} of its rate"
    )
    bandwidth = copy_bandwidth()
    floor, moved = traffic_floor(height, width, bandwidth)
    after_forward = parts["resize+cast"] + parts["prepare"] + parts["append"]
    print(
        f"added / forward = {added / parts['forward']:.1%} (target <= 10 %). Limit: after the "
        f"forward the dump moves >= {moved / 1e6:.0f} MB per image (resize+cast, append) = "
        f"{floor * 1000:.1f} ms at this core's copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s, beside decoding the PNGs ({parts['decode'] * 1000:.1f} "
        f"ms here: zlib inflate); resize+cast + prepare + append took "
        f"{after_forward * 1000:.1f} ms, {after_forward / floor:.1f}x that floor. "
        f"load average now {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    args = parse_arguments()
    if args.child:
        child(args)
        return
    if args.decode_resize:
        print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}")
        print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
        measure_decode_resize(args)
        return
    height, width = (int(v) for v in args.size.lower().split("x"))
    print(f"machine: {cpu_model()}, {platform.platform()}")
    print(
        f"cores: {os.cpu_count()}, torch {torch.__version__} threads {torch.get_num_threads()}, "
        f"python {sys.version.split()[0]}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    results, parts = run_all(args, height, width)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if not args.parts_only:
        print_rates(args, results, height, width)
    print_parts(parts, height, width)


if __name__ == "__main__":
    main()
