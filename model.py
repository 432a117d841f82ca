"""
model.py: SupraVL-Nano, a tiny CNN and a tiny GPT that caption images, exact to the design card.

A small CNN turns the picture into 16 "visual tokens", put in front of the caption's; one GPT-2 reads all:

    image (B,3,112,112) -> 3 x [Conv 3x3 -> BatchNorm -> GELU -> MaxPool 2] -> (B,64,14,14)
        -> AdaptiveAvgPool 4x4 -> 16 tokens x 64 -> Linear -> (B,16,128) = the visual tokens
    [visual tokens, BOS, w1, w2, ...] + positions -> 3 pre-LN blocks -> LayerNorm -> lm_head (tied to tok_emb)

698,624 parameters with the card's 2048-token vocabulary (the tied matrix counted once).
Part 1 is the model and plain generation (the whole sequence again for every token). Part 2 is speed: a
key/value cache, batched greedy / top-k / beam search that must give part 1's tokens, and attention maps.
Left out: the tokenizer (bpe.py), image loading and normalisation (data.py), training (train.py).
Tests: the model section of test_all.py (python -m pytest -q test_all.py runs them all).
Use it like:  model = VLM(Config()).eval(); model.generate_beam(images) -> [[ids...], ...]
"""
import math
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

    def __post_init__(self):
        if self.n_vis < 1 or math.isqrt(self.n_vis) ** 2 != self.n_vis:
            raise ValueError(f"Config: n_vis must be a perfect square (1, 4, 16, ...), got {self.n_vis}")
        if self.d_model % self.n_heads:
            raise ValueError(f"Config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.vis_ch % 4:
            raise ValueError(f"Config: vis_ch must be a multiple of 4, got {self.vis_ch}")


# ======================================================= part 1: the model, starting with the visual encoder
def conv_block(cin, cout):
    """Conv 3x3 (same padding) -> BatchNorm -> GELU -> MaxPool 2: halves H, W. Weights: .0 conv, .1 norm."""
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
        # channels_last (NHWC) is the layout the fast conv kernels use: no reordering before every op
        x = images.contiguous(memory_format=torch.channels_last)  # (B, 3, 112, 112)
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

    def forward(self, x, cache=None, layer=0, need_attn=False):
        """x (B, T, C) -> (B, T, C) and, if need_attn, the last position's weights over all keys (B, H, S).
        With a cache (part 2), T is either the whole prompt (cache empty) or one new position."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.add(layer, k, v)  # (B, H, S, hd): every position so far
        weights = None
        if need_attn:  # the same attention written out, to keep the weights (generation only)
            S = k.size(2)
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)  # (T, S): no future keys
            att = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # (B, H, T, S)
            y, weights = att @ v, att[:, :, -1]  # (B, H, T, hd), (B, H, S)
        else:  # one new query may look at every cached key; a prompt needs the triangle
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.proj(y), weights


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # (B, T, 128) -> (B, T, 256) -> (B, T, 128)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, layer=0, need_attn=False):
        a, weights = self.attn(self.ln1(x), cache, layer, need_attn)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, weights


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
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: 2*n_layers residual branches add up; scale them down
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module):
        # GPT-2's N(0, 0.02): a default N(0, 1) tied embedding would give logits of std ~sqrt(128) = 11
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied head/embedding matrix is yielded once

    def forward(self, images, ids, targets=None):
        """Teacher forcing: images (B,3,H,W) normalised, ids (B,T) from BOS, T <= max_seq -> logits (B,T,V)
        at the text positions, mean cross-entropy on targets (B,T) with pad_id ignored (None without them)."""
        cfg = self.config
        if ids.size(1) > cfg.max_seq:
            raise ValueError(f"model: {ids.size(1)} text tokens exceed max_seq {cfg.max_seq}")
        x = self._embed(self.vis_enc(images), ids, 0)  # (B, 16+T, 128)
        for block in self.blocks:
            x, _ = block(x)
        logits = self.lm_head(self.ln_f(x[:, cfg.n_vis:]))  # (B, T, V): text positions only
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=cfg.pad_id)
        return logits, loss

    def _embed(self, vis, ids, start):
        """Token embeddings of ids (after the visual tokens vis, if given) plus positions from start."""
        x = self.tok_emb(ids)  # (B, T, 128)
        if vis is not None:
            x = torch.cat([vis, x], dim=1)  # (B, 16+T, 128)
        pos = torch.arange(start, start + x.size(1), device=x.device)  # (16+T,)
        return self.drop(x + self.pos_emb(pos))

    @torch.no_grad()
    def generate_plain(self, images, max_new=48):
        """Greedy decoding the plain way, as the card's code does it: for every new token the whole
        sequence (and the CNN) runs again. Slow, but obviously right: part 2 must give its tokens."""
        B, cfg = images.size(0), self.config
        ids = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=images.device)  # (B, 1)
        for _ in range(max_new):
            logits, _ = self(images, ids)  # (B, T, V)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)  # (B, T+1)
            if (ids == cfg.eos_id).any(1).all():
                break
        return self._trim(ids[:, 1:], None)

    def _trim(self, toks, maps):
        """Each row of toks (B, t) up to its first EOS, as lists (and its maps (B, t, L, n_vis), if kept)."""
        eos = self.config.eos_id
        seqs = [row[:row.index(eos)] if eos in row else row for row in toks.tolist()]
        return seqs if maps is None else (seqs, [m[:len(s)] for m, s in zip(maps, seqs)])

    # ============================================================================ part 2: speed
    # generate_plain's tokens for one position's work per token: the CNN runs once, layers keep keys/values
    class KVCache:
        """Every layer's keys and values, (n_layers, B, H, n_vis + max_seq, head_dim), `length` positions
        filled. add() writes in place (no torch.cat copy of the past); reorder() picks rows for beams."""
        def __init__(self, cfg, batch, device, dtype):
            shape = (cfg.n_layers, batch, cfg.n_heads, cfg.n_vis + cfg.max_seq, cfg.d_model // cfg.n_heads)
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
            self.length = 0

        def add(self, layer, k, v):
            end = self.length + k.size(2)
            self.k[layer, :, :, self.length:end] = k  # (B, H, T, hd) after the filled positions
            self.v[layer, :, :, self.length:end] = v
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, H, end, hd) each: all so far

        def reorder(self, rows):
            self.k = self.k.index_select(1, rows)  # row i of the new cache is row rows[i] of the old one
            self.v = self.v.index_select(1, rows)

    def _decode(self, x, cache, need_attn):
        """Run new positions x (B,T,C) through the blocks, extending the cache. Returns the last position's
        next-token log-probs (B,V) and, if need_attn, its attention on the image, head mean (B,L,n_vis)."""
        maps = []
        for i, block in enumerate(self.blocks):
            x, w = block(x, cache, i, need_attn)
            if need_attn:
                maps.append(w[:, :, :self.config.n_vis].float().mean(dim=1))  # (B, n_vis)
        cache.length += x.size(1)
        logits = self.lm_head(self.ln_f(x[:, -1]))  # (B, V)
        return logits.float().log_softmax(-1), (torch.stack(maps, 1) if need_attn else None)

    def _start(self, images, max_new, need_attn):
        """Encode the images, run visual tokens + BOS; return (cache, log-probs of token 1, attn)."""
        cfg = self.config
        if not 1 <= max_new <= cfg.max_seq:
            raise ValueError(f"model: max_new must be in 1..{cfg.max_seq} (max_seq), got {max_new}")
        bos = torch.full((images.size(0), 1), cfg.bos_id, dtype=torch.long, device=images.device)  # (B, 1)
        x = self._embed(self.vis_enc(images), bos, 0)  # (B, 17, 128)
        cache = self.KVCache(cfg, x.size(0), x.device, x.dtype)
        return (cache, *self._decode(x, cache, need_attn))

    def _step(self, tokens, cache, need_attn):
        x = self._embed(None, tokens[:, None], cache.length)  # (B, 1, 128): one token per row, next position
        return self._decode(x, cache, need_attn)

    def _sample_loop(self, images, max_new, pick, return_attn):
        """Greedy / top-k: pick(logp (B,V)) -> next tokens (B,), until every row has emitted EOS."""
        cache, logp, attn = self._start(images, max_new, return_attn)
        toks, maps = [], []
        done = torch.zeros(images.size(0), dtype=torch.bool, device=images.device)  # (B,)
        for t in range(max_new):
            tok = pick(logp)  # (B,)
            toks.append(tok)
            maps.append(attn)  # the attention of the position that chose tok
            done |= tok == self.config.eos_id
            if t == max_new - 1 or done.all():  # the last token is never fed back
                break
            logp, attn = self._step(tok, cache, return_attn)
        return self._trim(torch.stack(toks, 1), torch.stack(maps, 1) if return_attn else None)

    @torch.no_grad()
    def generate_greedy(self, images, max_new=48, return_attn=False):
        """Most likely token at every step. Returns per image a list of ids (no BOS/EOS) or, with
        return_attn, (seqs, attns) with attns[i] of shape (len(seqs[i]), n_layers, n_vis) on the device."""
        return self._sample_loop(images, max_new, lambda logp: logp.argmax(-1), return_attn)

    @torch.no_grad()
    def generate_topk(self, images, max_new=48, temperature=0.8, top_k=50, generator=None, return_attn=False):
        """Sample from the top_k most likely tokens, logits divided by temperature."""
        def pick(logp):
            vals, idx = (logp / temperature).topk(min(top_k, logp.size(-1)), dim=-1)  # (B, k)
            choice = torch.multinomial(vals.softmax(-1), 1, generator=generator)  # (B, 1)
            return idx.gather(1, choice).squeeze(1)  # (B,)
        return self._sample_loop(images, max_new, pick, return_attn)

    @torch.no_grad()
    def generate_beam(self, images, beam_width=3, max_new=48, length_penalty=0.0, return_attn=False):
        """Beam search, the W beams of all B images run as one batch of B*W rows; returns what generate_greedy
        does. A hypothesis ending in EOS is set aside with score sum(log p) / len**length_penalty (len counts
        the EOS; 0 = summed log-probability). An image is done as soon as no live beam can beat its best
        finished one; at max_new its live beams compete too, so beams that never emit EOS give a caption."""
        cfg, B, W, lp, dev = self.config, images.size(0), beam_width, length_penalty, images.device
        cache, logp, attn = self._start(images, max_new, return_attn)
        rows = torch.arange(B, device=dev).repeat_interleave(W)  # (B*W,): every image's row, W times
        cache.reorder(rows)
        logp, attn = logp[rows], (attn[rows] if return_attn else None)  # (B*W, V), (B*W, L, n_vis)
        score = torch.full((B, W), float("-inf"), device=dev)  # (B, W): summed log-probs of the live beams
        score[:, 0] = 0.0  # only beam 0 is real at the start; the others would duplicate it
        toks = torch.zeros(B * W, 0, dtype=torch.long, device=dev)  # (B*W, t): the live beams' tokens
        maps = torch.zeros(B * W, 0, cfg.n_layers, cfg.n_vis, device=dev)  # (B*W, t, L, n_vis), if kept
        best, done = [None] * B, [False] * B  # per image: its best finished (score, tokens, maps)

        def finish(b, s, row):  # a finished hypothesis of image b, kept if it beats the best so far
            if not done[b] and (best[b] is None or s > best[b][0]):
                best[b] = (s, toks[row].tolist(), maps[row] if return_attn else None)
        for t in range(max_new):
            top, idx = (score.view(B * W, 1) + logp).view(B, -1).topk(2 * W, dim=1)  # (B, 2W): <= W are EOS
            beam, tok = idx // cfg.vocab_size, idx % cfg.vocab_size  # (B, 2W): which beam, extended by what
            is_eos = tok == cfg.eos_id  # (B, 2W)
            for b, j in is_eos[:, :W].nonzero().tolist():  # an EOS in the top W ends its hypothesis
                finish(b, top[b, j].item() / (t + 1) ** lp, b * W + beam[b, j].item())
            order = is_eos.float().argsort(dim=1, stable=True)[:, :W]  # (B, W): the best W non-EOS, ranked
            score = top.gather(1, order)  # (B, W)
            src = (beam.gather(1, order) + W * torch.arange(B, device=dev)[:, None]).flatten()  # (B*W,)
            tok = tok.gather(1, order).flatten()  # (B*W,)
            toks = torch.cat([toks[src], tok[:, None]], dim=1)  # (B*W, t+1)
            if return_attn:  # the attention of the position that chose tok (an EOS step's is never kept)
                maps = torch.cat([maps[src], attn[src, None]], dim=1)  # (B*W, t+1, L, n_vis)
            # the best a live beam can still reach: its sum only falls, len**lp (lp > 0) grows until max_new
            bound = (score[:, 0] / (max_new if lp > 0 else 1) ** lp).tolist()
            done = [d or (h is not None and x <= h[0]) for d, h, x in zip(done, best, bound)]
            if all(done) or t == max_new - 1:
                break
            cache.reorder(src)
            logp, attn = self._step(tok, cache, return_attn)  # (B*W, V), (B*W, L, n_vis)
        for b, s in enumerate((score[:, 0] / max_new ** lp).tolist()):  # at max_new live beams compete too;
            finish(b, s, b * W)  # they are ranked, so beam 0 is their best
        seqs = [h[1] for h in best]
        return (seqs, [h[2] for h in best]) if return_attn else seqs
