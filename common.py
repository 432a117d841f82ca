"""
common.py: the plumbing the chapters share, written once: one-line errors and atomic writes, devices and
precision, the dataset flags, and a model's files: torch checkpoints that run no code, safetensors by hand,
the published layout (load_model reads every form SupraVL-Nano-900k's tools wrote), a run's folder.

Left out: sharded checkpoints, remote model hubs, pickled Python objects of any kind.
Tests: python -m pytest test_all.py -k "flags or device or safetensors or load_model or published or resume"
"""
import contextlib
import ctypes
import json
import math
import os
import struct
import sys
import time
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bpe import Tokenizer
from model import VLM, Config


class UserError(Exception):
    """A problem the user can fix: a bad flag, file, folder or URL. The message names it, in one line."""


def cli(main):
    """Run main(): a UserError, an OSError or a full GPU: one stderr line and exit status 2 (Ctrl-C: 130)."""
    code = 2
    try:
        return main()
    except KeyboardInterrupt:
        message, code = "interrupted", 130  # 130: the shell's code for Ctrl-C
    except (UserError, OSError) as e:
        message = str(e)
    except torch.cuda.OutOfMemoryError as e:  # torch's message runs on for lines: keep its first sentence
        message = f"the GPU ran out of memory ({str(e).split('. ')[0]}); try a smaller --batch-size"
    if _progress["open"]:
        sys.stderr.write("\n")  # a \r status line is showing: the error starts a line of its own
    print("error: " + message.replace("\n", " "), file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write path.tmp, then rename it over path: a full disk or a kill midway leaves the old file whole."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_progress = {"open": False, "shown": 0.0}


def progress(text, end=False):
    """Redraw the one status line on stderr: at most twice a second, and always the last time."""
    if end or time.time() - _progress["shown"] > 0.5:
        sys.stderr.write("\r" + text.ljust(79) + ("\n" if end else ""))
        sys.stderr.flush()
        _progress.update(open=not end, shown=time.time())


# ----------------------------------------------------------------------------- devices and precision

def device_problem(name):
    """None when a tensor can be made on device `name`, else why not, in a few words."""
    kind = name.split(":")[0]
    if kind not in ("cuda", "mps"):
        return None if kind == "cpu" else "unknown device (use auto, cpu, cuda, cuda:N or mps)"
    with warnings.catch_warnings(record=True) as caught:  # a too-old driver only warns, then says "no"
        warnings.simplefilter("always")
        present = torch.cuda.is_available() if kind == "cuda" else torch.backends.mps.is_available()
    if not present:
        return "not available here" + (f" ({str(caught[0].message).splitlines()[0]})" if caught else "")
    try:
        torch.zeros(1, device=name)
    except Exception as e:  # out of memory, a GPU another job holds, a broken driver
        return f"present but unusable ({type(e).__name__}: {str(e).splitlines()[0][:150]})"
    return None


def pick_device(name="auto"):
    """"auto": cuda, else mps, else cpu, whichever first works; a named device must work."""
    if name != "auto":
        problem = device_problem(name)
        if problem:
            raise UserError(f"--device {name}: {problem}")
        return name
    for kind in ("cuda", "mps"):
        problem = device_problem(kind)
        if problem is None:
            return kind
        if problem != "not available here":  # there is a GPU, but it does not work: say so, once
            print(f"note: {kind} {problem}; using the cpu", file=sys.stderr)
    return "cpu"


def pick_dtype(name, device):
    if name != "auto":
        return getattr(torch, name), "asked for"
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:  # Ampere and newer have bf16 tensor cores
            return torch.bfloat16, f"sm_{major}{minor} has bf16 tensor cores"
        # is_bf16_supported() says yes here too (emulated), but a T4 or V100 runs bf16 slowly
        return torch.float16, f"sm_{major}{minor} has no bf16 tensor cores, so fp16 with a GradScaler"
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up with care
    if device == "cpu" and any(getattr(torch.cpu, f, lambda: False)() for f in checks):
        return torch.bfloat16, "the CPU has native bf16 instructions: faster than fp32, bench.py"
    return torch.float32, "no fast low precision on this device"


def keep_freed_memory():
    """Ask glibc to keep freed memory: a CPU step frees ~50 MB of conv activations, which would otherwise come
    back as page faults and zero-fills. Steps 1.1x (fp32) to 1.25x (bf16) faster; peak memory stays held."""
    with contextlib.suppress(OSError):  # no glibc (macOS, Windows, musl): nothing to tune
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GB come from the reusable heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap


@contextlib.contextmanager
def precision(device, dtype):
    """Autocast to dtype (float32: off), and on the CPU SDPA's plain math kernel, because its flash
    kernel's backward is slower for attention this small (bench.py: 1.2x faster bf16 steps)."""
    kernels = sdpa_kernel(SDPBackend.MATH) if device == "cpu" else contextlib.nullcontext()
    with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32), kernels:
        yield


# ----------------------------------------------------------------------------- flags

def add_data_flags(parser, default):
    """--data, --data-dir, --prep-dir: the same three flags in data.py, train.py and sample.py."""
    parser.add_argument("--data", choices=["flickr8k", "shapes"], default=default)
    parser.add_argument("--data-dir", help="the originals; default: data/<data>")
    parser.add_argument("--prep-dir", help="where the prepared arrays go; default: --data-dir (set it when "
                        "--data-dir is read-only, e.g. ../shared/flickr8k)")


def check_flags(args, rules):
    """rules: [(flag, ok, what is allowed), ...], e.g. ("--epochs", args.epochs >= 1, "at least 1")."""
    for flag, ok, allowed in rules:
        if not ok:
            raise UserError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: must be {allowed}")


# ----------------------------------------------------------------------------- torch checkpoints

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


# ----------------------------------------------------------------------------- safetensors, by hand
# Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}} (and
# "__metadata__") padded with spaces to a multiple of 8, then the tensor bytes; data_offsets count from there.

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def write_safetensors(path, tensors, metadata=None):
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    data = bytearray()  # the tensors' bytes so far: len(data) is where the next one starts
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype as its bytes (little-endian host)
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


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


# ----------------------------------------------------------------------------- the published layout

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
    inside = [os.path.join(path, name) for name in ("model.safetensors", "model.pt")]
    file = next((f for f in inside if os.path.isfile(f)), path)
    if os.path.isdir(file):
        raise UserError(f"{path}: no model.safetensors or model.pt (beside config.json, tokenizer.json)")
    ckpt = read_safetensors(file) if file.endswith(".safetensors") else load_torch(file)
    if not isinstance(ckpt, dict):
        raise UserError(f"{file}: not a SupraVL checkpoint (not a dict of weights)")
    held = [ckpt[k] for k in ("model", "model_state_dict", "state_dict") if isinstance(ckpt.get(k), dict)]
    weights = held[0] if held else ckpt  # the optimizer and scheduler state beside them: not needed
    if not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{file}: not a SupraVL checkpoint (no weights, nor model/state_dict of them)")
    if isinstance(ckpt.get("tokenizer"), str) and isinstance(ckpt.get("config"), dict):
        return weights, ckpt["config"], file, Tokenizer.from_json(ckpt["tokenizer"], file)
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
