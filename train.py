"""
train.py: the SupraVL-Nano training loop, from a fresh clone to out/model.safetensors.

The card's recipe: 15 epochs over the 30,000 Flickr8k (image, caption) training pairs, batch 64,
AdamW(0.9, 0.95) with weight decay 0.01 on matrices only, a short warmup then cosine to 3e-5,
gradient clipping at 1.0, teacher forcing, mixed precision where the device has it. One change, measured
(see RECIPES): peak lr 1e-3 instead of the card's 3e-4. The built-in shapes set has a recipe of its own,
measured to finish on a laptop CPU (see RECIPES and the README's table).

What a run leaves in --out-dir (default out/):
    ckpt.pt            latest full state (weights, optimizer, step, settings, tokenizer); --resume continues it
    best.pt            weights with the lowest validation loss so far
    loss.png           train and validation loss and the learning rate, redrawn at each evaluation
    model.safetensors, config.json, tokenizer.json   the published layout: `sample.py --ckpt out`
    eval.json          BLEU-1..4, CIDEr-D (and exact match on shapes) of the validation split

Left out on purpose: gradient accumulation, EMA weights, data augmentation, learning-rate finders.

Run:
    python train.py --data shapes                        # offline, a few minutes on a 2-core CPU
    python train.py                                      # Flickr8k on the best device (downloads it once)
    python train.py --resume                             # continue after Ctrl-C, kill -9 or --max-steps
    torchrun --standalone --nproc_per_node=4 train.py    # data parallel over 4 GPUs (gloo on CPUs)
"""
import argparse
import ctypes
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import scores
from bpe import Tokenizer
from common import (UserError, add_data_flags, atomic_write, check_flags, cli, load_torch, pick_device,
                    save_pretrained, save_torch)
from model import VLM, Config

# Flickr8k gets the card's recipe but for the peak learning rate: on the real photos at hand, 1e-3
# reached a lower validation loss than the card's 3e-4 in the same steps (4.34 vs 4.62; 2e-3 overfit).
# Shapes is far easier and must finish on a laptop CPU (README: "the laptop path").
RECIPES = {
    "flickr8k": dict(epochs=15, batch_size=64, lr=1e-3, min_lr=3e-5, warmup_steps=200),
    "shapes": dict(epochs=6, batch_size=64, lr=2e-3, min_lr=1e-4, warmup_steps=100),
}
SHARED = dict(weight_decay=0.01, grad_clip=1.0, seed=1337, vocab_size=2048, n_vis=16, dropout=0.0,
              log_interval=20, eval_interval=None, dtype="auto")
# On --resume these must match the checkpoint (another dataset, data order or model is another run);
# the other settings may change, and the run says what changed.
FIXED = ("data", "batch_size", "seed", "vocab_size", "n_vis", "dropout")
SETTINGS = ("data", "data_dir", "prep_dir", *RECIPES["shapes"], *SHARED)  # what a checkpoint remembers


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train SupraVL-Nano.", epilog=__doc__.split("Run:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p, default=None)
    p.add_argument("--out-dir", default="out")
    for name, kind, what in (
            ("epochs", int, "passes over the training pairs"), ("batch-size", int, "pairs per step, per process"),
            ("lr", float, "peak learning rate (the card: 3e-4)"), ("min-lr", float, ""),
            ("warmup-steps", int, ""), ("weight-decay", float, ""), ("grad-clip", float, ""), ("seed", int, ""),
            ("vocab-size", int, ""), ("n-vis", int, "visual tokens: 16 is the card's 4x4 grid, 1 a single "
             "pooled token (the ablation)"), ("dropout", float, ""), ("log-interval", int, "steps"),
            ("eval-interval", int, "steps; default: a tenth of the run")):
        key = name.replace("-", "_")
        default = {d: RECIPES[d].get(key, SHARED.get(key)) for d in RECIPES}
        shown = default["flickr8k"] if len(set(default.values())) == 1 else ", ".join(
            f"{v} ({d})" for d, v in default.items())
        p.add_argument(f"--{name}", type=kind, help=f"{what}; default: {shown}".lstrip("; "))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule is unchanged)")
    p.add_argument("--resume", action="store_true", help="continue --out-dir/ckpt.pt with its settings")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out-dir")
    args = p.parse_args(argv)
    args.given = [k for k in SETTINGS if getattr(args, k) is not None]  # typed on the command line
    for k, v in ({"data": "flickr8k"} | RECIPES[args.data or "flickr8k"] | SHARED).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_args(args)
    return args


def check_args(a):
    """Every flag, before any work or write: one line naming the flag, its value and what is allowed."""
    grid = math.isqrt(a.n_vis) if a.n_vis > 0 else 0
    check_flags(a, [
        ("--epochs", a.epochs >= 1, "at least 1"), ("--batch-size", a.batch_size >= 1, "at least 1"),
        ("--lr", a.lr > 0, "above 0"), ("--min-lr", 0 <= a.min_lr <= a.lr, f"between 0 and --lr {a.lr}"),
        ("--warmup-steps", a.warmup_steps >= 0, "0 or more"), ("--weight-decay", a.weight_decay >= 0, "0 or more"),
        ("--grad-clip", a.grad_clip > 0, "above 0"), ("--seed", a.seed >= 0, "0 or more"),
        ("--vocab-size", 259 <= a.vocab_size <= 65536, "259 (3 specials + 256 bytes) to 65536"),
        ("--n-vis", 1 <= a.n_vis <= 196 and grid * grid == a.n_vis, "a square from 1 to 196 (1, 4, 9, 16, ...)"),
        ("--dropout", 0 <= a.dropout < 1, "in [0, 1)"), ("--log-interval", a.log_interval >= 1, "at least 1"),
        ("--eval-interval", a.eval_interval is None or a.eval_interval >= 1, "at least 1"),
        ("--max-steps", a.max_steps is None or a.max_steps >= 1, "at least 1"),
        ("--resume", not (a.resume and a.overwrite), "given without --overwrite (continue a run, or replace it)"),
        ("--out-dir", not os.path.isfile(a.out_dir), "a folder, not a file")])


# -----------------------------------------------------------------------------
# Data: every (image, caption) pair becomes one row of token ids

def encode_pairs(split, tok, max_seq):
    """Rows [BOS, caption..., EOS, PAD...] of length max_seq+1, the image of each row, its input length.

    A row's first max_seq tokens are the model's input and its last max_seq the targets, so
    "a dog" -> ids [BOS a dog EOS PAD], targets [a dog EOS PAD PAD]: teacher forcing.
    """
    rows, image_of = [], []
    for i, caps in enumerate(split.captions):
        for c in caps:
            rows.append([tok.bos_id] + tok.encode(c)[: max_seq - 1] + [tok.eos_id])
            image_of.append(i)
    tokens = torch.full((len(rows), max_seq + 1), tok.pad_id, dtype=torch.long)
    for r, ids in enumerate(rows):
        tokens[r, : len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(ids) - 1 for ids in rows])
    return tokens, torch.tensor(image_of), lengths


def epoch_order(lengths, epoch, args, rank, world):
    """This rank's batches of row indices for one epoch, (steps, batch), and the longest input of each
    batch. A pure function of (seed, epoch): resuming needs nothing but the step to find its place."""
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(args.seed + epoch))
    steps = len(perm) // world // args.batch_size  # the ragged end is dropped: every rank takes equal steps
    mine = perm[rank * steps * args.batch_size:(rank + 1) * steps * args.batch_size].view(steps, args.batch_size)
    return mine, lengths[mine].amax(1).tolist()


def get_batch(rows, T, tokens, image_of, images):
    """Images and teacher-forcing ids for rows (B,), every tensor on one device; cut to T, the batch's
    longest input (known on the CPU, so no sync)."""
    ids, targets = tokens[rows, :T], tokens[rows, 1:T + 1]  # (B, T) each
    return data.normalize(images[image_of[rows]]), ids, targets  # (B, 3, 112, 112), ids, targets


def lr_at(step, total, args):
    """Linear warmup to args.lr, then cosine down to args.min_lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = min(1.0, (step - args.warmup_steps) / max(1, total - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


def make_optimizer(model, args):
    # Decay matrices (linear, conv, embedding); never biases or norm weights.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


# -----------------------------------------------------------------------------
# Evaluation, checkpoints and the loss plot

@dataclass
class Run:
    """What a checkpoint holds: the run's settings and its state between two steps."""
    args: argparse.Namespace
    model: VLM  # the plain module, never the compiled or DDP wrapper: its names are the published ones
    tok: Tokenizer
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    best: float = math.inf
    history: dict = field(default_factory=lambda: {"train": [], "val": [], "lr": []})

    def save(self, path, full=True):
        """Only tensors, numbers and strings, so that it loads with weights_only=True."""
        obj = {"model": self.model.state_dict(), "config": asdict(self.model.config), "step": self.step,
               "tokenizer": self.tok.to_json(), "settings": {k: getattr(self.args, k) for k in SETTINGS}}
        if full:
            obj.update(optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(), best_val=self.best,
                       history=self.history)
        save_torch(path, obj)

    def load(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best, self.history = state["step"], state["best_val"], state["history"]


@torch.no_grad()
def val_loss(model, pairs, images, autocast, batches=20, batch_size=64):
    """Mean loss over a fixed slice of the validation pairs."""
    tokens, image_of, lengths = pairs
    losses = []
    model.eval()
    for i in range(0, min(len(lengths), batches * batch_size), batch_size):
        rows = torch.arange(i, min(i + batch_size, len(lengths)), device=tokens.device)
        with autocast:
            batch = get_batch(rows, int(lengths[i:i + batch_size].max()), tokens, image_of, images)
            losses.append(model(*batch)[1].float())
    model.train()
    return torch.stack(losses).mean().item()


def validate(run, val, images, autocast, val_names, log):
    """At each evaluation: validation loss, three greedy captions to read, best.pt, ckpt.pt, loss.png."""
    loss = check_finite(val_loss(run.model, val, images, autocast), run)
    run.history["val"].append((run.step, loss))
    log(f"step {run.step}: val loss {loss:.4f}")
    run.model.eval()
    with torch.no_grad(), autocast:
        seqs = run.model.generate_greedy(data.normalize(images[:3]), max_new=run.model.config.max_seq)
    run.model.train()
    for name, ids in zip(val_names, seqs):
        log(f"   {name}: {run.tok.decode(ids)}")
    out = run.args.out_dir
    if loss < run.best:
        run.best = loss
        run.save(os.path.join(out, "best.pt"), full=False)
    run.save(os.path.join(out, "ckpt.pt"))
    plot_losses(os.path.join(out, "loss.png"), run.history)


def check_finite(loss, run):
    """A diverged run stops before it can overwrite the last good checkpoint."""
    if not math.isfinite(loss):
        raise UserError(f"{run.args.out_dir}/ckpt.pt: loss became {loss} at step {run.step}; the last good "
                        f"checkpoint is kept (try a lower --lr or --dtype float32)")
    return loss


def plot_losses(path, history, size=(720, 420), m=(64, 40, 64, 44)):
    """Train loss (blue, each log interval) and validation loss (red dots) on a log scale, the learning
    rate (grey, right axis) against the step, with ticks; drawn with Pillow."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = m[0], m[1], size[0] - m[2], size[1] - m[3]
    losses = [y for _, y in history["train"] + history["val"]]
    steps = [x for x, _ in history["train"] + history["val"]]
    if len(losses) >= 2:
        x1, lo, hi = max(steps), math.log10(max(min(losses), 1e-6)), math.log10(max(max(losses), 1e-6))
        hi += 1e-9
        sx = lambda x: left + x / max(x1, 1) * (right - left)
        sy = lambda y: bottom - (math.log10(max(y, 1e-6)) - lo) / (hi - lo) * (bottom - top)
        for k in range(5):  # ticks: 5 steps along x, 5 losses along y
            x, y = left + k / 4 * (right - left), bottom - k / 4 * (bottom - top)
            d.line([(x, bottom), (x, bottom + 4)], fill="black")
            d.text((x - 12, bottom + 8), f"{round(k / 4 * x1)}", fill="black")
            d.line([(left - 4, y), (left, y)], fill="black")
            d.text((4, y - 6), f"{10 ** (lo + k / 4 * (hi - lo)):.3g}", fill="black")
        if history["lr"]:
            peak = max(lr for _, lr in history["lr"])
            lr_y = lambda lr: bottom - lr / peak * (bottom - top)
            d.line([(sx(x), lr_y(lr)) for x, lr in history["lr"]], fill=(170, 170, 170), width=2)
            d.text((right + 6, top - 6), f"lr {peak:.1e}", fill="gray")
            d.text((right + 6, bottom - 6), "lr 0", fill="gray")
        if len(history["train"]) > 1:
            d.line([(sx(x), sy(y)) for x, y in history["train"]], fill="blue", width=2)
        val = [(sx(x), sy(y)) for x, y in history["val"]]
        if len(val) > 1:
            d.line(val, fill="red", width=1)
        for x, y in val:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill="red")
    d.rectangle([left, top, right, bottom], outline="black")
    d.text((left, 12), "loss (log scale): train (blue), validation (red); learning rate (grey)", fill="black")
    d.text(((left + right) // 2 - 12, size[1] - 18), "step", fill="black")
    with atomic_write(path) as f:
        img.save(f, format="PNG")


# -----------------------------------------------------------------------------
# The run

def train(args):
    device, dtype, rank, world, log = setup(args)
    ckpt = os.path.join(args.out_dir, "ckpt.pt")
    state = check_out_dir(args, log) if rank == 0 else load_torch(ckpt) if args.resume else None
    if state:
        adopt_settings(args, state, log)
    torch.manual_seed(args.seed)

    # Data: prepared once (downloaded or generated) by rank 0, then read as uint8 arrays.
    train_split, val_split = prepare_data(args, rank, world, log)
    tok = Tokenizer.from_json(state["tokenizer"], "ckpt.pt") if state else train_tokenizer(train_split, args, log)
    config = Config(vocab_size=tok.vocab_size, n_vis=args.n_vis, dropout=args.dropout,
                    pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    train_pairs = [t.to(device) for t in encode_pairs(train_split, tok, config.max_seq)]
    val_pairs = [t.to(device) for t in encode_pairs(val_split, tok, config.max_seq)]
    val_pairs[2] = val_pairs[2].cpu()  # lengths: read on the CPU, no sync
    # The uint8 images stay whole on the device (225 MB for Flickr8k): a batch is one gather.
    train_images = torch.from_numpy(train_split.images).to(device)
    val_images = torch.from_numpy(val_split.images).to(device)
    lengths = train_pairs[2].cpu()

    raw_model = VLM(config).to(device)
    log(f"model: {raw_model.num_params():,} parameters, {config.n_vis} visual tokens")
    run = Run(args, raw_model, tok, make_optimizer(raw_model, args),
              torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16))
    if state:
        run.load(state)
    model = torch.compile(raw_model) if args.compile else raw_model
    if world > 1:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    steps_per_epoch = len(lengths) // world // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{args.prep_dir}: {len(lengths)} training pairs, fewer than one batch")
    total = args.epochs * steps_per_epoch
    stop_at = min(total, args.max_steps or total)
    eval_every = args.eval_interval or max(1, total // 10)
    log(f"{len(lengths):,} training pairs, {args.epochs} epochs of {steps_per_epoch} steps: {total} steps")
    if run.step >= total:
        raise UserError(f"--epochs {args.epochs}: the run is already at step {run.step} of {total}; give more")

    model.train()
    t0, seen, order = time.time(), 0, None
    while run.step < stop_at:
        epoch, i = divmod(run.step, steps_per_epoch)
        if order is None or i == 0:  # the epoch's order goes to the device once, not a batch at a time
            rows, longest = epoch_order(lengths, epoch, args, rank, world)
            order = rows.to(device)
        lr = lr_at(run.step, total, args)
        for g in run.opt.param_groups:
            g["lr"] = lr
        torch.manual_seed(args.seed + run.step * world + rank)  # dropout masks: a function of the step
        x, ids, targets = get_batch(order[i], longest[i], *train_pairs[:2], train_images)
        with autocast:
            _, loss = model(x, ids, targets)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.opt)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        run.scaler.step(run.opt)
        run.scaler.update()
        run.opt.zero_grad(set_to_none=True)
        run.step, seen = run.step + 1, seen + len(ids) * world

        if run.step % args.log_interval == 0 or run.step == stop_at:
            loss_val = check_finite(loss.item(), run)  # the one sync with the device, every log interval
            run.history["train"].append((run.step, loss_val))
            run.history["lr"].append((run.step, lr))
            dt = time.time() - t0
            log(f"epoch {epoch + 1}/{args.epochs} step {run.step}/{total} loss {loss_val:.4f} lr {lr:.2e} "
                f"{seen / dt:.0f} pairs/s eta {(stop_at - run.step) * dt / (seen / len(ids) / world) / 60:.1f} min")
            t0, seen = time.time(), 0
        if stop_requested(run.step, args, world, device):
            if rank == 0:
                run.save(os.path.join(args.out_dir, "ckpt.pt"))
            if world > 1:
                dist.barrier()  # the others wait for the checkpoint: torchrun ends them all once one leaves
            log(f"\ninterrupted at step {run.step}, saved {args.out_dir}/ckpt.pt; continue with:\n"
                f"  python train.py --resume --out-dir {args.out_dir}")
            return "interrupted"
        if run.step % eval_every == 0 or run.step == stop_at:
            if rank == 0:
                validate(run, val_pairs, val_images, autocast, val_split.names, log)
            if world > 1:
                dist.barrier()  # the others wait while rank 0 evaluates and writes
    return finish(run, val_split, args, rank, log)


def finish(run, val_split, args, rank, log):
    """The end (also after --max-steps): the published layout, then scores on the validation split."""
    if rank != 0:
        return None
    save_pretrained(args.out_dir, run.model, run.tok)
    result = scores.score_split(run.model, run.tok, val_split, args.data)
    log("val: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    with atomic_write(os.path.join(args.out_dir, "eval.json"), "w") as f:
        f.write(json.dumps(result, indent=1))
    log(f"wrote {args.out_dir}/: ckpt.pt best.pt loss.png model.safetensors config.json tokenizer.json eval.json")
    return result


def train_tokenizer(split, args, log):
    t0 = time.time()
    tok = Tokenizer.train([c for caps in split.captions for c in caps], args.vocab_size)
    log(f"tokenizer: {tok.vocab_size} ids trained on the training captions in {time.time() - t0:.1f}s")
    return tok


STOP = []  # becomes [True] on Ctrl-C (see main)


def main(argv=None):
    args = get_args(argv)
    # Ctrl-C asks the loop to stop at the next step boundary, where the state is consistent.
    signal.signal(signal.SIGINT, lambda *_: STOP.append(True))
    try:
        return 130 if train(args) == "interrupted" else 0  # 130: the shell's code for "stopped by Ctrl-C"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Robustness and speed: devices and precision, processes, the output folder, resuming

def setup(args):
    """The device and precision, and the process group when run by torchrun. Returns (device, dtype,
    rank, world, log); only rank 0 logs."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    log = print if rank == 0 else (lambda *a, **k: None)
    device = pick_device(args.device)
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu":
        keep_freed_memory()
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # the shapes barely change: let cuDNN time its kernels once
    dtype, why = pick_dtype(args.dtype, device)
    log(f"device {device}, {str(dtype)[6:]} ({why}), {world} process{'es' if world > 1 else ''}")
    return device, dtype, rank, world, log


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
        # Measured on a 2-core AVX512-BF16 EPYC (bench.py): faster than fp32 for a batch-64 step.
        return torch.bfloat16, "the CPU has native bf16 instructions, faster than fp32"
    return torch.float32, "no fast low precision on this device"


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing it back to the OS.

    Every CPU step allocates and frees ~50 MB of 112x112 conv activations; by default glibc maps each
    fresh from the OS and unmaps it on free, so every step pays page faults and zero-fills. Measured
    1.1x (fp32) to 1.25x (bf16) faster steps; the process keeps its peak memory (a few hundred MB)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc (musl): nothing to tune
            return
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GB come from the reusable heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap


def prepare_data(args, rank, world, log):
    """Rank 0 prepares (may download ~1 GB first) while the others wait, then all read the arrays."""
    if rank == 0:
        data.prepare(args.data, args.data_dir, log=log, prep_dir=args.prep_dir)
    if world > 1:  # a gloo group with a long timeout: the default 10 minutes is shorter than a slow download
        log("the other processes wait (up to 2 hours) until the data is prepared")
        dist.barrier(group=dist.new_group(backend="gloo", timeout=timedelta(hours=2)))
    prep_dir = args.prep_dir or args.data_dir or os.path.join("data", args.data)
    return data.load_split(prep_dir, "train"), data.load_split(prep_dir, "val")


def stop_requested(step, args, world, device):
    """Ctrl-C sets STOP. Several processes agree on it every log interval, so all stop at the same step
    (a rank that left alone would leave the others waiting in the gradient all-reduce)."""
    if world == 1:
        return bool(STOP)
    if step % args.log_interval:
        return False
    flag = torch.tensor([float(bool(STOP))], device=device)
    dist.all_reduce(flag)
    return flag.item() > 0


RUN_FILES = ("ckpt.pt", "best.pt", "loss.png", "model.safetensors", "config.json", "tokenizer.json", "eval.json")


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
        what = ", ".join(found)
        if os.path.isfile(ckpt):
            state = load_torch(ckpt)
            what = f"{state['settings']['data']}, step {state['step']}"
        raise UserError(f"{args.out_dir} already holds a run ({what}): continue it with --resume, "
                        "choose another --out-dir, or replace it with --overwrite")
    for name in found:  # --overwrite: the old run goes as a whole, so the folder never mixes two runs
        os.remove(os.path.join(args.out_dir, name))
    os.makedirs(args.out_dir, exist_ok=True)
    return None


def adopt_settings(args, state, log):
    """--resume: the checkpoint's settings, except those given again. Those that would make it another
    run (FIXED) must match; the others change from here on, and the log says so."""
    for key, saved in state["settings"].items():
        given = getattr(args, key)
        if key not in args.given or given == saved:
            setattr(args, key, saved)
        elif key in FIXED:
            raise UserError(f"--{key.replace('_', '-')} {given}: {args.out_dir}/ckpt.pt was trained with "
                            f"{saved}; drop the flag to resume it, or start a new run in another --out-dir")
        else:
            log(f"resuming with --{key.replace('_', '-')} {given} instead of {saved}")


if __name__ == "__main__":
    sys.exit(cli(main))
