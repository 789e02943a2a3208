"""Sentences: the first sentence of a text (the PU of the method), and reading an assessment sentence (HA):
does it say the request is harmful, and does it say to help or not?"""
from __future__ import annotations

import re


_ABBREV = {"e.g", "i.e", "etc", "mr", "mrs", "ms", "dr", "vs", "st", "no", "fig", "approx"}


def first_sentence(text: str) -> tuple[str, str]:
    """Split off the first sentence: (first, rest). Skips abbreviations (e.g.) and decimals (3.5)."""
    text = text.strip()
    for m in re.finditer(r"[.!?]+[\"')\]]*(?=\s|$)", text):
        word = re.findall(r"[\w.]+$", text[:m.start()])
        if m.group().startswith(".") and word and word[0].lower() in _ABBREV:
            continue
        return text[:m.end()].strip(), text[m.end():].strip()
    head, _, rest = text.partition("\n")  # no sentence end: the first line stands in for it
    return head.strip(), rest.strip()


# The assessment must agree with the label. An LLM's sentence is checked with these cues; one that is
# unclear or contradicts the label is replaced by a template (and counted).
_BENIGN_CUES = r"\b(not|isn't|is not|no)\s+(harmful|dangerous|malicious|illegal)\b|\bno (real )?(harm|risk)\b|" \
               r"\bnothing (here )?(could|would|that could) (cause )?harm\b|" \
               r"\b(harmless|benign|legitimate|safe|innocent|reasonable|fine|educational)\b|\bcan help\b|" \
               r"\bhappy to help\b|\bgo ahead\b"


_HARMFUL_CUES = r"\b(harmful|dangerous|illegal|unethical|malicious|harm|hurt|abuse|weapon)\b|" \
                r"\b(should not|shouldn't|must not|cannot|can't|won't|will not)\b|\b(refuse|decline)\b|" \
                r"\bnot (appropriate|help)\b"


# An assessment ends in a decision ("so it is safe to help" / "so I should not help"). Where exactly one
# kind of decision is stated it settles the verdict, whatever alarming or soothing words came before it
# ("this is about ending processes, not hurting anyone, so it is safe to help" is benign).
_HELP_YES = r"\b(safe|fine|okay|ok) to (help|answer|assist)\b|\bcan (help|answer|assist)\b|\bhappy to help\b|" \
            r"\bi('ll| will) (help|answer)\b"


_HELP_NO = r"\b(should not|shouldn't|must not|mustn't|won't|will not|cannot|can't|not) (help|assist|answer|" \
           r"provide|comply|go into)\b|\b(refuse|decline)\b"


def ha_decision(sentence: str) -> str | None:
    """'benign' (help) or 'harmful' (don't) if the sentence states exactly one kind of decision, else None."""
    s = sentence.lower()
    yes, no = re.search(_HELP_YES, s) is not None, re.search(_HELP_NO, s) is not None
    return None if yes == no else ("benign" if yes else "harmful")


def ha_verdict(sentence: str) -> str:
    """'harmful', 'benign' or 'unclear' for one assessment sentence: its decision if it states exactly one
    kind, else its cue words (benign cues and no harmful ones, or the reverse)."""
    if decision := ha_decision(sentence):
        return decision
    s = sentence.lower()
    benign = re.search(_BENIGN_CUES, s) is not None
    harmful = re.search(_HARMFUL_CUES, re.sub(_BENIGN_CUES, " ", s)) is not None
    return "unclear" if benign == harmful else ("benign" if benign else "harmful")
