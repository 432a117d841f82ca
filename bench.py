"""
bench.py: every speed figure the project claims, each beside a baseline measured in the same run.

    tokenizer   our BPE trainer vs a naive one that recounts every pair for every merge (minbpe's way)
    generation  our batched, KV-cached decoding vs the card's loop (one image, one beam at a time,
                the whole sequence and the CNN recomputed for every new token), identical weights
    training    images/s of a batch-64 step in fp32 and bf16 autocast, as a fraction of the
                machine's measured fp32 matmul peak
    data        batches of 64 assembled from the prepared uint8 arrays vs training steps, and
                image preparation (decode + resize) on real Flickr8k JPEGs when ../shared has them
    sampling    whole-process time to the first caption, and beam-search captions/s over a split

Left out: GPU figures (train.py prints images/s wherever it runs) and anything that needs the full
Flickr8k download. Figures that need ../shared/flickr8k are skipped when it is absent.

    python bench.py            # a few minutes
    python bench.py --quick    # under a minute, fewer repeats
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import bpe
import data
import sample
import train
from model import VLM, Config

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "flickr8k")
ROWS = []  # (what, ours, baseline, ratio)


def row(what, ours, baseline="", ratio=""):
    ROWS.append((what, ours, baseline, ratio))
    print(f"  {what}: {ours}  {baseline}  {ratio}", file=sys.stderr)


def best_time(fn, repeats):
    """Best wall time of `repeats` calls: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# -----------------------------------------------------------------------------
# Tokenizer

def naive_bpe_train(texts, n_merges):
    """The textbook trainer: every merge recounts every pair of every word of the corpus."""
    words = [list(w.encode()) for t in texts for w in bpe.SPLIT.findall(t)]
    for k in range(n_merges):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        pair = max(counts, key=counts.get)
        words = [bpe.merge(w, pair, 256 + k) for w in words]


def bench_tokenizer(quick):
    path = os.path.join(SHARED, "Flickr8k.token.txt")
    if not os.path.exists(path):
        row("BPE", "skipped: ../shared/flickr8k/Flickr8k.token.txt is absent")
        return
    caps = [c for cs in data.parse_tokens(path)[0].values() for c in cs]
    t_train = best_time(lambda: bpe.Tokenizer.train(caps, 2048), 2 if quick else 5)
    tok = bpe.Tokenizer.train(caps, 2048)
    row(f"BPE train, 2048 vocab, {len(caps):,} captions", f"{t_train:.2f} s", "HF tokenizers (Rust): 0.30 s*")

    def encode_all():
        fresh = bpe.Tokenizer.from_json(tok.to_json())  # an empty per-word cache each time
        for c in caps:
            fresh.encode(c)
    t_enc = best_time(encode_all, 2 if quick else 5)
    row(f"BPE encode all {len(caps):,} captions", f"{t_enc:.2f} s", "HF tokenizers: 0.35-0.63 s*")

    n, merges = (1000, 100) if quick else (4000, 300)
    t_naive = best_time(lambda: naive_bpe_train(caps[:n], merges), 1)
    t_ours = best_time(lambda: bpe.Tokenizer.train(caps[:n], 259 + merges), 3)
    row(f"BPE train, first {n} captions, {merges} merges", f"{t_ours * 1000:.0f} ms",
        f"naive {t_naive * 1000:.0f} ms", f"{t_naive / t_ours:.0f}x")


# -----------------------------------------------------------------------------
# Generation: the card's loop against ours

@torch.no_grad()
def card_greedy(model, image, max_new):
    ids = [model.config.bos_id]
    for _ in range(max_new):
        logits, _ = model(image[None], torch.tensor([ids]))  # everything again, every token
        nxt = int(logits[0, -1].argmax())
        if nxt == model.config.eos_id:
            break
        ids.append(nxt)
    return ids[1:]


@torch.no_grad()
def card_beam(model, image, width, max_new):
    beams = [([model.config.bos_id], 0.0)]
    for _ in range(max_new):
        cands = []
        for ids, score in beams:  # one forward per beam
            logp = model(image[None], torch.tensor([ids]))[0][0, -1].log_softmax(-1)
            top = logp.topk(width)
            cands += [(ids + [int(i)], score + float(v)) for v, i in zip(top.values, top.indices)]
        beams = sorted(cands, key=lambda c: -c[1])[:width]
    return beams[0][0][1:]


def bench_generation(quick):
    torch.manual_seed(0)
    # eos_id -1 is never produced: both sides decode the full 48 tokens, the worst case.
    model = VLM(Config(eos_id=-1)).eval()
    n = 4 if quick else 16
    images = torch.randn(n, 3, 112, 112)
    for name, card, ours in (
            ("greedy", lambda im: card_greedy(model, im, 48), lambda: model.generate_greedy(images, 48)),
            ("beam-3", lambda im: card_beam(model, im, 3, 48), lambda: model.generate_beam(images, 3, 48))):
        t_card = best_time(lambda: [card(im) for im in images[: max(1, n // 4)]], 1) / max(1, n // 4)
        t_ours = best_time(ours, 1 if quick else 3) / n
        row(f"generate {name}, 48 tokens, {n} images, per image", f"{t_ours * 1000:.1f} ms",
            f"card's loop {t_card * 1000:.0f} ms", f"{t_card / t_ours:.0f}x")


# -----------------------------------------------------------------------------
# Training step and data path

def matmul_peak():
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    return 2 * 1024 ** 3 / best_time(lambda: a @ b, 10)


def bench_training(quick):
    torch.manual_seed(0)
    B, T = 64, 16  # T: a Flickr8k batch's longest caption is ~20 tokens, most are 12
    model = VLM(Config())
    opt = train.make_optimizer(model, argparse.Namespace(lr=3e-4, weight_decay=0.01))
    x, ids = torch.randn(B, 3, 112, 112), torch.randint(3, 2048, (B, T))

    def step(dtype):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, ids, ids)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:
        step(torch.float32)
    flops = fc.get_total_flops() / B
    peak = matmul_peak()
    row("fp32 matmul 1024^3 (the machine's peak)", f"{peak / 1e9:.0f} GFLOP/s")
    steps = {}
    for dtype in (torch.float32, torch.bfloat16):
        step(dtype)
        steps[dtype] = best_time(lambda: step(dtype), 3 if quick else 8)
        ips = B / steps[dtype]
        row(f"train step, batch {B}, {str(dtype)[6:]}", f"{ips:.0f} img/s",
            f"{flops / 1e6:.0f} MFLOP/img", f"{ips * flops / peak:.0%} of fp32 peak")

    n = 6000
    images = torch.randint(0, 256, (n, 112, 112, 3), dtype=torch.uint8)
    tokens = torch.randint(0, 2048, (5 * n, 49))
    pairs = (tokens, torch.arange(5 * n) // 5, torch.randint(8, 20, (5 * n,)))
    rows = torch.randperm(5 * n)[:B]
    t_batch = best_time(lambda: train.get_batch(rows, *pairs, images, "cpu"), 20)
    row("batch of 64 assembled (gather + normalise)", f"{1 / t_batch:.0f} batch/s",
        f"train step {1 / min(steps.values()):.1f} step/s", f"{min(steps.values()) / t_batch:.0f}x headroom")


def bench_preparation(quick):
    src = os.path.join(SHARED, "images128")
    if not os.path.isdir(src):
        row("image preparation", "skipped: ../shared/flickr8k/images128 is absent")
        return
    paths = sorted(os.path.join(src, f) for f in os.listdir(src))[: 100 if quick else 434]
    t = best_time(lambda: data.decode_images(paths, 112), 1)
    row(f"prepare {len(paths)} real 128px JPEGs -> 112px, {os.cpu_count()} cores", f"{len(paths) / t:.0f} img/s",
        f"8091 images: {8091 * t / len(paths):.0f} s")
    with tempfile.TemporaryDirectory() as tmp:  # full-size photos, like the 500x375 originals
        big = []
        for p in paths[:60]:
            big.append(os.path.join(tmp, os.path.basename(p)))
            Image.open(p).resize((500, 375), Image.BICUBIC).save(big[-1], quality=90)
        t = best_time(lambda: data.decode_images(big, 112), 1)
        row(f"prepare {len(big)} 500x375 JPEGs -> 112px", f"{len(big) / t:.0f} img/s",
            f"8091 images: {8091 * t / len(big):.0f} s")


# -----------------------------------------------------------------------------
# Sampling: the command people run

def bench_sampling(quick):
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        tok = bpe.Tokenizer.train(["a red circle", "a small blue square above a large red circle"], 300)
        model = VLM(Config(vocab_size=tok.vocab_size))
        sample.save_pretrained(tmp, model, tok)
        img = os.path.join(tmp, "x.png")
        Image.fromarray(np.zeros((112, 112, 3), np.uint8)).save(img)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "sample.py", "--ckpt", tmp, "--img", img, "--device", "cpu"],
                       check=True, capture_output=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        row("python sample.py --img x.png, whole process (CPU)", f"{time.perf_counter() - t0:.2f} s")
        split = data.Split([], np.random.randint(0, 256, (256 if quick else 1000, 112, 112, 3), np.uint8), [])
        t = best_time(lambda: sample.caption(model.eval(), tok, split.images, strategy="beam"), 1)
        row(f"beam-3 captions of a {len(split.images)}-image split (untrained model)",
            f"{len(split.images) / t:.0f} captions/s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes: under a minute")
    args = p.parse_args()
    t0 = time.time()
    train.keep_freed_memory()  # as train.py does on the CPU
    for part in (bench_tokenizer, bench_generation, bench_training, bench_preparation, bench_sampling):
        print(f"{part.__name__}...", file=sys.stderr)
        part(args.quick)
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    print(f"\nmachine: {names[0] if names else cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}")
    w = [max(len(r[i]) for r in ROWS + [("measurement", "ours", "baseline", "ratio")]) for i in range(4)]
    for r in [("measurement", "ours", "baseline", "ratio"), tuple("-" * k for k in w)] + ROWS:
        print("  ".join(s.ljust(k) for s, k in zip(r, w)))
    print(f"* not run here; measured once on this machine's kind (issue 7). bench took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
