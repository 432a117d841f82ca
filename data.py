"""
data.py: the two datasets, shapes (built in, offline) and Flickr8k (real photos), each prepared once into
the one format that training reads (prep_dir: --prep-dir, else --data-dir), so training has one code path:
    {prep_dir}/{split}_images_{size}.npy   uint8 (N, size, size, 3), squash-resized (no crop)
    {prep_dir}/{split}_captions.json       {"names": [...], "captions": [[caption, ...], ...]}
Left out: augmentation, any other dataset. Downloads and archives are common.py's plumbing.

    python data.py --data shapes        # -> data/shapes (+ contact_sheet.png), in seconds
    python data.py --data flickr8k      # -> data/flickr8k (downloads ~1 GB)
    python data.py --data flickr8k --data-dir ../shared/flickr8k --prep-dir data/flickr8k-small
"""
import argparse
import functools
import json
import os
import re
import textwrap
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from common import UserError, add_data_flags, atomic_write, check_flags, cli, download, extract_zip, progress

SPLITS = ("train", "val", "test")

# ----------------------------------------------------------------------------- the prepared format
def clean_caption(text):
    """The one normaliser of every caption: '  A dog  runs in the park . ' -> 'a dog runs in the park'."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text

@dataclass
class Split:
    names: list
    images: np.ndarray  # uint8 (N, S, S, 3)
    captions: list  # N lists of cleaned captions

def folders(data, data_dir=None, prep_dir=None):
    """(data_dir, prep_dir): the originals (default data/<data>), the prepared arrays (default data_dir)."""
    data_dir = data_dir or os.path.join("data", data)
    return data_dir, prep_dir or data_dir

def _split_paths(prep_dir, split, size):
    return (os.path.join(prep_dir, f"{split}_images_{size}.npy"),
            os.path.join(prep_dir, f"{split}_captions.json"))

def save_split(prep_dir, split, names, images, captions, size):
    """Writes a split's two files, each atomically; load_split notices a pair from two different runs."""
    img_path, cap_path = _split_paths(prep_dir, split, size)
    with atomic_write(img_path) as f:  # a file object, so np.save adds no second ".npy"
        np.save(f, np.ascontiguousarray(images, dtype=np.uint8))
    with atomic_write(cap_path, "w") as f:
        json.dump({"names": list(names), "captions": [list(c) for c in captions]}, f)

def load_split(prep_dir, split, size=112, mmap_mode=None):
    """Reads a prepared split; a missing or malformed one is a UserError naming the file."""
    img_path, cap_path = _split_paths(prep_dir, split, size)
    for p in (img_path, cap_path):
        if not os.path.isfile(p):
            raise UserError(f"{p}: not prepared (run python data.py --data ... first)")
    try:
        images = np.load(img_path, mmap_mode=mmap_mode, allow_pickle=False)  # (N, S, S, 3)
    except (OSError, ValueError) as e:
        raise UserError(f"{img_path}: not a readable .npy array ({e})") from None
    if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3) or len(images) == 0:
        raise UserError(f"{img_path}: {images.dtype} {images.shape}, not uint8 (N, {size}, {size}, 3), N >= 1")
    try:
        with open(cap_path, encoding="utf-8") as f:
            meta = json.load(f)
        names, captions = list(meta["names"]), list(meta["captions"])  # list(): a number is refused here
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cap_path}: not a captions file ({type(e).__name__}: {e})") from None
    if len(names) != len(images) or len(captions) != len(images):
        raise UserError(f"{cap_path}: {len(names)} names and {len(captions)} caption lists "
                        f"for {len(images)} images in {img_path}")
    if not all(isinstance(c, list) and c and all(isinstance(s, str) for s in c) for c in captions):
        raise UserError(f"{cap_path}: every image needs a non-empty list of caption strings")
    return Split(names, images, captions)

# ----------------------------------------------------------------------------- shapes: the quick start's
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 225),  # far apart in RGB
           "yellow": (235, 215, 40), "purple": (140, 60, 190), "cyan": (40, 200, 215)}
SHAPES = ("circle", "square", "triangle")
RADII = {"small": (10.0, 12.0), "large": (19.0, 22.0)}  # half-extent, in units of a 112-pixel image
GAP = 6.0  # minimum empty space between the two objects along the axis of their relation

@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre and half-extent, in 112-pixel units (so captions do not depend on image size)
    y: float
    r: float

    def phrase(self):
        return f"{self.size} {self.colour} {self.shape}"

def _random_obj(rng):
    size = ("small", "large")[rng.integers(2)]
    return Obj(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))], size,
               0.0, 0.0, float(rng.uniform(*RADII[size])))

def random_scene(rng):
    """One object, or two in a clear relation: gap >= GAP along its axis, offset across <= half that along."""
    a = _random_obj(rng)
    if rng.random() < 0.5:
        a.x, a.y = (float(rng.uniform(a.r + 3, 109 - a.r)) for _ in range(2))
        return [a]
    b = _random_obj(rng)
    while (b.colour, b.shape) == (a.colour, a.shape):  # never two identical-looking objects
        b = _random_obj(rng)
    along_a = rng.uniform(a.r + 3, 109 - b.r - a.r - b.r - GAP)  # a first (left or upper), b after it
    along_b = rng.uniform(along_a + a.r + b.r + GAP, 109 - b.r)
    half = (along_b - along_a) / 2
    across_a = rng.uniform(a.r + 3, 109 - a.r)
    across_b = rng.uniform(max(b.r + 3, across_a - half), min(109 - b.r, across_a + half))
    if rng.random() < 0.5:  # horizontal: a is left of b
        a.x, a.y, b.x, b.y = along_a, across_a, along_b, across_b
    else:  # vertical: a is above b
        a.x, a.y, b.x, b.y = across_a, along_a, across_b, along_b
    return [a, b] if rng.random() < 0.5 else [b, a]  # list order carries no meaning

def scene_captions(objs):
    """Five true, differently worded captions; a relation is said both ways ('left of' and 'right of')."""
    if len(objs) == 1:
        o = objs[0].phrase()
        return [f"a {o}", f"there is a {o}", f"a picture of a {o}", f"a single {o}", f"an image with one {o}"]
    a, b = objs
    horizontal = abs(b.x - a.x) > abs(b.y - a.y)  # the relation's axis is the one with the larger offset
    a, b = (o.phrase() for o in sorted(objs, key=lambda o: o.x if horizontal else o.y))  # a: left or upper
    fwd, inv = ("to the left of", "to the right of") if horizontal else ("above", "below")
    return [f"a {a} {fwd} a {b}", f"a {b} {inv} a {a}", f"there is a {a} {fwd} a {b}",
            f"there is a {b} {inv} a {a}", f"a picture of a {a} {fwd} a {b}"]

def draw_scene(objs, rng, size=112):
    """A muted, tinted grey background with a gentle gradient, then the objects -> uint8 (S, S, 3)."""
    k = size / 112
    base = rng.uniform(60, 190) + rng.uniform(-15, 15, 3)  # (3,) grey with a tint
    angle, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0, 20)
    ramp = np.linspace(-amp, amp, size)  # (S,)
    bg = base + np.cos(angle) * ramp[None, :, None] + np.sin(angle) * ramp[:, None, None]  # (S, S, 3)
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for o in objs:
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[o.colour]) + rng.integers(-12, 13, 3), 0, 255))
        x, y, r = o.x * k, o.y * k, o.r * k
        if o.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return np.asarray(im)

def make_shapes(data_dir, sizes=(6000, 1000, 1000), seed=0, size=112, log=print):
    """The three splits, and contact_sheet.png of val, into data_dir. Each split has random streams of
    its own (so splits are disjoint), scenes apart from pixels (so captions are the same at any size)."""
    os.makedirs(data_dir, exist_ok=True)
    for i, (split, n) in enumerate(zip(SPLITS, sizes)):
        scene_rng, pixel_rng = np.random.default_rng([seed, i, 0]), np.random.default_rng([seed, i, 1])
        scenes = [random_scene(scene_rng) for _ in range(n)]
        images = np.zeros((n, size, size, 3), np.uint8)  # (N, S, S, 3)
        for j, objs in enumerate(scenes):
            images[j] = draw_scene(objs, pixel_rng, size)
        for chunk in np.split(images, range(512, n, 512)):  # pixel noise; views of <= 512 images bound memory
            chunk[:] = np.clip(chunk + pixel_rng.integers(-12, 13, chunk.shape, dtype=np.int16), 0, 255)
        s = Split([f"shapes_{split}_{j:05d}" for j in range(n)], images, [scene_captions(o) for o in scenes])
        save_split(data_dir, split, s.names, s.images, s.captions, size)
        if split == "val":  # a first look for a person: 12 images and their captions
            contact_sheet(s, os.path.join(data_dir, "contact_sheet.png"))
        log(f"  {split:5s}: {n} images generated" + (" + contact_sheet.png" if split == "val" else ""))

def contact_sheet(split, path, n=12, cols=4):
    """A PNG of the first n images (shown at 2x) with their captions beneath, for a person to look at."""
    font = ImageFont.load_default(size=12)  # a bitmap fallback when Pillow lacks FreeType
    n = min(n, len(split.names))
    cell_w, cell_h = 240, 240 + 14 * 12
    sheet = Image.new("RGB", (cell_w * cols, cell_h * max(1, -(-n // cols))), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        sheet.paste(Image.fromarray(split.images[i]).resize((224, 224), Image.NEAREST), (x + 8, y + 8))
        lines = [line for c in split.captions[i] for line in textwrap.wrap(c, 38, subsequent_indent="  ")]
        draw.multiline_text((x + 8, y + 236), "\n".join(lines[:12]), fill="black", font=font, spacing=2)
    with atomic_write(path) as f:
        sheet.save(f, format="PNG")

# ----------------------------------------------------------------------------- Flickr8k: real photos
DEFAULT_BASE_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/"
ADVICE = "check the network, use a mirror (python data.py --data flickr8k --base-url URL), or --data shapes"
SPLIT_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
TOKEN_FILE = "Flickr8k.token.txt"
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images128", "Images", ".")  # first with images wins

def load_image(path, size=112):
    """Any image Pillow reads (a Flickr8k photo, sample.py's --img) -> uint8 (size, size, 3), squashed."""
    if not os.path.exists(path) or os.path.isdir(path):
        raise UserError(f"{path}: {'is a folder, not an image' if os.path.isdir(path) else 'no such file'}")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: empty file, not an image")
    try:
        with warnings.catch_warnings():  # 90-179 MP, e.g. a 108 MP phone photo: read, without Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # more: refused, below
            im = Image.open(path)
        with im:  # an animation: its first frame
            im.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, several times faster
            im = _to_rgb(ImageOps.exif_transpose(im)).resize((size, size), Image.BICUBIC)  # camera's rotation
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: refused as a decompression bomb ({e})") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return np.asarray(im, dtype=np.uint8)  # (size, size, 3)

def _to_rgb(im):
    """Any mode -> RGB: transparency composited on white, 16/32-bit grey scaled (convert() would clip it)."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)  # (H, W)
        if im.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert("RGB")

def parse_tokens(path):
    """Flickr8k.token.txt -> ({image name: [cleaned captions]}, number of malformed lines); a space may
    stand for the TAB. 'x.jpg#0<TAB>A child in a pink dress .' -> {'x.jpg': ['a child in a pink dress']}"""
    captions, malformed = {}, 0
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: a BOM is no name
        for line in f:
            m = re.match(r"^(\S+)#\d+\s+(.*\S)", line)
            caption = clean_caption(m[2]) if m else ""
            if not caption:
                malformed += line.strip() != ""  # a blank line is not malformed
                continue
            captions.setdefault(m[1], []).append(caption)
    return captions, malformed

def _find_image_dir(data_dir):
    for sub in IMAGE_DIRS:
        folder = os.path.normpath(os.path.join(data_dir, sub))
        if os.path.isdir(folder) and any(n.lower().endswith(".jpg") for n in os.listdir(folder)):
            return folder
    return None

def _decode(path, size):
    """load_image in a worker process: a bad image is reported back, not raised."""
    try:
        return load_image(path, size), None
    except UserError as e:
        return None, str(e)

def decode_images(paths, size=112, workers=None, label="images"):
    """Decodes every path once, on all cores -> (uint8 (N, S, S, 3) of the good ones, ok flags, errors)."""
    n, workers = len(paths), workers or os.cpu_count() or 1
    pool = ProcessPoolExecutor(workers) if workers > 1 and n >= 64 else None  # a few: not worth one
    out, ok, errors, t0 = np.zeros((n, size, size, 3), np.uint8), [], [], time.time()
    try:
        sizes = [size] * n
        results = pool.map(_decode, paths, sizes, chunksize=16) if pool else map(_decode, paths, sizes)
        for i, (img, err) in enumerate(results, 1):
            if err:
                errors.append(err)
            else:
                out[i - 1 - len(errors)] = img  # the good images packed to the front, in order
            ok.append(err is None)
            progress(f"  decoding {label}: {i}/{n} ({i / (time.time() - t0):.0f} img/s)", end=i == n)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)  # on Ctrl-C too: drop the queued work
    return out[:n - len(errors)], ok, errors

def prepare_flickr8k(data_dir, prep_dir, size=112, base_url=DEFAULT_BASE_URL, log=print):
    """Downloads (if needed), extracts, parses and decodes Flickr8k into the prepared format."""
    os.makedirs(data_dir, exist_ok=True)
    token_path, *lists = [os.path.join(data_dir, n) for n in (TOKEN_FILE, *SPLIT_LISTS.values())]
    for archive, extracted in (("Flickr8k_text.zip", lambda: all(map(os.path.isfile, [token_path, *lists]))),
                               ("Flickr8k_Dataset.zip", lambda: _find_image_dir(data_dir))):
        if extracted():
            continue  # extracted before, or a folder that came without zips
        zip_path, url = os.path.join(data_dir, archive), base_url.rstrip("/") + "/" + archive
        if not os.path.exists(zip_path):
            log(f"downloading {url}")
            download(url, zip_path, ADVICE)
        log(f"extracting {zip_path}")
        extract_zip(zip_path, data_dir)
        if not extracted():
            raise UserError(f"{zip_path}: does not hold the expected Flickr8k files")
    captions, malformed = parse_tokens(token_path)
    image_dir = _find_image_dir(data_dir)
    log(f"{TOKEN_FILE}: {len(captions)} images, {malformed} malformed lines skipped; images from {image_dir}")
    for split, list_path in zip(SPLITS, lists):
        with open(list_path, encoding="utf-8-sig", errors="replace") as f:
            listed = list(dict.fromkeys(f.read().split()))  # unique names, in order
        present = [n for n in listed if n in captions and os.path.isfile(os.path.join(image_dir, n))]
        images, ok, errors = decode_images([os.path.join(image_dir, n) for n in present], size, label=split)
        names = [n for n, good in zip(present, ok) if good]
        uncaptioned = sum(n not in captions for n in listed)
        log(f"  {split:5s}: {len(names)} of {len(listed)} listed images prepared; skipped "
            f"{len(listed) - uncaptioned - len(present)} missing, {len(errors)} unreadable, "
            f"{uncaptioned} without captions" + "".join(f"\n    {e}" for e in errors[:3]))
        if not names:  # an empty split would fail later, with a message that blames something else
            raise UserError(f"{list_path}: none of its {len(listed)} listed images could be prepared")
        save_split(prep_dir, split, names, images, [captions[n] for n in names], size)

# ----------------------------------------------------------------------------- one entry point
def prepare(data, data_dir=None, size=112, base_url=DEFAULT_BASE_URL, log=print, prep_dir=None):
    """Prepares the three splits of `data` in prep_dir, unless all three load already; returns prep_dir."""
    if data not in ("flickr8k", "shapes"):
        raise UserError(f"unknown dataset {data!r} (use flickr8k or shapes)")
    data_dir, prep_dir = folders(data, data_dir, prep_dir)
    try:
        [load_split(prep_dir, s, size, mmap_mode="r") for s in SPLITS]  # headers only: a quick check
        log(f"{data}: already prepared in {prep_dir} at {size}x{size}")
    except UserError:  # absent, or half written by a run that was killed
        try:
            os.makedirs(prep_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"{prep_dir}: cannot create it ({e.strerror}); pass --prep-dir DIR") from None
        if not os.access(prep_dir, os.W_OK) or not os.stat(prep_dir).st_mode & 0o200:  # root ignores modes
            raise UserError(f"{prep_dir}: not writable; pass --prep-dir DIR for the prepared arrays")
        t0 = time.time()
        log(f"{data}: preparing into {prep_dir}")
        if data == "shapes":
            make_shapes(prep_dir, size=size, log=log)
        else:
            prepare_flickr8k(data_dir, prep_dir, size, base_url, log)
        log(f"{data}: prepared in {time.time() - t0:.1f}s")
    for split in SPLITS:
        s = load_split(prep_dir, split, size, mmap_mode="r")
        log(f"  {split:5s}: {len(s.names):5d} images, {sum(map(len, s.captions)):6d} captions")
    return prep_dir

# ----------------------------------------------------------------------------- images as the model sees them
def normalize(images):
    """uint8 (B, H, W, 3), array or tensor on any device -> float32 (B, 3, H, W) with ImageNet mean/std."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"normalize: expected uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    shift, scale = _shift_scale(images.device)
    x = images.permute(0, 3, 1, 2)  # (B, 3, H, W), a view: HWC bytes are the channels_last layout convs want
    return torch.addcmul(shift, x.float(), scale)  # (x/255 - mean)/std in one pass

@functools.cache  # once per device: a tensor made from a Python list is a host-to-device copy, a GPU sync
def _shift_scale(device):
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)  # ImageNet statistics
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    return (-mean / std).to(device), (1.0 / (255.0 * std)).to(device)

def half_size(images, chunk=512):
    """uint8 (N, S, S, 3) tensor -> uint8 (N, S/2, S/2, 3), each 2x2 block of pixels averaged and rounded."""
    S = images.shape[1] // 2
    sums = [c.view(-1, S, 2, S, 2, 3).sum((2, 4), dtype=torch.int16) for c in images.split(chunk)]  # bounded
    return ((torch.cat(sums) + 2) // 4).to(torch.uint8)

def main(argv=None):
    p = argparse.ArgumentParser(description="Download/generate and prepare a dataset for SupraVL-Nano.")
    add_data_flags(p, default="shapes")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="Flickr8k mirror holding the two zips")
    p.add_argument("--size", type=int, default=112, help="image side in pixels")
    args = p.parse_args(argv)
    check_flags(args, [
        ("--size", 8 <= args.size <= 1024, "8..1024 pixels"),
        ("--base-url", re.match(r"https?://[^/]", args.base_url), "an http(s):// URL with a host")])
    prepare(args.data, args.data_dir, args.size, args.base_url, print, args.prep_dir)

if __name__ == "__main__":
    cli(main)
