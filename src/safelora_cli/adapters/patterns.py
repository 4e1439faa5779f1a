"""Regular expressions from adapter configs, matched as PEFT matches them, within a time budget.

PEFT reads several ``adapter_config.json`` fields as regular expressions, some inside templates of
its own: ``target_modules`` and ``exclude_modules`` (when strings), the keys of ``rank_pattern`` and
``alpha_pattern``, ``layers_pattern`` and the names in ``modules_to_save``. It matches them with
Python's ``re``, which backtracks without limit: ``(a|aa)*$`` against a module name runs for minutes.
Here the same templates run on the ``regex`` package, which reads ``re``'s syntax alike and stops a
match at a timeout, and all that one config compiles and matches draws on one budget of
``BUDGET_S`` seconds: a pattern that would stall a run is refused instead.

Compiling cannot be stopped halfway, so a pattern is bounded before it is compiled. ``regex``
unrolls the minimum of every repetition count (``a{100000}`` costs tens of megabytes and
``(a{1000}){1000}`` hundreds), so a pattern's length times the product of its counts, summed over a
config, may not exceed ``MAX_UNITS``. Syntax that only the ``regex`` package reads (fuzzy matching
``{e<=1}``, ``\\p{…}``, ``(?V1)``, recursion, POSIX classes, its extra escapes) is refused too:
``re``, and so PEFT, would reject it or read it otherwise. (``re.compile`` itself is no check: it
spends milliseconds on each wide character class, seconds on a pattern of a few kilobytes.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence

import regex

from ..errors import AdapterError

BUDGET_S = 1.0
MAX_UNITS = 200_000  # pattern characters × repetition counts, over one config: ~50 MB and ~50 ms to compile

# PEFT's own templates: get_pattern_key (rank_pattern, alpha_pattern), check_target_module_exists
# (modules_to_save, layers_pattern, and its layer index when layers_pattern is not set).
KEY_TEMPLATE = r"(.*\.)?({})$"
SAVE_TEMPLATE = r"(^|.*\.){}($|\..*)"
LAYERS_TEMPLATE = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."
DEFAULT_LAYER = r".*?\.[^.]*\.(?P<idx>\d+)\."

_FIX = {
    "target_modules": "use a list of module names or a simpler regular expression",
    "exclude_modules": "use a list of module names or a simpler regular expression",
    "rank_pattern key": "use module names as keys or a simpler regular expression",
    "alpha_pattern key": "use module names as keys or a simpler regular expression",
    "layers_pattern": 'use the name of the module list that holds the layers, such as "layers"',
    "modules_to_save entry": "use module names",
    "layer index pattern": "the adapter's module names are not a model's",
}
# Escapes of ASCII letters that Python's re reads; the regex package reads more (\p, \X, \m, \G, \L...).
_RE_ESCAPES = frozenset("aAbBdDfnNrsStuUvwWxZ")
_CODE_ESCAPES = frozenset("xuUN")
_COUNT = re.compile(r"\{([0-9]*)(?:,([0-9]*))?\}")
# "(?" constructs both engines read alike: non-capturing, lookarounds, comments, atomic groups,
# P-named groups and references, conditionals on a group, and re's inline flags but x: in verbose
# mode the regex package skips spaces inside tokens ("( ?R)", "{1 000}") where re does not.
_GROUP = re.compile(r"\(\?(?:[:=!#>]|<[=!]|P[<=]|\((?!DEFINE\)|R)|[aiLmsu]*(?:-[aiLmsu]*)?[:)])")
_SHOWN = 60
_MAX_INDEX_DIGITS = 18


def _all_linear(target: str) -> bool:
    """PEFT's shorthand for every linear layer but the output one, in any case."""
    return target.lower() == "all-linear"


def show(text: str) -> str:
    """``text`` for a one-line message: escaped by ``repr`` and cut after ``_SHOWN`` characters."""
    if len(text) <= _SHOWN:
        return repr(text)
    return f"{text[:_SHOWN]!r}… ({len(text)} characters)"


def units(pattern: str) -> tuple[int, str | None]:
    """(length × the product of its repetition counts, None), or (0, what ``pattern`` uses that is refused).

    A scan of the text, not a parse: braces, ``(?`` and ``[:`` are judged wherever they stand (inside a
    character class too), which refuses a few odd patterns that both engines would read alike but never
    misses a repetition count the ``regex`` package would unroll.
    """
    product, i, n = 1, 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            letter = pattern[i + 1 : i + 2]
            if letter.isascii() and letter.isalpha() and letter not in _RE_ESCAPES:
                return 0, f"uses the escape \\{letter}"
            if letter in _CODE_ESCAPES and pattern.startswith("{", i + 2):
                # \x{71} is a character to the regex package and an error to re; braces stay counts only
                return 0, f"uses the escape \\{letter}{{…}}"
            i += 2
        elif c == "{":
            count = _COUNT.match(pattern, i)
            if count is None:
                return 0, "uses braces other than a repetition count {m,n}"
            low = count[1].lstrip("0")  # the minimum: what the regex package unrolls
            # capped, so that a count of many digits stays a small int and still fails the bound
            product = min(product * (max(1, int(low or 0)) if len(low) < 10 else MAX_UNITS), MAX_UNITS)
            i = count.end()
        elif c == "(" and pattern.startswith("?", i + 1):
            if _GROUP.match(pattern, i) is None:
                return 0, f"uses {pattern[i : i + 4]!r}…"
            i += 2
        elif c == "[" and pattern.startswith(":", i + 1):
            return 0, "uses a POSIX class [:…:]"
        else:
            i += 1
    return n * product, None


class Budget:
    """Seconds of regular-expression work left to one config: every compile and every match draws on it.

    Only the time spent compiling and matching counts, not the time between (reading files), so
    a slow disk cannot use the budget up and a pathological pattern cannot exceed it.
    """

    def __init__(self, seconds: float = BUDGET_S) -> None:
        self.seconds = seconds
        self.spent = 0.0

    def left(self) -> float:
        return self.seconds - self.spent


class ConfigPatterns:
    """The patterns of one adapter config, compiled once and matched as PEFT matches them.

    Every pattern is compiled (and bounded) here, so a config with a pattern that cannot be
    compiled, or compiled within bounds, is refused before any module is matched. ``source`` names
    the config file in messages. Each failure is an ``AdapterError`` of one line naming the file,
    the field and the fix.
    """

    def __init__(
        self,
        source: str,
        *,
        target_modules: Sequence[str] | str | None,
        exclude_modules: Sequence[str] | str | None,
        modules_to_save: Sequence[str],
        rank_pattern: Iterable[str],
        alpha_pattern: Iterable[str],
        layers_pattern: Sequence[str] | str | None,
        layers_to_transform: Sequence[int] | None,
    ) -> None:
        self.source = source
        self.budget = Budget()
        self._target = target_modules
        self._exclude = exclude_modules
        self._to_save = list(modules_to_save)
        self._rank_keys = list(rank_pattern)
        self._alpha_keys = list(alpha_pattern)
        self._layers = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
        self._layer_ids = layers_to_transform
        self._compiled: dict[str, regex.Pattern[str]] = {}
        self._units = 0
        todo: list[tuple[str, str, str]] = []
        if isinstance(target_modules, str) and not _all_linear(target_modules):
            todo.append(("target_modules", target_modules, "{}"))
        if isinstance(exclude_modules, str) and exclude_modules:
            todo.append(("exclude_modules", exclude_modules, "{}"))
        todo += [("modules_to_save entry", m, SAVE_TEMPLATE) for m in self._to_save]
        todo += [("rank_pattern key", k, KEY_TEMPLATE) for k in self._rank_keys]
        todo += [("alpha_pattern key", k, KEY_TEMPLATE) for k in self._alpha_keys]
        todo += [("layers_pattern", p, LAYERS_TEMPLATE) for p in self._layers]
        todo.append(("layer index pattern", DEFAULT_LAYER, "{}"))
        for what, pattern, template in todo:
            self._compile(what, pattern, template)

    # --- PEFT's decisions --------------------------------------------------------------------

    def targets(self, module: str) -> bool:
        """Whether PEFT puts a LoRA layer on ``module`` (its check_target_module_exists).

        ``exclude_modules`` and ``modules_to_save`` exclude; a string ``target_modules`` must match
        the whole name; a list names modules by suffix, and then ``layers_to_transform`` (if not
        empty) must hold the module's layer index. ``None`` and ``"all-linear"`` stand for the
        module list PEFT derives from the model, so they name every module.
        """
        ex = self._exclude
        if isinstance(ex, str):
            if ex and self._run("exclude_modules", ex, "{}", module, whole=True) is not None:
                return False
        elif ex and (module in ex or any(module.endswith(f".{name}") for name in ex)):
            return False
        if any(self._run("modules_to_save entry", m, SAVE_TEMPLATE, module) is not None for m in self._to_save):
            return False
        t = self._target
        if isinstance(t, str) and not _all_linear(t):
            return self._run("target_modules", t, "{}", module, whole=True) is not None
        if t is not None and not isinstance(t, str):
            if module in t:
                return True
            if not any(module.endswith(f".{name}") for name in t):
                return False
        if not self._layer_ids:
            return True
        return self.layer(module) in self._layer_ids

    def layer(self, module: str) -> int | None:
        """The layer index PEFT finds in ``module`` for ``layers_to_transform``, or None.

        With ``layers_pattern``: the number after the first of its names to match; without: the
        first number that follows a name and a dot, as in ``model.layers.3.`` or ``transformer.h.3.``.
        """
        found = None
        if self._layers:
            for pattern in self._layers:
                found = self._run("layers_pattern", pattern, LAYERS_TEMPLATE, module)
                if found is not None:
                    break
        else:
            found = self._run("layer index pattern", DEFAULT_LAYER, "{}", module)
        index = found.groupdict().get("idx") if found is not None else None
        # An index longer than any model's would only make int() slow, or raise past 4300 digits.
        if index is None or len(index) > _MAX_INDEX_DIGITS:
            return None
        return int(index)

    def rank_key(self, module: str) -> str:
        """The ``rank_pattern`` key PEFT uses for ``module`` (get_pattern_key): the first to match, else ``module``."""
        return self._pattern_key("rank_pattern key", self._rank_keys, module)

    def alpha_key(self, module: str) -> str:
        """The ``alpha_pattern`` key PEFT uses for ``module``, as ``rank_key`` finds it."""
        return self._pattern_key("alpha_pattern key", self._alpha_keys, module)

    def _pattern_key(self, what: str, keys: list[str], module: str) -> str:
        for key in keys:
            if self._run(what, key, KEY_TEMPLATE, module) is not None:
                return key
        return module

    # --- bounded compiling and matching -----------------------------------------------------

    def _compile(self, what: str, pattern: str, template: str) -> regex.Pattern[str]:
        full = template.format(pattern)
        compiled = self._compiled.get(full)
        if compiled is not None:
            return compiled
        size, refused = units(full)
        if refused is not None:
            raise self._error(
                what,
                pattern,
                f"{refused}, which Python's re (as PEFT uses it) and the regex package safelora matches with "
                "do not read alike",
                "write it without that",
            )
        self._units += size
        if self._units > MAX_UNITS:
            whole = "" if size > MAX_UNITS else " with the config's other patterns"
            raise self._error(
                what,
                pattern,
                f"is too large to compile safely{whole} (characters × repetition counts over {MAX_UNITS})",
                _FIX[what],
            )
        self._check_budget(what, pattern, None)
        start = time.monotonic()
        try:
            compiled = regex.compile(full, regex.VERSION0, cache_pattern=False)
        except regex.error as e:
            raise self._error(
                what, pattern, f"is not a valid regular expression ({e})", "restore it from your training run"
            ) from None
        except RecursionError:
            raise self._error(what, pattern, "is nested too deeply", _FIX[what]) from None
        finally:
            self.budget.spent += time.monotonic() - start
        self._compiled[full] = compiled
        return compiled

    def _run(
        self, what: str, pattern: str, template: str, module: str, *, whole: bool = False
    ) -> regex.Match[str] | None:
        """``pattern`` in ``template`` against ``module``, anchored at the start (to the end with ``whole``)."""
        compiled = self._compile(what, pattern, template)
        self._check_budget(what, pattern, module)
        start = time.monotonic()
        try:
            if whole:
                return compiled.fullmatch(module, timeout=self.budget.left())
            return compiled.match(module, timeout=self.budget.left())
        except TimeoutError:
            raise self._timeout(what, pattern, module) from None
        finally:
            self.budget.spent += time.monotonic() - start

    def _check_budget(self, what: str, pattern: str, module: str | None) -> None:
        if self.budget.left() <= 0:
            raise self._timeout(what, pattern, module)

    def _timeout(self, what: str, pattern: str, module: str | None) -> AdapterError:
        on = f" on module {show(module)}" if module is not None else ""
        return self._error(
            what,
            pattern,
            f"did not finish{on} within the {self.budget.seconds:g} s safelora allows for all of a config's patterns",
            _FIX[what],
        )

    def _error(self, what: str, pattern: str, problem: str, fix: str) -> AdapterError:
        return AdapterError(f"{self.source}: {what} {show(pattern)} {problem}; {fix}")


def saved(modules_to_save: Iterable[str], name: str) -> bool:
    """Whether ``name`` (a tensor name, PEFT's prefix removed) is a weight PEFT saved for ``modules_to_save``.

    PEFT wraps every module whose name ends with one of the entries (no dot needed: ``head`` wraps
    ``lm_head``) and saves each of its parameters under the module's name: so some proper prefix of
    ``name`` that ends before a dot ends with an entry.
    """
    return any(f"{entry}." in name for entry in modules_to_save)
