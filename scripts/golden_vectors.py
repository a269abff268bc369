#!/usr/bin/env python3
"""Reference implementation of shardproxy's routing contract, and generator of its golden vectors.

This is an INDEPENDENT implementation of docs/routing.md, written from the spec and not from
the Rust source. It writes tests/golden/routing_vectors.tsv, which `tests/routing_golden.rs`
asserts against the Rust implementation on every `cargo test`. CI never runs this script: the
TSV is committed, and changing any expected value in it is a breaking change of the routing
contract (see docs/routing.md, "Compatibility").

Requires Python 3.8+ and the `xxhash` package (`pip install xxhash`), which binds the
reference C implementation of XXH3.

Usage:
    python3 scripts/golden_vectors.py              # (re)write tests/golden/routing_vectors.tsv
    python3 scripts/golden_vectors.py --stdout     # print the vectors instead
    python3 scripts/golden_vectors.py --check      # exit 1 if the committed file differs
    python3 scripts/golden_vectors.py --explain KEY_HEX NAME [WEIGHT]
                                                   # print every intermediate value

The spec, in short (all integers unsigned 64-bit, all byte orders little-endian):

    k       = XXH3_64(key bytes, seed 0)
    s_node  = XXH3_64(UTF-8 bytes of the node name, seed 0)
    raw     = XXH3_64_withSeed(k as 8 little-endian bytes, seed = s_node)
    u       = f64(raw) / f64(2^64 - 1)            # f64(2^64 - 1) rounds to 2^64; u in [0, 1]
    score   = ln(u) / f64(weight)                 # <= 0; higher wins; weight 0 => not ranked
    rank    = sort by (score, name bytes) descending
    fingerprint = XXH3_64(concat over nodes sorted by name bytes of
                          name bytes || 0x00 || weight as u32 LE)
"""

import argparse
import hashlib
import math
import os
import struct
import sys

try:
    import xxhash
except ImportError:  # pragma: no cover
    sys.exit("this script needs the xxhash package: pip install xxhash")

U64_MAX = (1 << 64) - 1
MAX_WEIGHT = 1_000_000
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(REPO_ROOT, "tests", "golden", "routing_vectors.tsv")


# --------------------------------------------------------------------------------------------
# The spec.
# --------------------------------------------------------------------------------------------

def key_digest(key: bytes) -> int:
    """k = XXH3_64(key bytes, seed 0)."""
    return xxhash.xxh3_64_intdigest(key, seed=0)


def node_seed(name: str) -> int:
    """s_node = XXH3_64(UTF-8 bytes of the name, seed 0)."""
    return xxhash.xxh3_64_intdigest(name.encode("utf-8"), seed=0)


def raw_score(key: bytes, name: str) -> int:
    """raw = XXH3_64_withSeed(le64(k), seed = s_node)."""
    k = key_digest(key)
    return xxhash.xxh3_64_intdigest(struct.pack("<Q", k), seed=node_seed(name))


def weighted_score(raw: int, weight: int) -> float:
    """score = ln(f64(raw) / f64(2^64 - 1)) / f64(weight), IEEE-754 binary64.

    Python's int -> float conversion rounds to nearest, ties to even, exactly like Rust's
    `u64 as f64`; so float(U64_MAX) == 2.0**64 and the division by it is exact.
    """
    assert 0 < weight <= MAX_WEIGHT
    u = float(raw) / float(U64_MAX)
    if u == 0.0:  # raw == 0: ln(0) = -inf (math.log raises instead)
        return -math.inf / float(weight)
    return math.log(u) / float(weight)


def rank(key: bytes, nodes):
    """Names of the nodes with weight > 0, best first; ties by name bytes, greater first."""
    scored = []
    for name, weight in nodes:
        if weight == 0:
            continue  # drained: takes no keys, not ranked at all
        scored.append((weighted_score(raw_score(key, name), weight), name.encode("utf-8"), name))
    scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [name for _, _, name in scored]


def fingerprint(nodes) -> int:
    """XXH3_64 (seed 0, streaming) of the nodes sorted by name bytes: name, 0x00, u32 LE weight."""
    h = xxhash.xxh3_64(seed=0)
    for name, weight in sorted(nodes, key=lambda n: n[0].encode("utf-8")):
        h.update(name.encode("utf-8"))
        h.update(b"\x00")
        h.update(struct.pack("<I", weight))
    return h.intdigest()


# --------------------------------------------------------------------------------------------
# The vectors.
# --------------------------------------------------------------------------------------------

def prng_bytes(label: str, n: int) -> bytes:
    """Deterministic pseudo-random bytes (SHA-256 in counter mode over a label)."""
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{counter}".encode()).digest()
        counter += 1
    return out[:n]


# Keys: ASCII, UTF-8, binary, and lengths on each side of XXH3's internal size classes
# (1-3, 4-8, 9-16, 17-128, 129-240, 241+ bytes). Keys are 1..=256 bytes (the header's default).
KEYS = {
    "user42": b"user:42",
    "session": b"session:9f8e7d6c",
    "order": b"order/2024/000123",
    "one_a": b"a",
    "one_00": b"\x00",
    "one_ff": b"\xff",
    "utf8": "ключ:λ:キー".encode("utf-8"),
    "bin5": b"\x00\x01\x02\xfe\xff",
    "len3": prng_bytes("len3", 3),
    "len4": prng_bytes("len4", 4),
    "len8": prng_bytes("len8", 8),
    "len9": prng_bytes("len9", 9),
    "len16": prng_bytes("len16", 16),
    "len17": prng_bytes("len17", 17),
    "len128": prng_bytes("len128", 128),
    "len129": prng_bytes("len129", 129),
    "len240": prng_bytes("len240", 240),
    "len241": prng_bytes("len241", 241),
    "len256": prng_bytes("len256", 256),
    "ascii256": (b"0123456789abcdef" * 16),
}

NODE_SETS = {
    "one": [("solo", 1)],
    "two_eq": [("a", 1), ("b", 1)],
    "two_uneq": [("a", 1), ("b", 3)],
    "three_eq": [("cache-0", 1), ("cache-1", 1), ("cache-2", 1)],
    "three_eq_reordered": [("cache-2", 1), ("cache-0", 1), ("cache-1", 1)],
    "three_drain": [("cache-0", 1), ("cache-1", 0), ("cache-2", 1)],
    "five_uneq": [("db-a", 1), ("db-b", 2), ("db-c", 3), ("db-d", 4), ("db-e", 5)],
    "five_uneq_reordered": [("db-e", 5), ("db-c", 3), ("db-a", 1), ("db-d", 4), ("db-b", 2)],
    "five_extreme": [("x", MAX_WEIGHT), ("y", 1), ("z", 500_000), ("w", 999_999), ("v", 2)],
    "ten_eq": [(f"node-{i}", 1) for i in range(10)],
    "ten_eq_reversed": [(f"node-{i}", 1) for i in reversed(range(10))],
    "ten_mixed": [(f"node-{i}", w) for i, w in enumerate([1, 0, 2, 5, 1, 0, 10, 3, 1, 100])],
    "utf8": [("shard-ü", 1), ("節点-1", 2), ("🦀", 1), ("ascii", 1), ("｡", 3)],
    "utf8_reordered": [("｡", 3), ("🦀", 1), ("節点-1", 2), ("ascii", 1), ("shard-ü", 1)],
    "prefixes": [("a", 1), ("aa", 1), ("a0", 1), ("b", 1), ("A", 1)],
    "all_drained": [("a", 0), ("b", 0)],
    "addresses_look_alike": [("10.0.0.1-6379", 1), ("10.0.0.2-6379", 1), ("redis.svc.local", 2)],
}

# Which keys each node set is checked with (every set gets at least three).
RANK_CASES = [
    ("one", ["user42", "one_a", "len256"]),
    ("two_eq", ["user42", "session", "one_00", "len9"]),
    ("two_uneq", ["user42", "session", "one_ff", "len17"]),
    ("three_eq", ["user42", "order", "bin5", "len128", "utf8"]),
    ("three_eq_reordered", ["user42", "order", "bin5", "len128", "utf8"]),
    ("three_drain", ["user42", "order", "bin5", "len128"]),
    ("five_uneq", ["user42", "len3", "len4", "len240"]),
    ("five_uneq_reordered", ["user42", "len3", "len4", "len240"]),
    ("five_extreme", ["session", "len8", "len241", "ascii256"]),
    ("ten_eq", ["user42", "one_a", "len16", "len129", "len256"]),
    ("ten_eq_reversed", ["user42", "one_a", "len16", "len129", "len256"]),
    ("ten_mixed", ["order", "utf8", "len8", "ascii256"]),
    ("utf8", ["user42", "utf8", "one_00", "len241"]),
    ("utf8_reordered", ["user42", "utf8", "one_00", "len241"]),
    ("prefixes", ["session", "one_ff", "len4"]),
    ("all_drained", ["user42", "len256"]),
    ("addresses_look_alike", ["user42", "session", "len17"]),
]

RAW_CASES = [
    ("user42", "a"), ("user42", "b"), ("user42", "cache-0"), ("user42", "node-0"),
    ("one_a", "a"), ("one_00", "a"), ("one_ff", "a"), ("bin5", "cache-1"),
    ("utf8", "shard-ü"), ("utf8", "節点-1"), ("utf8", "🦀"), ("utf8", "｡"),
    ("len3", "db-a"), ("len4", "db-b"), ("len8", "db-c"), ("len9", "db-d"),
    ("len16", "db-e"), ("len17", "x"), ("len128", "y"), ("len129", "z"),
    ("len240", "node-9"), ("len241", "node-1"), ("len256", "solo"), ("ascii256", "a"),
    ("user42", "🦀"),  # a worked example in docs/routing.md
]

SCORE_CASES = [
    ("user42", "a", 1), ("user42", "b", 3), ("user42", "b", 1), ("session", "x", MAX_WEIGHT),
    ("session", "y", 1), ("len256", "node-0", 2), ("utf8", "節点-1", 2), ("utf8", "🦀", 1),
    ("one_a", "a", 7), ("len9", "db-d", 4),
]

FINGERPRINT_CASES = [
    [],
    [("a", 1)],
    [("a", 0)],
    [("a", 1), ("b", 1)],
    [("b", 1), ("a", 1)],
    [("a", 1), ("b", 2)],
    [("a", 2), ("b", 1)],
    NODE_SETS["three_eq"],
    NODE_SETS["three_drain"],
    NODE_SETS["five_extreme"],
    NODE_SETS["ten_mixed"],
    NODE_SETS["utf8"],  # UTF-8 byte order: "｡" (EF BD A1) < "🦀" (F0 9F A6 80), unlike UTF-16
    NODE_SETS["prefixes"],  # "A" < "a" < "a0" < "aa" < "b"
    [("b", 2), ("a", 1)],  # the worked examples in docs/routing.md
    [("｡", 1), ("🦀", 1)],
]


def check_name(name: str) -> None:
    assert name and name != "-", f"bad name {name!r}"
    for bad in ":,\t\r\n\x00":
        assert bad not in name, f"name {name!r} holds {bad!r}"


def nodes_field(nodes) -> str:
    for name, weight in nodes:
        check_name(name)
        assert 0 <= weight <= MAX_WEIGHT
    return ",".join(f"{name}:{weight}" for name, weight in nodes) if nodes else "-"


def hex16(v: int) -> str:
    return f"{v:016x}"


def f64_bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


HEADER = """\
# shardproxy routing golden vectors: the routing contract (docs/routing.md).
# GENERATED by scripts/golden_vectors.py (an independent Python implementation); asserted by
# tests/routing_golden.rs. Changing any expected value here is a BREAKING CHANGE.
#
# UTF-8 text, one record per line, fields separated by a single TAB. Lines starting with '#' and
# empty lines are ignored. The first field is the record kind:
#
# rank<TAB>key_hex<TAB>nodes<TAB>ranked
#     key_hex: the key bytes as lowercase hex (keys are 1..=256 bytes).
#     nodes:   the node set in the order given, "name:weight,name:weight,..." ("-" if empty).
#              Names are UTF-8 and never contain ':', ',', TAB, CR, LF or NUL, and are never "-".
#     ranked:  the names of the nodes with weight > 0, best first, comma-separated ("-" if none).
#              The first is the key's owner.
# raw<TAB>key_hex<TAB>name<TAB>raw_hex
#     raw_hex: XXH3_64_withSeed(le64(XXH3_64(key)), XXH3_64(name)) as 16 lowercase hex digits.
# score<TAB>key_hex<TAB>name<TAB>weight<TAB>score_bits
#     score_bits: the IEEE-754 binary64 bit pattern of ln(f64(raw) / f64(2^64-1)) / f64(weight)
#                 as 16 lowercase hex digits.
# fp<TAB>nodes<TAB>fingerprint_hex
#     fingerprint_hex: the membership fingerprint as 16 lowercase hex digits.
"""


def generate() -> str:
    # Self-checks against published XXH3 known answers, so a broken binding cannot slip through.
    assert xxhash.xxh3_64_intdigest(b"", seed=0) == 0x2D06800538D394C2
    out = [HEADER]

    out.append("\n# --- rank: ranked names for a key and a node set ---\n")
    for set_name, key_names in RANK_CASES:
        nodes = NODE_SETS[set_name]
        for key_name in key_names:
            key = KEYS[key_name]
            assert 1 <= len(key) <= 256
            ranked = rank(key, nodes)
            out.append(
                f"rank\t{key.hex()}\t{nodes_field(nodes)}\t{','.join(ranked) if ranked else '-'}\n"
            )

    # The same membership listed in another order must rank identically.
    for a, b in [
        ("three_eq", "three_eq_reordered"),
        ("five_uneq", "five_uneq_reordered"),
        ("ten_eq", "ten_eq_reversed"),
        ("utf8", "utf8_reordered"),
    ]:
        for key in KEYS.values():
            assert rank(key, NODE_SETS[a]) == rank(key, NODE_SETS[b]), (a, b, key)
        assert fingerprint(NODE_SETS[a]) == fingerprint(NODE_SETS[b]), (a, b)

    out.append("\n# --- raw: the unweighted 64-bit score of a (key, node name) pair ---\n")
    for key_name, name in RAW_CASES:
        check_name(name)
        key = KEYS[key_name]
        out.append(f"raw\t{key.hex()}\t{name}\t{hex16(raw_score(key, name))}\n")

    out.append("\n# --- score: the weighted score as f64 bits ---\n")
    for key_name, name, weight in SCORE_CASES:
        check_name(name)
        key = KEYS[key_name]
        s = weighted_score(raw_score(key, name), weight)
        out.append(f"score\t{key.hex()}\t{name}\t{weight}\t{hex16(f64_bits(s))}\n")

    out.append("\n# --- fp: membership fingerprints ---\n")
    for nodes in FINGERPRINT_CASES:
        out.append(f"fp\t{nodes_field(nodes)}\t{hex16(fingerprint(nodes))}\n")
    return "".join(out)


def explain(key_hex: str, name: str, weight: int) -> None:
    key = bytes.fromhex(key_hex)
    k = key_digest(key)
    s = node_seed(name)
    raw = raw_score(key, name)
    u = float(raw) / float(U64_MAX)
    print(f"key bytes        {key.hex()} ({len(key)} byte{'' if len(key) == 1 else 's'})")
    print(f"name bytes       {name.encode('utf-8').hex()} ({name!r})")
    print(f"k                {hex16(k)}")
    print(f"le64(k)          {struct.pack('<Q', k).hex()}")
    print(f"s_node           {hex16(s)}")
    print(f"raw              {hex16(raw)} ({raw})")
    print(f"f64(raw)         {float(raw)!r} (bits {hex16(f64_bits(float(raw)))})")
    print(f"u                {u!r} (bits {hex16(f64_bits(u))})")
    if raw:
        print(f"ln(u)            {math.log(u)!r} (bits {hex16(f64_bits(math.log(u)))})")
    sc = weighted_score(raw, weight)
    print(f"{'score (w=' + str(weight) + ')':<17}{sc!r} (bits {hex16(f64_bits(sc))})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--stdout", action="store_true", help="print instead of writing the file")
    group.add_argument("--check", action="store_true", help="fail if the committed file differs")
    group.add_argument("--explain", nargs="+", metavar="ARG",
                       help="KEY_HEX NAME [WEIGHT]: print the intermediate values")
    args = parser.parse_args()

    if args.explain:
        if len(args.explain) not in (2, 3):
            parser.error("--explain takes KEY_HEX NAME [WEIGHT]")
        weight = int(args.explain[2]) if len(args.explain) == 3 else 1
        explain(args.explain[0], args.explain[1], weight)
        return 0

    text = generate()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        with open(OUTPUT, encoding="utf-8", newline="") as f:
            if f.read() != text:
                print(f"{OUTPUT} differs from the generated vectors", file=sys.stderr)
                return 1
        print(f"{OUTPUT} is up to date")
        return 0
    os.makedirs(os.path.dirname(OUTPUT), exist_ok=True)
    with open(OUTPUT, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
