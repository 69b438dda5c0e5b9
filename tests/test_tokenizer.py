"""text_encoder.CLIPTokenizer against transformers' CLIPTokenizer, token for token (modelscope-architecture.md §7.4).

The oracle is `transformers.CLIPTokenizer.from_pretrained(data/clip-tokenizer)`: the same vocab.json and
merges.txt, with special_tokens_map.json giving pad_token "!" (id 0). (In transformers 5 the constructor
`CLIPTokenizer(vocab_file=..., merges_file=...)` ignores both files and builds a 3-token vocabulary, so
from_pretrained is the way to build it on the files.)
"""
import json
import random
import shutil
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from text_encoder import CLIPTokenizer, normalize, split_words
from weights.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "clip-tokenizer"
SHARED = ROOT.parent / "shared"
BENCHMARK = SHARED / "data" / "lvd-llm-cache" / "benchmark_gpt-4-1106-preview.json"


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.from_pretrained(DATA)


@pytest.fixture(scope="module")
def ref():
    tok = transformers.CLIPTokenizer.from_pretrained(DATA)
    assert (len(tok), tok.pad_token, tok.pad_token_id) == (49408, "!", 0)
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    return tok


# -----------------------------------------------------------------------------
# the corpus: hand-picked edge cases + seeded random strings (nothing here needs ../shared)

HAND = [
    "", " ", "a", "A bear eating honey", "a  bear\t\teating\n\nhoney  ", "\r\n leading and trailing \t",
    # accents, NFC, casing
    "café crème brûlée", "cafe\u0301 cre\u0300me", "naïve façade Ångström Straße", "ΟΔΟΣ ΣΑΣ σοφία", "İSTANBUL ǅemal",
    "ÀÉÎÕÜ àéîõü", "ﬁne ﬂow Ⅻ ² ½ ٣ ३", "x\u0301y e\u0308\u0301", "ＡＢＣ１２３ full width",
    # emoji and CJK
    "🐻 eating 🍯!", "👨‍👩‍👧 family, 🇺🇸 flag, 👍🏽 thumbs", "一只熊在吃蜂蜜", "くまが はちみつを 食べる", "곰이 꿀을 먹는다", "一二三 四五",
    # digits and punctuation
    "1234567890", "3.14159 and 1,000,000", "2nd 3rd 4th 10x 3d", "!!!", "?!", "...", "a-b_c d/e", "(x)[y]{z}",
    "“smart” ‘quotes’ — dash – en", "@#$%^&*+=|\\~`<>", "a!b!!c", "wow!!! great!!", "!'s !!'s '!'",
    # apostrophes and contractions
    "it's IT'S we'll they're I'd you've I'm don't", "'sup 'tis rock'n'roll", "dogs' toys '' ''s", "it’s curly",
    "'S 'T 'RE 'VE 'M 'LL 'D", "o'clock y'all ma'am",
    # whitespace variety
    "a\u3000b\xa0c\u2009d\u200be\x1cf\x1dg\x85h\u2028i\u202fj", "tabs\tand\vvertical\fform", "\n\n\n",
    # special-token strings inside prompts
    "<|endoftext|>", "<|startoftext|> x <|endoftext|>", "<|EndOfText|> upper", "a<|endoftext|>!!", "<|endoftext", "|>",
    # prompts over 77 tokens
    "a photo of " + "a cat and " * 40 + "zebra giraffe",
    "A realistic lively video of " + ", ".join(f"object number {i}" for i in range(40)),
    "x" * 500, "ab " * 100, "🐻" * 60, "1" * 90,
]

ALPHABET = ("abcdefghijklmnopqrstuvwxyz" "ABCDEFGHIJKLMNOPQRSTUVWXYZ" "0123456789" "      \t\n\r"
            "'''!!?.,;:-_()[]\"/\\@#&*"
            "éèêëàâäïîôöùûüçñÉÀÇÑßøåæœ" "ΑΒΓΔΣσςαβγ" "ДЖЯжяё" "你好熊蜂蜜一二三" "ひらがなカタカナ" "한국어" "١٢٣٤" "²½Ⅻ"
            "🐻🍯😀👍🏽🇺🇸" "\u0301\u0308\u200d\ufe0f\u00a0\u3000\u2009\u200b\x1c")
WORDS = ["bear", "Honey", "eating", "cat's", "don't", "A", "video", "of", "the", "running", "ZEBRA", "dog",
         "3", "42", "!", "...", "café", "熊", "🐻", "<|endoftext|>", "'ll", "rock'n'roll", "\t", "  "]


def generated():
    """Seeded random strings: random characters, random words, random joins of vocabulary pieces, random code points."""
    rng = random.Random(20240517)
    vocab = json.loads((DATA / "vocab.json").read_text(encoding="utf-8"))
    byte_of = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
    pieces = []  # the text of every vocab token that is valid UTF-8 (exercises the BPE merges)
    for tok in vocab:
        raw = bytes(byte_of[c] for c in tok.removesuffix("</w>")) if not tok.startswith("<|") else b""
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    out = []
    for _ in range(700):
        out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60))))
    for _ in range(500):
        seps = ["", " ", "  ", ",", "-", "\n"]
        out.append("".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(rng.randint(1, 30))))
    for _ in range(700):
        words = ("".join(rng.choice(pieces) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 12)))
        out.append(" ".join(words))
    for _ in range(300):  # code points assigned in this Python's Unicode tables (see text_encoder.py "Differences")
        cps = (rng.choice([rng.randint(0x20, 0x2FFF), rng.randint(0x3000, 0xD7FF), rng.randint(0x10000, 0x1FAFF)])
               for _ in range(rng.randint(1, 20)))
        out.append("".join(chr(c) for c in cps if unicodedata.category(chr(c)) != "Cn"))
    for _ in range(50):  # long prompts
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))))
    return out


def _gpt2_bytes_to_unicode():
    """The byte-level alphabet, written out again here (test oracle, not imported)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def benchmark_prompts():
    if not SHARED.is_dir():
        pytest.skip("../shared not present (user clone): the 184 benchmark prompts are in ../shared/data/lvd-llm-cache")
    return list(json.loads(BENCHMARK.read_text(encoding="utf-8")))


def _mismatches(a, b, strings):
    return [(s, x, y) for s, x, y in zip(strings, a, b) if x != y]


def _compare(ours, ref, strings):
    """encode() vs ref ids without specials, and __call__ vs ref(padding max_length 77, truncation)."""
    enc_ref = ref(strings, add_special_tokens=False).input_ids
    enc_bad = _mismatches([ours.encode(s) for s in strings], enc_ref, strings)
    assert not enc_bad, f"{len(enc_bad)} of {len(strings)} encode() mismatches, first: {enc_bad[:3]}"
    call_ref = ref(strings, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call = ours(strings)
    assert call.dtype == torch.long and call.shape == (len(strings), 77)
    rows_bad = (call != call_ref).any(dim=1).nonzero().flatten().tolist()
    first = [(strings[i], call[i].tolist()) for i in rows_bad[:2]]
    assert not rows_bad, f"{len(rows_bad)} of {len(strings)} __call__ mismatches, first: {first}"


# -----------------------------------------------------------------------------
# parity

def test_corpus_size():
    assert len(HAND) + len(generated()) >= 1000


def test_hand_picked_match_transformers(ours, ref):
    _compare(ours, ref, HAND)


def test_generated_match_transformers(ours, ref):
    _compare(ours, ref, generated())


def test_benchmark_prompts_match_transformers(ours, ref):
    prompts = benchmark_prompts()
    assert len(prompts) == 184
    _compare(ours, ref, prompts)


def test_sampled_code_points_match_transformers(ours, ref):
    """Every 32nd code point assigned in this Python's Unicode tables, in several contexts (case, runs, contractions).

    (All 282,230 assigned code points of Unicode 14 were checked once the same way: 0 mismatches.)
    """
    cps = [c for c in range(0, 0x110000, 32) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    _compare(ours, ref, [f"x{chr(c)}y {chr(c) * 3}a1{chr(c)}'s{chr(c)} {chr(c).upper()}" for c in cps])


def test_pipeline_layout(ours):
    """§7.4: [49406, BPE ids, 49407, 0 ...]; "" -> [49406, 49407, 75 x 0]; 'bear</w>' tokens for phrase lookup."""
    ids = ours(["a bear", ""])
    assert ids[0, :4].tolist() == [49406, 320, 4298, 49407] and ids[0, 4:].eq(0).all()
    assert ids[1].tolist() == [49406, 49407] + [0] * 75
    assert ours.tokens("A Bear's honey") == ["a</w>", "bear</w>", "'s</w>", "honey</w>"]
    assert ours.id_to_token[4298] == "bear</w>"


# -----------------------------------------------------------------------------
# truncation warning

def test_truncation_warning_names_dropped_text(ours, ref):
    prompt = "a photo of " + "a cat and " * 40 + "zebra giraffe"
    with pytest.warns(UserWarning, match="zebra giraffe") as rec:
        ids = ours([prompt])
    content = ref(prompt, add_special_tokens=False).input_ids
    assert ids[0, 1:76].tolist() == content[:75] and ids[0, 76] == 49407
    # diffusers' message: tokenizer.batch_decode(untruncated_ids[:, 76:-1]), i.e. the content ids from 75 on
    dropped = ref.decode(content[75:], clean_up_tokenization_spaces=False)
    assert f'"{dropped}"' in str(rec[0].message) and f"has {len(content)} tokens" in str(rec[0].message)


def test_truncation_warning_on_generated_long_prompts(ours, ref):
    long = [s for s in generated() + HAND if len(ref(s, add_special_tokens=False).input_ids) > 75]
    assert len(long) >= 40
    for s in long:
        content = ref(s, add_special_tokens=False).input_ids
        with pytest.warns(UserWarning) as rec:
            ours([s])
        assert f'"{ref.decode(content[75:], clean_up_tokenization_spaces=False)}"' in str(rec[0].message), s


def test_no_warning_at_exactly_75_tokens(ours):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = ours(["a " * 75])
    assert ids[0, 76] == 49407


# -----------------------------------------------------------------------------
# pieces, checked by hand

def test_split_words_by_hand():
    assert split_words("it's a dog's 12ab!? x") == ["it", "'s", "a", "dog", "'s", "1", "2", "ab", "!?", "x"]
    assert split_words("'sun !'s ''s") == ["'s", "un", "!'", "s", "''", "s"]
    assert split_words("a\x1cb\u3000c") == ["a", "\x1c", "b", "c"]  # \x1c is not \s in the tokenizers regex
    assert split_words("一二三 ²½ ⅻ") == ["一二三", "²", "½", "ⅻ"]  # 一 is a letter (Lo), ² ½ ⅻ are numbers


def test_normalize_by_hand():
    assert normalize("Cafe\u0301  \t\nΟΔΟΣ") == "café οδοσ"  # NFC, one space, per-character lowercase


def test_bad_input_is_a_clear_error(ours):
    with pytest.raises(TypeError, match="prompt 1"):
        ours(["ok", None])
    with pytest.raises(TypeError, match="expected a str"):
        ours.encode(b"bytes")


# -----------------------------------------------------------------------------
# the files

def _copy(tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(DATA, folder)
    return folder


def test_merge_order_is_checked(tmp_path):
    """tiktoken ranks stand for merge ranks only if merge r gives id 512 + r: a swapped pair must be refused."""
    folder = _copy(tmp_path)
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    lines[5], lines[6] = lines[6], lines[5]
    (folder / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(CheckpointError, match="merge 4"):
        CLIPTokenizer.from_pretrained(folder)


def test_missing_special_tokens_map(tmp_path):
    folder = _copy(tmp_path)
    (folder / "special_tokens_map.json").unlink()
    with pytest.raises(CheckpointError, match="special_tokens_map.json"):
        CLIPTokenizer.from_pretrained(folder)


def test_pad_comes_from_the_files(tmp_path):
    folder = _copy(tmp_path)
    special = json.loads((folder / "special_tokens_map.json").read_text())
    special["pad_token"] = "<|endoftext|>"  # SD-1.x style
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    assert CLIPTokenizer.from_pretrained(folder)(["a bear!"])[0, :6].tolist() == [49406, 320, 4298, 256, 49407, 49407]


@pytest.mark.parametrize("bad", ["a b</w>", "aЖ</w>"], ids=["latin-1 space", "cyrillic"])
def test_a_vocab_token_outside_the_byte_alphabet_is_refused(tmp_path, bad):
    """A space (a latin-1 character that the byte alphabet spells 'Ġ') or a letter outside it: one-line error."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(ROOT / "data" / "clip-tokenizer", folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab[bad] = vocab.pop("a</w>")
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(CheckpointError, match="outside the byte alphabet") as info:
        CLIPTokenizer.from_pretrained(str(folder))
    assert "\n" not in str(info.value)
