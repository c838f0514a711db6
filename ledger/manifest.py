"""Read a user's manifest (YAML or JSON) and turn it into a ``Plan``.

A manifest is written by hand, often edited in a hurry on a laptop, and a mistake in it
is only found hours later on a GPU box. So this module reads the whole file, collects
*every* problem it can find, and raises one ``ManifestError`` whose ``problems`` are
one line each, ``FILE:LINE:COL: where: what`` (the position is left out when it is not
known, e.g. for JSON). It never lets another exception escape: whatever goes wrong while
reading becomes a problem of that file.

Reading order: text -> plain data (+ the position of every value and key) -> checked
settings per level -> jobs expanded from grids -> ``JobSpec`` per job -> ``Plan``.

Settings are looked up job > template > phase > top level. ``env`` and the two retry
policies are merged key by key across levels; every other setting is taken from the
nearest level that sets it.

Variables: ``${name}`` refers to a grid value, an argument of the job (by key) or the
job's ``id``. ``${GPU}``, ``${RUN_ID}`` and ``${ATTEMPT}`` are left as they are (the
launcher fills them in); ``$${name}`` is a literal ``${name}`` (for a shell variable).
In commands every substituted value is shell-quoted; in ids, paths and env values it is
put in as it is. A value that is exactly ``${name}`` takes the variable's own type.
"""

import difflib
import itertools
import json
import math
import os
import re
import shlex
import string
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .errors import ManifestError, NotFoundError
from .plan import DEFAULT_THRESHOLD_MIB, JobSpec, Phase, Plan, RESERVED_VARS, RetryPolicy

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_JOBS = 100000
MAX_PROBLEMS_SHOWN = 50
MAX_NODES = 200000
MAX_DEPTH = 64
MAX_NAME_LENGTH = 100
LAUNCHERS = ("screen", "tmux", "process")
PRECONDITION_TYPES = ("checkpoint_exists",)
#: Names users reach for in on_complete/on_stuck, and the environment variable that has it.
HOOK_NAMES = {"JOB": "LEDGER_JOB", "JOB_ID": "LEDGER_JOB", "RUN": "LEDGER_RUN", "RUN_ID": "LEDGER_RUN",
              "REASON": "LEDGER_REASON", "HOOK": "LEDGER_HOOK", "GPU": None, "ATTEMPT": None}
EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")

#: Shown if a bug slips through; the property tests check it never appears.
INTERNAL_ERROR_TEXT = "could not be read because of a bug in ledger"

SETTING_KEYS = ("env", "timeout", "gpus_per_job", "retry", "oom_retry", "output_check", "preconditions")
JOB_KEYS = ("id", "cmd", "args") + SETTING_KEYS
PHASE_KEYS = ("name", "depends_on", "grid", "template", "jobs", "default_cmd", "cmd", "conda") + SETTING_KEYS
TOP_KEYS = (
    "project", "cwd", "conda", "conda_hook", "ssh", "default_cmd", "cmd", "gpus", "max_parallel",
    "gpu_free_threshold_mib", "launcher", "gpu_provider", "stale_grace", "on_complete", "on_stuck",
    "grid", "template", "jobs", "phases",
) + SETTING_KEYS
RETRY_KEYS = ("max_attempts", "delay", "exit_codes")
PRECONDITION_KEYS = ("type", "path")
#: Misspellings difflib ranks badly (it prefers 'conda' for 'command').
KEY_HINTS = {"command": "cmd", "comand": "cmd", "commands": "cmd", "default_command": "default_cmd"}

DEFAULT_OOM_RETRY = JobSpec.__dataclass_fields__["oom_retry"].default
DEFAULT_RETRY = RetryPolicy()
_JOBSPEC_HAS_CONDA = "conda" in JobSpec.__dataclass_fields__

_SAFE_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_-.+")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_OPTION_NAME = re.compile(r"-{0,2}[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_PATH_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_REFERENCE = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WHOLE_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")
_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)\Z")
_DURATION = re.compile(r"(?:\s*(?:\d+(?:\.\d*)?|\.\d+)\s*[smhdSMHD])+\s*\Z")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhdSMHD])")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

# ``${var}`` inside a YAML flow collection ({...} or [...]) is not valid YAML: the braces
# end the plain scalar. Users write it anyway, so before parsing each brace of a ``${...}``
# is swapped for a private-use character (one character for one, so every line and column
# stays where it was) and swapped back in every string read.
_OPEN_MARK, _CLOSE_MARK = "\U0010fffc", "\U0010fffd"
_BRACED = re.compile(r"\$\{([^{}\r\n]*)\}")


# ----------------------------------------------------------------------------- public API


def load_manifest(path):
    """Read the manifest file at ``path`` into a ``Plan`` (``ManifestError`` if it is wrong)."""
    source = _source_name(path)
    data = _read_file_bytes(path, source)
    return parse_manifest(data, source=source)


def parse_manifest(text, source="manifest.yaml"):
    """Turn manifest text (YAML or JSON; str or bytes) into a ``Plan``."""
    source = _one_line(str(source))
    try:
        if isinstance(text, (bytes, bytearray)):
            text = _decode(bytes(text), source)
        return _ManifestReader(source).read(text)
    except ManifestError:
        raise
    except RecursionError:
        raise _single_problem(source, "the manifest is nested too deeply to read")
    except Exception as exc:  # a bug, but the user still gets one line naming the file
        raise _single_problem(source, "{} ({}: {})".format(INTERNAL_ERROR_TEXT, type(exc).__name__, exc))


def plan_table(plan):
    """Rows ``(id, phase, command, gpus_per_job, output_check)`` for ``ledger plan``."""
    return [(job.id, job.phase, job.cmd, job.gpus_per_job, job.output_check or "") for job in plan.jobs]


def write_plan(plan, folder):
    """Write the normalized plan to ``<folder>/manifest.json`` (0600, atomically); return its path."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "manifest.json")
    temporary = path + ".tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(plan.to_json(indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return path


def new_plan_folder(root, stamp):
    """``<root>/<stamp>``, or ``<stamp>-2``, ``-3``... when a plan was already saved there in
    the same second: a saved plan is never overwritten by another."""
    folder = os.path.join(root, stamp)
    n = 1
    while os.path.exists(os.path.join(folder, "manifest.json")):
        n += 1
        folder = os.path.join(root, "%s-%d" % (stamp, n))
    return folder


def list_examples():
    """Names of the built-in example manifests (``ledger plan --example NAME``)."""
    if not os.path.isdir(EXAMPLES_DIR):
        return []
    return sorted(name[:-5] for name in os.listdir(EXAMPLES_DIR) if name.endswith(".yaml"))


def example_path(name="sim_sweep"):
    """Path of a built-in example manifest."""
    path = os.path.join(EXAMPLES_DIR, "{}.yaml".format(name))
    if not os.path.isfile(path):
        raise NotFoundError("no example manifest named {!r}; examples: {}".format(
            name, ", ".join(list_examples()) or "none"))
    return path


# ----------------------------------------------------------------------------- problems


def _one_line(text):
    """Join any kind of line break into spaces: a problem is always one line."""
    return " ".join(str(text).splitlines())


def _single_problem(source, message):
    line = _one_line("{}: {}".format(source, message))
    return ManifestError(line, [line])


class _Problems:
    """Collects problems with their positions; formats them as ``FILE:LINE:COL: where: what``."""

    def __init__(self, source):
        self.source = source
        self.value_marks = {}
        self.key_marks = {}
        self._entries = []
        self._seen = set()

    def add(self, path, message, where=None, at_key=False, mark_path=None):
        """Record a problem about the value at ``path`` (or its key); repeated lines are kept once."""
        where = _format_path(path) if where is None else where
        mark = self._mark(path if mark_path is None else mark_path, at_key)
        self.add_at(mark, "{}: {}".format(where, message) if where else message)

    def add_at(self, mark, text):
        position = "{}:{}:{}".format(self.source, mark[0], mark[1]) if mark else self.source
        line = _one_line("{}: {}".format(position, text))
        if line in self._seen:
            return
        self._seen.add(line)
        self._entries.append((mark or (0, 0), len(self._entries), line))

    def _mark(self, path, at_key):
        if at_key and path in self.key_marks:
            return self.key_marks[path]
        path = tuple(path)
        while True:
            if path in self.value_marks:
                return self.value_marks[path]
            if not path:
                return None
            path = path[:-1]

    def __bool__(self):
        return bool(self._entries)

    def error(self):
        lines = [entry[2] for entry in sorted(self._entries)]
        count = len(lines)
        if count > MAX_PROBLEMS_SHOWN:
            hidden = count - MAX_PROBLEMS_SHOWN
            lines = lines[:MAX_PROBLEMS_SHOWN] + ["{}: ... and {} more problem{}".format(
                self.source, hidden, "" if hidden == 1 else "s")]
        message = lines[0] if count == 1 else "{}: {} problems".format(self.source, count)
        return ManifestError(message, lines)


def _format_path(path):
    """('phases', 1, 'template') -> 'phases[1].template'."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += "[{}]".format(part)
        elif _PATH_KEY.match(part):
            text += ("." if text else "") + part
        else:
            text += "[{}]".format(_show(part))
    return text


def _show(value, limit=60):
    """A short one-line repr of a user value for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def _describe(value):
    """'a string '0,1'', 'an integer 5', 'a list', ... for 'expected X, got Y' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean {}".format("true" if value else "false")
    if isinstance(value, int):
        return "an integer {}".format(_render(value))
    if isinstance(value, float):
        return "a number {}".format(_render(value))
    if isinstance(value, str):
        return "a string {}".format(_show(value)) if value else "an empty string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a {}".format(type(value).__name__)


def _suggestion(word, choices):
    """' (did you mean 'cmd'?)' or ''."""
    hint = KEY_HINTS.get(str(word).lower())
    if hint in choices:
        return " (did you mean {!r}?)".format(hint)
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return " (did you mean {!r}?)".format(close[0]) if close else ""


# ----------------------------------------------------------------------------- values


class _SourceInt(int):
    """An integer that remembers how it was written (``010``, ``1_000``) for substitution."""

    def __new__(cls, value, text):
        self = super().__new__(cls, value)
        self.text = text
        return self


class _SourceFloat(float):
    """A number that remembers how it was written (``0.10``, ``1.0e-4``) for substitution."""

    def __new__(cls, value, text):
        self = super().__new__(cls, value)
        self.text = text
        return self


def _render(value):
    """A scalar as the text that goes into a command, id or path: what the user wrote."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = getattr(value, "text", None)
    if isinstance(text, str):
        return text
    return str(value)


def _render_any(value):
    """A scalar or a list of scalars as text (a list joins with spaces)."""
    return _render(value) if _is_scalar(value) else " ".join(_render(v) for v in value)


def _short(text, limit=40):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_scalar(value):
    return value is None or isinstance(value, (str, int, float, bool))


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_duration(value):
    """Seconds from 3600, '90m', '2h', '1h30m', '30s', '45'; None if it is not a duration."""
    if _is_number(value):
        return float(value) if math.isfinite(float(value)) else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if _NUMBER.match(text):
        return float(text) if math.isfinite(float(text)) else None
    if _DURATION.match(text):
        seconds = sum(float(number) * _DURATION_UNITS[unit.lower()] for number, unit in _DURATION_PART.findall(text))
        return seconds if math.isfinite(seconds) else None
    return None


def _unsafe_name_reason(name, what):
    """Why ``name`` cannot be a file and screen name, or None if it can."""
    if name == "":
        return "{} is empty".format(what)
    if len(name) > MAX_NAME_LENGTH:
        return "{} {} is {} characters long (at most {})".format(what, _show(name), len(name), MAX_NAME_LENGTH)
    if name[0] in ".-":
        return "{} {} must not start with {!r}".format(what, _show(name), name[0])
    for position, char in enumerate(name, 1):
        if char not in _SAFE_NAME_CHARS:
            return ("{} {} is not usable as a file and screen name: character {!r} at position {} is not "
                    "allowed (use ASCII letters, digits, _ - . +)").format(what, _show(name), char, position)
    return None


# ----------------------------------------------------------------------------- reading text


def _source_name(path):
    try:
        return _one_line(os.fsdecode(os.fspath(path)))
    except TypeError:
        return _one_line(str(path))


def _read_file_bytes(path, source):
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise _single_problem(source, "no such file")
    except IsADirectoryError:
        raise _single_problem(source, "is a directory, not a manifest file")
    except PermissionError:
        raise _single_problem(source, "cannot be read: permission denied")
    except (OSError, TypeError, ValueError) as exc:
        raise _single_problem(source, "cannot be read: {}".format(getattr(exc, "strerror", None) or exc))
    if len(data) > MAX_FILE_BYTES:
        raise _single_problem(source, "is larger than {} MiB; is it really a manifest?".format(MAX_FILE_BYTES >> 20))
    return data


def _decode(data, source):
    """UTF-8 text (a leading BOM is dropped), or a ManifestError naming the first bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _single_problem(source, "not UTF-8 text at byte {}".format(exc.start))
    nul = data.find(b"\x00")
    if nul >= 0:
        raise _single_problem(source, "not a text file (NUL byte at byte {})".format(nul))
    return text


def _line_col(text, position):
    line = text.count("\n", 0, position) + 1
    return line, position - (text.rfind("\n", 0, position) + 1) + 1


def _protect_braces(text):
    return _BRACED.sub(lambda m: "$" + _OPEN_MARK + m.group(1) + _CLOSE_MARK, text)


def _unprotect(text):
    return text.replace(_OPEN_MARK, "{").replace(_CLOSE_MARK, "}")


def _looks_like_json(text, source):
    return source.lower().endswith(".json") or text.lstrip().startswith(("{", "["))


class _TooLarge(Exception):
    """The document expands (through aliases) to more values than a manifest ever has."""


class _NodeReader:
    """Turns a composed YAML node tree into plain data, noting every value's and key's position.

    Going through nodes (not ``yaml.safe_load``) gives positions for every problem, catches
    duplicate keys (which PyYAML silently drops) and keeps numbers as they were written.
    """

    def __init__(self, loader, problems):
        self.loader = loader
        self.problems = problems
        self.count = 0
        self.active = set()
        self.inherited = {}  # id(mapping node) -> number of pairs merged in through '<<'

    def read(self, node, path=()):
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge()
        self.problems.value_marks[path] = _mark(node.start_mark)
        if len(path) > MAX_DEPTH:
            self.problems.add(path[:1], "nested more than {} levels deep".format(MAX_DEPTH), mark_path=path)
            return None
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.active:
            self.problems.add(path, "an alias refers to the value that contains it")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.read(item, path + (index,)) for index, item in enumerate(node.value)]
            return self.mapping(node, path)
        finally:
            self.active.discard(id(node))

    def scalar(self, node, path):
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            self.problems.add(path, "YAML error: {}".format(_unprotect(exc.problem or exc.context or "")))
            return None
        except Exception:
            self.problems.add(path, "cannot read {} as {}".format(_show(_unprotect(node.value)), node.tag))
            return None
        if isinstance(value, str):
            return _unprotect(_join_folded_lines(value) if node.style == ">" else value)
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int):
            return _SourceInt(value, node.value) if node.style is None else int(value)
        if isinstance(value, float):
            return _SourceFloat(value, node.value) if node.style is None else float(value)
        return _unprotect(str(node.value))  # dates, binary: the text as written

    def mapping(self, node, path):
        try:
            inherited = self.flatten(node)
        except yaml.MarkedYAMLError as exc:
            self.problems.add_at(_mark(exc.problem_mark or node.start_mark),
                                 "{}: YAML error: {}".format(_format_path(path), exc.problem))
            return {}
        except Exception:
            self.problems.add(path, "a merge key ('<<') must refer to a mapping")
            return {}
        result = {}
        first_line = {}
        for position, (key_node, value_node) in enumerate(node.value):
            key = self.key(key_node, path)
            if key is None:
                continue
            child = path + (key,)
            if key in first_line and position >= inherited:
                self.problems.key_marks[child] = _mark(key_node.start_mark)
                self.problems.add(child, "duplicate key {} (first at line {})".format(_show(key), first_line[key]),
                                  where=_format_path(path), at_key=True)
                continue
            self.problems.key_marks[child] = _mark(key_node.start_mark)
            if position >= inherited:
                first_line[key] = key_node.start_mark.line + 1
            result[key] = self.read(value_node, child)
        return result

    def flatten(self, node):
        """Resolve ``<<`` merge keys; return how many leading pairs came from them (later ones win)."""
        if id(node) not in self.inherited:
            own = sum(1 for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge")
            self.loader.flatten_mapping(node)
            self.inherited[id(node)] = len(node.value) - own
        return self.inherited[id(node)]

    def key(self, key_node, path):
        if not isinstance(key_node, yaml.ScalarNode):
            self.problems.add_at(_mark(key_node.start_mark),
                                 "{}a key must be text, not a list or mapping".format(_where_prefix(path)))
            return None
        key = self.scalar(key_node, path)
        if not isinstance(key, str):
            self.problems.add_at(_mark(key_node.start_mark), "{}key {} must be text (put it in quotes)".format(
                _where_prefix(path), _render(key) if _is_scalar(key) else _show(key)))
            return None
        return key


def _join_folded_lines(text):
    """A folded (``>``) scalar is meant as one line; YAML keeps newlines around indented lines."""
    return re.sub(r"[ \t]*\n[ \t\n]*", " ", text).strip()


def _where_prefix(path):
    return _format_path(path) + ": " if path else ""


def _mark(mark):
    return (mark.line + 1, mark.column + 1)


def _read_yaml(text, problems):
    loader = None
    try:
        loader = yaml.SafeLoader(_protect_braces(text))
        node = loader.get_single_node()
        if node is None:
            return None
        return _NodeReader(loader, problems).read(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = _unprotect(exc.problem or "")
        if exc.context:
            message += " ({})".format(_unprotect(exc.context))
        problems.add_at(_mark(mark) if mark else None, "YAML syntax error: {}".format(message.strip()))
    except yaml.reader.ReaderError as exc:
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        problems.add_at(_line_col(text, exc.position), "not text: character {!r} is not allowed".format(char))
    except yaml.YAMLError as exc:
        problems.add_at(None, "YAML error: {}".format(_unprotect(str(exc))))
    except _TooLarge:
        problems.add_at(None, "the document expands to more than {} values (aliases?)".format(MAX_NODES))
    finally:
        if loader is not None:
            loader.dispose()
    return None


def _read_json(text, problems):
    def unique_pairs(pairs):
        result = {}
        for key, value in pairs:
            if key in result:
                problems.add_at(None, "duplicate key {}".format(_show(key)))
            result[key] = value
        return result

    try:
        data = json.loads(text, object_pairs_hook=unique_pairs, parse_float=lambda s: _SourceFloat(float(s), s))
    except json.JSONDecodeError as exc:
        problems.add_at((exc.lineno, exc.colno), "JSON syntax error: {}".format(exc.msg))
        return None, False
    return data, True


# ----------------------------------------------------------------------------- levels


@dataclass
class _Level:
    """One place settings can come from: a job, a template, a phase, or the top level."""

    kind: str
    mapping: Dict[str, Any]
    path: Tuple[Any, ...]

    def command_key(self):
        """Which key holds this level's command ('cmd', or 'default_cmd' on phases/top)."""
        if self.kind in ("job", "template"):
            return "cmd" if "cmd" in self.mapping else None
        for key in ("default_cmd", "cmd"):
            if key in self.mapping:
                return key
        return None


@dataclass
class _PhaseSource:
    name: str
    index: Optional[int]
    path: Tuple[Any, ...]
    mapping: Dict[str, Any]
    depends_on: List[str] = field(default_factory=list)


@dataclass
class _Draft:
    """A job before resolution: where it came from and the levels it reads settings from."""

    phase: str
    origin: str
    levels: List[_Level]
    grid: Dict[str, Any]
    index: int
    from_template: bool
    has_phases: bool

    def label(self, job_id=None):
        if self.from_template:
            values = ", ".join("{}={}".format(k, _short(_render_any(v))) for k, v in self.grid.items())
            return "{} ({})".format(self.origin, values) if values else self.origin
        return "{} ({})".format(self.origin, job_id) if job_id else self.origin


class _ManifestReader:
    """Reads one manifest; every check records a problem and carries on."""

    def __init__(self, source):
        self.source = source
        self.problems = _Problems(source)
        self.gpus = None
        self.top_conda = None
        self.reported_undefined = set()
        self.misspelled_command = set()  # paths whose unknown key was probably meant as the command

    # -- whole file

    def read(self, text):
        text = text[1:] if text.startswith("\ufeff") else text
        if "\x00" in text:
            raise _single_problem(self.source, "not a text file (NUL character at line {}, column {})".format(
                *_line_col(text, text.index("\x00"))))
        if not text.strip():
            raise _single_problem(self.source, "the manifest is empty")
        data = self._read_data(text)
        if self.problems:
            raise self.problems.error()
        plan = self._plan(data)
        if self.problems:
            raise self.problems.error()
        return plan

    def _read_data(self, text):
        if _looks_like_json(text, self.source):
            attempt = _Problems(self.source)
            data, parsed = _read_json(text, attempt)
            if parsed or self.source.lower().endswith(".json"):
                self.problems = attempt
                return data
        return _read_yaml(text, self.problems)

    def _plan(self, data):
        if data is None:
            self.problems.add_at(None, "the manifest is empty")
            return None
        if not isinstance(data, dict):
            self.problems.add((), "the top level must be a mapping of settings (project:, cwd:, jobs: ...), "
                                  "got {}".format(_describe(data)))
            return None
        self._check_keys(data, (), TOP_KEYS)
        self._check_command_keys(data, ())
        settings = self._top_settings(data)
        phases = self._phase_sources(data)
        ordered = self._phase_order(phases)
        top = _Level("top", data, ())
        drafts = []
        for phase in ordered:
            drafts.extend(self._drafts(phase, top, has_phases="phases" in data))
        if not drafts and not self.problems:
            self.problems.add((), "no jobs: add jobs:, or grid: with template:")
        jobs = self._jobs(drafts)
        if self.problems:
            return None
        return Plan(jobs=tuple(jobs), phases=tuple(Phase(p.name, tuple(p.depends_on)) for p in ordered),
                    **settings)

    # -- generic checks

    def _check_keys(self, mapping, path, known):
        """Every key must be known (``x-`` keys are the user's own, e.g. for YAML anchors)."""
        for key in mapping:
            if key in known or key.startswith("x-"):
                continue
            suggestion = _suggestion(key, known)
            if "'cmd'" in suggestion or "'default_cmd'" in suggestion:
                self.misspelled_command.add(path)
            self.problems.add(path + (key,), "unknown key {}{}".format(_show(key), suggestion),
                              where=_format_path(path), at_key=True)

    def _check_command_keys(self, mapping, path):
        if "cmd" in mapping and "default_cmd" in mapping:
            self.problems.add(path + ("cmd",), "both cmd and default_cmd are set; keep one",
                              where=_format_path(path), at_key=True)

    def _mapping_at(self, value, path, what):
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problems.add(path, "expected {}, got {}".format(what, _describe(value)))
            return {}
        return value

    def _text(self, data, key, path=(), required=False, single_token=False):
        """An optional (or required) one-line text setting."""
        here = path + (key,)
        if key not in data or data[key] is None:
            if required:
                self.problems.add(path, "missing required key {!r}".format(key))
            return None
        value = data[key]
        if not isinstance(value, str):
            self.problems.add(here, "expected text, got {}".format(_describe(value)))
            return None
        value = value.strip()
        if not value:
            self.problems.add(here, "is empty")
            return None
        if "\n" in value or "\r" in value:
            self.problems.add(here, "must be one line")
            return None
        if single_token and (any(c.isspace() for c in value) or value.startswith("-")):
            self.problems.add(here, "{} must be one word not starting with '-'".format(_show(value)))
            return None
        return value

    # -- top level

    def _top_settings(self, data):
        project = data.get("project")
        if _is_int(project):
            project = _render(project)
        project = self._text({"project": project} if "project" in data else {}, "project", required=True)
        if project is not None:
            reason = _unsafe_name_reason(project, "project name")
            if reason:
                self.problems.add(("project",), reason)
        cwd = self._text(data, "cwd", required=True)
        conda = self._text(data, "conda", single_token=True)
        self.top_conda = conda
        hook = self._text(data, "conda_hook")
        self.gpus = self._gpus(data)
        settings = dict(
            project=project or "", cwd=cwd or "", conda=conda,
            conda_hook=hook,  # a bare path or the user's own hook command; launchers.resolve_conda_hook reads it
            ssh=self._text(data, "ssh", single_token=True),
            gpus=self.gpus,
            max_parallel=self._count(data, "max_parallel", minimum=1, default=None),
            gpu_free_threshold_mib=self._count(data, "gpu_free_threshold_mib", minimum=0,
                                               default=DEFAULT_THRESHOLD_MIB),
            launcher=self._launcher(data),
            gpu_provider=self._text(data, "gpu_provider", single_token=True),
            stale_grace=self._stale_grace(data),
            on_complete=self._hook(data, "on_complete"),
            on_stuck=self._hook(data, "on_stuck"),
        )
        return settings

    def _hook(self, data, key):
        """An alert hook is the user's shell text, run by bash with LEDGER_RUN, LEDGER_JOB,
        LEDGER_REASON and LEDGER_HOOK in its environment. ``${JOB}`` and the like would
        silently expand to nothing there: name the variable that holds it."""
        text = self._text(data, key)
        for name in re.findall(r"\$\{(\w+)\}", text or ""):
            if name in HOOK_NAMES:
                use = "use $%s" % HOOK_NAMES[name] if HOOK_NAMES[name] else "a hook has no GPU or attempt"
                self.problems.add((key,), "${%s} is empty in a hook; %s (hooks get LEDGER_RUN, "
                                  "LEDGER_JOB, LEDGER_REASON, LEDGER_HOOK)" % (name, use))
        return text

    def _gpus(self, data):
        value = data.get("gpus")
        if value is None:
            return None
        path = ("gpus",)
        if not isinstance(value, list):
            self.problems.add(path, "expected a list of GPU indices like [0, 1], got {}".format(_describe(value)))
            return None
        if not value:
            self.problems.add(path, "empty list: name at least one GPU index, or leave gpus out to use all")
            return None
        good = True
        for index, item in enumerate(value):
            if not _is_int(item) or item < 0:
                self.problems.add(path + (index,), "expected a GPU index (0, 1, ...), got {}".format(_describe(item)))
                good = False
        if not good:
            return None
        duplicates = sorted({int(g) for g in value if value.count(g) > 1})
        if duplicates:
            self.problems.add(path, "GPU {} is listed more than once".format(", ".join(map(str, duplicates))))
            return None
        return tuple(int(g) for g in value)

    def _count(self, data, key, minimum, default):
        value = data.get(key)
        if value is None:
            return default
        if not _is_int(value):
            self.problems.add((key,), "expected a whole number, got {}".format(_describe(value)))
            return default
        if value < minimum:
            self.problems.add((key,), "must be at least {}, got {}".format(minimum, int(value)))
            return default
        return int(value)

    def _launcher(self, data):
        value = data.get("launcher")
        if value is None:
            return "screen"
        if value not in LAUNCHERS:
            self.problems.add(("launcher",), "expected one of {}, got {}{}".format(
                ", ".join(LAUNCHERS), _describe(value), _suggestion(value, LAUNCHERS) if isinstance(value, str) else ""))
            return "screen"
        return value

    def _stale_grace(self, data):
        value = data.get("stale_grace")
        if value is None:
            return 60.0
        seconds = _parse_duration(value)
        if seconds is None or seconds < 0:
            self.problems.add(("stale_grace",), "expected seconds or a duration like '30s', '5m', got {}".format(
                _describe(value)))
            return 60.0
        return seconds

    # -- phases

    def _phase_sources(self, data):
        if "phases" not in data:
            return [_PhaseSource("main", None, (), data)]
        for key in ("grid", "template", "jobs"):
            if key in data:
                self.problems.add((key,), "cannot be used together with phases; move it into a phase")
        raw = data["phases"]
        if not isinstance(raw, list):
            self.problems.add(("phases",), "expected a list of phases, got {}".format(_describe(raw)))
            return []
        if not raw:
            self.problems.add(("phases",), "empty list: add at least one phase")
        phases = []
        for index, item in enumerate(raw):
            path = ("phases", index)
            if not isinstance(item, dict):
                self.problems.add(path, "expected a phase (a mapping with name:), got {}".format(_describe(item)))
                continue
            self._check_keys(item, path, PHASE_KEYS)
            self._check_command_keys(item, path)
            name = self._text(item, "name", path, required=True)
            if name is None:
                continue
            reason = _unsafe_name_reason(name, "phase name")
            if reason:
                self.problems.add(path + ("name",), reason)
            if any(p.name == name for p in phases):
                self.problems.add(path + ("name",), "a phase named {!r} is already defined".format(name))
                continue
            phases.append(_PhaseSource(name, index, path, item))
        names = [p.name for p in phases]
        for phase in phases:
            phase.depends_on = self._depends_on(phase, names)
        return phases

    def _depends_on(self, phase, names):
        value = phase.mapping.get("depends_on")
        path = phase.path + ("depends_on",)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            self.problems.add(path, "expected a phase name or a list of phase names, got {}".format(_describe(value)))
            return []
        result = []
        for item in items:
            if item not in names:
                self.problems.add(path, "no phase named {}{}".format(_show(item), _suggestion(item, names)))
            elif item not in result:
                result.append(item)
        return result

    def _phase_order(self, phases):
        """Phases in dependency order, keeping the written order where dependencies allow."""
        placed, ordered, remaining = set(), [], list(phases)
        while remaining:
            ready = next((p for p in remaining if all(d in placed for d in p.depends_on)), None)
            if ready is None:
                self.problems.add(("phases",), "dependency cycle: {}".format(" -> ".join(_find_cycle(remaining))))
                return ordered + remaining
            remaining.remove(ready)
            placed.add(ready.name)
            ordered.append(ready)
        return ordered

    # -- expansion

    def _drafts(self, phase, top, has_phases):
        """The phase's jobs before resolution: one per grid combination, then its listed jobs."""
        mapping, path = phase.mapping, phase.path
        levels = [top] if phase.index is None else [_Level("phase", mapping, path), top]
        template_level = self._template_level(mapping, path)
        prefix = _format_path(path) + "." if path else ""
        combos = self._grid_combinations(mapping.get("grid"), path + ("grid",)) if "grid" in mapping else None
        drafts = []
        if combos is None and template_level is not None and "jobs" not in mapping:
            combos = [{}]  # a template alone is one job
        if combos:
            generator = template_level or _Level("template", {}, path + ("grid",))
            origin = prefix + ("template" if template_level else "grid")
            for index, combo in enumerate(combos):
                drafts.append(_Draft(phase.name, origin, [generator] + levels, combo, index, True, has_phases))
        base = ([template_level] if template_level else []) + levels
        for index, job, job_path in self._job_items(mapping.get("jobs"), path + ("jobs",)):
            drafts.append(_Draft(phase.name, _format_path(job_path), [_Level("job", job, job_path)] + base,
                                 {}, index, False, has_phases))
        if phase.index is not None and not drafts and combos is None and mapping.get("template") is None \
                and mapping.get("jobs") in (None, []):
            self.problems.add(path, "phase {!r} has no jobs: add jobs:, or grid: with template:".format(phase.name))
        return drafts

    def _template_level(self, mapping, path):
        if mapping.get("template") is None:
            return None
        template_path = path + ("template",)
        template = mapping["template"]
        if not isinstance(template, dict):
            self.problems.add(template_path, "expected a mapping of job settings (id:, cmd:, args: ...), "
                                             "got {}".format(_describe(template)))
            return None
        self._check_keys(template, template_path, JOB_KEYS)
        return _Level("template", template, template_path)

    def _job_items(self, value, path):
        if value is None:
            return []
        if not isinstance(value, list):
            self.problems.add(path, "expected a list of jobs, got {}".format(_describe(value)))
            return []
        items = []
        for index, job in enumerate(value):
            job_path = path + (index,)
            if not isinstance(job, dict):
                self.problems.add(job_path, "expected a job (a mapping with id:, args: ...), got {}".format(
                    _describe(job)))
                continue
            self._check_keys(job, job_path, JOB_KEYS)
            items.append((index, job, job_path))
        return items

    def _grid_combinations(self, grid, path):
        """Every combination of grid values, last key fastest; None means 'no grid'."""
        if grid is None:
            self.problems.add(path, "empty grid: give each variable a list of values")
            return []
        if not isinstance(grid, dict):
            self.problems.add(path, "expected a mapping of variable: [values], got {}".format(_describe(grid)))
            return []
        names, lists, total = [], [], 1
        for name, values in grid.items():
            here = path + (name,)
            if not _VAR_NAME.match(name) or name in RESERVED_VARS or name == "id":
                reason = "is reserved" if name in RESERVED_VARS or name == "id" else \
                    "is not a variable name (letters, digits, _; not starting with a digit)"
                self.problems.add(here, "{} {}".format(_show(name), reason), at_key=True)
                continue
            if not isinstance(values, list):
                self.problems.add(here, "expected a list of values like [1, 2], got {}".format(_describe(values)))
                continue
            if not values:
                self.problems.add(here, "empty list: the grid would have no jobs")
                continue
            for index, item in enumerate(values):
                if not (_is_scalar(item) or (isinstance(item, list) and all(_is_scalar(i) for i in item))):
                    self.problems.add(here + (index,), "expected a value (text or a number), got {}".format(
                        _describe(item)))
            names.append(name)
            lists.append(values)
            total *= len(values)
        if total > MAX_JOBS:
            self.problems.add(path, "{} combinations; at most {} jobs".format(total, MAX_JOBS))
            return []
        return [dict(zip(names, combo)) for combo in itertools.product(*lists)]

    # -- jobs

    def _jobs(self, drafts):
        jobs, origins = [], {}
        for draft in drafts:
            spec = _JobBuilder(self, draft).build()
            if spec is None:
                continue
            if spec.id in origins:
                self.problems.add(draft.levels[0].path, "duplicate job id {!r} (also from {})".format(
                    spec.id, origins[spec.id]), where=self._dup_label(draft))
                continue
            origins[spec.id] = self._dup_label(draft)
            jobs.append(spec)
        return jobs

    @staticmethod
    def _dup_label(draft):
        return draft.label() if draft.from_template else draft.origin


def _find_cycle(phases):
    """Names along one dependency cycle among phases that could not be ordered."""
    by_name = {p.name: p for p in phases}
    current, seen = phases[0].name, []
    while current not in seen:
        seen.append(current)
        current = next(d for d in by_name[current].depends_on if d in by_name)
    return seen[seen.index(current):] + [current]


class _JobBuilder:
    """Resolves one draft into a ``JobSpec``: variables, id, command, then each setting."""

    def __init__(self, reader, draft):
        self.reader = reader
        self.problems = reader.problems
        self.draft = draft
        self.levels = draft.levels
        self.vars = dict(draft.grid)
        self.job_id = None
        self.undefined_count = 0

    def build(self):
        args = self._args()
        self.vars.update((key, value) for key, value in args.items() if _VAR_NAME.match(key))
        self.job_id = self._job_id()
        if self.job_id is None:
            return None
        self.vars["id"] = self.job_id
        cmd = self._command(args)
        settings = dict(
            env=self._env(),
            timeout=self._timeout(),
            gpus_per_job=self._gpus_per_job(),
            output_check=self._output_check(),
            preconditions=self._preconditions(),
            oom_retry=self._policy("oom_retry", DEFAULT_OOM_RETRY),
            retry=self._policy("retry", DEFAULT_RETRY),
        )
        conda = self._conda()
        if cmd is None:
            return None
        if _JOBSPEC_HAS_CONDA:
            settings["conda"] = conda
        return JobSpec(id=self.job_id, phase=self.draft.phase, cmd=cmd,
                       vars={k: _render_any(v) for k, v in self.vars.items()},
                       **settings)

    # -- lookups

    def _nearest(self, key, kinds=None):
        """(value, path) from the nearest level that sets ``key``; (None, None) if none does."""
        for level in self.levels:
            if (kinds is None or level.kind in kinds) and key in level.mapping:
                return level.mapping[key], level.path + (key,)
        return None, None

    def _label(self):
        return self.draft.label(self.job_id)

    # -- substitution

    def _substitute(self, value, path, names, quote=False):
        """Fill ``${var}`` in strings (recursively in lists/dicts); exactly '${var}' keeps its type."""
        if isinstance(value, str):
            whole = _WHOLE_REFERENCE.match(value)
            if whole and not quote and whole.group(1) in names:
                return names[whole.group(1)]
            return self._substitute_text(value, path, names, quote)
        if isinstance(value, list):
            return [self._substitute(item, path + (i,), names, quote) for i, item in enumerate(value)]
        if isinstance(value, dict):
            return {k: self._substitute(v, path + (k,), names, quote) for k, v in value.items()}
        return value

    def _substitute_text(self, text, path, names, quote):
        def replace(match):
            escaped, name = match.group(1), match.group(2)
            if escaped:
                return "${" + name + "}"
            if name in RESERVED_VARS:
                return match.group(0)
            if name not in names:
                self._undefined(name, path, names, quote)
                return match.group(0)
            value = names[name]
            if quote:
                return shlex.quote(_render(value)) if _is_scalar(value) else " ".join(
                    shlex.quote(_render(v)) for v in value)
            return _render_any(value)

        return _REFERENCE.sub(replace, text)

    def _undefined(self, name, path, names, in_shell):
        self.undefined_count += 1
        key = (name, tuple(path[:-1]) if path and isinstance(path[-1], int) else tuple(path))
        if key in self.reader.reported_undefined:
            return
        self.reader.reported_undefined.add(key)
        defined = ", ".join(sorted(names)) or "nothing"
        hint = "; write $${{{}}} for a shell variable".format(name) if in_shell and name.isupper() else ""
        self.problems.add(path, "${{{}}} is not defined; defined: {} (and {}){}".format(
            name, defined, ", ".join(RESERVED_VARS), hint), where=self._label(), mark_path=path)

    # -- args, id, command

    def _args(self):
        """Template args, then the job's own (job wins per key), with grid values filled in."""
        merged = {}
        for level in reversed(self.levels):
            if level.kind not in ("template", "job") or "args" not in level.mapping:
                continue
            path = level.path + ("args",)
            args = self.reader._mapping_at(level.mapping["args"], path, "a mapping of option: value")
            for key, value in args.items():
                if not _OPTION_NAME.match(key):
                    self.problems.add(path + (key,), "{} is not usable as an option name (letters, digits, "
                                                     "_ - .)".format(_show(key)), where=_format_path(path), at_key=True)
                    continue
                value = self._substitute(value, path + (key,), self.draft.grid)
                if not (_is_scalar(value) or (isinstance(value, list) and all(_is_scalar(v) for v in value))):
                    self.problems.add(path + (key,), "expected a value (text, number, true/false, null or a "
                                                     "list of values), got {}".format(_describe(value)))
                    continue
                merged[key] = value
        return merged

    def _job_id(self):
        value, path = self._nearest("id", ("job", "template"))
        if value is None:
            return self._automatic_id()
        if _is_int(value):
            value = _render(value)
        if not isinstance(value, str):
            self.problems.add(path, "expected an id (text), got {}".format(_describe(value)))
            return None
        for name in RESERVED_VARS + ("id",):
            if "${" + name + "}" in value:
                self.problems.add(path, "${{{}}} cannot be part of an id{}".format(
                    name, " (it is only known at launch)" if name != "id" else ""))
                return None
        before = self.undefined_count
        value = self._substitute_text(value, path, self.vars, quote=False)
        if self.undefined_count > before:
            return None
        reason = _unsafe_name_reason(value, "job id")
        if reason:
            self.problems.add(path, reason, where=self._label() if self.draft.from_template else None)
            return None
        return value

    def _automatic_id(self):
        """An id from the grid values (stable as long as the grid is), or phase_index."""
        if self.draft.from_template and self.draft.grid:
            parts = ["{}{}".format(k, _render(v) if _is_scalar(v) else "-".join(_render(i) for i in v))
                     for k, v in self.draft.grid.items()]
            text = "".join(c if c in _SAFE_NAME_CHARS else "_" for c in "_".join(parts))
            if self.draft.has_phases:
                text = "{}_{}".format(self.draft.phase, text)
            text = text.lstrip(".-")[:MAX_NAME_LENGTH]
            if text:
                return text
        return "{}_{}".format(self.draft.phase, self.draft.index)

    def _command(self, args):
        text, path = None, None
        for level in self.levels:
            key = level.command_key()
            if key is not None:
                text, path = level.mapping[key], level.path + (key,)
                break
        if text is not None and not isinstance(text, str):
            self.problems.add(path, "expected a shell command (text), got {}".format(_describe(text)))
            return None
        text = (text or "").strip()
        if not text and any(level.path in self.reader.misspelled_command for level in self.levels):
            return None  # the misspelled key is already reported
        if not text:
            where = self.draft.origin if self.draft.from_template else self._label()
            self.problems.add(self.levels[0].path, "no command: set cmd on the job or template, or default_cmd",
                              where=where)
            return None
        command = self._substitute_text(text, path, self.vars, quote=True)
        options = _format_args(args)
        return command + (" " + options if options else "")

    # -- settings

    def _env(self):
        env = {}
        for level in reversed(self.levels):
            if "env" not in level.mapping:
                continue
            path = level.path + ("env",)
            mapping = self.reader._mapping_at(level.mapping["env"], path, "a mapping of NAME: value")
            for name, value in mapping.items():
                if not _ENV_NAME.match(name):
                    self.problems.add(path + (name,), "{} is not a valid environment variable name (letters, "
                                                      "digits, _; not starting with a digit)".format(_show(name)),
                                      where=_format_path(path), at_key=True)
                    continue
                value = self._substitute(value, path + (name,), self.vars)
                if value is None or not _is_scalar(value):
                    self.problems.add(path + (name,), "expected text or a number, got {}".format(_describe(value)))
                    continue
                env[name] = _render(value)
        return env

    def _timeout(self):
        value, path = self._nearest("timeout")
        value = self._substitute(value, path, self.vars) if path else None
        if value is None:
            return None
        seconds = _parse_duration(value)
        if seconds is None or seconds <= 0:
            self.problems.add(path, "expected seconds or a duration like '90m', '2h', '30s', got {}".format(
                _describe(value)))
            return None
        return seconds

    def _gpus_per_job(self):
        value, path = self._nearest("gpus_per_job")
        value = self._substitute(value, path, self.vars) if path else None
        if value is None:
            return 1
        if not _is_int(value) or value < 1:
            self.problems.add(path, "expected a whole number of GPUs (1 or more), got {}".format(_describe(value)))
            return 1
        gpus = self.reader.gpus
        if gpus is not None and value > len(gpus):
            self.problems.add(path, "{} GPUs per job, but gpus lists only {}".format(int(value), len(gpus)))
        return int(value)

    def _output_check(self):
        value, path = self._nearest("output_check")
        value = self._substitute(value, path, self.vars) if path else None
        if value is None:
            return None
        if _is_number(value):
            value = _render(value)
        if not isinstance(value, str) or not value.strip() or "\n" in value:
            self.problems.add(path, "expected a path or glob relative to cwd, got {}".format(_describe(value)))
            return None
        return value.strip()

    def _preconditions(self):
        value, path = self._nearest("preconditions")
        if value is None:
            return ()
        if not isinstance(value, list):
            self.problems.add(path, "expected a list like [{{type: checkpoint_exists, path: ...}}], got {}".format(
                _describe(value)))
            return ()
        result = []
        for index, item in enumerate(value):
            here = path + (index,)
            if not isinstance(item, dict):
                self.problems.add(here, "expected {{type: checkpoint_exists, path: ...}}, got {}".format(
                    _describe(item)))
                continue
            self.reader._check_keys(item, here, PRECONDITION_KEYS)
            kind = item.get("type")
            if kind not in PRECONDITION_TYPES:
                known = ", ".join(PRECONDITION_TYPES)
                if "type" not in item:
                    message = "missing required key 'type'"
                elif isinstance(kind, str):
                    message = "unknown precondition type {} (known: {})".format(_show(kind), known)
                else:
                    message = "expected a precondition type ({}), got {}".format(known, _describe(kind))
                self.problems.add(here + ("type",) if "type" in item else here, message)
                continue
            target = self._substitute(item.get("path"), here + ("path",), self.vars)
            if not isinstance(target, str) or not target.strip():
                self.problems.add(here + ("path",) if "path" in item else here,
                                  "expected a path, got {}".format(_describe(target)) if "path" in item
                                  else "missing required key 'path'")
                continue
            result.append({"type": kind, "path": target.strip()})
        return tuple(result)

    def _policy(self, key, default):
        merged, paths = {}, {}
        for level in reversed(self.levels):
            if key not in level.mapping:
                continue
            path = level.path + (key,)
            mapping = self._substitute(level.mapping[key], path, self.vars)
            mapping = self.reader._mapping_at(mapping, path, "a mapping like {max_attempts: 3, delay: 60}")
            self.reader._check_keys(mapping, path, RETRY_KEYS)
            for name in RETRY_KEYS:
                if name in mapping:
                    merged[name], paths[name] = mapping[name], path + (name,)
        return self._retry_policy(merged, paths, default)

    def _retry_policy(self, values, paths, default):
        attempts, delay, codes = default.max_attempts, default.delay, default.exit_codes
        if values.get("max_attempts") is not None:
            value = values["max_attempts"]
            if _is_int(value) and value >= 1:
                attempts = int(value)
            else:
                self.problems.add(paths["max_attempts"], "expected a whole number of attempts (1 or more), "
                                                         "got {}".format(_describe(value)))
        if values.get("delay") is not None:
            seconds = _parse_duration(values["delay"])
            if seconds is not None and seconds >= 0:
                delay = seconds
            else:
                self.problems.add(paths["delay"], "expected seconds or a duration like '2m', got {}".format(
                    _describe(values["delay"])))
        if "exit_codes" in values:
            codes = self._exit_codes(values["exit_codes"], paths["exit_codes"])
        return RetryPolicy(max_attempts=attempts, delay=float(delay), exit_codes=codes)

    def _exit_codes(self, value, path):
        if value is None:
            return None
        items = [value] if _is_int(value) else value
        if not isinstance(items, list):
            self.problems.add(path, "expected a list of exit codes (0-255) like [1, 137], got {}".format(
                _describe(value)))
            return None
        bad = [(i, c) for i, c in enumerate(items) if not (_is_int(c) and 0 <= c <= 255)]
        if bad:
            i, c = bad[0]
            self.problems.add(path, "item {} is not an exit code (0-255): {}".format(i, _describe(c)))
            return None
        return tuple(int(c) for c in items)

    def _conda(self):
        value, path = self._nearest("conda", ("phase",))
        if path is None:
            return self.reader.top_conda
        conda = self.reader._text({"conda": value}, "conda", path[:-1], single_token=True)
        if conda is not None and conda != self.reader.top_conda and not _JOBSPEC_HAS_CONDA:
            self.problems.add(path, "a conda env per phase is not supported by this plan format yet; "
                                    "set conda at the top level")
        return conda


def _format_args(args):
    """'--key value' per argument, each value shell-quoted; true is a bare flag, false/null omitted."""
    parts = []
    for key, value in args.items():
        flag = shlex.quote(key if key.startswith("-") else "--" + key)
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts.append(" ".join([flag] + [shlex.quote(_render(v)) for v in value]))
        else:
            parts.append("{} {}".format(flag, shlex.quote(_render(value))))
    return " ".join(parts)
