"""
model.py: SupraVL-Nano, a tiny CNN and a tiny GPT that caption images, exact to the design card.

    image (B,3,112,112) -> 3 x [Conv 3x3 -> BatchNorm -> GELU -> MaxPool 2] -> (B,64,14,14)
        -> AdaptiveAvgPool 4x4 -> 16 tokens x 64 -> Linear -> (B,16,128) = the visual tokens
    [visual tokens, BOS, w1, w2, ...] + positions -> 3 pre-LN blocks -> LayerNorm -> lm_head (tied to tok_emb)

698,624 parameters with the card's 2048-token vocabulary (the tied matrix counted once). Last, the weights on
disk: safetensors by hand. Left out: the tokenizer (bpe.py), images (data.py), training (train.py).
Tests: the model section of test_all.py (python -m pytest -q test_all.py runs them all).
Use it like:  model = VLM(Config()).eval(); model.generate_beam(images) -> [[ids...], ...]
"""
import json
import math
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

@dataclass
class Config:
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 3
    d_ff: int = 256
    vis_ch: int = 64  # channels of the last conv block; the first two have vis_ch/4 and vis_ch/2
    n_vis: int = 16  # visual tokens; must be a square: 16 -> 4x4 pooled grid, 1 -> one pooled token
    vocab_size: int = 2048
    max_seq: int = 48  # text positions: BOS + caption tokens
    img_size: int = 112
    dropout: float = 0.0  # off by default (its effect on the full Flickr8k is not measured here)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):  # a config.json may hold anything: every field is checked before a layer is made
        for name, value in vars(self).items():
            low = 0 if name.endswith("_id") else 1
            if name != "dropout" and (type(value) is not int or value < low):
                raise ValueError(f"Config: {name} must be a whole number of at least {low}, got {value!r}")
        ids = (self.pad_id, self.bos_id, self.eos_id)
        problems = [
            (math.isqrt(self.n_vis) ** 2 != self.n_vis, f"n_vis {self.n_vis} is not a square (1, 4, 16...)"),
            (self.d_model % self.n_heads, f"d_model {self.d_model} is no multiple of n_heads {self.n_heads}"),
            (self.vis_ch % 4, f"vis_ch {self.vis_ch} is not a multiple of 4"),
            (not 8 <= self.img_size <= 1024, f"img_size {self.img_size} is not in 8..1024"),
            (max(ids) >= self.vocab_size, f"token ids {ids} do not all fit in vocab_size {self.vocab_size}"),
            (type(self.dropout) not in (int, float) or not 0 <= self.dropout < 1,
             f"dropout {self.dropout!r} is not a number in [0, 1)")]
        for bad, problem in problems:
            if bad:
                raise ValueError(f"Config: {problem}")

# ======================================================= part 1: the model, starting with the visual encoder
def conv_block(cin, cout):  # halves H and W; its weights are named .0 (conv) and .1 (norm)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.GELU(), nn.MaxPool2d(2))

class VisualEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg.vis_ch
        self.conv1 = conv_block(3, c // 4)
        self.conv2 = conv_block(c // 4, c // 2)
        self.conv3 = conv_block(c // 2, c)
        self.pool = nn.AdaptiveAvgPool2d(math.isqrt(cfg.n_vis))  # any image size -> a 4x4 grid (n_vis 16)
        self.proj = nn.Linear(c, cfg.d_model)

    def forward(self, images):
        x = images.contiguous(memory_format=torch.channels_last)  # NHWC: the fast conv kernels' own layout
        x = self.conv3(self.conv2(self.conv1(x)))  # (B, 64, 14, 14)
        x = self.pool(x).flatten(2).transpose(1, 2)  # (B, 16, 64): one token per grid cell, row-major
        return self.proj(x)  # (B, 16, 128)

# ----------------------------------------------------------------------------- the GPT part
class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cache=None, start=0, need_attn=False):
        """x (B,T,C) at positions start.. -> (B,T,C) and, if need_attn, the last query's weights (B,H,1,S)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        if cache is not None:  # part 2: this layer's keys/values (2, B, H, S_max, hd); no torch.cat copies
            cache[:, :, :, start:start + T] = torch.stack([k, v])  # (2, B, H, T, hd) in place, after the past
            k, v = cache[:, :, :, :start + T]  # (B, H, S, hd) each: every position so far
        # a prompt (with an empty cache) needs the triangle; one new query may look at every cached key
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout)  # (B, H, T, hd)
        # SDPA keeps no weights: written out for the last query, which sees every key, so it needs no mask
        weights = (q[:, :, -1:] @ k.mT / math.sqrt(q.size(-1))).softmax(-1) if need_attn else None
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), weights  # heads side by side again

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(OrderedDict(  # (B, T, 128) -> (B, T, 256) -> (B, T, 128)
            fc1=nn.Linear(cfg.d_model, cfg.d_ff), gelu=nn.GELU(), fc2=nn.Linear(cfg.d_ff, cfg.d_model)))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, start=0, need_attn=False):
        a, weights = self.attn(self.ln1(x), cache, start, need_attn)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.ln2(x))), weights

class VLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.vis_enc = VisualEncoder(cfg)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.n_vis + cfg.max_seq, cfg.d_model)  # visual + text positions
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one matrix reads and writes tokens
        for m in self.modules():  # GPT-2's N(0, 0.02): N(0, 1) tied embeddings would give logits of std ~11
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():  # GPT-2: 2*n_layers residual branches add up; scale them down
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied head/embedding matrix is yielded once

    def forward(self, images, ids, targets=None):
        """Teacher forcing: images (B,3,H,W) normalised, ids (B,T) from BOS, T <= max_seq -> logits (B,T,V)
        at the text positions, mean cross-entropy on targets (B,T) with pad_id ignored (None without them)."""
        cfg = self.config
        require(ids.size(1) <= cfg.max_seq, f"{ids.size(1)} text tokens exceed max_seq {cfg.max_seq}")
        x = self._embed(self.vis_enc(images), ids, 0)  # (B, 16+T, 128)
        for block in self.blocks:
            x, _ = block(x)
        logits = self.lm_head(self.ln_f(x[:, cfg.n_vis:]))  # (B, T, V): text positions only
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=cfg.pad_id)

    def _embed(self, vis, ids, start):
        """Token embeddings of ids (after the visual tokens vis, if given) plus positions from start."""
        x = self.tok_emb(ids) if vis is None else torch.cat([vis, self.tok_emb(ids)], 1)  # (B, [16+]T, 128)
        pos = torch.arange(start, start + x.size(1), device=x.device)  # (16+T,)
        return self.drop(x + self.pos_emb(pos))

    @torch.no_grad()
    def generate_plain(self, images, max_new=48):
        """Greedy decoding the plain way, as the card's code does it: for every new token the whole
        sequence (and the CNN) runs again. Slow, but obviously right: part 2 must give its tokens."""
        require(not self.training, EVAL_FIRST)
        ids = images.new_full((images.size(0), 1), self.config.bos_id, dtype=torch.long)  # (B, 1)
        for _ in range(max_new):
            logits, _ = self(images, ids)  # (B, T, V)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)  # (B, T+1)
            if (ids == self.config.eos_id).any(1).all():
                break
        return self._trim(ids[:, 1:], None)

    def _trim(self, toks, maps):
        """Each row of toks (B, t) up to its first EOS, as lists (and its maps (B, t, L, n_vis), if kept)."""
        eos = self.config.eos_id
        seqs = [row[:row.index(eos)] if eos in row else row for row in toks.tolist()]
        return seqs if maps is None else (seqs, [m[:len(s)] for m, s in zip(maps, seqs)])

    # ============================================================================ part 2: speed
    # generate_plain's tokens for one position's work per token: the CNN runs once, layers keep keys/values
    def _decode(self, vis, ids, cache, start, need_attn):
        """ids (B,T) at positions start.. (after the visual tokens vis, if given), keys/values into cache ->
        the last position's next-token log-probs (B,V) and, if need_attn, its image attention (B,L,n_vis)."""
        x = self._embed(vis, ids, start)  # (B, T, 128)
        maps = []
        for block, kv in zip(self.blocks, cache.split(2)):  # layer i: rows 2i, 2i+1 (keys, values), views
            x, w = block(x, kv, start, need_attn)
            if need_attn:
                maps.append(w[:, :, 0, :self.config.n_vis].float().mean(dim=1))  # (B, n_vis), heads averaged
        logits = self.lm_head(self.ln_f(x[:, -1]))  # (B, V)
        return logits.float().log_softmax(-1), (torch.stack(maps, 1) if need_attn else None)

    def _start(self, images, max_new, need_attn):
        """Run visual tokens + BOS -> (every layer's key/value cache, log-probs of token 1, attn)."""
        cfg, B = self.config, images.size(0)
        require(not self.training, EVAL_FIRST)
        require(B >= 1 and 1 <= max_new <= cfg.max_seq, f"{B} images, max_new {max_new} (1..{cfg.max_seq})")
        shape = (2 * cfg.n_layers, B, cfg.n_heads, cfg.n_vis + cfg.max_seq, cfg.d_model // cfg.n_heads)
        cache = torch.zeros(shape, device=images.device, dtype=self.tok_emb.weight.dtype)
        bos = images.new_full((B, 1), cfg.bos_id, dtype=torch.long)  # (B, 1)
        return (cache, *self._decode(self.vis_enc(images), bos, cache, 0, need_attn))

    @torch.no_grad()
    def _sample_loop(self, images, max_new, pick, return_attn):
        """Greedy / top-k: pick(logp (B,V)) -> next tokens (B,), until every row has emitted EOS."""
        cache, logp, attn = self._start(images, max_new, return_attn)
        toks, maps = [], []  # per step: the new tokens (B,) and their maps (B, L, n_vis)
        ended = torch.zeros(images.size(0), dtype=torch.bool, device=images.device)  # (B,): emitted EOS yet
        for t in range(max_new):
            toks.append(pick(logp))
            maps.append(attn)  # the attention of the position that chose the new token
            ended |= toks[-1] == self.config.eos_id  # one comparison a step, not one over every token so far
            if t == max_new - 1 or ended.all():
                break  # the last token is never fed back
            logp, attn = self._decode(None, toks[-1][:, None], cache, self.config.n_vis + 1 + t, return_attn)
        return self._trim(torch.stack(toks, 1), torch.stack(maps, 1) if return_attn else None)

    def generate_greedy(self, images, max_new=48, return_attn=False):
        """Most likely token at every step. Returns per image a list of ids (no BOS/EOS) or, with
        return_attn, (seqs, attns) with attns[i] of shape (len(seqs[i]), n_layers, n_vis) on the device."""
        return self._sample_loop(images, max_new, lambda logp: logp.argmax(-1), return_attn)

    def generate_topk(self, images, max_new=48, temperature=0.8, top_k=50, generator=None, return_attn=False):
        """Sample from the top_k most likely tokens, logits divided by temperature."""
        require(temperature > 0 and top_k >= 1, f"temperature {temperature}, top_k {top_k}: need > 0, >= 1")

        def pick(logp):
            vals, idx = logp.topk(min(top_k, logp.size(-1)), dim=-1)  # (B, k), the best first
            probs = ((vals - vals[:, :1]) / temperature).softmax(-1)  # from the best: a tiny T gives no nan
            choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            return idx.gather(1, choice).squeeze(1)  # (B,)
        return self._sample_loop(images, max_new, pick, return_attn)

    @torch.no_grad()
    def generate_beam(self, images, beam_width=3, max_new=48, length_penalty=0.0, return_attn=False):
        """Beam search, the W beams of all B images run as one batch of B*W rows; returns what generate_greedy
        does. A hypothesis ending in EOS is set aside with score sum(log p) / len**length_penalty (len counts
        the EOS; 0 = summed log-probability); at max_new the live beams compete too (captions without EOS)."""
        cfg, B, W, lp, dev = self.config, images.size(0), beam_width, length_penalty, images.device
        require(1 <= W <= cfg.vocab_size // 2 and lp >= 0, f"beam_width {W}, length_penalty {lp}: 1..V/2, >=0")
        cache, logp, attn = self._start(images, max_new, return_attn)  # one live beam per image until step 2
        score = torch.zeros(B, 1, device=dev)  # (B, n): summed log-probs of each image's n live beams
        toks = torch.zeros(B, 0, dtype=torch.long, device=dev)  # (B*n, t): the live beams' tokens
        maps = torch.zeros(B, 0, cfg.n_layers, cfg.n_vis, device=dev)  # (B*n, t, L, n_vis), if kept
        best = [None] * B  # per image: its best finished (score, tokens, maps)

        def finish(b, s, row):  # a finished hypothesis of image b, kept if it beats the best so far
            if best[b] is None or s > best[b][0]:
                best[b] = (s, toks[row].tolist(), maps[row] if return_attn else None)
        for t in range(max_new):
            n = score.size(1)
            top, idx = (score.view(B * n, 1) + logp).view(B, -1).topk(2 * W, dim=1)  # (B, 2W): <= W are EOS
            # exact ties (bf16 weights) go to the lower id, as argmax breaks them: topk's order is arbitrary
            idx, by_index = idx.sort(dim=1)
            top, by_score = top.gather(1, by_index).sort(dim=1, descending=True, stable=True)  # (B, 2W)
            idx = idx.gather(1, by_score)
            beam, tok = idx // cfg.vocab_size, idx % cfg.vocab_size  # (B, 2W): which beam, extended by what
            is_eos = tok == cfg.eos_id  # (B, 2W)
            for b, j in is_eos[:, :W].nonzero().tolist():  # an EOS in the top W ends its hypothesis
                finish(b, top[b, j].item() / (t + 1) ** lp, b * n + beam[b, j].item())
            order = is_eos.float().argsort(dim=1, stable=True)[:, :W]  # (B, W): the best W non-EOS, ranked
            score = top.gather(1, order)  # (B, W)
            src = (beam.gather(1, order) + n * torch.arange(B, device=dev)[:, None]).flatten()  # (B*W,)
            toks = torch.cat([toks[src], tok.gather(1, order).view(-1, 1)], dim=1)  # (B*W, t+1)
            if return_attn:  # the attention of the position that chose tok (an EOS step's is never kept)
                maps = torch.cat([maps[src], attn[src, None]], dim=1)  # (B*W, t+1, L, n_vis)
            # the best a live beam can still reach: its sum only falls, len**lp grows to max_new if lp > 0
            bound = (score[:, 0] / max_new ** lp).tolist()
            if t == max_new - 1 or all(h is not None and x <= h[0] for h, x in zip(best, bound)):
                break
            cache = cache.index_select(1, src)  # row i of the new cache is row src[i] of the old one
            logp, attn = self._decode(None, toks[:, -1:], cache, cfg.n_vis + 1 + t, return_attn)
        for b, s in enumerate(bound):  # at max_new, the live beams' own scores
            finish(b, s, b * W)  # the live beams are ranked: beam 0 is their best
        seqs = [h[1] for h in best]
        return (seqs, [h[2] for h in best]) if return_attn else seqs

# forward's and the generate_* methods' arguments, checked: a ValueError saying which, not a deep torch error
def require(ok, problem):
    if not ok:
        raise ValueError(f"model: {problem}")

EVAL_FIRST = "call model.eval() before generating (in train mode BatchNorm learns from what it captions)"

# ============================================================================ part 3: the weights on disk
# safetensors by hand, so that a published model needs no extra library. Layout: 8-byte little-endian header
# length N, N bytes of JSON {name: {dtype, shape, data_offsets}} (and "__metadata__") padded with spaces to a
# multiple of 8, then the tensor bytes; data_offsets count from there.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

def safetensors_bytes(tensors, metadata=None):
    """{name: tensor} -> the bytes of a .safetensors file (common.save_pretrained writes them atomically)."""
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    data = bytearray()  # the tensors' bytes so far: len(data) is where the next one starts
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES or name == "__metadata__":  # one the reader could not read back
            raise ValueError(f"safetensors: cannot write {name!r} ({t.dtype}); the dtypes: {', '.join(DTYPES)}")
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype as its bytes (little-endian host)
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
    return struct.pack("<Q", len(text)) + text + data

def read_safetensors(path):
    """{name: tensor}; sizes are checked against the file's real bytes before allocating; else ValueError."""
    def check(ok, why):
        if not ok:
            raise ValueError(f"{path}: not a valid safetensors file: {why}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        check(size >= 8, f"only {size} bytes")
        (n,) = struct.unpack("<Q", f.read(8))
        # the header fits in the file, and in 100 MB, the safetensors library's own cap (ours is ~5 KB)
        check(n <= min(size - 8, 100 * 2 ** 20), f"header length {n} goes beyond the file's {size} bytes")
        head, blob = f.read(n), f.read()  # blob: the data the file holds, whatever the header claims
    try:
        header = json.loads(head)
    except (ValueError, RecursionError):  # also UnicodeDecodeError; RecursionError: "[[[[..." nested deep
        check(False, "header is not JSON")
    check(isinstance(header, dict), "header is not a JSON object")
    header.pop("__metadata__", None)  # free-form strings, e.g. {"format": "pt"}
    spans, end = [], 0
    for name, info in header.items():
        info = info if isinstance(info, dict) else {}
        dtype = DTYPES.get(str(info.get("dtype")))  # str(): a list is no dtype, and cannot be a dict key
        shape, offsets = info.get("shape"), info.get("data_offsets")
        a, b = offsets if isinstance(offsets, list) and len(offsets) == 2 else (None, None)
        check(dtype is not None, f"tensor {name!r} has unknown dtype {info.get('dtype')!r}")
        check(isinstance(shape, list) and all(type(d) is int and 0 <= d < 2 ** 63 for d in shape),
              f"tensor {name!r} has shape {shape!r}, not a list of sizes (each below 2**63)")
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
