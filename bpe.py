"""
bpe.py - a byte-level byte-pair-encoding tokenizer (GPT-2 style), written out by hand.

Text is cut into words with a GPT-2-like regex, each word becomes its UTF-8 bytes, and training learns
merges of adjacent tokens, most frequent pair first: plainly, then fast (the same merges). Any text
encodes (no "unknown" token) and decodes back to itself. A tokenizer is a Hugging Face tokenizer.json:
training writes GPT-2's, and we read the BPE forms `tokenizers` writes (form_of) with its ids and text.

Left out: normalizers, dropout, WordPiece/Unigram models (such files raise a one-line ValueError),
and added tokens matched inside text (encode never produces special ids; decode drops them).

    python bpe.py --train captions.txt --vocab-size 2048 --out tokenizer.json
    python bpe.py --tokenizer tokenizer.json --encode "a dog runs"
"""

import argparse
import functools
import heapq
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict, namedtuple

# ----------------------------------------------------------------------------- words
# Splitting text into words, first: a merge never crosses a word boundary, so " dog" can become one token
# but "dog." cannot. GPT-2's pattern (the one `tokenizers` ByteLevel uses) is
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# `re` has no \p{..}: a letter is [^\W\d_] (a word character, not a digit or "_"), a number \d, "other"
# [^\s\w] or "_". Rust's classes split rare text otherwise (never Flickr8k's): Python's \w takes ², ½, Ⅻ
# (numbers in GPT-2) but not combining marks or U+200D, and its \s takes the separators \x1c-\x1f.
SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")

SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2; then the 256 bytes (3..258); then merges

# GPT-2's map from each byte to a printable character, for the token strings in tokenizer.json:
# printable bytes stay themselves, the others move above 255 (b" " -> "Ġ", b"\n" -> "Ċ").
PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
UNPRINTABLE = [b for b in range(256) if b not in PRINTABLE]
BYTE_TO_CHAR = {b: chr(b) for b in PRINTABLE} | {b: chr(256 + n) for n, b in enumerate(UNPRINTABLE)}
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}

def merge(ids, pair, new_id):
    """Replace each occurrence of pair, left to right: merge([5, 6, 5, 6, 6], (5, 6), 9) -> [9, 9, 6]."""
    out = []
    for i in ids:
        if out and out[-1] == pair[0] and i == pair[1]:
            out[-1] = new_id  # new_id is never pair[0], so [a, a, a] becomes [aa, a]
        else:
            out.append(i)
    return out

# ----------------------------------------------------------------------------- training: plainly, then fast
def start_training(texts, vocab_size):
    """Byte b as token 3 + b, each token kept as the string tokenizer.json writes (b" dog" is "Ġdog");
    and each distinct word once, as byte ids, with its count."""
    if vocab_size < 3 + 256:
        raise ValueError(f"vocab_size must be at least {3 + 256}, got {vocab_size}")
    word_counts = Counter(w for text in texts for w in SPLIT.findall(text))
    words = [[3 + b for b in w.encode("utf-8", "surrogatepass")] for w in word_counts]
    return {3 + b: BYTE_TO_CHAR[b] for b in range(256)}, words, list(word_counts.values())

def train_simple(texts, vocab_size):
    """Learn merges until there are vocab_size tokens (3 specials + 256 bytes + merges); returns
    (vocab {id: token}, merges [(id_a, id_b), ...]). Every merge recounts every pair of every word.

    Worked example: "hug hug pug hugs bun" splits into the words "hug", " hug", " pug", " hugs",
    " bun". The pair (u,g) occurs 4 times, so "ug" is the first merge (id 259); then (h,ug) occurs
    3 times and "hug" is the second (id 260); then (" ",hug) occurs twice, giving " hug" (written
    "Ġhug", id 261). Now every pair occurs once, so training stops early."""
    vocab, words, counts = start_training(texts, vocab_size)
    merges = []
    while len(vocab) + 3 < vocab_size:
        stats = Counter()
        for w, n in zip(words, counts):
            for pair in zip(w, w[1:]):
                stats[pair] += n
        # skip pairs that remake a token ("a"+"bc" after "ab"+"c"): tokenizer.json keys tokens by string
        made = set(vocab.values())
        fresh = [(-n, p) for p, n in stats.items() if vocab[p[0]] + vocab[p[1]] not in made]
        n, pair = min(fresh, default=(0, None))  # the most frequent; ties go to the smaller ids
        if -n < 2:
            break  # no pair occurs twice any more
        new_id = 3 + len(vocab)
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        merges.append(pair)
        words = [merge(w, pair, new_id) for w in words]
    return vocab, merges

def train_fast(texts, vocab_size):
    """train_simple's merges, 50x faster on 4,000 captions (140x on all 40,460): a merge changes only the
    words that contain its pair, so keep the pair counts in a heap and move only what those words change."""
    vocab, words, counts = start_training(texts, vocab_size)
    made, merges = set(vocab.values()), []
    stats = defaultdict(int)  # pair -> occurrences in the corpus
    where = defaultdict(set)  # pair -> indices of the words it occurs in (may be stale)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            stats[pair] += counts[i]
            where[pair].add(i)
    # Max-heap by count via negation; ties go to the smaller pair, as in train_simple. Counts change
    # after every merge: we push the new count and drop out-of-date entries when they come to the top.
    heap = [(-n, pair) for pair, n in stats.items()]
    heapq.heapify(heap)
    while len(vocab) + 3 < vocab_size and heap and -heap[0][0] >= 2:  # some pair may still occur twice
        n, pair = heapq.heappop(heap)
        new_token = vocab[pair[0]] + vocab[pair[1]]
        if -n != stats[pair] or new_token in made:
            continue  # an out-of-date entry, or a pair skipped as in train_simple
        new_id = 3 + len(vocab)
        vocab[new_id] = new_token
        made.add(new_token)
        merges.append(pair)
        delta = defaultdict(int)  # pair -> change of its count
        for i in where.pop(pair):
            old = words[i]
            new = merge(old, pair, new_id)
            if len(new) == len(old):
                continue  # a stale index: an earlier merge already took this pair apart
            for p in zip(old, old[1:]):
                delta[p] -= counts[i]
            for p in zip(new, new[1:]):
                delta[p] += counts[i]
                where[p].add(i)
            words[i] = new
        for p, d in delta.items():
            if d:
                stats[p] += d
                heapq.heappush(heap, (-stats[p], p))
    return vocab, merges  # fewer than vocab_size tokens when no pair occurs twice any more

def tokenizer_json(vocab, merges):
    """A trained tokenizer's tokenizer.json: <pad>, <bos>, <eos> = 0, 1, 2 and GPT-2's ByteLevel BPE."""
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(SPECIALS)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": {s: i for i, s in enumerate(SPECIALS)} | {vocab[i]: i for i in sorted(vocab)},
             "merges": [[vocab[a], vocab[b]] for a, b in merges]}  # pairs, as tokenizers 0.23 writes
    return json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                       "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
                       "decoder": byte_level, "model": model}, ensure_ascii=False, indent=1)

# ----------------------------------------------------------------------------- the Tokenizer
class Tokenizer:
    """A BPE tokenizer as its tokenizer.json says: train() writes one (GPT-2's form), from_json() reads it."""

    def __init__(self, vocab, merges, specials, source, unk_id, form):
        """vocab {id: token string} of ordinary tokens, merges [(id_a, id_b), ...] by rank, form_of's form."""
        self.vocab, self.merges, self.source, self.unk_id, self.form = vocab, merges, source, unk_id, form
        self.vocab_size = len(vocab) + len(specials)
        self.ids_of = {s: i for i, s in vocab.items()}
        self.pad_id, self.bos_id, self.eos_id = (specials.get(s, self.ids_of.get(s)) for s in SPECIALS)
        # pair -> (rank, id of the merged token); encode merges the lowest rank first
        self.ranks = {p: (r, self.ids_of[vocab[p[0]] + vocab[p[1]]]) for r, p in enumerate(merges)}
        # encode_word remembers its last 100,000 words: captions reuse a few thousand words over and over
        self.encode_word = functools.lru_cache(maxsize=100_000)(self.encode_word)

    @classmethod
    def train(cls, texts, vocab_size=2048):
        """train_fast's merges, read back from the tokenizer.json they make: one way to a Tokenizer."""
        return cls.from_json(tokenizer_json(*train_fast(texts, vocab_size)))

    def encode_word(self, word):
        """The ids of the word's characters (byte-level: its bytes'), then merges, lowest rank first."""
        if self.form.byte_level:  # 'surrogatepass': any str encodes, even "\ud800" (it decodes as U+FFFD)
            word = "".join([BYTE_TO_CHAR[b] for b in word.encode("utf-8", "surrogatepass")])
        ids = []
        for c in [*word[:-1], word[-1:] + self.form.suffix]:  # the last character carries end_of_word_suffix
            i = self.ids_of.get(c, self.unk_id)  # unseen in training: the unk token (one per run if fused)
            if i is not None and not (self.form.fuse_unk and i == self.unk_id and ids[-1:] == [i]):
                ids.append(i)
        no_merge = (float("inf"), None)  # one tuple for all pairs: a new one per pair is 25% slower cold
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, no_merge))
            if pair not in self.ranks:
                break  # nothing left to merge
            ids = merge(ids, pair, self.ranks[pair][1])
        return ids

    def encode(self, text):
        """Text -> ids (no <bos>/<eos> added). Special-token strings in the text are plain text."""
        if self.form.prefix_space and text[:1] not in ("", " "):
            text = " " + text  # ByteLevel add_prefix_space: the first word gets a space like the others
        return [i for word in self.form.split(text) for i in self.encode_word(word)]

    def decode(self, ids):
        """Ids -> text, as `tokenizers` decodes them: special and unknown ids are dropped, bytes that are
        not UTF-8 (a character cut short) become U+FFFD. Never raises."""
        pieces = [self.vocab[i] for i in ids if i in self.vocab]
        if self.form.byte_level:
            return bytes(CHAR_TO_BYTE[c] for c in "".join(pieces)).decode("utf-8", "replace")
        if self.form.decoder_suffix is None:
            return " ".join(pieces)  # no decoder: `tokenizers` puts a space between pieces
        s = self.form.decoder_suffix  # BPEDecoder: a word's end becomes a space, except in the last piece
        return "".join([p.replace(s, " ") for p in pieces[:-1]] + [p.replace(s, "") for p in pieces[-1:]])

    def to_json(self):
        """The tokenizer.json text it was made from, which save() writes."""
        return self.source

    @classmethod
    def from_json(cls, text, name="<string>"):
        """Parse tokenizer.json text; any problem raises ValueError(f"{name}: <what is wrong>")."""
        def check(ok, problem):
            if not ok:
                raise ValueError(f"{name}: {problem}")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not valid JSON ({e})") from None
        check(isinstance(d, dict) and isinstance(d.get("model"), dict), "not a tokenizer.json: no 'model'")
        m, form = d["model"], form_of(d, check)
        vocab, merges, added = m.get("vocab"), m.get("merges") or [], d.get("added_tokens") or []
        check(isinstance(vocab, dict) and vocab, "model.vocab is missing or empty")
        check(isinstance(merges, list) and isinstance(added, list), "model.merges, added_tokens: not lists")
        bad = next((f"vocab id {i!r} of {s!r}" for s, i in vocab.items() if type(i) is not int or i < 0), "")
        check(not bad, f"{bad} is not a non-negative integer")
        check(all(isinstance(t, dict) and type(t.get("id")) is int and isinstance(t.get("content"), str)
                  for t in added), "each of added_tokens needs an integer id and a string content")
        ids = vocab | {t["content"]: t["id"] for t in added}  # token string -> id
        specials = {t["content"]: t["id"] for t in added if t.get("special")}
        check(sorted(ids.values()) == list(range(len(ids))), "token ids are not 0..N-1 without repeats")
        unk = m.get("unk_token")
        check(unk is None or isinstance(unk, str) and unk in ids, f"model.unk_token {unk!r} is not a token")
        tokens = {i: s for s, i in ids.items() if s not in specials}
        odd = [s for s in tokens.values() if form.byte_level and not set(s) <= CHAR_TO_BYTE.keys()]
        check(not odd, f"{len(odd)} tokens are not byte-level, e.g. {odd[:1]}")
        pairs = []
        for k, mg in enumerate(merges):
            parts = mg.split(" ") if isinstance(mg, str) else mg  # "a b" before tokenizers 0.20
            check(isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts),
                  f"merge {k} {mg!r} is not a pair")
            for tok in (*parts, "".join(parts)):
                check(tok in ids and tok not in specials, f"merge {k} {mg!r} uses unknown token {tok!r}")
            pairs.append((ids[parts[0]], ids[parts[1]]))
        check(len(set(pairs)) == len(pairs), "model.merges has a repeated pair")
        return cls(tokens, pairs, specials, text, ids.get(unk), form)

    def save(self, path):
        tmp = path + ".tmp"  # write then rename, so a crash never leaves half a file
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        finally:  # a failed write or rename (path is a folder, the disk is full) leaves no tmp behind
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path):
        return cls.from_json(read_text(path), path)

Form = namedtuple("Form", "split byte_level prefix_space suffix fuse_unk decoder_suffix")

def form_of(d, check):
    """How tokenizer.json d splits and joins text, else check fails: ByteLevel (add_prefix_space; no
    use_regex: the text is one word), or the quick tour's Whitespace(Split) BPE (fuse_unk, end_of_word_suffix)
    with pieces joined by spaces ("a dog run s") or a BPEDecoder (decoder_suffix; None: no decoder)."""
    m, parts = d["model"], {k: d.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")}
    for key, part in parts.items():  # a bare "ByteLevel" is not one
        check(isinstance(part, (dict, type(None))), f"{key} must be a JSON object or null")
    norm, pre, post, dec = ((part or {}).get("type") for part in parts.values())  # "ByteLevel", None, ...
    check(m.get("type", "BPE") == "BPE", f"model type {m.get('type')!r} is not supported, only BPE")
    for key in ("dropout", "continuing_subword_prefix", "byte_fallback", "ignore_merges"):
        check(not m.get(key), f"model.{key}={m.get(key)!r} is not supported")
    check(norm is None, f"normalizer {norm!r} is not supported")
    check(post in (None, "ByteLevel"), f"post_processor {post!r} is not supported")
    splits = {"ByteLevel": SPLIT.findall, "Whitespace": re.compile(r"\w+|[^\w\s]+").findall,
              "WhitespaceSplit": str.split}
    check(isinstance(pre, str) and pre in splits, f"pre_tokenizer {pre!r} is not supported")
    byte_level = pre == "ByteLevel"
    check(dec in (("ByteLevel",) if byte_level else (None, "BPEDecoder")),
          f"decoder {dec!r} is not supported with pre_tokenizer {pre!r}")
    suffix, dec_suffix = m.get("end_of_word_suffix") or "", (parts["decoder"] or {}).get("suffix", "</w>")
    check(isinstance(suffix, str) and isinstance(dec_suffix, str), "an end-of-word suffix is not a string")
    opts = parts["pre_tokenizer"]  # a JSON object: pre is a string
    for part, key in ((opts, "add_prefix_space"), (opts, "use_regex"), (m, "fuse_unk")):  # not "false"
        check(key not in part or type(part[key]) is bool, f"{key} {part.get(key)!r} is not true or false")
    whole = byte_level and not opts.get("use_regex", True)
    return Form(split=(lambda text: [text] if text else []) if whole else splits[pre], byte_level=byte_level,
                prefix_space=bool(opts.get("add_prefix_space")), suffix=suffix,
                fuse_unk=bool(m.get("fuse_unk")), decoder_suffix=dec_suffix if dec == "BPEDecoder" else None)

# ----------------------------------------------------------------------------- the command line
def read_text(path):
    """The UTF-8 text of a file, or a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None

def main():
    parser = argparse.ArgumentParser(description="Train or try a byte-level BPE tokenizer.")
    parser.add_argument("--train", metavar="FILE", help="text file, one text per line")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--out", default="tokenizer.json", help="where --train writes the tokenizer")
    parser.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json to use with --encode")
    parser.add_argument("--encode", metavar="TEXT", help="text to encode")
    args = parser.parse_args()
    if bool(args.train) == bool(args.tokenizer and args.encode is not None):
        parser.error("give either --train FILE or --tokenizer FILE --encode TEXT")
    try:
        if args.train and args.vocab_size < 3 + 256:
            raise ValueError(f"--vocab-size {args.vocab_size}: must be at least 259 (3 specials + 256 bytes)")
        if args.train:
            lines = read_text(args.train).splitlines()
            t0 = time.perf_counter()
            tok = Tokenizer.train(lines, args.vocab_size)
            tok.save(args.out)
            t1 = time.perf_counter()
            n_tokens = sum(len(tok.encode(line)) for line in lines)
            early = " (stopped early: no pair occurs twice)" if tok.vocab_size < args.vocab_size else ""
            print(f"trained on {len(lines)} lines in {t1 - t0:.2f} s: {len(tok.merges)} merges, vocab "
                  f"{tok.vocab_size}{early} -> {args.out}\nencoded them in {time.perf_counter() - t1:.2f} s: "
                  f"{n_tokens / max(1, len(lines)):.2f} tokens per line")
        else:
            tok = Tokenizer.load(args.tokenizer)
            ids = tok.encode(args.encode)
            print("ids:   ", ids)
            print("pieces:", [tok.decode([i]) for i in ids])
    except (ValueError, OSError) as e:  # OSError: save() could not write --out (named, not its .tmp)
        why = f"{args.out}: {e.strerror or e}" if isinstance(e, OSError) else e
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main()
