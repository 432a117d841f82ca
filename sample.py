"""Caption images with a trained SupraVL-Nano, draw where it looked, and score a split like papers do.

    python sample.py --img photo.jpg other.png              # PATH<TAB>caption, one line per image
    python sample.py --img photo.jpg --ckpt out --strategy topk --num-samples 3 --seed 0
    python sample.py --img photo.jpg --attn attn.png        # the attention picture
    python sample.py --ckpt out/ckpt.pt --eval val --data shapes --json val.json
    python sample.py --eval test --data-dir ../shared/flickr8k --prep-dir data/flickr8k  # read-only data

--ckpt is train.py's out/ckpt.pt or a folder in the published layout (model.safetensors,
config.json, tokenizer.json), which save_pretrained below writes. Also here, all hand-written:
the coco-caption metrics (corpus BLEU-1..4 and CIDEr-D) and a small validating safetensors
reader/writer. Left out: METEOR, ROUGE-L and SPICE (they need Java), coco's PTB tokenizer (the
captions are already cleaned by data.clean_caption, so we split on whitespace).
Tests: python -m pytest -q test_all.py -k "bleu or cider or safetensors or load_model or caption or cli"
"""

import argparse
import json
import math
import os
import struct
import sys
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
from bpe import Tokenizer
from data import DataError, atomic_write
from model import VLM, Config

# ----------------------------------------------------------------------------- metrics (coco-caption)


def ngrams(words, n=4):
    """Counts of all 1..n-grams. ngrams("a a b".split(), 2) -> {(a,):2, (b,):1, (a,a):1, (a,b):1}"""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(references, hypotheses):
    """Corpus BLEU-1..4 exactly as pycocoevalcap's BleuScorer with option "closest"; references: one
    list of caption strings per image, hypotheses: one string per image. n-gram matches are clipped by
    the largest count in any one reference and summed over the corpus; the brevity penalty compares the
    summed hypothesis length with the summed reference lengths, each the one closest to its hypothesis
    (ties: the shorter). coco's smoothing: tiny=1e-15 on matches, small=1e-9 on guesses, so a corpus
    with no 4-gram at all scores (1e-6)**(1/4), not 0."""
    if len(references) != len(hypotheses):
        raise ValueError(f"bleu: {len(references)} reference lists for {len(hypotheses)} hypotheses")
    tiny, small = 1e-15, 1e-9
    correct, guess, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for refs, hyp in zip(references, hypotheses):
        words = hyp.split()
        max_ref = Counter()
        for ref in refs:
            max_ref |= ngrams(ref.split())  # | keeps the larger count of each n-gram
        hyp_len += len(words)
        ref_len += min((abs(len(r.split()) - len(words)), len(r.split())) for r in refs)[1]
        for gram, count in ngrams(words).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(4):
            guess[k] += max(0, len(words) - k)
    ratio = (hyp_len + tiny) / (ref_len + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for k in range(4):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1 / (k + 1)) * brevity)
    return scores


def cider(references, hypotheses, n=4, sigma=6.0):
    """CIDEr-D exactly as pycocoevalcap's CiderScorer: the mean over images of
    10 * mean over n=1..4 of mean over refs of clipped-cosine(tf-idf hyp, tf-idf ref) * length penalty.
    Document frequencies come from the references of the evaluated set (an n-gram counts once per
    image), idf = log(n_images) - log(max(1, df)), so one image alone always scores 0."""
    if len(references) != len(hypotheses):
        raise ValueError(f"cider: {len(references)} reference lists for {len(hypotheses)} hypotheses")
    ref_counts = [[ngrams(r.split(), n) for r in refs] for refs in references]
    df = Counter(g for counts in ref_counts for g in set().union(*counts))
    log_images = math.log(len(references))

    def vector(counts):
        """Per n: {ngram: tf * idf} and its norm, plus coco's length: the number of BIGRAMS
        (= words - 1; only differs from the word count's delta when a caption is empty)."""
        vec = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for hyp, counts in zip(hypotheses, ref_counts):
        h_vec, h_norm, h_len = vector(ngrams(hyp.split(), n))
        total = 0.0
        for ref in counts:
            r_vec, r_norm, r_len = vector(ref)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                # clipped: a hypothesis repeating an n-gram gains nothing beyond the reference's weight
                val = sum(min(w, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, w in h_vec[k].items())
                if h_norm[k] and r_norm[k]:
                    val /= h_norm[k] * r_norm[k]
                total += val * penalty
        scores.append(10.0 * total / n / len(counts))
    return sum(scores) / len(scores)

# ----------------------------------------------------------------------------- safetensors, by hand
# Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}
# (plus an optional "__metadata__" of strings), padded with spaces to a multiple of 8, then the raw
# little-endian tensor bytes; data_offsets count from the end of the header.


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2 ** 20  # the real library's cap as well; our header is ~5 KB


def write_safetensors(path, tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype as its bytes (little-endian host)
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
    blob = struct.pack("<Q", len(text)) + text + b"".join(blobs)
    atomic_write(path, lambda f: f.write(blob))


def read_safetensors(path):
    """{name: tensor} from a .safetensors file, refusing anything malformed with DataError.
    Every size is checked against the bytes actually in the file before anything is allocated."""
    def bad(why):
        return DataError(f"{path}: not a valid safetensors file: {why}")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise bad(f"only {size} bytes")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER):
                raise bad(f"header length {n} goes beyond the file's {size} bytes")
            head, blob = f.read(n), f.read()  # blob: the data the file holds, whatever the header claims
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")
    try:
        header = json.loads(head)
    except ValueError:  # also UnicodeDecodeError
        raise bad("header is not JSON")
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)  # free-form strings, e.g. {"format": "pt"}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = DTYPES.get(info.get("dtype")), info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise bad(f"tensor {name!r} has unknown dtype {info.get('dtype')!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= len(blob)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r} outside the {len(blob)} data bytes")
        need = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != need:
            raise bad(f"tensor {name!r}: shape {shape} of {info['dtype']} needs {need} bytes, "
                      f"data_offsets give {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name, dtype, shape))
    end = 0
    for start, stop, name, _, _ in sorted(spans, key=lambda s: s[:2]):
        if start != end:  # like the real library: the tensors tile the data, no gaps or overlaps
            raise bad(f"tensor {name!r} starts at byte {start}, expected {end}")
        end = stop
    if end != len(blob):
        raise bad(f"{len(blob) - end} bytes after the last tensor")
    return {name: (torch.frombuffer(bytearray(blob[a:b]), dtype=dtype) if b > a  # frombuffer refuses 0 bytes
                   else torch.empty(0, dtype=dtype)).reshape(shape)
            for a, b, name, dtype, shape in spans}

# ----------------------------------------------------------------------------- checkpoints

# The published config.json keys and the Config fields they hold.
CONFIG_KEYS = {"D_MODEL": "d_model", "N_HEADS": "n_heads", "N_LAYERS": "n_layers", "D_FF": "d_ff",
               "VIS_CH": "vis_ch", "N_VIS": "n_vis", "VOCAB_SIZE": "vocab_size", "MAX_SEQ": "max_seq",
               "IMG_SIZE": "img_size", "BOS_ID": "bos_id", "EOS_ID": "eos_id", "PAD_ID": "pad_id"}


def save_pretrained(out_dir, model, tok):
    """The published layout: model.safetensors (tied tok_emb/lm_head stored twice, so a strict
    load_state_dict finds both names), config.json with the published keys, tokenizer.json."""
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), model.state_dict(), {"format": "pt"})
    config = {key: getattr(model.config, field) for key, field in CONFIG_KEYS.items()}
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(os.path.join(out_dir, "config.json"), lambda f: f.write(text.encode()))
    atomic_write(os.path.join(out_dir, "tokenizer.json"), lambda f: f.write(tok.to_json().encode()))


def load_torch_checkpoint(path):
    """A ckpt.pt as a dict, safely (weights_only: tensors, numbers, strings; never code). Every failure
    is one DataError line. Also train.py's --resume reads its checkpoint with this."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such checkpoint file or folder")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise DataError(f"{path}: not a PyTorch checkpoint (not a zip archive as torch.save writes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes: torch raises many kinds
        first = str(e).split("\n")[0].split(". ")[0][:120]  # torch's messages run on for lines
        raise DataError(f"{path}: not a readable PyTorch checkpoint ({first})")


def _read_checkpoint(path):
    """(state dict, Config fields, the file to blame for the config, tokenizer) from either form."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            if not os.path.isfile(os.path.join(path, name)):
                raise DataError(f"{path}: no {name} (expected model.safetensors, config.json, tokenizer.json)")
        config_path = os.path.join(path, "config.json")
        try:
            with open(config_path, encoding="utf-8") as f:
                published = json.load(f)
            fields = {field: published[key] for key, field in CONFIG_KEYS.items()}
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{config_path}: not a SupraVL config ({type(e).__name__}: {e})")
        return (read_safetensors(os.path.join(path, "model.safetensors")), fields, config_path,
                Tokenizer.load(os.path.join(path, "tokenizer.json")))
    ckpt = load_torch_checkpoint(path)
    types = {"model": dict, "config": dict, "tokenizer": str}
    if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), t) for k, t in types.items())):
        raise DataError(f"{path}: not a SupraVL checkpoint (expects keys model, config, tokenizer)")
    return ckpt["model"], ckpt["config"], path, Tokenizer.from_json(ckpt["tokenizer"], name=path)


def load_model(path, device="cpu"):
    """(model in eval mode on device, tokenizer) from a ckpt.pt or a published folder."""
    try:
        state, fields, where, tok = _read_checkpoint(path)
    except ValueError as e:  # bpe's load errors; they name their file
        raise DataError(str(e)) from None
    held = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
    try:
        c = Config(**fields)
        # The weights (real bytes) bound the model: a config.json claiming D_MODEL = 10**6 is refused
        # here instead of making VLM allocate terabytes. These are its largest matrices.
        d = c.d_model
        if max(c.vocab_size * d, (c.n_vis + c.max_seq) * d, c.n_layers * d * c.d_ff, c.vis_ch ** 2) > held:
            raise ValueError(f"it describes a bigger model than the {held} weights hold")
        model = VLM(c)
    except (ValueError, TypeError, RuntimeError) as e:
        raise DataError(f"{where}: bad config ({e})")
    want = model.state_dict()
    problems = {"missing weights": [k for k in want if k not in state],
                "unknown weights": [k for k in state if k not in want],
                "wrong shapes": [f"{k} {tuple(getattr(v, 'shape', ()))} not {tuple(want[k].shape)}"
                                 for k, v in state.items()
                                 if k in want and (not isinstance(v, torch.Tensor) or v.shape != want[k].shape)]}
    for what, names in problems.items():
        if names:  # one line, whatever is wrong
            raise DataError(f"{where}: {what}: {', '.join(names[:3])}" + (" ..." if len(names) > 3 else ""))
    if tok.vocab_size > c.vocab_size:
        raise DataError(f"{path}: tokenizer has {tok.vocab_size} ids, the model only {c.vocab_size}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), tok

# ----------------------------------------------------------------------------- captioning


def word_attention(tok, ids, attn):
    """[(word, (n_vis,) attention), ...] for one generated caption. attn (len(ids), n_layers, n_vis)
    is averaged over LAYERS (steadier than any one of three), and over the BPE pieces of each word,
    so the picture shows words: token k belongs to word len(decode(ids[:k+1]).split()) - 1."""
    maps = attn.float().mean(1)  # (T, n_vis)
    owner = [max(len(tok.decode(ids[:k + 1]).split()) - 1, 0) for k in range(len(ids))]
    return [(word, maps[[k for k, o in enumerate(owner) if o == w]].mean(0) if w in owner
             else torch.zeros(maps.size(1))) for w, word in enumerate(tok.decode(ids).split())]


def caption(model, tok, images_uint8, strategy="beam", beam_width=3, length_penalty=0.0,
            temperature=0.8, top_k=50, generator=None, batch_size=64, return_attn=False):
    """Captions for uint8 images (N,S,S,3), numpy or tensor, in batches of batch_size.
    With return_attn: (captions, maps) where maps[i] = [(word, (n_vis,) attention), ...]."""
    if strategy not in ("beam", "greedy", "topk"):  # before any work, and even for no images
        raise ValueError(f"unknown strategy {strategy!r} (beam, greedy, topk)")
    device, max_new = next(model.parameters()).device, model.config.max_seq
    texts, maps = [], []
    for start in range(0, len(images_uint8), batch_size):
        batch = torch.tensor(np.asarray(images_uint8[start:start + batch_size]), device=device)  # a copy
        x = data.normalize(batch)  # (B, 3, S, S)
        if strategy == "beam":
            out = model.generate_beam(x, beam_width, max_new, length_penalty, return_attn=return_attn)
        elif strategy == "greedy":
            out = model.generate_greedy(x, max_new, return_attn=return_attn)
        else:
            out = model.generate_topk(x, max_new, temperature, top_k, generator, return_attn=return_attn)
        seqs, attns = out if return_attn else (out, None)
        texts += [tok.decode(s).strip() for s in seqs]
        if return_attn:
            maps += [word_attention(tok, s, m) for s, m in zip(seqs, attns)]
    return (texts, maps) if return_attn else texts


def evaluate(model, tok, split, data_name, strategy="beam", beam_width=3, batch_size=64,
             split_name="val", **generate):
    """Caption every image of a data.Split and score it: BLEU-1..4, CIDEr-D and, for shapes, exact
    match, also apart for one-object and two-object images (those whose captions have a relation).
    "ms_per_caption": the captioning time alone; "samples": the first 8 captions with their references."""
    model.eval()
    t0 = time.perf_counter()
    hyps = caption(model, tok, split.images, strategy, beam_width, batch_size=batch_size, **generate)
    ms = 1000 * (time.perf_counter() - t0) / max(len(hyps), 1)  # decode() synced the device already
    b = bleu(split.captions, hyps)
    result = {"split": split_name, "n_images": len(hyps), "bleu1": b[0], "bleu2": b[1], "bleu3": b[2],
              "bleu4": b[3], "cider": cider(split.captions, hyps), "exact_match": None, "ms_per_caption": ms}
    if data_name == "shapes":
        hits = [data.exact_match(h, refs) for h, refs in zip(hyps, split.captions)]
        two = [bool({"left", "right", "above", "below"} & set(refs[0].split())) for refs in split.captions]
        for key, group in (("exact_match", hits),
                           ("exact_match_one", [h for h, t in zip(hits, two) if not t]),
                           ("exact_match_two", [h for h, t in zip(hits, two) if t])):
            result[key] = sum(group) / len(group) if group else None
    result["samples"] = [{"name": n, "caption": h, "references": r}
                         for n, h, r in zip(split.names[:8], hyps, split.captions)]
    return result

# ----------------------------------------------------------------------------- the attention picture

CELL, LABEL, COLUMNS = 128, 18, 6  # panel size in pixels, text strip under it, panels per row


def draw_attention(image_uint8, words_maps, path):
    """One PNG: the image, then per word a panel where the visual tokens it attended to glow red
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
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))

# ----------------------------------------------------------------------------- command line


def pick_device(name):
    """"auto": cuda, else mps, else cpu; a named device must be present."""
    found = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()),
                             ("cpu", True)) if ok]
    if name != "auto" and name.split(":")[0] not in found:
        raise DataError(f"--device {name}: not available here (only {', '.join(found)})")
    return found[0] if name == "auto" else name


def caption_files(args, model, tok, device):
    """Print PATH<TAB>caption (num_samples lines) for every readable image, a batch at a time so the
    first lines come at once; an unreadable one gets an error line instead. Returns how many failed."""
    opts = dict(strategy=args.strategy, beam_width=args.beam_width, length_penalty=args.length_penalty,
                temperature=args.temperature, top_k=args.top_k, batch_size=args.batch_size,
                generator=torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None)
    failed = 0
    for start in range(0, len(args.img), args.batch_size):
        batch = []  # (position in --img, path, image) for the readable ones
        for i, path in enumerate(args.img[start:start + args.batch_size], start):
            try:
                batch.append((i, path, data.load_image(path, model.config.img_size)))
            except DataError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
        if not batch:
            continue
        images = np.stack([image for _, _, image in batch])  # (B, S, S, 3) uint8
        out = caption(model, tok, images, return_attn=bool(args.attn), **opts)
        texts, maps = out if args.attn else (out, [])  # the first sample is the one drawn: same caption
        stem, ext = os.path.splitext(args.attn or "")
        for (i, _, image), word_maps in zip(batch, maps):  # attn.png, or attn_1.png... by place in --img
            draw_attention(image, word_maps, args.attn if len(args.img) == 1 else f"{stem}_{i + 1}{ext}")
        samples = [texts] + [caption(model, tok, images, **opts) for _ in range(args.num_samples - 1)]
        for j, (_, path, _) in enumerate(batch):
            for texts in samples:
                print(f"{path}\t{texts[j]}", flush=True)
    return failed


def run_eval(args, model, tok):
    """Score a whole split; the scores go to stdout (and --json), data.prepare's log to stderr."""
    size = model.config.img_size
    prep_dir = data.prepare(args.data, args.data_dir, size, log=lambda m: print(m, file=sys.stderr),
                            prep_dir=args.prep_dir)
    r = evaluate(model, tok, data.load_split(prep_dir, args.eval, size), args.data, args.strategy,
                 args.beam_width, args.batch_size, args.eval, length_penalty=args.length_penalty)
    ms = r["ms_per_caption"]
    print(f"{args.data} {args.eval}: {r['n_images']} images, {args.strategy} search in batches of "
          f"{args.batch_size}: {ms:.1f} ms per caption ({1000 / ms:.1f} captions/s)")
    print("  ".join(f"BLEU-{k} {r[f'bleu{k}']:.4f}" for k in range(1, 5)) + f"  CIDEr-D {r['cider']:.4f}")
    if r["exact_match"] is not None:
        print(f"exact match {r['exact_match']:.4f}  (one-object images {r['exact_match_one'] or 0:.4f}, "
              f"two-object images {r['exact_match_two'] or 0:.4f})")
    if args.json:
        scores = {k: v for k, v in r.items() if k != "samples"}
        atomic_write(args.json, lambda f: f.write((json.dumps(scores, indent=1) + "\n").encode()))


def main(argv=None):
    p = argparse.ArgumentParser(description="Caption images or score a split with a SupraVL-Nano model.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--img", nargs="+", help="image files to caption")
    what.add_argument("--eval", choices=["val", "test"], help="score a whole split")
    p.add_argument("--ckpt", default="out/ckpt.pt", help="ckpt.pt or a published folder")
    p.add_argument("--strategy", choices=["beam", "greedy", "topk"], default="beam")
    p.add_argument("--beam-width", type=int, default=3)
    p.add_argument("--length-penalty", type=float, default=0.0, help="beam score / len**this")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=1, help="captions per image (topk)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--attn", help="write the attention picture here (attn_1.png... for several images)")
    p.add_argument("--data", choices=["flickr8k", "shapes"], default="flickr8k")
    p.add_argument("--data-dir", help="default: data/<data>")
    p.add_argument("--prep-dir", help="where the prepared arrays are (or go); default: --data-dir (set it when "
                   "--data-dir is read-only, e.g. ../shared/flickr8k)")
    p.add_argument("--json", help="write the scores here")
    args = p.parse_args(argv)
    if args.num_samples > 1 and args.strategy != "topk":
        p.error("--num-samples > 1 needs --strategy topk (beam and greedy give one caption)")
    if min(args.beam_width, args.top_k, args.num_samples, args.batch_size) < 1 or args.temperature <= 0:
        p.error("--beam-width, --top-k, --num-samples, --batch-size and --temperature must be positive")
    try:
        device = pick_device(args.device)
        model, tok = load_model(args.ckpt, device)
        failed = caption_files(args, model, tok, device) if args.img else run_eval(args, model, tok)
    except (DataError, OSError) as e:  # OSError: e.g. --attn or --json in a folder that is not there
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if failed:
        sys.exit(2)


if __name__ == "__main__":
    main()
