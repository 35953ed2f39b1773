"""The synthetic world's judge: SEED-Story's three questions, answered exactly by the world's rules.

SEED-Story asks GPT-4 to rate generated stories for style, coherence and engagement. In the
synthetic world each has an exact answer, from the caption grammar of :mod:`datamodules.synthetic`
and the evaluator's labels of each drawn frame:

- **style**: the frame's background (as the evaluator sees it) is the story's, step by step;
- **coherence**: the characters a caption puts on screen are those the evaluator finds in the
  frame drawn for it (F1 per step);
- **engagement**: captions are sentences of the world's grammar (*valid*), their events can
  happen in the story's state (*possible*: who enters is off screen, who acts or leaves is on it,
  the watchers named are exactly the others, at most three on screen, the place is the story's),
  and a caption differs from the one before it (*distinct*).

The state starts from the start frame's true cast and follows the captions: a valid caption sets
who is on screen (even when its event was impossible, it says who is there); an invalid one
leaves the state as it was, and its step is scored against the names it mentions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from datamodules.synthetic import SLOTS
from datamodules.synthetic_world import BACKGROUNDS, CHARACTER_NAMES

_NAME = "|".join(CHARACTER_NAMES)
_LIST = rf"(?:{_NAME})(?:(?:, (?:{_NAME}))* and (?:{_NAME}))?"
_PLACE = "|".join(re.escape(b.place) for b in BACKGROUNDS)
_WATCH = rf"(?: (?P<watchers>{_LIST}) (?P<watch>watches|watch)\.)?"
_SENTENCES = {  # event -> the caption's pattern (``actor``: who acts; ``watchers``: the others, named)
    "alone": rf"(?P<actor>{_NAME}) is alone (?P<place>{_PLACE})\.",
    "enter": rf"(?P<actor>{_NAME}) enters (?:on the left|on the right|in the middle)\.{_WATCH}",
    "leave": rf"(?P<actor>{_NAME}) leaves and (?P<stayers>{_LIST}) (?P<stay>stays|stay) (?P<place>{_PLACE})\.",
    "walk": rf"(?P<actor>{_NAME}) walks to the (?:left|middle|right)\.{_WATCH}",
    "jump": rf"(?P<actor>{_NAME}) jumps high\.{_WATCH}",
    "wave": rf"(?P<actor>{_NAME}) waves hello\.{_WATCH}",
    "sit": rf"(?P<actor>{_NAME}) sits down to rest\.{_WATCH}",
    "meet": rf"(?P<actor>{_NAME}) and (?P<partner>{_NAME}) meet and say hello\.{_WATCH}",
}
_PATTERNS = {event: re.compile(pattern) for event, pattern in _SENTENCES.items()}


def _names(text: str | None) -> list[str]:
    return re.findall(_NAME, text) if text else []


@dataclass(frozen=True)
class CaptionReading:
    """What one caption says, read against the state before it."""

    valid: bool  # a sentence of the world's grammar (each name once, singular/plural agreeing)
    possible: bool  # its event can happen in that state
    on_screen: frozenset[str]  # who is on screen after it (the state, unchanged, when invalid)
    named: frozenset[str]  # the characters it names


def read_caption(caption: str, before: frozenset[str], place: str) -> CaptionReading:
    """Parse ``caption`` (one step of a story set at ``place``) given who was on screen ``before``."""
    caption = caption.strip()
    named = frozenset(_names(caption))
    for event, pattern in _PATTERNS.items():
        match = pattern.fullmatch(caption)
        if match is None:
            continue
        actor = match["actor"]
        partner = match.groupdict().get("partner")
        groups = match.groupdict()
        watchers, stayers = _names(groups.get("watchers")), _names(groups.get("stayers"))
        mentioned = [actor, *([partner] if partner else []), *watchers, *stayers]
        # one name takes "watches" / "stays", several "watch" / "stay"
        agree = all(groups.get(verb) is None or (len(names) == 1) == groups[verb].endswith("s")
                    for verb, names in (("watch", watchers), ("stay", stayers)))
        if len(set(mentioned)) != len(mentioned) or not agree:
            return CaptionReading(False, False, before, named)
        at_place = match.groupdict().get("place") in (None, place)
        if event == "alone":
            return CaptionReading(True, at_place, frozenset({actor}), named)
        if event == "enter":
            after = frozenset({actor, *watchers})
            possible = actor not in before and set(watchers) == set(before) and len(after) <= len(SLOTS)
            return CaptionReading(True, possible, after, named)
        if event == "leave":
            possible = at_place and actor in before and set(stayers) == set(before) - {actor}
            return CaptionReading(True, possible, frozenset(stayers), named)
        acting = {actor, *([partner] if partner else [])}
        after = frozenset({*acting, *watchers})
        return CaptionReading(True, acting <= before and after == before, after, named)
    return CaptionReading(False, False, before, named)


def f1(predicted: set[str], truth: set[str]) -> float:
    """Set F1; two empty sets agree (1.0)."""
    if not predicted and not truth:
        return 1.0
    hits = len(predicted & truth)
    return 2 * hits / (len(predicted) + len(truth))


def judge_story(captions: Sequence[str], labels: Sequence[dict], start_characters: Sequence[str],
                background: str) -> dict[str, list]:
    """Per step (0 = the start frame): background kept, coherence F1, and for steps >= 1 valid,
    possible and distinct. ``labels``: the evaluator's ``{"characters", "background"}`` per frame."""
    place = next(b.place for b in BACKGROUNDS if b.name == background)
    state = frozenset(start_characters)
    out: dict[str, list] = {"background_kept": [], "coherence": [], "valid": [], "possible": [], "distinct": []}
    for step, (caption, label) in enumerate(zip(captions, labels, strict=True)):
        if step > 0:
            reading = read_caption(caption, state, place)
            state = reading.on_screen
            out["valid"].append(reading.valid)
            out["possible"].append(reading.possible)
            out["distinct"].append(caption.strip() != captions[step - 1].strip())
            said = set(state) if reading.valid else set(reading.named)
        else:
            said = set(state)
        out["background_kept"].append(label["background"] == background)
        out["coherence"].append(f1(said, set(label["characters"])))
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(judged: Sequence[dict[str, list]]) -> dict[str, object]:
    """Over stories: per-step means of background kept and coherence, and the headline numbers
    (coherence averaged over steps >= 1, background kept at the last step, shares of valid,
    possible and distinct captions)."""
    steps = max(len(j["coherence"]) for j in judged)

    def per_step(key: str) -> list[float]:
        return [_mean([float(j[key][s]) for j in judged if s < len(j[key])]) for s in range(steps)]

    def share(key: str) -> float:
        return _mean([float(v) for j in judged for v in j[key]])

    coherence = per_step("coherence")
    background = per_step("background_kept")
    return {
        "stories": len(judged),
        "style_background_kept_last": background[-1],
        "coherence_f1": _mean(coherence[1:]),
        "valid_captions": share("valid"),
        "possible_events": share("possible"),
        "distinct_consecutive": share("distinct"),
        "per_step": {"background_kept": background, "coherence_f1": coherence},
    }


def distinct_share(stories: Sequence[Sequence[str]]) -> float:
    """How often a caption differs from the one before it (the real stories' reference for *distinct*)."""
    return _mean([float(a.strip() != b.strip()) for captions in stories for a, b in zip(captions[1:], captions[:-1])])
