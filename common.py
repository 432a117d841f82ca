"""
common.py: the plumbing the chapters share, written once: one-line errors and atomic writes, devices,
precision and processes, the dataset flags, downloads that resume, zip archives extracted safely, torch
checkpoints that run no code, the published layout (load_model reads every form SupraVL-Nano-900k's tools
wrote; the safetensors format itself is model.py's last part), and a run's folder.

Left out: proxies, checksums, other archives, sharded checkpoints, remote hubs, pickled Python objects.
Tests: python -m pytest test_all.py -k "flags or device or download or archive or load_model or resume"
"""
import contextlib
import ctypes
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
import zlib

import requests
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from bpe import Tokenizer
from model import VLM, Config, read_safetensors, safetensors_bytes

class UserError(Exception):
    """A problem the user can fix: a bad flag, file, folder or URL. The message names it, in one line."""

def cli(main):
    """Run main(): a UserError, an OSError or a full GPU: one stderr line and exit status 2 (Ctrl-C: 130)."""
    if hasattr(sys.stdout, "reconfigure"):  # a log into a file or pipe shows each line at once, and what
        sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace")  # a code page lacks, escaped
    try:
        return main()
    except KeyboardInterrupt:
        message, code = "interrupted", 130  # 130: the shell's code for Ctrl-C
    except (UserError, OSError, MemoryError) as e:  # MemoryError: e.g. numpy's "Unable to allocate 17.6 GiB"
        message, code = str(e) or type(e).__name__, 2
    except torch.cuda.OutOfMemoryError as e:  # torch's message runs on for lines: keep its first sentence
        message, code = f"the GPU ran out of memory ({str(e).split('. ')[0]}); try a smaller --batch-size", 2
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
    except OSError as e:  # one line naming the file asked for (not our temporary one; a full disk names none)
        raise OSError(f"{path}: {e.strerror or e}") from None
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

# ----------------------------------------------------------------------------- devices, precision, processes
def device_problem(name):
    """None when a tensor can be made on device `name`, else why not, in a few words."""
    kind = name.split(":")[0]
    if kind != "cuda":  # mps: PyTorch's fails on our encoder (its issues 96056 and 175189: see the README)
        mps = "not supported (README: On a Mac)"
        return {"cpu": None, "mps": mps}.get(kind, "unknown (use auto, cpu, cuda or cuda:N)")
    with warnings.catch_warnings(record=True) as caught:  # a too-old driver only warns, then says "no"
        warnings.simplefilter("always")
        present = torch.cuda.is_available()
    if not present:
        return "not available here" + (f" ({str(caught[0].message).splitlines()[0]})" if caught else "")
    try:
        torch.zeros(1, device=name)
    except Exception as e:  # out of memory, a GPU another job holds, a broken driver
        return f"present but unusable ({type(e).__name__}: {str(e).splitlines()[0][:150]})"
    return None

def pick_device(name="auto"):
    """"auto": cuda if it works, else cpu; a named device must work."""
    for kind in ("cuda", "cpu") if name == "auto" else (name,):
        problem = device_problem(kind)
        if problem is None:
            return kind
        if name != "auto":
            raise UserError(f"--device {name}: {problem}")
        if problem != "not available here":  # there is a GPU, but it does not work: say so, once
            print(f"note: {kind} {problem}; using the cpu", file=sys.stderr)

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

def setup(args):
    """(device, rank, world, log), and torchrun's process group; only rank 0 logs."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    log = print if rank == 0 else (lambda *a, **k: None)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and args.device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local)  # before the first CUDA call, or every process opens one on GPU 0
    device = pick_device(args.device)
    device = f"cuda:{local}" if device == "cuda" and world > 1 else device
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu":
        keep_freed_memory()
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # the shapes barely change: let cuDNN time its kernels once
    return device, rank, world, log

# ----------------------------------------------------------------------------- flags
def add_data_flags(parser, default, shown=None):
    """--data, --data-dir, --prep-dir: the same three flags in data.py, train.py and sample.py."""
    parser.add_argument("--data", choices=["flickr8k", "shapes"], default=default,
                        help=f"default: {shown or default}")
    parser.add_argument("--data-dir", help="the originals; default: data/<data>")
    parser.add_argument("--prep-dir", help="the prepared arrays; default: --data-dir (set it if read-only)")

def flag_value(args, flag):
    """flag_value(args, "--batch-size") is args.batch_size."""
    return getattr(args, flag[2:].replace("-", "_"))

def check_flags(args, rules):
    """rules: [(flag, ok, what is allowed), ...], e.g. ("--epochs", args.epochs >= 1, "at least 1")."""
    for flag, ok, allowed in rules:
        if not ok:
            raise UserError(f"{flag} {flag_value(args, flag)}: must be {allowed}")

# ----------------------------------------------------------------------------- downloads and archives
def download(url, dest, advice, retries=4, backoff=1.0, timeout=(10, 60)):
    """Streams url to dest via dest.part, which the next try resumes; dest appears only when whole. HTTP 5xx,
    a dropped link or a short body is retried 1, 2, 4, 8 s later; else a UserError that ends with `advice`."""
    part, why = dest + ".part", None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))  # give a flaky link time to recover
        have = os.path.getsize(part) if os.path.exists(part) else 0
        # identity: the file's own bytes, so that Content-Length counts what we write (no gzip in between)
        headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={have}-"} if have else {})
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if 400 <= r.status_code < 500 and r.status_code != 416:  # a wrong URL: retrying will not help
                    raise UserError(f"{url}: HTTP {r.status_code} {r.reason}; {advice}")
                span = re.match(rf"bytes {have}-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
                resumed = r.status_code == 206 and span is not None  # the rest, or a piece of it, from have
                if r.status_code in (206, 416) and not resumed:  # our .part is no prefix the server knows
                    os.remove(part)
                if r.status_code != 200 and not resumed:  # a 5xx, or the bad range above: try again
                    why = f"HTTP {r.status_code}"
                    continue
                size = span[1] if resumed else r.headers.get("Content-Length", "")  # the file's, if it says
                total = int(size) if size.isdigit() else None
                of = f" of {total / 1e6:.1f}" if total else ""
                with open(part, "ab" if resumed else "wb") as f:
                    for chunk in r.iter_content(1 << 16):
                        f.write(chunk)
                        progress(f"  {os.path.basename(dest)}: {f.tell() / 1e6:.1f}{of} MB")
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            why = type(e).__name__
            continue
        except requests.RequestException as e:  # a bad URL and the like: retrying will not help
            raise UserError(f"{url}: {type(e).__name__}; {advice}") from None
        got = os.path.getsize(part)
        if total is None or got == total:
            progress(f"  {os.path.basename(dest)}: {got / 1e6:.1f} MB downloaded", end=True)
            os.replace(part, dest)
            return dest
        why = f"got {got} of {total} bytes"
    raise UserError(f"{url}: download failed after {retries + 1} tries ({why}); {advice}")

def extract_zip(path, dest_dir):
    """path into dest_dir, all or nothing: refused if an entry is absolute or has '..', removed if corrupt."""
    tmp = os.path.join(dest_dir, ".extract.tmp")  # nothing moves into place until all of it is out
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name, base = info.filename, os.path.basename(info.filename.rstrip("/"))
                if re.match(r"[/\\]|[A-Za-z]:", name) or ".." in re.split(r"[/\\]", name):
                    raise UserError(f"{path}: unsafe entry {name!r} (absolute or '..'); archive refused")
                if not (name.startswith("__MACOSX/") or base.startswith("._") or base == ".DS_Store"):
                    zf.extract(info, tmp)  # reading checks each entry's CRC
        for entry in os.listdir(tmp):
            target = os.path.join(dest_dir, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):  # a file, or a link (to an empty or missing folder): only it goes
                os.remove(target)
            os.replace(os.path.join(tmp, entry), target)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        os.remove(path)
        raise UserError(f"{path}: corrupt archive ({e}); removed it, run again to download it again") from None
    except (RuntimeError, NotImplementedError) as e:  # encrypted, or deflate64: a new download will not help
        raise UserError(f"{path}: unsupported zip ({e}); extract it yourself into {dest_dir}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

# ----------------------------------------------------------------------------- the published layout
def load_torch(path):
    """torch.load with weights_only=True (tensors, numbers, strings, never code); a failure is one line."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such checkpoint file or folder (python train.py makes out/ckpt.pt)")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise UserError(f"{path}: not a PyTorch checkpoint (not a zip archive as torch.save writes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes: torch raises many kinds
        first = str(e).split("\n")[0].split(". ")[0][:120]  # torch's messages run on for lines
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first})") from None

# config.json: the nine Config fields in upper case (D_MODEL); the token ids also under Hugging Face's names.
CONFIG_FIELDS = [f for f in vars(Config()) if f != "dropout" and not f.endswith("_id")]
TOKEN_IDS = {"bos_id": "bos_token_id", "eos_id": "eos_token_id", "pad_id": "pad_token_id"}

def save_pretrained(out_dir, model, tok):
    """model.safetensors (the tied head under both names, for strict loaders), config.json, tokenizer.json."""
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, "model.safetensors")) as f:
        f.write(safetensors_bytes(model.state_dict(), {"format": "pt"}))
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
    except ValueError as e:  # bpe's and model's file errors; they name their file
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
                                 for k, v in weights.items() if k in want and v.shape != want[k].shape],
                "wrong dtypes": [f"{k} {v.dtype}" for k, v in weights.items()  # e.g. int8: quantised weights
                                 if k in want and v.is_floating_point() != want[k].is_floating_point()]}
    for what, names in problems.items():
        if names:  # one line, whatever is wrong
            raise UserError(f"{where}: {what}: {', '.join(names[:3])}" + (" ..." if len(names) > 3 else ""))
    if tok.vocab_size > c.vocab_size:
        raise UserError(f"{path}: tokenizer has {tok.vocab_size} ids, the model only {c.vocab_size}")
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval(), tok

# ----------------------------------------------------------------------------- a run's folder
RUN_FILES = ("ckpt.pt", "best.pt", "loss.png", "model.safetensors", "config.json", "tokenizer.json",
             "eval.json")  # what train.py leaves in --out-dir

def load_run(path):
    """train.py's own ckpt.pt (its tokenizer as a Tokenizer), else a one-line error: never half read."""
    state = load_torch(path)
    keys = ("model", "config", "tokenizer", "step", "settings", "optimizer", "scaler", "history")
    if not isinstance(state, dict) or not all(k in state for k in keys):
        raise UserError(f"{path}: not a checkpoint of train.py (it holds {', '.join(keys)})")
    try:
        state["tokenizer"] = Tokenizer.from_json(state["tokenizer"], path)  # its tokenizer.json text, parsed
    except ValueError as e:
        raise UserError(str(e)) from None
    return state

def check_out_dir(args, log):
    """A run never silently replaces another. Returns the checkpoint to resume, or None."""
    ckpt = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        if not os.path.isfile(ckpt):
            raise UserError(f"{ckpt}: no checkpoint to resume (train without --resume first)")
        state = load_run(ckpt)
        log(f"resuming {ckpt} at step {state['step']}")
        return state
    found = [n for n in RUN_FILES if os.path.exists(os.path.join(args.out_dir, n))]
    if found and not args.overwrite:
        try:
            held = load_run(ckpt)
            what = f"{held['settings']['data']}, step {held['step']}"
        except UserError:  # no ckpt.pt, or not train.py's: the files say what is there
            what = ", ".join(found)
        raise UserError(f"{args.out_dir} already holds a run ({what}): continue it with --resume, "
                        "choose another --out-dir, or replace it with --overwrite")

def start_out_dir(out_dir, overwrite):
    """Once the new run is known to start: --overwrite removes the old one whole, so no folder mixes two."""
    try:  # a file written and removed: a folder that cannot take checkpoints fails now, not after training
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise UserError(f"--out-dir {out_dir}: cannot write there ({e.strerror or e})") from None
    if overwrite:
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))

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
