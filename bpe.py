"""
bpe.py - a byte-level byte-pair-encoding tokenizer (GPT-2 style), written out by hand.

Text is cut into words with a GPT-2-like regex, each word becomes its UTF-8 bytes, and training
learns merges of adjacent tokens, most frequent pair first. Any string encodes (there is no
"unknown" token) and decodes back to itself. The tokenizer is saved as a Hugging Face
tokenizer.json (BPE model, ByteLevel pre-tokenizer and decoder), so `tokenizers` loads our file
and we load a ByteLevel BPE file that `tokenizers` wrote.

Left out: normalizers, dropout, added tokens matched inside text (encode never produces special
ids; decode drops them), and other tokenizer.json variants (we raise a clear error for those).

    python bpe.py --train captions.txt --vocab-size 2048 --out tokenizer.json
    python bpe.py --tokenizer tokenizer.json --encode "a dog runs"
"""

import argparse
import heapq
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict

# -----------------------------------------------------------------------------
# Splitting text into words. GPT-2's pattern (the one `tokenizers` ByteLevel uses) is
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# `re` has no \p{..} classes, so a letter is [^\W\d_] (a word character that is neither a digit
# nor "_"), a number is \d, and "other" is [^\s\w] or "_". Where this differs from GPT-2:
# numerals that are not decimal digits (², ½, Ⅻ) count as letters here, and \s also matches the
# ASCII separators \x1c-\x1f. On ordinary text (all of Flickr8k) the two split identically.
# A merge never crosses a word boundary, so " dog" can become one token but "dog." cannot.
SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")

SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2; then the 256 bytes (3..258); then merges


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character, used for the strings in tokenizer.json.
    Printable bytes map to themselves; the rest are shifted above 255: b' ' -> 'Ġ', b'\\n' -> 'Ċ'."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def to_bytes(text):
    # 'surrogatepass' lets a str holding a lone surrogate ("\ud800") round-trip as well
    return text.encode("utf-8", "surrogatepass")


def read_text(path):
    """The UTF-8 text of a file, or a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def merge(ids, pair, new_id):
    """Replace each occurrence of pair, left to right: merge([5, 6, 5, 6, 6], (5, 6), 9) -> [9, 9, 6]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class Tokenizer:
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab, merges, specials):
        """vocab: {id: bytes} of the ordinary tokens; merges: [(id_a, id_b), ...] in rank order;
        specials: {"<pad>": id, ...}. Every byte must have a token, so any text encodes."""
        self.vocab, self.merges, self.specials = vocab, merges, specials
        self.pad_id, self.bos_id, self.eos_id = (specials[s] for s in SPECIALS)
        self.vocab_size = len(vocab) + len(specials)
        ids_of = {b: i for i, b in vocab.items()}
        self.byte_ids = [ids_of[bytes([b])] for b in range(256)]
        # pair -> (rank, id of the merged token); encode merges the lowest rank first
        self.ranks = {p: (r, ids_of[vocab[p[0]] + vocab[p[1]]]) for r, p in enumerate(merges)}
        self.cache = {}  # word -> ids; captions reuse a few thousand words over and over

    # --- training ---------------------------------------------------------------------------
    @classmethod
    def train(cls, texts, vocab_size=2048, verbose=False):
        """Learn merges until there are vocab_size tokens (3 specials + 256 bytes + merges).

        Worked example: "hug hug pug hugs bun" splits into the words "hug", " hug", " pug", " hugs",
        " bun". The pair (u,g) occurs 4 times, so b"ug" is the first merge (id 259); then (h,ug)
        occurs 3 times and b"hug" is the second (id 260); then (" ",hug) occurs twice, giving b" hug"
        (id 261). Now every pair occurs once, so training stops early. Ties go to the smaller ids."""
        if vocab_size < 3 + 256:
            raise ValueError(f"vocab_size must be at least {3 + 256}, got {vocab_size}")
        vocab = {3 + b: bytes([b]) for b in range(256)}
        ids_of = {tok: i for i, tok in vocab.items()}
        # Every distinct word is stored once, with how often it occurs.
        word_counts = Counter(w for text in texts for w in SPLIT.findall(text))
        words = [[3 + b for b in to_bytes(w)] for w in word_counts]
        counts = list(word_counts.values())
        stats = defaultdict(int)  # pair -> occurrences in the corpus
        where = defaultdict(set)  # pair -> indices of the words it occurs in (may be stale)
        for i, w in enumerate(words):
            for pair in zip(w, w[1:]):
                stats[pair] += counts[i]
                where[pair].add(i)
        # Max-heap by count via negation; ties go to the smaller pair, so training is deterministic.
        # Counts change after every merge; rather than fixing entries in place we push the new count
        # and drop popped entries whose count is out of date ("lazy deletion").
        heap = [(-n, pair) for pair, n in stats.items()]
        heapq.heapify(heap)
        merges, skipped = [], set()
        while len(vocab) + 3 < vocab_size:
            while heap and (-heap[0][0] != stats[heap[0][1]] or heap[0][1] in skipped):
                heapq.heappop(heap)
            if not heap or -heap[0][0] < 2:
                print(f"bpe: stopped early at {len(vocab) + 3} tokens: no pair occurs twice any more")
                break
            n, pair = heapq.heappop(heap)
            new_token = vocab[pair[0]] + vocab[pair[1]]
            if new_token in ids_of:
                # The same bytes were already made from another pair ("a"+"bc" after "ab"+"c").
                # tokenizer.json keys tokens by their string, so keep one way to make each token.
                skipped.add(pair)
                continue
            new_id = 3 + len(vocab)
            vocab[new_id], ids_of[new_token] = new_token, new_id
            merges.append(pair)
            # Only the words containing the pair change; move their pair counts by the difference.
            delta = defaultdict(int)
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
            if verbose and len(merges) % 200 == 0:
                print(f"merge {len(merges)}: {new_token!r} ({-n} occurrences)")
        return cls(vocab, merges, dict(zip(SPECIALS, range(3))))

    # --- encoding and decoding --------------------------------------------------------------
    def encode_word(self, word):
        """Byte ids of one word, then merges applied lowest rank first, as GPT-2 does."""
        ids = [self.byte_ids[b] for b in to_bytes(word)]
        no_merge = (float("inf"), None)
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, no_merge))
            if pair not in self.ranks:
                break  # nothing left to merge
            ids = merge(ids, pair, self.ranks[pair][1])
        return ids

    def encode(self, text):
        """Text -> ids (no <bos>/<eos> added). Special-token strings in the text are plain text."""
        ids = []
        for word in SPLIT.findall(text):
            word_ids = self.cache.get(word)
            if word_ids is None:
                if len(self.cache) > 100_000:  # bound the memory on endless new words
                    self.cache.clear()
                word_ids = self.cache[word] = self.encode_word(word)
            ids.extend(word_ids)
        return ids

    def decode(self, ids):
        """Ids -> text. Special and unknown ids are dropped; never raises."""
        data = b"".join([self.vocab.get(i, b"") for i in ids])
        try:
            return data.decode("utf-8", "surrogatepass")  # everything encode produced
        except UnicodeDecodeError:
            return data.decode("utf-8", "replace")  # e.g. a sequence cut inside a character

    # --- Hugging Face tokenizer.json ----------------------------------------------------------
    def to_json(self):
        """The tokenizer.json text that save() writes."""
        text = {i: "".join(BYTE_TO_CHAR[b] for b in tok) for i, tok in self.vocab.items()}
        vocab = dict(self.specials) | {text[i]: i for i in sorted(text)}
        added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for s, i in self.specials.items()]
        merges = [[text[a], text[b]] for a, b in self.merges]  # the format tokenizers 0.23 writes
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                 "ignore_merges": False, "vocab": vocab, "merges": merges}
        return json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                           "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
                           "decoder": byte_level, "model": model}, ensure_ascii=False, indent=1)

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
        m = d["model"]
        check(m.get("type", "BPE") == "BPE", f"model type {m.get('type')!r} is not supported, only BPE")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges"):
            check(not m.get(key), f"model.{key}={m.get(key)!r} is not supported")
        check(d.get("normalizer") is None, "normalizers are not supported")
        pre = d.get("pre_tokenizer") or {}
        check(pre.get("type") == "ByteLevel", f"pre_tokenizer must be ByteLevel, got {pre.get('type')!r}")
        check(not pre.get("add_prefix_space") and pre.get("use_regex", True),
              "ByteLevel pre_tokenizer needs add_prefix_space=false and use_regex=true")
        vocab, merges = m.get("vocab"), m.get("merges", [])
        check(isinstance(vocab, dict) and vocab, "model.vocab is missing or empty")
        check(isinstance(merges, list), "model.merges is not a list")
        ids = {}  # token string -> id, model vocab plus added tokens
        for s, i in vocab.items():
            check(type(i) is int and i >= 0, f"vocab id {i!r} of {s!r} is not a non-negative integer")
            ids[s] = i
        specials = {}
        for t in d.get("added_tokens") or []:
            check(isinstance(t, dict) and type(t.get("id")) is int and isinstance(t.get("content"), str),
                  f"bad added token {t!r}")
            s, i = t["content"], t["id"]
            check(ids.setdefault(s, i) == i, f"added token {s!r} has two ids")
            if t.get("special"):
                specials[t["content"]] = t["id"]
        for s in SPECIALS:
            check(s in ids, f"special token {s} is missing")
            specials[s] = ids[s]
        missing = [c for c in BYTE_TO_CHAR.values() if c not in ids]
        check(not missing, f"vocab lacks {len(missing)} of the 256 byte tokens, e.g. {missing[:1]}")
        check(sorted(ids.values()) == list(range(len(ids))), "token ids are not 0..N-1 without repeats")
        tokens = {}  # id -> bytes for the ordinary tokens
        for s, i in ids.items():
            if s not in specials:
                check(all(c in CHAR_TO_BYTE for c in s), f"token {s!r} is not a byte-level token")
                tokens[i] = bytes(CHAR_TO_BYTE[c] for c in s)
        pairs = []
        for k, mg in enumerate(merges):
            # tokenizers >= 0.20 writes merges as ["a", "b"]; older files use "a b"
            parts = mg.split(" ") if isinstance(mg, str) else mg
            check(isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts),
                  f"merge {k} {mg!r} is not a pair")
            a, b = parts
            for tok in (a, b, a + b):
                check(tok in ids and tok not in specials, f"merge {k} {mg!r} uses unknown token {tok!r}")
            pairs.append((ids[a], ids[b]))
        check(len(set(pairs)) == len(pairs), "model.merges has a repeated pair")
        return cls(tokens, pairs, specials)

    def save(self, path):
        tmp = path + ".tmp"  # write then rename, so a crash never leaves half a file
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        return cls.from_json(read_text(path), path)


# -----------------------------------------------------------------------------
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
        if args.train:
            lines = read_text(args.train).splitlines()
            t0 = time.perf_counter()
            tok = Tokenizer.train(lines, args.vocab_size)
            seconds = time.perf_counter() - t0
            tok.save(args.out)
            t0 = time.perf_counter()
            n_tokens = sum(len(tok.encode(line)) for line in lines)
            print(f"trained on {len(lines)} lines in {seconds:.2f} s: {len(tok.merges)} merges, "
                  f"vocab {tok.vocab_size} -> {args.out}")
            print(f"encoded them in {time.perf_counter() - t0:.2f} s: "
                  f"{n_tokens / max(1, len(lines)):.2f} tokens per line")
        else:
            tok = Tokenizer.load(args.tokenizer)
            ids = tok.encode(args.encode)
            print("ids:   ", ids)
            print("pieces:", [tok.decode([i]) for i in ids])
    except (ValueError, OSError) as e:  # OSError: --out cannot be written
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
