"""
sample.py: caption your own images with a trained SupraVL-Nano, see where it looked, score a split.

    python sample.py --img photo.jpg other.png              # PATH<TAB>caption, one line per image
    python sample.py --img photo.jpg --strategy topk --num-samples 3 --seed 0
    python sample.py --img photo.jpg --attn attn.png        # the attention picture
    python sample.py --eval test --json test.json           # on the run's own dataset (--data: another)

--ckpt (default out/ckpt.pt): a ckpt.pt or a published folder, such as train.py's out/ or SupraVL-Nano-900k
(common.load_model reads each). Captions and scores: scores.py. A printed line never holds a control character
(scores.printable escapes them). Left out: a server batching calls, image URLs.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import scores
from common import (UserError, add_data_flags, atomic_write, check_flags, cli, flag_value, load_model,
                    load_torch, pick_device)

CELL, LABEL, COLUMNS = 128, 18, 6  # panel size in pixels, text strip under it, panels per row
IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # --attn's, by its name; else PNG

def word_attention(tok, ids, attn):
    """[(word, (n_vis,) attention), ...] for one caption: attn (len(ids), n_layers, n_vis) averaged over the
    layers (steadier than any one of three) and over each word's BPE pieces, so the picture shows words."""
    maps = attn.float().mean(1)  # (T, n_vis)
    owner = [max(len(tok.decode(ids[:k + 1]).split()) - 1, 0) for k in range(len(ids))]  # token k's word
    return [(word, maps[[k for k, o in enumerate(owner) if o == w]].mean(0) if w in owner
             else torch.zeros(maps.size(1))) for w, word in enumerate(tok.decode(ids).split())]

def draw_attention(image_uint8, words_maps, path):
    """One picture: the image, then per word a panel where the visual tokens it attended to glow red
    (the sqrt(n_vis) x sqrt(n_vis) grid drawn as blocks, scaled to its maximum) and the rest darken."""
    base = Image.fromarray(np.asarray(image_uint8)).convert("RGB").resize((CELL, CELL), Image.BICUBIC)
    dark = Image.eval(base, lambda v: v // 4)
    glow = Image.blend(base, Image.new("RGB", base.size, (255, 0, 0)), 0.35)
    panels = [(base, "(image)")]
    for word, m in words_maps:
        g = math.isqrt(m.numel())
        heat = (m / m.max() if m.max() > 0 else m).reshape(g, g)  # (g, g) in 0..1
        mask = Image.fromarray((heat.numpy() * 255).astype(np.uint8), "L").resize((CELL, CELL), Image.NEAREST)
        panels.append((Image.composite(glow, dark, mask), word))
    cols = min(COLUMNS, len(panels))
    canvas = Image.new("RGB", (cols * CELL, math.ceil(len(panels) / cols) * (CELL + LABEL)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, (panel, word) in enumerate(panels):
        x, y = (i % cols) * CELL, (i // cols) * (CELL + LABEL)
        canvas.paste(panel, (x, y))
        left = x + (CELL - draw.textlength(word, font=font)) / 2  # centred under its panel
        draw.text((left, y + CELL + 3), word, fill="black", font=font)
    with atomic_write(path) as f:  # the format its name asks for (attn.jpg: a JPEG), else PNG
        canvas.save(f, format=IMAGE_FORMATS.get(os.path.splitext(path)[1].lower(), "PNG"))

def caption_files(args, model, tok, opts):
    """Print PATH<TAB>caption (num_samples lines) for every readable image, a batch at a time so the first
    lines come at once; an unreadable one gets an error line instead. Returns 2 if any failed, else 0."""
    failed = 0
    for start in range(0, len(args.img), args.batch_size):
        batch = []  # (position in --img, path, image) for the readable ones
        for i, path in enumerate(args.img[start:start + args.batch_size], start):
            try:
                batch.append((i, path, data.load_image(path, model.config.img_size)))
            except UserError as e:
                print(f"error: {scores.printable(str(e))}", file=sys.stderr)
                failed += 1
        images = np.array([image for _, _, image in batch])  # (B, S, S, 3) uint8; B = 0 captions nothing
        out = scores.caption(model, tok, images, return_attn=bool(args.attn), **opts)
        samples = [out[0] if args.attn else out]  # the first sample is the one drawn: the same caption
        samples += [scores.caption(model, tok, images, **opts) for _ in range(args.num_samples - 1)]
        for j, (_, path, _) in enumerate(batch):
            lines = [f"{scores.printable(path)}\t{scores.printable(texts[j])}" for texts in samples]
            print("\n".join(lines), flush=True)
        stem, ext = os.path.splitext(args.attn or "")
        for j, (i, _, image) in enumerate(batch if args.attn else []):  # attn.png, or attn_1.png... by place
            words = word_attention(tok, out[1][j], out[2][j])
            draw_attention(image, words, args.attn if len(args.img) == 1 else f"{stem}_{i + 1}{ext}")
    return 2 if failed else 0

def eval_data(args):
    """--eval's dataset: as the flags say, else as the run trained (its ckpt.pt remembers), else Flickr8k."""
    if not (args.data or args.data_dir or args.prep_dir):  # none given: all three come from the run
        run = os.path.join(args.ckpt, "ckpt.pt") if os.path.isdir(args.ckpt) else args.ckpt
        held = load_torch(run) if run.endswith(".pt") and os.path.isfile(run) else {}
        settings = held.get("settings", {}) if isinstance(held, dict) else {}  # a published model.pt has none
        args.data, args.data_dir, args.prep_dir = (settings.get(k) for k in ("data", "data_dir", "prep_dir"))
    args.data = args.data or "flickr8k"

def run_eval(args, model, tok, opts):
    """Score a whole split; the scores go to stdout (and --json), data.prepare's log to stderr."""
    eval_data(args)
    size = model.config.img_size
    prep_dir = data.prepare(args.data, args.data_dir, size, log=lambda m: print(m, file=sys.stderr),
                            prep_dir=args.prep_dir)
    split = data.load_split(prep_dir, args.eval, size)
    r = scores.score_split(model, tok, split, args.data, args.eval, **opts)
    ms = r["ms_per_caption"]
    print(f"{args.data} {args.eval}: {r['n_images']} images, {args.strategy} search in batches of "
          f"{args.batch_size}: {ms:.1f} ms per caption ({1000 / ms:.1f} captions/s)")
    print("  ".join(f"BLEU-{k} {r[f'bleu{k}']:.4f}" for k in range(1, 5)) + f"  CIDEr-D {r['cider']:.4f}")
    if r["exact_match"] is not None:
        one, two = ("none" if r[k] is None else f"{r[k]:.4f}" for k in ("exact_match_one", "exact_match_two"))
        print(f"exact match {r['exact_match']:.4f}  (one-object images {one}, two-object images {two})")
    if args.json:
        with atomic_write(args.json, "w") as f:
            f.write(json.dumps({k: v for k, v in r.items() if k != "samples"}, indent=1) + "\n")
    return 0

def writable(path):
    """Whether path can be written, as far as a check before the work can tell: no folder, in a folder."""
    return not os.path.isdir(path) and os.path.isdir(os.path.dirname(path) or ".")

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Caption images or score a split with a SupraVL-Nano model.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--img", nargs="+", help="image files to caption")
    what.add_argument("--eval", choices=["val", "test"], help="score a whole split")
    p.add_argument("--ckpt", default="out/ckpt.pt", help="a ckpt.pt, or a published folder")
    p.add_argument("--strategy", choices=["beam", "greedy", "topk"], default="beam")
    p.add_argument("--beam-width", type=int, default=3)
    p.add_argument("--length-penalty", type=float, default=0.0, help="beam score / len**this")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=1, help="captions per image (topk)")
    p.add_argument("--seed", type=int, help="makes top-k repeatable")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--attn", help="with --img: the attention picture (attn_1.png... for several images)")
    add_data_flags(p, None, "the run's own (its ckpt.pt remembers it), else flickr8k")
    p.add_argument("--json", help="with --eval: the scores as JSON")
    a = p.parse_args(argv)
    rules = [(flag, flag_value(a, flag) >= 1, "at least 1")
             for flag in ("--beam-width", "--top-k", "--num-samples", "--batch-size")]
    check_flags(a, rules + [
        ("--seed", a.seed is None or 0 <= a.seed < 2 ** 32, "0 to 2**32 - 1"),
        ("--temperature", a.temperature > 0, "above 0"),
        ("--length-penalty", 0 <= a.length_penalty <= 10, "0 to 10"),
        ("--num-samples", a.num_samples == 1 or a.strategy == "topk",
         "1 unless --strategy topk (beam and greedy give one caption)"),
        ("--json", not a.json or a.eval and writable(a.json), "a file in an existing folder, with --eval"),
        ("--attn", not a.attn or a.img and writable(a.attn), "a file in an existing folder, with --img")])
    return a

def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    model, tok = load_model(args.ckpt, device)
    half = model.config.vocab_size // 2  # a beam step keeps the 2W best next tokens of the vocabulary
    check_flags(args, [("--beam-width", args.beam_width <= half or args.strategy != "beam",
                        f"at most {half}, half the vocabulary")])
    seeded = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    opts = dict(strategy=args.strategy, beam_width=args.beam_width, length_penalty=args.length_penalty,
                temperature=args.temperature, top_k=args.top_k, batch_size=args.batch_size, generator=seeded)
    return (run_eval if args.eval else caption_files)(args, model, tok, opts)

if __name__ == "__main__":
    sys.exit(cli(main))
