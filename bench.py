"""
bench.py: the project's speed figures (README "Measured"), each beside a baseline measured in the same run.

Left out: GPU figures (train.py prints img/s wherever it runs). Figures that need ../shared/flickr8k
are skipped when it is absent.

    python bench.py            # about 23 s on the 2-core development machine
    python bench.py --quick    # fewer repeats and smaller sizes: 11 s
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import timeit
from collections import Counter

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import bpe
import common
import data
import scores
import train
from model import VLM, Config

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "flickr8k")
ROWS = [("measurement", "ours", "baseline", "ratio")]  # the table's header, then a row per figure

def row(what, ours, baseline="", ratio=""):
    ROWS.append((what, ours, baseline, ratio))
    print(f"  {what}: {ours}  {baseline}  {ratio}", file=sys.stderr)

def best_time(fn, repeats):
    """Best wall time of `repeats` calls, the least disturbed by other work; gc on, as in real use."""
    return min(timeit.repeat(fn, "gc.enable()", number=1, repeat=repeats))

def bench_tokenizer(quick):
    folder = next((f for f in (SHARED, os.path.join(HERE, "data", "flickr8k"))
                   if os.path.exists(os.path.join(f, data.TOKEN_FILE))), None)
    if folder is None:
        return row("BPE", "skipped: no Flickr8k.token.txt in ../shared/flickr8k or data/flickr8k")
    captions = data.parse_tokens(os.path.join(folder, data.TOKEN_FILE))[0]
    caps = [c for cs in captions.values() for c in cs]
    t_train = best_time(lambda: bpe.Tokenizer.train(caps, 2048), 2 if quick else 5)
    tok = bpe.Tokenizer.train(caps, 2048)
    row(f"BPE train, 2048 vocab, {len(caps):,} captions", f"{t_train:.2f} s")
    fresh = lambda: bpe.Tokenizer.from_json(tok.to_json())  # an empty per-word cache each pass
    t_enc = best_time(lambda: list(map(fresh().encode, caps)), 2 if quick else 5)
    row(f"BPE encode all {len(caps):,} captions (empty cache)", f"{t_enc:.2f} s")
    n, merges = (1000, 100) if quick else (4000, 300)
    t_plain = best_time(lambda: bpe.train_simple(caps[:n], 259 + merges), 1)
    t_fast = best_time(lambda: bpe.Tokenizer.train(caps[:n], 259 + merges), 3)
    row(f"BPE train, first {n} captions, {merges} merges", f"{t_fast * 1000:.0f} ms",
        f"plain trainer {t_plain * 1000:.0f} ms", f"{t_plain / t_fast:.0f}x")
    bpe_vs_words(folder, captions)

def bpe_vs_words(folder, captions):
    """The card's choice of BPE: 2048 BPE tokens vs 2048 whole words, from train captions, on test ones."""
    split = lambda name: [c for n in open(os.path.join(folder, data.SPLIT_LISTS[name])).read().split()
                          for c in captions.get(n, [])]
    train_caps, test_caps = split("train"), split("test")
    words = Counter(w for c in train_caps for w in c.split())
    vocab = {w for w, _ in words.most_common(2048 - 3)}
    test_words = [w for c in test_caps for w in c.split()]
    unknown = sum(w not in vocab for w in test_words) / len(test_words)
    tok = bpe.Tokenizer.train(train_caps, 2048)
    per_caption = sum(len(tok.encode(c)) for c in test_caps) / len(test_caps)
    row(f"{len(test_caps):,} test captions, 2048 BPE tokens", f"0% unknown, {per_caption:.1f} tokens/caption",
        f"2048 whole words: {unknown:.1%} unknown, {len(test_words) / len(test_caps):.1f} tokens/caption")

@torch.no_grad()
def card_beam(model, image, width, max_new):
    """The card's beam search: one image, one beam at a time, the whole sequence every step."""
    beams = [([model.config.bos_id], 0.0)]
    for _ in range(max_new):
        cands = []
        for ids, score in beams:
            top = model(image[None], torch.tensor([ids]))[0][0, -1].log_softmax(-1).topk(width)
            cands += [(ids + [int(i)], score + float(v)) for v, i in zip(*top)]
        beams = sorted(cands, key=lambda c: -c[1])[:width]
    return beams[0][0][1:]

def bench_generation(quick):
    """Cached, batched decoding vs the card's plain loops, same weights."""
    torch.manual_seed(0)
    model = VLM(Config()).eval()
    model.config.eos_id = -1  # never produced (Config refuses it: set after): all 48 tokens, the worst case
    n = 4 if quick else 16
    images = torch.randn(n, 3, 112, 112)
    for name, plain, ours in (
            ("greedy", lambda im: model.generate_plain(im[None], 48),
             lambda: model.generate_greedy(images, 48)),
            ("beam-3", lambda im: card_beam(model, im, 3, 48), lambda: model.generate_beam(images, 3, 48))):
        t_plain = best_time(lambda: [plain(im) for im in images[:n // 4]], 1) / (n // 4)
        t_ours = best_time(ours, 1 if quick else 3) / n
        row(f"generate {name}, 48 tokens, {n} images, per image", f"{t_ours * 1000:.1f} ms",
            f"plain loop {t_plain * 1000:.0f} ms", f"{t_plain / t_ours:.0f}x")

def bench_training(quick):
    """Steps as train.py runs them on the CPU (common.precision) vs SDPA's default kernel; a batch gather."""
    a = torch.randn(1024, 1024)
    peak = 2 * 1024 ** 3 / best_time(lambda: a @ a, 10)
    row("fp32 matmul 1024^3 (the machine's peak)", f"{peak / 1e9:.0f} GFLOP/s")
    contexts = {"fp32": lambda: common.precision("cpu", torch.float32),
                "bf16": lambda: common.precision("cpu", torch.bfloat16),
                "bf16, SDPA's default kernel": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    for T, source in ((28, "Flickr8k's longest"), (16, "shapes")):
        torch.manual_seed(0)
        model = VLM(Config())
        opt = train.make_optimizer(model, argparse.Namespace(lr=3e-4, weight_decay=0.01))
        x, ids = torch.randn(64, 3, 112, 112), torch.randint(3, 2048, (64, T))
        def step(context):
            with context():
                loss = model(x, ids, ids)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as fc:
            step(contexts["fp32"])
        flops = fc.get_total_flops()
        times = {}
        for label, context in contexts.items():
            step(context)
            t = times[label] = best_time(lambda: step(context), 3 if quick else 8)
            row(f"train step, batch 64, {T} tokens ({source}), {label}", f"{64 / t:.0f} img/s",
                f"{flops / 64 / 1e6:.0f} MFLOP/img", f"{flops / t / peak:.0%} of fp32 peak")
    x = torch.nn.functional.avg_pool2d(x, 2)  # (64, 3, 56, 56): what step() sees in a --half-res-epochs epoch
    t = best_time(lambda: step(contexts["bf16"]), 3 if quick else 8)
    row("train step, batch 64, 16 tokens, bf16, 56x56 images (half-res epoch)", f"{64 / t:.0f} img/s",
        f"112x112: {64 / times['bf16']:.0f} img/s", f"{times['bf16'] / t:.1f}x")
    images = torch.randint(0, 256, (6000, 112, 112, 3), dtype=torch.uint8)
    tokens, image_of = torch.randint(0, 2048, (30000, 49)), torch.arange(30000) // 5
    rows = torch.randperm(30000)[:64]
    t_batch = best_time(lambda: train.get_batch(rows, 28, tokens, image_of, images), 20)
    row("batch of 64 gathered + normalised", f"{1 / t_batch:.0f} batch/s",
        f"bf16 train step {times['bf16']:.3f} s", f"{times['bf16'] / t_batch:.0f}x headroom")

def bench_preparation(quick):
    src = os.path.join(SHARED, "images128")
    if not os.path.isdir(src):
        return row("image preparation", "skipped: ../shared/flickr8k/images128 is absent")
    paths = sorted(os.path.join(src, f) for f in os.listdir(src))[: 100 if quick else 434]
    with tempfile.TemporaryDirectory() as tmp:  # full-size photos too, like the 500x375 originals
        big = [os.path.join(tmp, os.path.basename(p)) for p in paths[:60]]
        for p, q in zip(paths, big):
            Image.open(p).resize((500, 375), Image.BICUBIC).save(q, quality=90)
        for what, ps in ((f"{len(paths)} real 128px JPEGs -> 112px, {os.cpu_count()} cores", paths),
                         (f"{len(big)} 500x375 JPEGs -> 112px", big)):
            t = best_time(lambda: data.decode_images(ps, 112), 1)
            row(f"prepare {what}", f"{len(ps) / t:.0f} img/s", f"8091 images: {8091 * t / len(ps):.0f} s")

def bench_sampling(quick):
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        tok = bpe.Tokenizer.train(["a red circle", "a small blue square above a large red circle"], 300)
        model = VLM(Config(vocab_size=tok.vocab_size))
        common.save_pretrained(tmp, model, tok)
        img = os.path.join(tmp, "x.png")
        Image.new("RGB", (112, 112)).save(img)
        cmd = [sys.executable, "sample.py", "--ckpt", tmp, "--img", img, "--device", "cpu"]
        t = best_time(lambda: subprocess.run(cmd, check=True, capture_output=True, cwd=HERE), 1)
        row("python sample.py --img x.png, whole process (CPU)", f"{t:.2f} s")
        images = torch.randint(0, 256, (256 if quick else 1000, 112, 112, 3), dtype=torch.uint8)
        t = best_time(lambda: scores.caption(model.eval(), tok, images, strategy="beam"), 1)
        row(f"beam-3 captions of {len(images)} images (untrained model)", f"{len(images) / t:.0f} captions/s")

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes")
    args = p.parse_args()
    t0 = time.time()
    common.keep_freed_memory()  # as train.py does on the CPU
    for part in (bench_tokenizer, bench_generation, bench_training, bench_preparation, bench_sampling):
        part(args.quick)
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    print(f"\nmachine: {names[0] if names else platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}")
    widths = [max(map(len, column)) for column in zip(*ROWS)]
    ROWS.insert(1, tuple("-" * w for w in widths))
    for r in ROWS:
        print("  ".join(s.ljust(w) for s, w in zip(r, widths)))
    print(f"bench took {time.time() - t0:.0f} s")

if __name__ == "__main__":
    main()
