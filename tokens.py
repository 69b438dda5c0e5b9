"""Phrase -> token positions: where each object's name sits in the prompt the text encoder sees.

What to read: `lvd-method.md` §3.1 (the final prompt: background and appended phrases) and §3.4 (token lookup,
`refine_phrase`, the plural fallback).

Official implementation: TonyLianLong/LLM-groundedVideoDiffusion @22d90d2, utils/guidance.py (`refine_phrase`,
`get_token_map`, `get_phrase_indices`).

Differences:
- Phrase positions are matched on whole BPE tokens, not by a character search in the joined token string,
  so 'ball' no longer matches inside 'football</w>' (§10.7).
- The plural fallback is a small rule set (`plural`) instead of the `inflect` library (§10.18). Added suffixes
  are returned so runs can record them (§10.9).
"""
import logging
import re

log = logging.getLogger(__name__)


_IRREGULAR = {"man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
              "goose": "geese", "foot": "feet", "tooth": "teeth", "ox": "oxen", "fish": "fish", "sheep": "sheep",
              "deer": "deer", "leaf": "leaves", "knife": "knives", "wife": "wives", "wolf": "wolves",
              "shelf": "shelves", "loaf": "loaves", "life": "lives", "calf": "calves", "half": "halves",
              "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes", "cactus": "cacti"}


def plural(word):
    """English plural of one noun, replacing `inflect.plural` (§10.18). Rules, in order:
    a short irregular table (man -> men, person -> people, fish -> fish, leaf -> leaves, ...);
    -s/-x/-z/-ch/-sh -> +es (bus -> buses, box -> boxes); consonant + y -> -ies (puppy -> puppies);
    otherwise +s (car -> cars, cat -> cats, bird -> birds, ball -> balls, dog -> dogs, toy -> toys)."""
    low = word.lower()
    if low in _IRREGULAR:
        return _IRREGULAR[low] if word == low else word[0] + _IRREGULAR[low][1:]  # keep a capital
    if low.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(low) > 1 and low.endswith("y") and low[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def refine_phrase(prompt, phrase):
    """The form of `phrase` found in `prompt` as a whole word (case-sensitive, \\b), or None (§3.4):
    the phrase, then it with digits/spaces stripped ('car 2' -> 'car'), its last word, that word's plural."""
    stripped = phrase.strip("0123456789 ")
    last = stripped.split()[-1] if stripped.split() else stripped
    for cand in (phrase, stripped, last, plural(last) if last else ""):
        if cand and re.search(r"\b" + re.escape(cand) + r"\b", prompt):
            return cand
    return None


def _find_tokens(tokenizer, prompt, phrase):
    """Positions (in the 77-token sequence; 0 = start token) of the first whole-token occurrence, or None."""
    seq, sub = tokenizer.tokens(prompt), tokenizer.tokens(phrase)  # BPE strings, e.g. 'bear</w>', no start/end
    for i in range(len(seq) - len(sub) + 1 if sub else 0):
        if seq[i:i + len(sub)] == sub:
            return [1 + i + j for j in range(len(sub))]
    return None


def resolve_tokens(tokenizer, prompt, background, phrases, max_len=77):
    """-> (final_prompt, positions per phrase, suffixes added), the prompt the text encoder sees (§3.1).

    First `, {background} background` is appended (if non-empty); then each phrase is refined and looked up
    on whole tokens; a phrase not found gets `| phrase` appended (no space before the bar, as the official),
    and later phrases are looked up in the extended prompt. `tokenizer.tokens(text)` gives BPE strings.
    """
    final, suffixes, positions = prompt, [], []
    if background and background.strip():
        suffixes.append(f", {background} background")
        final += suffixes[-1]
    for phrase in phrases:
        found = refine_phrase(final, phrase)
        pos = _find_tokens(tokenizer, final, found) if found is not None else None
        if pos is None:
            suffixes.append("| " + phrase)
            final += suffixes[-1]
            log.warning("phrase %r not in the prompt: appended %r (the text encoder sees %r)", phrase, suffixes[-1], final)
            pos = _find_tokens(tokenizer, final, phrase)
        if not pos or pos[-1] > max_len - 2:  # the end token must still fit in the 77
            raise ValueError(f"resolve_tokens: phrase {phrase!r} has no tokens within the first {max_len - 2} "
                             f"of prompt {final!r}")
        positions.append(pos)
    return final, positions, suffixes
