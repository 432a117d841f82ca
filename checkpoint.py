"""
checkpoint.py: a model's files, read safely and written whole: safetensors by hand, torch files that run
no code, the published layout (load_model() reads every form SupraVL-Nano-900k's tools wrote), a run's folder.

Left out: sharded checkpoints, remote model hubs, pickled Python objects of any kind.
Tests: python -m pytest -q test_all.py -k "safetensors or load_model or published or replaced or resume"
"""
import json
import math
import os
import struct
import sys

import torch

from bpe import Tokenizer
from common import UserError, atomic_write
from model import VLM, Config


# ----------------------------------------------------------------------------- safetensors, by hand
# Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}} (and
# "__metadata__") padded with spaces to a multiple of 8, then the tensor bytes; data_offsets count from there.

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def write_safetensors(path, tensors, metadata=None):
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype as its bytes (little-endian host)
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors(path):
    """{name: tensor}; every size is checked against the bytes really in the file before anything is made."""
    def check(ok, why):
        if not ok:
            raise UserError(f"{path}: not a valid safetensors file: {why}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        check(size >= 8, f"only {size} bytes")
        (n,) = struct.unpack("<Q", f.read(8))
        # the header fits in the file, and in 100 MB, the safetensors library's own cap (ours is ~5 KB)
        check(n <= min(size - 8, 100 * 2 ** 20), f"header length {n} goes beyond the file's {size} bytes")
        head, blob = f.read(n), f.read()  # blob: the data the file holds, whatever the header claims
    try:
        header = json.loads(head)
    except ValueError:  # also UnicodeDecodeError
        check(False, "header is not JSON")
    check(isinstance(header, dict), "header is not a JSON object")
    header.pop("__metadata__", None)  # free-form strings, e.g. {"format": "pt"}
    spans, end = [], 0
    for name, info in header.items():
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = DTYPES.get(info.get("dtype")), info.get("shape"), info.get("data_offsets")
        a, b = offsets if isinstance(offsets, list) and len(offsets) == 2 else (None, None)
        check(dtype is not None, f"tensor {name!r} has unknown dtype {info.get('dtype')!r}")
        check(isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape),
              f"tensor {name!r} has shape {shape!r}, not a list of sizes")
        check(type(a) is int and type(b) is int and 0 <= a <= b <= len(blob),
              f"tensor {name!r} has data_offsets {[a, b]} outside the {len(blob)} data bytes")
        need = math.prod(shape) * dtype.itemsize
        check(b - a == need, f"tensor {name!r}: shape {shape} needs {need} bytes, data_offsets give {b - a}")
        spans.append((a, b, name, dtype, shape))
    for a, b, name, _, _ in sorted(spans, key=lambda s: s[:2]):
        check(a == end, f"tensor {name!r} starts at byte {a}, expected {end}")  # no gaps, no overlaps
        end = b
    check(end == len(blob), f"{len(blob) - end} bytes after the last tensor")
    return {name: (torch.frombuffer(bytearray(blob[a:b]), dtype=dtype) if b > a  # frombuffer refuses 0 bytes
                   else torch.empty(0, dtype=dtype)).reshape(shape) for a, b, name, dtype, shape in spans}


# ----------------------------------------------------------------------------- checkpoints

def load_torch(path):
    """torch.load with weights_only=True (tensors, numbers, strings, never code); a failure is one line."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such checkpoint file or folder")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise UserError(f"{path}: not a PyTorch checkpoint (not a zip archive as torch.save writes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes: torch raises many kinds
        first = str(e).split("\n")[0].split(". ")[0][:120]  # torch's messages run on for lines
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first})") from None


def save_torch(path, obj):
    with atomic_write(path) as f:
        torch.save(obj, f)


# config.json: the nine Config fields in upper case (D_MODEL); the token ids also under Hugging Face's names.
CONFIG_FIELDS = ("d_model", "n_heads", "n_layers", "d_ff", "vis_ch", "n_vis", "vocab_size", "max_seq",
                 "img_size")
TOKEN_IDS = {"bos_id": "bos_token_id", "eos_id": "eos_token_id", "pad_id": "pad_token_id"}


def save_pretrained(out_dir, model, tok):
    """model.safetensors (the tied head under both names, for strict loaders), config.json, tokenizer.json."""
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), model.state_dict(), {"format": "pt"})
    config = {field.upper(): getattr(model.config, field) for field in CONFIG_FIELDS}
    config.update({hf_key: getattr(model.config, field) for field, hf_key in TOKEN_IDS.items()})
    with atomic_write(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    tok.save(os.path.join(out_dir, "tokenizer.json"))


def read_config_json(path, tok):
    """Config fields from config.json; a token id it lacks is the tokenizer's, else Config's (the seed's)."""
    try:
        with open(path, encoding="utf-8") as f:
            published = json.load(f)
        fields = {field: published[field.upper()] for field in CONFIG_FIELDS}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a SupraVL config ({type(e).__name__}: {e})") from None
    for field, hf_key in TOKEN_IDS.items():
        found = [published.get(field.upper()), published.get(hf_key), getattr(tok, field)]
        fields[field] = next((i for i in found if i is not None), getattr(Config, field))
    return fields


def read_checkpoint(path):
    """(weights, Config fields, their file, tokenizer): in a ckpt.pt, or in the files beside the weights."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights_file = next((os.path.join(path, n) for n in ("model.safetensors", "model.pt")
                         if os.path.isfile(os.path.join(path, n))), path)
    if os.path.isdir(weights_file):
        raise UserError(f"{path}: no model.safetensors or model.pt (beside config.json, tokenizer.json)")
    ckpt = read_safetensors(weights_file) if weights_file.endswith(".safetensors") else load_torch(weights_file)
    if not isinstance(ckpt, dict):
        raise UserError(f"{weights_file}: not a SupraVL checkpoint (not a dict of weights)")
    held = [ckpt[k] for k in ("model", "model_state_dict", "state_dict") if isinstance(ckpt.get(k), dict)]
    weights = held[0] if held else ckpt  # the optimizer and scheduler state beside them: not needed
    if not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{weights_file}: not a SupraVL checkpoint (no weights, nor model/state_dict of them)")
    if isinstance(ckpt.get("tokenizer"), str) and isinstance(ckpt.get("config"), dict):
        return weights, ckpt["config"], weights_file, Tokenizer.from_json(ckpt["tokenizer"], weights_file)
    for name in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{path}: no {name} beside the weights (a published folder holds "
                            "model.safetensors or model.pt, config.json, tokenizer.json)")
    tok = Tokenizer.load(os.path.join(folder, "tokenizer.json"))
    config_path = os.path.join(folder, "config.json")
    return weights, read_config_json(config_path, tok), config_path, tok


def load_model(path, device="cpu"):
    """(model in eval mode on device, tokenizer) from a ckpt.pt, a published folder, or a model.pt."""
    try:
        weights, fields, where, tok = read_checkpoint(path)
    except ValueError as e:  # bpe's errors; they name their file
        raise UserError(str(e)) from None
    # the seed's code stores its causal masks as buffers: not weights, and ours builds no such buffer
    weights = {k: v for k, v in weights.items() if not k.endswith(".attn.mask")}
    emb = weights.get("tok_emb.weight")
    if emb is not None:  # the head is tok_emb, as the seed's code re-ties it after loading
        if not torch.equal(weights.get("lm_head.weight", emb), emb):
            print(f"note: {path}: lm_head.weight differs from tok_emb.weight; the head is tied to "
                  "tok_emb.weight, as the published code does", file=sys.stderr)
        weights["lm_head.weight"] = emb
    held = sum(v.numel() for v in weights.values())
    try:
        c = Config(**fields)
        # its largest matrices must fit in the weights held: a config.json claiming D_MODEL = 10**6 is refused
        d = c.d_model
        if max(c.vocab_size * d, (c.n_vis + c.max_seq) * d, c.n_layers * d * c.d_ff, c.vis_ch ** 2) > held:
            raise ValueError(f"it describes a bigger model than the {held} weights hold")
        model = VLM(c)
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{where}: bad config ({e})") from None
    want = model.state_dict()
    problems = {"missing weights": [k for k in want if k not in weights],
                "unknown weights": [k for k in weights if k not in want],
                "wrong shapes": [f"{k} {tuple(v.shape)} not {tuple(want[k].shape)}"
                                 for k, v in weights.items() if k in want and v.shape != want[k].shape]}
    for what, names in problems.items():
        if names:  # one line, whatever is wrong
            raise UserError(f"{where}: {what}: {', '.join(names[:3])}" + (" ..." if len(names) > 3 else ""))
    if tok.vocab_size > c.vocab_size:
        raise UserError(f"{path}: tokenizer has {tok.vocab_size} ids, the model only {c.vocab_size}")
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval(), tok


# ----------------------------------------------------------------------------- a run's folder

RUN_FILES = ("ckpt.pt", "best.pt", "loss.png", "model.safetensors", "config.json", "tokenizer.json",
             "eval.json")


def check_out_dir(args, log):
    """A run never silently replaces another. Returns the checkpoint to resume, or None."""
    ckpt = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        if not os.path.isfile(ckpt):
            raise UserError(f"{ckpt}: no checkpoint to resume (train without --resume first)")
        state = load_torch(ckpt)
        log(f"resuming {ckpt} at step {state['step']}")
        return state
    found = [n for n in RUN_FILES if os.path.exists(os.path.join(args.out_dir, n))]
    if found and not args.overwrite:
        held = load_torch(ckpt) if "ckpt.pt" in found else None
        what = f"{held['settings']['data']}, step {held['step']}" if held else ", ".join(found)
        raise UserError(f"{args.out_dir} already holds a run ({what}): continue it with --resume, "
                        "choose another --out-dir, or replace it with --overwrite")
    for name in found:  # --overwrite: the old run goes as a whole, so the folder never mixes two runs
        os.remove(os.path.join(args.out_dir, name))
    os.makedirs(args.out_dir, exist_ok=True)


def adopt_settings(args, state, fixed, log):
    """--resume: the checkpoint's settings; a flag given again wins (logged), or must match if in `fixed`."""
    for key, saved in state["settings"].items():
        given = getattr(args, key)
        if key not in args.given or given == saved:
            setattr(args, key, saved)
        elif key in fixed:
            raise UserError(f"--{key.replace('_', '-')} {given}: {args.out_dir}/ckpt.pt was trained with "
                            f"{saved}; drop the flag to resume it, or start a new run in another --out-dir")
        else:
            log(f"resuming with --{key.replace('_', '-')} {given} instead of {saved}")
