"""PEFT module patterns (``rank_pattern`` / ``alpha_pattern`` keys), refused when they could backtrack
and matched in linear time.
"""

from __future__ import annotations

import functools

from .bounds import CheckpointError, _show

# ------------------------------------------------------------------------------------------------
# PEFT module patterns (rank_pattern / alpha_pattern keys)
# ------------------------------------------------------------------------------------------------
# PEFT matches a pattern key against a module name with ``re.match(rf"(.*\.)?({key})$", name)``.
# A backtracking pattern such as ``(a+)+$`` then hung the loader (183 s at 20 characters, issue 12
# F5), and PEFT itself runs the same regex when the CLI attaches the adapter. So a key must be a
# module path in a small regex subset: letters, digits, ``_``, ``-``, ``.``, ``\.``, ``\d``,
# ``\w``, simple ``[...]`` classes, ``(a|b)`` groups and ``^`` / ``$``; quantifiers (``? * + {m,n}``)
# only after a single character, no quantified group, at most MAX_PATTERN_REPEATS variable repeats
# and MAX_PATTERN_BRANCHES alternatives in all (``(a|.)`` x 40 or ``.?`` x 60 backtrack exponentially
# too). Such a pattern backtracks polynomially at worst in ``re`` (PEFT: < 10 ms on a 60-character
# module name), and is matched here without ``re``, in time linear in the module name.
MAX_PATTERN_LENGTH = 200
MAX_PATTERN_REPEATS = 2
MAX_PATTERN_BRANCHES = 16
_PATTERN_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_PATTERN_ESCAPES = {
    ".": lambda c: c == ".",
    "-": lambda c: c == "-",
    "_": lambda c: c == "_",
    "d": str.isdecimal,  # re's \d on str: Unicode category Nd
    "w": lambda c: c.isalnum() or c == "_",  # re's \w on str
}
PATTERN_RULE = (
    "use the module path (e.g. 'transformer_blocks.0.attn1.to_q' or 'attn2.to_k'), optionally with "
    "\\d+, .*, [0-9] or (to_q|to_k); quantifiers only after one character, at most "
    f"{MAX_PATTERN_REPEATS} of them, at most {MAX_PATTERN_BRANCHES} alternatives, {MAX_PATTERN_LENGTH} characters"
)


class _PatternRefused(Exception):
    """Internal: why a pattern is outside the supported subset."""


class _PatternParser:
    """A recursive-descent parser of the supported pattern subset (state: the position and the
    counts of variable repeats and alternatives so far)."""

    def __init__(self, pattern: str):
        self.pattern, self.n, self.pos, self.repeats, self.branches = pattern, len(pattern), 0, 0, 1

    def char_class(self):
        pattern, n = self.pattern, self.n
        members = []
        self.pos += 1
        while self.pos < n and pattern[self.pos] != "]":
            c = pattern[self.pos]
            if c == "\\" and self.pos + 1 < n and pattern[self.pos + 1] in _PATTERN_ESCAPES:
                members.append(_PATTERN_ESCAPES[pattern[self.pos + 1]])
                self.pos += 2
            elif c in _PATTERN_WORD or c == ".":
                if self.pos + 2 < n and pattern[self.pos + 1] == "-" and pattern[self.pos + 2] != "]":
                    low, high = c, pattern[self.pos + 2]
                    if not (low.isalnum() and high.isalnum() and low.isascii() and high.isascii() and low <= high):
                        raise _PatternRefused(f"the class range {low}-{high} is not a range of letters or digits")
                    members.append(lambda ch, low=low, high=high: low <= ch <= high)
                    self.pos += 3
                else:
                    members.append(lambda ch, c=c: ch == c)
                    self.pos += 1
            else:
                raise _PatternRefused(f"{c!r} inside [...] is not supported (letters, digits, _ - . ranges only)")
        if self.pos >= n or not members:
            raise _PatternRefused("a [...] class is empty or not closed")
        self.pos += 1
        return lambda ch: any(test(ch) for test in members)

    def atom(self):
        pattern, n = self.pattern, self.n
        c = pattern[self.pos]
        if c in _PATTERN_WORD:
            self.pos += 1
            return lambda ch, c=c: ch == c
        if c == ".":
            self.pos += 1
            return lambda ch: ch != "\n"
        if c == "\\" and self.pos + 1 < n and pattern[self.pos + 1] in _PATTERN_ESCAPES:
            self.pos += 2
            return _PATTERN_ESCAPES[pattern[self.pos - 1]]
        if c == "[":
            return self.char_class()
        raise _PatternRefused(f"{pattern[self.pos : self.pos + 2]!r} at position {self.pos} is not supported")

    def quantifier(self) -> tuple[int, int | None]:
        pattern, n = self.pattern, self.n
        if self.pos >= n or pattern[self.pos] not in "?*+{":
            return 1, 1
        c = pattern[self.pos]
        self.pos += 1
        if c == "{":
            close = pattern.find("}", self.pos)
            body = pattern[self.pos : close] if close > 0 else ""
            low_text, comma, high_text = body.partition(",")
            if not (
                low_text.isdigit()
                and len(low_text) <= 2
                and (not high_text or high_text.isdigit() and len(high_text) <= 2)
            ):
                raise _PatternRefused(f"the repeat {{{body}}} is not {{m}}, {{m,}} or {{m,n}} with m, n below 100")
            self.pos = close + 1
            low = int(low_text)
            high = (int(high_text) if high_text else None) if comma else low
            if high is not None and high < low:
                raise _PatternRefused(f"the repeat {{{body}}} has its bounds reversed")
        else:
            low, high = {"?": (0, 1), "*": (0, None), "+": (1, None)}[c]
        if high is None or high > low:
            self.repeats += 1
            if self.repeats > MAX_PATTERN_REPEATS:
                raise _PatternRefused(f"it has more than {MAX_PATTERN_REPEATS} variable repeats (? * + {{m,n}})")
        if self.pos < n and pattern[self.pos] in "?*+{":
            raise _PatternRefused(f"a quantifier follows a quantifier at position {self.pos}")
        return low, high

    def sequence(self, depth: int) -> list:
        pattern, n = self.pattern, self.n
        items = []
        while self.pos < n and pattern[self.pos] not in "|)":
            c = pattern[self.pos]
            if c == "(":
                if depth >= 3:
                    raise _PatternRefused("groups are nested more than 3 deep")
                self.pos += 1
                if pattern.startswith("?:", self.pos):
                    self.pos += 2
                elif pattern.startswith("?", self.pos):
                    raise _PatternRefused("(?...) constructs are not supported")
                alternatives = self.alternation(depth + 1)
                if self.pos >= n or pattern[self.pos] != ")":
                    raise _PatternRefused("a '(' is not closed")
                self.pos += 1
                items.append(("group", alternatives, 1, 1))
            elif c in "^$":
                self.pos += 1
                items.append(("anchor", c, 1, 1))
            else:
                test = self.atom()
                items.append(("char", test, *self.quantifier()))
                continue
            if self.pos < n and pattern[self.pos] in "?*+{":
                raise _PatternRefused(f"a quantifier after a group or anchor (position {self.pos}) can backtrack")
        return items

    def alternation(self, depth: int) -> list:
        pattern, n = self.pattern, self.n
        alternatives = [self.sequence(depth)]
        while self.pos < n and pattern[self.pos] == "|":
            self.pos += 1
            alternatives.append(self.sequence(depth))
        self.branches *= len(alternatives)
        if self.branches > MAX_PATTERN_BRANCHES:
            raise _PatternRefused(f"its (a|b) groups combine into more than {MAX_PATTERN_BRANCHES} alternatives")
        return alternatives


def _parse_pattern(pattern: str) -> list:
    """Parse a pattern of the supported subset into alternatives of items ``(kind, payload, lo, hi)``
    (``kind``: ``char`` with a predicate, ``group`` with alternatives, ``anchor`` ``^``/``$``;
    ``hi`` ``None`` means unbounded)."""
    if not isinstance(pattern, str):
        raise _PatternRefused(f"it is a {type(pattern).__name__}, not a string")
    if not pattern or len(pattern) > MAX_PATTERN_LENGTH:
        raise _PatternRefused(f"it has {len(pattern)} characters (1 to {MAX_PATTERN_LENGTH} allowed)")
    parser = _PatternParser(pattern)
    parsed = parser.alternation(0)
    if parser.pos != parser.n:
        raise _PatternRefused(f"an unmatched ')' at position {parser.pos}")
    return parsed


def _advance(items: list, text: str, positions: set[int]) -> set[int]:
    """The end positions reachable by matching ``items`` from any of ``positions`` (an NFA
    simulation: O(len(items) x len(text)), never backtracking)."""
    n = len(text)
    for kind, payload, low, high in items:
        if not positions:
            break
        if kind == "anchor":
            positions = {p for p in positions if p == (0 if payload == "^" else n)}
        elif kind == "group":
            positions = set().union(*(_advance(alt, text, positions) for alt in payload))
        else:
            for _ in range(low):
                positions = {p + 1 for p in positions if p < n and payload(text[p])}
            if high is None:  # closure in one left-to-right pass
                reach, active = set(), False
                for i in range(min(positions, default=n + 1), n + 1):
                    active = i in positions or (active and payload(text[i - 1]))
                    if active:
                        reach.add(i)
                positions = reach
            else:
                frontier, reach = positions, set(positions)
                for _ in range(high - low):
                    frontier = {p + 1 for p in frontier if p < n and payload(text[p])}
                    reach |= frontier
                positions = reach
    return positions


@functools.lru_cache(maxsize=256)
def _compiled_pattern(pattern: str) -> list:
    return _parse_pattern(pattern)


def pattern_problem(pattern) -> str | None:
    """Why ``pattern`` cannot be a ``rank_pattern`` / ``alpha_pattern`` key here, or None if it can."""
    try:
        _compiled_pattern(pattern) if isinstance(pattern, str) else _parse_pattern(pattern)
    except _PatternRefused as why:
        return str(why)
    return None


def module_matches(pattern: str, module: str) -> bool:
    r"""Whether PEFT's ``re.match(rf"(.*\.)?({pattern})$", module)`` matches, computed without ``re``.

    Raises:
        CheckpointError: ``pattern`` is outside the supported subset (see ``PATTERN_RULE``).
    """
    try:
        parsed = _compiled_pattern(pattern)
    except (_PatternRefused, TypeError) as why:
        raise CheckpointError(f"module pattern {_show(pattern)} is not supported ({why}): {PATTERN_RULE}") from None
    starts = {0} | {i + 1 for i, c in enumerate(module) if c == "."}
    return len(module) in _advance([("group", parsed, 1, 1)], module, starts)
