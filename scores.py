"""
scores.py: caption a whole split in batches (printable() shows a caption safely on one line), then score it
as papers do: corpus BLEU-1..4 and CIDEr-D exactly as the coco-caption toolkit computes them, and on shapes
the strict exact match (the caption word for word one of the five). Left out: METEOR, ROUGE-L and SPICE
(they need Java), coco's PTB tokenizer (data.clean_caption has cleaned every caption: we split on whitespace).
Tests: python -m pytest -q test_all.py -k "bleu or cider or exact or score"
"""
import math
import time
import unicodedata
from collections import Counter

import numpy as np
import torch

import data

def caption(model, tok, images, strategy="beam", beam_width=3, length_penalty=0.0, temperature=0.8,
            top_k=50, generator=None, batch_size=64, return_attn=False):
    """Captions of uint8 images (N, S, S, 3), numpy or tensor, batch_size at a time. With return_attn:
    (captions, token ids, attns), attns[i] of shape (tokens of caption i, n_layers, n_vis)."""
    device, max_new = next(model.parameters()).device, model.config.max_seq
    args = {"beam": (beam_width, max_new, length_penalty), "greedy": (max_new,),  # generate_*'s arguments
            "topk": (max_new, temperature, top_k, generator)}
    if strategy not in args or batch_size < 1:  # before any work, and even for no images
        raise ValueError(f"strategy {strategy!r} (one of {', '.join(args)}), batch_size {batch_size} (>= 1)")
    ids, attns = [], []
    for start in range(0, len(images), batch_size):
        x = data.normalize(torch.as_tensor(np.asarray(images[start:start + batch_size])).to(device))
        out = getattr(model, f"generate_{strategy}")(x, *args[strategy], return_attn=return_attn)
        seqs, maps = out if return_attn else (out, [])
        ids += seqs
        attns += [m.cpu() for m in maps]
    texts = [tok.decode(s) for s in ids]
    return (texts, ids, attns) if return_attn else texts

def ngrams(words, n=4):
    """Counts of all 1..n-grams. ngrams("a a b".split(), 2) -> {(a,):2, (b,):1, (a,a):1, (a,b):1}"""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))

def check_pairs(metric, references, hypotheses):
    """Both metrics need, for each of at least one image, one hypothesis and at least one reference."""
    if len(references) != len(hypotheses) or not references or not all(references):
        raise ValueError(f"{metric}: {len(references)} reference lists (each must hold one or more) for "
                         f"{len(hypotheses)} hypotheses")

def bleu(references, hypotheses):
    """Corpus BLEU-1..4 as pycocoevalcap's BleuScorer with option "closest"; a list of references and one
    hypothesis per image. Matches are clipped at the largest count in any one reference; the brevity penalty
    compares summed lengths, per image the reference length closest to the hypothesis's (ties: the shorter).
    coco's smoothing (tiny on matches, small on guesses): hypotheses with no 4-gram at all put a factor
    (1e-6)**(1/4) ~ 0.03 into BLEU-4, not 0: bleu([["a b c d"]], ["a b c"])[3] -> 0.0227."""
    check_pairs("bleu", references, hypotheses)
    tiny, small = 1e-15, 1e-9
    correct, guess, ref_len = [0] * 4, [0] * 4, 0
    for refs, hyp in zip(references, hypotheses):
        words = hyp.split()
        max_ref = Counter()
        for ref in refs:
            max_ref |= ngrams(ref.split())  # | keeps the larger count of each n-gram
        ref_len += min((abs(len(r.split()) - len(words)), len(r.split())) for r in refs)[1]
        for gram, count in ngrams(words).items():
            guess[len(gram) - 1] += count
            correct[len(gram) - 1] += min(count, max_ref[gram])
    ratio = (guess[0] + tiny) / (ref_len + small)  # guess[0], the unigrams: the hypotheses' length
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    precisions = [(c + tiny) / (g + small) for c, g in zip(correct, guess)]  # n = 1..4
    return [math.prod(precisions[:k + 1]) ** (1 / (k + 1)) * brevity for k in range(4)]  # geometric means

def cider(references, hypotheses, n=4, sigma=6.0):
    """CIDEr-D exactly as pycocoevalcap's CiderScorer: the mean over images of 10 * mean over n=1..4 of mean
    over refs of clipped-cosine(tf-idf hyp, tf-idf ref) * length penalty. df: how many evaluated images have
    the n-gram in a reference; idf = log(n_images) - log(max(1, df)), so one image alone scores 0."""
    check_pairs("cider", references, hypotheses)
    ref_counts = [[ngrams(r.split(), n) for r in refs] for refs in references]
    df = Counter(g for counts in ref_counts for g in set().union(*counts))
    log_images = math.log(len(references))

    def vector(counts):
        """Per n {ngram: tf * idf} and its norm; coco's length: the BIGRAM count (words - 1; 0 when empty)."""
        vec = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for hyp, counts in zip(hypotheses, ref_counts):
        h_vec, h_norm, h_len = vector(ngrams(hyp.split(), n))
        total = 0.0
        for r_vec, r_norm, r_len in map(vector, counts):
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                # clipped: a hypothesis repeating an n-gram gains nothing beyond the reference's weight
                val = sum(min(w, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, w in h_vec[k].items())
                total += val / (h_norm[k] * r_norm[k] or 1.0) * penalty  # a zero vector: cosine 0, as coco
        scores.append(10.0 * total / n / len(counts))
    return sum(scores) / len(scores)

def exact_match(hypothesis, references):
    """True when the generated caption equals one of the references after cleaning."""
    return data.clean_caption(hypothesis) in {data.clean_caption(r) for r in references}

def score_split(model, tok, split, data_name, split_name="val", **generate):
    """Caption every image of a data.Split and score it: BLEU-1..4, CIDEr-D and, for shapes, exact
    match, also apart for one-object and two-object images (those whose captions have a relation).
    "ms_per_caption": the captioning time alone; "samples": the first 8 captions with their references."""
    model.eval()
    t0 = time.perf_counter()
    hyps = caption(model, tok, split.images, **generate)
    ms = 1000 * (time.perf_counter() - t0) / max(len(hyps), 1)  # decode() synced the device already
    b = bleu(split.captions, hyps)
    result = {"split": split_name, "n_images": len(hyps), "bleu1": b[0], "bleu2": b[1], "bleu3": b[2],
              "bleu4": b[3], "cider": cider(split.captions, hyps), "exact_match": None, "ms_per_caption": ms}
    if data_name == "shapes":
        hits = [exact_match(h, refs) for h, refs in zip(hyps, split.captions)]
        two = [bool({"left", "right", "above", "below"} & set(refs[0].split())) for refs in split.captions]
        for key, group in (("exact_match", hits),
                           ("exact_match_one", [h for h, t in zip(hits, two) if not t]),
                           ("exact_match_two", [h for h, t in zip(hits, two) if t])):
            result[key] = sum(group) / len(group) if group else None
    result["samples"] = [{"name": n, "caption": h, "references": r}
                         for n, h, r in zip(split.names[:8], hyps, split.captions)]
    return result

def printable(text):
    r"""Control characters, line separators and a file name's undecodable bytes as escapes: a line stays one
    line and cannot drive the terminal (a word-salad caption may hold any byte); every other character,
    U+202F in a macOS screenshot's name too, stays itself. printable("a\x1b[2J") -> 'a\\x1b[2J'"""
    unsafe = ("Cc", "Cs", "Zl", "Zp")  # controls, surrogates (undecodable bytes), line/paragraph separators
    return "".join(c.encode("unicode_escape").decode() if unicodedata.category(c) in unsafe else c
                   for c in text)
