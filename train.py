"""
train.py: the SupraVL-Nano training loop, from a fresh clone to out/model.safetensors.

Teacher forcing, AdamW, warmup then cosine, clipping, mixed precision: the card's recipe (RECIPES). A run
leaves in --out-dir: ckpt.pt (what --resume continues), best.pt (lowest validation loss), loss.png,
eval.json (validation scores) and the published layout (model.safetensors, config.json, tokenizer.json).
Left out on purpose: gradient accumulation, EMA weights, data augmentation, learning-rate finders.

Run:
    python train.py --data shapes                        # offline, about 2.5 minutes on a 2-core CPU
    python train.py --data shapes --n-vis 1              # the ablation: one pooled visual token, not 16
    python train.py                                      # Flickr8k on the best device (downloads it once)
    python train.py --resume                             # continue after Ctrl-C, SIGTERM, kill -9, --max-steps
    torchrun --standalone --nproc_per_node=4 train.py    # data parallel over 4 GPUs (gloo on CPUs)
"""
import argparse
import functools
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
from common import (RUN_FILES, UserError, add_data_flags, adopt_settings, atomic_write, check_flags,
                    check_out_dir, cli, flag_value, load_run, pick_dtype, precision,
                    save_pretrained, setup, start_out_dir)
from model import VLM, Config

# Flickr8k: the card's recipe (15 epochs of 30,000 pairs, batch 64, AdamW(0.9, 0.95), wd 0.01, cosine
# to 3e-5, clip 1.0) with a warmup of ours, and a peak lr of 1e-3: on the real photos at hand it reached a
# lower validation loss than the card's 3e-4 in the same steps (4.34 vs 4.62; 2e-3 overfit). Shapes: far
# easier, and it must finish on a laptop CPU, so its first epochs see 56x56 images (README: "the laptop path").
RECIPES = {
    "flickr8k": dict(epochs=15, batch_size=64, lr=1e-3, min_lr=3e-5, warmup_steps=200, half_res_epochs=0),
    "shapes": dict(epochs=6, batch_size=64, lr=2e-3, min_lr=1e-5, warmup_steps=100, half_res_epochs=5)}
SHARED = dict(weight_decay=0.01, grad_clip=1.0, seed=1337, vocab_size=2048, n_vis=16, dropout=0.0,
              log_interval=20, eval_interval=None, dtype="auto")  # None: a tenth of the run, rounded up
SETTINGS = ("data", "data_dir", "prep_dir", *RECIPES["shapes"], *SHARED)  # what a checkpoint remembers
FIXED = ("data", "batch_size", "seed", "vocab_size", "n_vis", "dropout")  # --resume: another run if changed

# ----------------------------------------------------------------------------- data: pairs as rows
def encode_pairs(split, tok, max_seq):
    """Rows [BOS, caption..., EOS, PAD...] of length max_seq+1, the image of each row, its input length.
    A row's first max_seq tokens are the input and its last max_seq the targets (teacher forcing), so
    "a dog" -> ids [BOS a dog EOS PAD], targets [a dog EOS PAD PAD]."""
    rows = [[tok.bos_id] + tok.encode(c)[:max_seq - 1] + [tok.eos_id] for cs in split.captions for c in cs]
    image_of = [i for i, caps in enumerate(split.captions) for _ in caps]
    tokens = torch.full((len(rows), max_seq + 1), tok.pad_id, dtype=torch.long)  # (N, 49)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = torch.tensor(ids)
    return tokens, torch.tensor(image_of), torch.tensor([len(ids) - 1 for ids in rows])

def on_device(split, tok, max_seq, device):
    """encode_pairs' rows and image index, and the uint8 images, on the device; lengths stay on the CPU."""
    tokens, image_of, lengths = encode_pairs(split, tok, max_seq)
    return tokens.to(device), image_of.to(device), lengths, torch.from_numpy(split.images).to(device)

def epoch_order(lengths, epoch, args, rank, world):
    """This rank's batches of row indices for one epoch, (steps, batch), and each batch's longest input.
    A pure function of (seed, epoch): resuming needs nothing but the step to find its place."""
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(args.seed + epoch))
    steps, B = len(perm) // world // args.batch_size, args.batch_size  # the ragged end is dropped
    mine = perm[rank * steps * B:(rank + 1) * steps * B].view(steps, B)  # every rank takes equal steps
    return mine, lengths[mine].amax(1).tolist()

def get_batch(rows, T, tokens, image_of, images):
    """Images, ids, targets of rows (B,), all on one device; cut to T, the longest input (known: no sync)."""
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
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    fused = model.tok_emb.weight.device.type in ("cpu", "cuda")  # one kernel, not one per tensor (not on MPS)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused)

# ----------------------------------------------------------------------------- the run
@dataclass
class Run:
    """What a checkpoint holds: the settings, and the state between two steps."""
    args: argparse.Namespace
    model: VLM  # the plain module, never the compiled or DDP wrapper: its names are the published ones
    tok: Tokenizer
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    world: int = 1  # processes: their number sets the steps of an epoch, so a resume must keep it
    history: dict = field(default_factory=lambda: {"train": [], "val": [], "lr": []})

def train(args):
    device, rank, world, log = setup(args)
    ckpt = f"{args.out_dir}/ckpt.pt"
    state = check_out_dir(args, log) if rank == 0 else load_run(ckpt) if args.resume else None
    if state:
        adopt_settings(args, state, FIXED, log)
        check_args(args)  # now with the run's own settings
        if state.get("world", 1) != world:  # the number of processes sets the steps of an epoch
            raise UserError(f"{ckpt}: trained by {state['world']} processes, not {world}: resume it with "
                            f"{resume_command(state['world'], args.out_dir)}")
    dtype, why = pick_dtype(args.dtype, device)  # after --resume took the run's own --dtype
    log(f"device {device}, {str(dtype)[6:]} ({why}), {world} process{'es' if world > 1 else ''}")
    torch.manual_seed(args.seed)
    train_split, val_split = prepare_data(args, rank, world, log)
    texts = [c for caps in train_split.captions for c in caps]  # the tokenizer learns from these alone
    tok = state["tokenizer"] if state else Tokenizer.train(texts, args.vocab_size)
    model = VLM(Config(vocab_size=tok.vocab_size, n_vis=args.n_vis, dropout=args.dropout, pad_id=tok.pad_id,
                       bos_id=tok.bos_id, eos_id=tok.eos_id)).to(device)
    early = " (BPE stopped early: no pair occurs twice any more)" if tok.vocab_size < args.vocab_size else ""
    log(f"tokenizer {tok.vocab_size} ids{early}, model {model.num_params():,} parameters, "
        f"{args.n_vis} visual tokens")
    run = Run(args, model, tok, make_optimizer(model, args),
              torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16), world=world)
    if state:
        restore(run, state, ckpt)
    fast = torch.compile(model) if args.compile else model
    if world > 1:
        fast = DDP(fast, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    autocast = functools.partial(precision, device, dtype)  # autocast(): a fresh context each time
    # A step's inputs live on the device (Flickr8k's uint8 images are 225 MB): a batch is a gather
    tokens, image_of, lengths, images = on_device(train_split, tok, model.config.max_seq, device)
    val = on_device(val_split, tok, model.config.max_seq, device)
    half = min(args.half_res_epochs, args.epochs - 1)  # epochs at 56x56 (README): never the last one
    small = data.half_size(images) if half else None  # made once, not at every step
    steps_per_epoch = len(lengths) // world // args.batch_size
    total = args.epochs * steps_per_epoch  # a run at step == total (stopped in its last step) only finishes
    check_flags(args, [
        ("--batch-size", steps_per_epoch > 0, f"at most {len(lengths) // world}, the pairs of each process"),
        ("--epochs", run.step <= total, f"enough for the {run.step} steps the run has done"),
        ("--max-steps", (args.max_steps or math.inf) > run.step, f"above {run.step}, where the run is")])
    if rank == 0:
        start_out_dir(args.out_dir, args.overwrite)  # only now, when every check has passed
    stop_at, every = min(total, args.max_steps or total), args.eval_interval or -(-total // 10)
    log(f"{len(lengths):,} training pairs, {args.epochs} epochs of {steps_per_epoch} steps: {total} steps"
        + (" (all done: only the export and the final scores are left)" if run.step == total else ""))

    STOP.clear()
    # from here on, Ctrl-C (or a job scheduler's SIGTERM) stops at a step boundary, after saving
    outside = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        t0, logged, order = time.time(), run.step, None
        while run.step < stop_at:
            epoch, i = divmod(run.step, steps_per_epoch)
            if order is None or i == 0:  # once an epoch, the order goes to the device whole
                order, longest = epoch_order(lengths, epoch, args, rank, world)
                order = order.to(device)
            lr = lr_at(run.step, total, args)
            for g in run.opt.param_groups:
                g["lr"] = lr
            if args.dropout:  # its masks: a function of (step, rank), so ranks differ and resume needs no RNG
                torch.manual_seed(args.seed + run.step * world + rank)
            pixels = small if epoch < half else images  # 56x56: a quarter of the conv work, still 16 tokens
            x, ids, targets = get_batch(order[i], longest[i], tokens, image_of, pixels)
            with autocast():
                _, loss = fast(x, ids, targets)
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            run.scaler.step(run.opt)
            run.scaler.update()
            run.opt.zero_grad(set_to_none=True)
            run.step += 1

            if run.step % args.log_interval == 0 or run.step == stop_at:
                loss_val = check_finite(loss.item(), run)  # the one sync with the device, every log interval
                run.history["train"].append((run.step, loss_val))
                run.history["lr"].append((run.step, lr))
                dt = (time.time() - t0) / (run.step - logged)  # seconds a step since the last log
                t0, logged = time.time(), run.step
                eta = (stop_at - run.step) * dt / 60
                log(f"epoch {epoch + 1}/{args.epochs} step {run.step}/{total} loss {loss_val:.4f} lr {lr:.2e} "
                    f"{args.batch_size * world / dt:.0f} img/s eta {eta:.1f} min")
            if run.step % every == 0 or run.step == stop_at:
                if rank == 0:
                    validate(run, val, val_split.names, autocast, log)
                if world > 1:
                    dist.barrier()  # the others wait while rank 0 evaluates and writes
                t0, logged = time.time(), run.step  # img/s counts training steps, not the evaluation
            if stop_requested(run.step, args.log_interval, world, device):
                return interrupted(run, rank, world, log)
    finally:  # the handlers from before, also after an error: Ctrl-C in the final scoring stops at once
        for s, handler in outside.items():
            signal.signal(s, handler)
    return finish(run, val_split, log) if rank == 0 else None

def finish(run, val_split, log):
    """Rank 0, at the end (also after --max-steps): the published layout, then scores on the val split."""
    out = run.args.out_dir
    save_pretrained(out, run.model, run.tok)
    result = scores.score_split(run.model, run.tok, val_split, run.args.data)
    log("val: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    with atomic_write(f"{out}/eval.json", "w") as f:
        f.write(json.dumps(result, indent=1))
    log(f"wrote {out}/: {' '.join(RUN_FILES)}")
    return result

# ----------------------------------------------------------------------------- evaluation, loss plot
@torch.no_grad()
def validate(run, val, names, autocast, log, batches=20, batch_size=64):
    """Val loss on a fixed slice, 3 greedy captions to read, then best.pt (if lowest), ckpt.pt, loss.png."""
    tokens, image_of, lengths, images = val
    run.model.eval()
    losses = []
    with autocast():
        for rows in torch.arange(min(len(lengths), batches * batch_size)).split(batch_size):
            batch = get_batch(rows.to(tokens.device), int(lengths[rows].max()), tokens, image_of, images)
            losses.append(run.model(*batch)[1].float())
        first3 = data.normalize(images[:3])  # (3, 3, 112, 112)
        seqs = run.model.generate_greedy(first3, run.model.config.max_seq)
    run.model.train()
    loss = check_finite(torch.stack(losses).mean().item(), run)
    log(f"step {run.step}: val loss {loss:.4f}")
    for name, ids in zip(names, seqs):
        log(f"   {name}: {scores.printable(run.tok.decode(ids))}")
    if loss < min([v for _, v in run.history["val"]], default=math.inf):
        save_state(run, f"{run.args.out_dir}/best.pt", full=False)
    run.history["val"].append((run.step, loss))
    save_state(run, f"{run.args.out_dir}/ckpt.pt")
    plot_losses(f"{run.args.out_dir}/loss.png", run.history)

def check_finite(loss, run):
    """A diverged run stops here, before it can overwrite the last good checkpoint."""
    if not math.isfinite(loss):
        ckpt = f"{run.args.out_dir}/ckpt.pt"
        kept = f"{ckpt}, the last good checkpoint, is kept" if os.path.exists(ckpt) else "none was saved yet"
        raise UserError(f"loss became {loss} at step {run.step}; {kept} (try a lower --lr or --dtype float32)")
    return loss

def save_state(run, path, full=True):
    """Only tensors, numbers and strings, so that it loads with weights_only=True."""
    obj = {"model": run.model.state_dict(), "config": asdict(run.model.config), "tokenizer": run.tok.to_json(),
           "step": run.step, "world": run.world, "settings": {k: getattr(run.args, k) for k in SETTINGS}}
    if full:
        obj.update(optimizer=run.opt.state_dict(), scaler=run.scaler.state_dict(), history=run.history)
    with atomic_write(path) as f:
        torch.save(obj, f)

def restore(run, state, path):
    """--resume: the run as save_state left it; a ckpt.pt of other code is one line, not a traceback."""
    try:
        run.model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when fp16 was off: a scaler newly on (--dtype float16) starts fresh
            run.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:  # saved by other code, or edited by hand
        last = str(e).strip().splitlines()[-1].strip()  # torch's message runs on for lines
        raise UserError(f"{path}: does not fit this model ({last})") from None
    run.step, run.history = state["step"], state["history"]

def plot_losses(path, history, size=(720, 420), box=(64, 40, 656, 376)):
    """Train loss (blue, every log interval) and validation loss (red dots) on a log scale, and the
    learning rate (grey, from 0 to its peak), against the step; drawn with Pillow."""
    img = Image.new("RGB", size, "white")
    d, (left, top, right, bottom) = ImageDraw.Draw(img), box
    steps, losses = zip(*history["train"] + history["val"]) if history["train"] + history["val"] else ((), ())
    if len(steps) >= 2:
        last, lo = max(steps), math.log10(max(min(losses), 1e-6))
        hi = max(math.log10(max(max(losses), 1e-6)), lo + 1e-3)
        sx = lambda x: left + x / last * (right - left)  # noqa: E731
        sy = lambda y: bottom - (math.log10(max(y, 1e-6)) - lo) / (hi - lo) * (bottom - top)  # noqa: E731
        for k in range(5):  # five ticks on each axis
            x, y = left + k / 4 * (right - left), bottom - k / 4 * (bottom - top)
            d.line([(x, bottom), (x, bottom + 4)], fill="black")
            d.text((x - 12, bottom + 8), f"{round(k / 4 * last)}", fill="black")
            d.line([(left - 4, y), (left, y)], fill="black")
            d.text((6, y - 6), f"{10 ** (lo + k / 4 * (hi - lo)):.3g}", fill="black")
        peak = max([lr for _, lr in history["lr"]] + [1e-12])
        lr_line = [(sx(x), bottom - lr / peak * (bottom - top)) for x, lr in history["lr"]]
        d.line(lr_line, fill="silver", width=2)
        d.text((right + 6, top - 6), f"lr {peak:.0e}", fill="gray")
        d.line([(sx(x), sy(y)) for x, y in history["train"]], fill="blue", width=2)
        d.line([(sx(x), sy(y)) for x, y in history["val"]], fill="red")
        for x, y in history["val"]:
            d.ellipse([sx(x) - 4, sy(y) - 4, sx(x) + 4, sy(y) + 4], fill="red")
    d.rectangle(box, outline="black")
    d.text((left, 12), "loss (log scale): train (blue), validation (red); learning rate (grey)", fill="black")
    d.text(((left + right) // 2 - 12, size[1] - 18), "step", fill="black")
    with atomic_write(path) as f:
        img.save(f, format="PNG")

# ----------------------------------------------------------------------------- the command line
def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train SupraVL-Nano.", epilog=__doc__.split("Run:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p, None, "flickr8k")  # None: so that --resume tells a given --data from the default
    p.add_argument("--out-dir", default="out", help="default: out")
    shown = {k: " / ".join(f"{r[k]} ({d})" for d, r in RECIPES.items()) for k in RECIPES["shapes"]} | SHARED
    shown |= {"eval_interval": "a tenth of the run", "half_res_epochs": shown["half_res_epochs"] + "; 56x56 "
              "images in the first N epochs, never the last"}
    for k, v in (RECIPES["shapes"] | SHARED).items():  # a flag each, typed as its default (None: an int)
        p.add_argument(f"--{k.replace('_', '-')}", type=int if v is None else type(v),
                       choices=["auto", "float32", "bfloat16", "float16"] if k == "dtype" else None,
                       help=f"default: {shown[k]}")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule is unchanged)")
    p.add_argument("--resume", action="store_true", help="continue --out-dir/ckpt.pt with its settings")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out-dir")
    args = p.parse_args(argv)
    args.given = [k for k in SETTINGS if getattr(args, k) is not None]  # typed on the command line
    for k, v in ({"data": "flickr8k"} | RECIPES[args.data or "flickr8k"] | SHARED).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite: give one (continue the run in --out-dir, or replace it)")
    if not args.resume:  # else checked once the run's own settings are in (train: adopt_settings, check_args)
        check_args(args)
    return args

def check_args(a):
    """Every flag, before any work or write: one line naming the flag, its value and what is allowed."""
    rules = [(f, flag_value(a, f) is None or flag_value(a, f) >= 1, "at least 1")  # None: not given
             for f in ("--epochs", "--batch-size", "--log-interval", "--eval-interval", "--max-steps")]
    rules += [(f, flag_value(a, f) >= 0, "0 or more") for f in ("--warmup-steps", "--half-res-epochs",
                                                              "--weight-decay")]
    rules += [(f, flag_value(a, f) > 0, "above 0") for f in ("--lr", "--grad-clip")]
    grid = math.isqrt(max(a.n_vis, 0))
    check_flags(a, rules + [
        ("--min-lr", 0 <= a.min_lr <= a.lr, f"between 0 and --lr {a.lr}"),
        ("--seed", 0 <= a.seed < 2 ** 32, "0 to 2**32 - 1"),
        ("--vocab-size", 259 <= a.vocab_size <= 65536, "259 (3 specials + 256 bytes) to 65536"),
        ("--n-vis", 1 <= a.n_vis <= 196 and grid * grid == a.n_vis, "a square, 1 to 196 (1, 4, 9, 16...)"),
        ("--dropout", 0 <= a.dropout < 1, "in [0, 1)"),
        ("--out-dir", not os.path.isfile(a.out_dir), "a folder, not a file")])

def main(argv=None):
    args = get_args(argv)
    try:
        return 130 if train(args) == "interrupted" else 0  # 130: the shell's code for "stopped by Ctrl-C"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

# ----------------------------------------------------------------------------- every process: Ctrl-C, the data
STOP = []  # request_stop appends True: the loop stops at the next step boundary, where the state is whole

def request_stop(signum, frame):
    """Ctrl-C or SIGTERM in the training loop: stop at the next step boundary; a second Ctrl-C stops at once."""
    if STOP and signum == signal.SIGINT:  # a person pressing twice; a scheduler may send SIGTERM twice
        raise KeyboardInterrupt
    STOP.append(True)

def stop_requested(step, every, world, device):
    """Ranks agree on STOP every `every` steps: all stop at one step, none left waiting in the all-reduce."""
    if world > 1 and step % every == 0:
        flag = torch.tensor([float(bool(STOP))], device=device)
        dist.all_reduce(flag)
        return flag.item() > 0
    return world == 1 and bool(STOP)  # one process stops at once; several, only at the steps they agree at

def prepare_data(args, rank, world, log):
    """Rank 0 prepares (it may download ~1 GB first) while the others wait; then all read the arrays."""
    # a gloo group with a long timeout (the default 10 minutes is shorter than a slow download), made by all
    # processes before rank 0 starts: making it is itself a wait for every process, and Ctrl-C cannot stop it
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=2)) if world > 1 else None
    if rank == 0:
        data.prepare(args.data, args.data_dir, log=log, prep_dir=args.prep_dir)
    if world > 1:
        log("the other processes wait (up to 2 hours) until the data is prepared")
        done = dist.barrier(group=group, async_op=True)
        while not done.is_completed():  # polled, not a blocking wait, so that Ctrl-C still gets through
            time.sleep(0.1)
        done.wait()  # raises if rank 0 failed
    prep_dir = data.folders(args.data, args.data_dir, args.prep_dir)[1]
    return data.load_split(prep_dir, "train"), data.load_split(prep_dir, "val")

def interrupted(run, rank, world, log):
    if rank == 0:
        save_state(run, f"{run.args.out_dir}/ckpt.pt")
        plot_losses(f"{run.args.out_dir}/loss.png", run.history)
    if world > 1:
        dist.barrier()  # the others wait for the checkpoint: torchrun ends them all once one leaves
    log(f"\ninterrupted at step {run.step}, saved {run.args.out_dir}/ckpt.pt; continue with:\n"
        f"  {resume_command(world, run.args.out_dir)}")
    return "interrupted"

def resume_command(world, out_dir):
    launch = f"torchrun --standalone --nproc_per_node={world} train.py" if world > 1 else "python train.py"
    return f"{launch} --resume --out-dir {out_dir}"

if __name__ == "__main__":
    sys.exit(cli(main))
