"""
model.py: SupraVL-Nano, a tiny CNN and a tiny GPT that captions images, exact to the design card.

The picture becomes n_vis=16 "visual tokens" by a small convolutional encoder; they are put in front
of the caption's tokens, and one causal GPT-2 decoder reads the whole sequence:

    image (B,3,112,112) -> 3 x [Conv 3x3 -> BatchNorm -> GELU -> MaxPool 2] -> (B,64,14,14)
        -> AdaptiveAvgPool 4x4 -> 16 tokens x 64 -> Linear -> (B,16,128)
    [16 visual tokens, BOS, w1, w2, ...] + position embedding -> 3 pre-LN blocks -> LayerNorm
        -> lm_head (tied to tok_emb) -> next-token logits at the text positions

698,624 parameters with the card's 2048-token vocabulary (the tied matrix counted once).
Generation comes twice: plainly (the whole sequence again for every token, as the card's code does),
then batched with a key/value cache (greedy, top-k sampling, beam search), which must agree with it.
Every cached method can also return, per generated token, its attention over the visual tokens.

Left out: tokenizer (bpe.py), image loading and normalisation (data.py), training (train.py).
It imports only torch and the standard library. Tests: python -m pytest -q test_all.py -k model
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
        grid = math.isqrt(self.n_vis)
        if self.n_vis < 1 or grid * grid != self.n_vis:
            raise ValueError(f"Config: n_vis must be a perfect square (1, 4, 16, ...), got {self.n_vis}")
        if self.d_model % self.n_heads:
            raise ValueError(f"Config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.vis_ch % 4:
            raise ValueError(f"Config: vis_ch must be a multiple of 4, got {self.vis_ch}")


# ----------------------------------------------------------------------------- visual encoder

def conv_block(c_in, c_out):
    """Conv 3x3 (stride 1, same padding) -> BatchNorm -> GELU -> MaxPool 2: halves H and W.
    Names inside: .0 conv, .1 batch norm (GELU and MaxPool have no parameters)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                         nn.GELU(), nn.MaxPool2d(2))


class VisualEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg.vis_ch
        self.conv1 = conv_block(3, c // 4)
        self.conv2 = conv_block(c // 4, c // 2)
        self.conv3 = conv_block(c // 2, c)
        self.pool = nn.AdaptiveAvgPool2d(math.isqrt(cfg.n_vis))
        self.proj = nn.Linear(c, cfg.d_model)

    def forward(self, images):
        # channels_last (NHWC) lets oneDNN run the 3x3 convs, batch norm and pooling without
        # reordering the tensor at every op: measured 1.33x (fp32) / 1.22x (bf16) faster training steps.
        x = images.contiguous(memory_format=torch.channels_last)  # (B, 3, 112, 112)
        x = self.conv3(self.conv2(self.conv1(x)))  # (B, 64, 14, 14)
        x = self.pool(x).flatten(2).transpose(1, 2)  # (B, 16, 64): one token per grid cell, row-major
        return self.proj(x)  # (B, 16, 128)


# ----------------------------------------------------------------------------- the GPT part

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cache=None, layer=0, need_attn=False):
        """x (B, T, C). With a cache, T is either the whole prompt (cache empty) or one new position.
        Returns y (B, T, C) and, if need_attn, the last position's weights (B, H, S) over all keys."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # (B, H, T, hd) -> keys/values of every position so far (B, H, S, hd)
            k, v = cache.add(layer, k, v)
        causal = T > 1  # one new query may look at every cached key; a prompt needs the triangle
        weights = None
        if need_attn:  # the same attention written out, to keep the weights (generation only)
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
            if causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~mask, float("-inf"))
            att = scores.softmax(dim=-1)
            y, weights = att @ v, att[:, :, -1]  # (B, H, T, hd), (B, H, S)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.proj(y), weights


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


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
        # GPT-2: each residual branch adds to the stream 2*n_layers times; scale their outputs down.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.fc2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module):
        # GPT-2 init, N(0, 0.02). PyTorch's default N(0, 1) embedding, tied to the head, makes the
        # first logits huge (std ~sqrt(128) = 11): the softmax is then almost one-hot, the loss starts
        # far above log(vocab_size), and its gradient is full of denormal floats, which some CPUs
        # compute very slowly (not seen on the EPYC this was measured on). Small weights avoid both.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        """Unique parameters: the tied head/embedding matrix counts once."""
        return sum(p.numel() for p in self.parameters())  # parameters() already skips the tied copy

    # ------------------------------------------------------------------------- training forward

    def forward(self, images, ids, targets=None):
        """images (B,3,H,W) normalised float; ids (B,T) starting with BOS, T <= max_seq.
        Returns logits (B,T,V) for the text positions and the mean cross-entropy over targets
        (B,T) with pad_id ignored (None without targets)."""
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
        pos = torch.arange(start, start + x.size(1), device=x.device)
        return self.drop(x + self.pos_emb(pos))

    # ------------------------------------------------------------------------- generation, plainly

    @torch.no_grad()
    def generate_plain(self, images, max_new=48):
        """Greedy decoding the plain way, as the card's code does it: for every new token, the whole
        sequence (and the CNN) runs again. Slow, but obviously right: the cached methods below must
        give exactly its tokens (tested), and bench.py times the two."""
        B, cfg = images.size(0), self.config
        ids = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=images.device)  # (B, 1)
        for _ in range(max_new):
            logits, _ = self(images, ids)  # (B, T, V)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)  # (B, T+1)
            if (ids == cfg.eos_id).any(1).all():
                break
        return self._trim(ids[:, 1:], None)

    def _trim(self, toks, maps):
        """Each row's tokens up to its first EOS, as lists (and their attention maps, if kept)."""
        seqs, attns = [], []
        for i, row in enumerate(toks.tolist()):
            n = row.index(self.config.eos_id) if self.config.eos_id in row else len(row)
            seqs.append(row[:n])
            attns.append(maps[i, :n] if maps is not None else None)
        return seqs if maps is None else (seqs, attns)

    # ------------------------------------------------------------------------- cached decoding
    # The same result, each new token costing one position: the keys and values of every earlier
    # position are kept (KVCache), and the images run through the CNN once.

    def _decode(self, x, cache, need_attn):
        """Run new positions x (B,T,C) through the blocks, extending the cache. Returns the next-token
        log-probabilities of the last position (B,V) and, if need_attn, its attention over the
        visual tokens per layer averaged over heads (B, n_layers, n_vis)."""
        maps = []
        for i, block in enumerate(self.blocks):
            x, w = block(x, cache, i, need_attn)
            if need_attn:
                maps.append(w[:, :, :self.config.n_vis].float().mean(dim=1))  # (B, n_vis)
        cache.length += x.size(1)
        logits = self.lm_head(self.ln_f(x[:, -1]))  # (B, V)
        return logits.float().log_softmax(-1), (torch.stack(maps, 1) if need_attn else None)

    def _start(self, images, max_new, need_attn):
        """Encode the images, run visual tokens + BOS, return (cache, log-probs of token 1, attn)."""
        cfg = self.config
        if not 1 <= max_new <= cfg.max_seq:
            raise ValueError(f"model: max_new must be in 1..{cfg.max_seq} (max_seq), got {max_new}")
        B = images.size(0)
        bos = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=images.device)
        x = self._embed(self.vis_enc(images), bos, 0)  # (B, 17, 128)
        cache = KVCache(cfg, B, x.device, x.dtype)
        return (cache, *self._decode(x, cache, need_attn))

    def _step(self, tokens, cache, need_attn):
        """Feed one token per row (B,) at the next position."""
        x = self._embed(None, tokens[:, None], cache.length)  # (B, 1, 128)
        return self._decode(x, cache, need_attn)

    def _sample_loop(self, images, max_new, pick, return_attn):
        """Greedy / top-k: pick(logp (B,V)) -> next tokens (B,), until every row has emitted EOS."""
        cache, logp, attn = self._start(images, max_new, return_attn)
        toks, maps = [], []
        done = torch.zeros(images.size(0), dtype=torch.bool, device=images.device)
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
        """Most likely token at every step. Returns per image a list of ids (no BOS/EOS)
        or, with return_attn, (seqs, attns) with attns[i] of shape (len(seqs[i]), n_layers, n_vis)."""
        return self._sample_loop(images, max_new, lambda logp: logp.argmax(-1), return_attn)

    @torch.no_grad()
    def generate_topk(self, images, max_new=48, temperature=0.8, top_k=50, generator=None,
                      return_attn=False):
        """Sample from the top_k most likely tokens, logits divided by temperature."""
        def pick(logp):
            vals, idx = (logp / temperature).topk(min(top_k, logp.size(-1)), dim=-1)  # (B, k)
            choice = torch.multinomial(vals.softmax(-1), 1, generator=generator)  # (B, 1)
            return idx.gather(1, choice).squeeze(1)
        return self._sample_loop(images, max_new, pick, return_attn)

    @torch.no_grad()
    def generate_beam(self, images, beam_width=3, max_new=48, length_penalty=0.0, return_attn=False):
        """Beam search; the beams of all images run as one batch of B*W rows (see Beams).
        Returns what generate_greedy returns: per image its best hypothesis."""
        B, W = images.size(0), beam_width
        cache, logp, attn = self._start(images, max_new, return_attn)
        rows = torch.arange(B, device=images.device).repeat_interleave(W)  # every image's row, W times
        cache.reorder(rows)
        logp, attn = logp[rows], (attn[rows] if return_attn else None)  # (B*W, V), (B*W, L, n_vis)
        maps = (self.config.n_layers, self.config.n_vis) if return_attn else None
        beams = Beams(B, W, max_new, length_penalty, self.config.eos_id, images.device, maps)
        for t in range(max_new):
            src, tok = beams.extend(logp, attn, t)  # (B*W,) each: the rows they extend, the new tokens
            if all(beams.done) or t == max_new - 1:
                break
            cache.reorder(src)
            logp, attn = self._step(tok, cache, return_attn)
        return beams.best()


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to the full length.

    k, v: (n_layers, B, H, n_vis + max_seq, head_dim); `length` positions are filled. Writing into a
    preallocated buffer (rather than torch.cat at every step) was measured ~equal here, and keeps the
    beam reorder a single index_select."""

    def __init__(self, cfg, batch, device, dtype):
        shape = (cfg.n_layers, batch, cfg.n_heads, cfg.n_vis + cfg.max_seq, cfg.d_model // cfg.n_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def add(self, layer, k, v):
        """Store k, v (B, H, T, hd) after the filled positions; return all keys/values so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, rows):
        """Beam search: row i of the new cache is row rows[i] of the old one."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)


class Beams:
    """The bookkeeping of beam search for B images x W beams. Live hypotheses: their summed
    log-probabilities `score` (B, W), tokens (B*W, t) and attention maps, all on the device.
    A hypothesis ending in EOS is set aside with score sum(log p) / len**length_penalty (len counts the
    EOS; length_penalty 0 = summed log-probability). An image is done as soon as no live beam can still
    beat its best finished one; at max_new the live beams join the candidates, so an image whose beams
    never emit EOS still gets its best unfinished one."""

    def __init__(self, B, W, max_new, length_penalty, eos_id, device, map_shape=None):
        self.W, self.max_new, self.lp, self.eos_id = W, max_new, length_penalty, eos_id
        self.score = torch.full((B, W), float("-inf"), device=device)
        self.score[:, 0] = 0.0  # only beam 0 is real at the start; the others would duplicate it
        self.toks = torch.zeros(B * W, 0, dtype=torch.long, device=device)
        self.maps = None if map_shape is None else []  # per step (B*W, *map_shape), reordered with the beams
        self.no_maps = None if map_shape is None else torch.zeros(0, *map_shape, device=device)
        self.finished = [[] for _ in range(B)]  # per image: (score, tokens, maps)
        self.done = [False] * B

    def extend(self, logp, attn, t):
        """Extend every live beam by the best tokens; returns (source rows, new tokens), both (B*W,)."""
        B, W, V = self.score.size(0), self.W, logp.size(-1)
        cand = (self.score.view(B * W, 1) + logp).view(B, W * V)  # (B, W*V) summed log-probs
        top, idx = cand.topk(2 * W, dim=1)  # 2W: at most W of them end in EOS
        beam, tok = idx // V, idx % V  # (B, 2W)
        is_eos = tok == self.eos_id
        self._set_aside(top, beam, is_eos, t)
        order = is_eos.float().argsort(dim=1, stable=True)[:, :W]  # the best W non-EOS, in rank order
        self.score = top.gather(1, order)  # (B, W)
        src = (beam.gather(1, order) + W * torch.arange(B, device=beam.device)[:, None]).flatten()
        new = tok.gather(1, order).flatten()  # (B*W,)
        self.toks = torch.cat([self.toks[src], new[:, None]], dim=1)
        if self.maps is not None:
            self.maps = [m[src] for m in self.maps] + [attn[src]]
        self._check_done()
        return src, new

    def _set_aside(self, top, beam, is_eos, t):
        """EOS candidates ranked in the top W end their hypothesis (lower ones would not make the beam)."""
        for b, j in is_eos[:, :self.W].nonzero().tolist():
            if not self.done[b]:  # (the EOS step's map belongs to no caption token: not kept)
                r = b * self.W + beam[b, j].item()
                self._finish(b, top[b, j].item() / (t + 1) ** self.lp, r)

    def _finish(self, b, score, row):
        maps = None
        if self.maps is not None:  # (t, n_layers, n_vis); t = 0 when EOS came first
            maps = torch.stack([m[row] for m in self.maps]) if self.maps else self.no_maps
        self.finished[b].append((score, self.toks[row].tolist(), maps))

    def _check_done(self):
        # a live beam's sum only falls; with a length bonus it may still gain up to max_new
        bound = (self.score[:, 0] / (self.max_new if self.lp > 0 else 1) ** self.lp).tolist()
        for b, hyps in enumerate(self.finished):
            self.done[b] = self.done[b] or bool(hyps) and bound[b] <= max(h[0] for h in hyps)

    def best(self):
        """Per image its best hypothesis: (seqs, attns) when maps were kept, else seqs."""
        final = (self.score / self.max_new ** self.lp).tolist()
        for b in range(len(self.finished)):
            if not self.done[b]:  # max_new reached: live beams compete too (never-EOS captions included)
                for w in range(self.W):
                    self._finish(b, final[b][w], b * self.W + w)
        best = [max(hyps, key=lambda h: h[0]) for hyps in self.finished]
        seqs = [h[1] for h in best]
        return seqs if self.maps is None else (seqs, [h[2] for h in best])
