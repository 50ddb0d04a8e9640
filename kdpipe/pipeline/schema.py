"""The pipeline YAML: read it with line numbers, apply ``--set`` overrides, validate, resolve paths.

Every mistake (unknown key, wrong type, missing file) raises one KdpipeError that names the place:
``FILE:LINE: ...`` for a value from the file, ``--set KEY: ...`` for an override.

Paths of input files (``teacher.onnx``, ``teacher.card``, dataset files and folders) are relative to
the YAML file's folder; ``workdir`` (where every output goes) is relative to the current directory.
The ``cache`` and ``distill`` sections take any option of `kdpipe cache-teacher` / `kdpipe distill` by
its long name with ``_`` for ``-`` (``batch_size: 64``, ``flip: false``); the list of accepted keys
and their types is read from the command line itself, so the two never disagree.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdpipe.errors import KdpipeError


# ----------------------------------------------------------------------------------- marked values
@dataclass
class Node:
    """A YAML value with where it came from (``FILE:LINE`` or ``--set KEY``).

    ``value`` is a dict of str -> Node, a list of Node, or a plain scalar.
    """

    value: Any
    where: str
    keys: dict[str, str] = field(default_factory=dict)  # mapping key -> where the key itself is

    def fail(self, message: str) -> KdpipeError:
        """The one-line error for this value."""
        return KdpipeError(f"{self.where}: {message}")

    def plain(self) -> Any:
        """The value without marks (dicts and lists converted recursively)."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


def _from_yaml(node: yaml.Node, fname: str, constructor: yaml.constructor.SafeConstructor) -> Node:
    where = f"{fname}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        keys: dict[str, str] = {}
        for k, v in node.value:
            key = constructor.construct_object(k, deep=True)
            kwhere = f"{fname}:{k.start_mark.line + 1}"
            if not isinstance(key, str):
                raise KdpipeError(f"{kwhere}: key {key!r} is not a name")
            if key in out:
                raise KdpipeError(f"{kwhere}: key {key!r} appears twice")
            out[key] = _from_yaml(v, fname, constructor)
            keys[key] = kwhere
        return Node(out, where, keys)
    if isinstance(node, yaml.SequenceNode):
        return Node([_from_yaml(v, fname, constructor) for v in node.value], where)
    return Node(constructor.construct_object(node, deep=True), where)


def read_yaml(path: Path) -> Node:
    """The YAML file as a tree of Nodes carrying line numbers."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KdpipeError(f"pipeline file {path} does not exist") from None
    except OSError as e:
        raise KdpipeError(f"pipeline file {path}: cannot read it ({e.strerror})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise KdpipeError(f"{path}{line}: not valid YAML ({problem})") from None
    if root is None:
        raise KdpipeError(f"{path}: the file is empty; see pipelines/demo.yaml for an example")
    tree = _from_yaml(root, str(path), yaml.constructor.SafeConstructor())
    if not isinstance(tree.value, dict):
        raise tree.fail("a pipeline is a mapping (teacher:, data:, cache:, distill:, ...)")
    return tree


def apply_set(tree: Node, assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` (value parsed as YAML; list items by index: ``students.0.x``)."""
    if "=" not in assignment:
        raise KdpipeError(f"--set {assignment!r}: expected KEY=VALUE such as cache.views=4")
    key, text = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    where = f"--set {key}"
    if not key or not all(parts):
        raise KdpipeError(f"--set {assignment!r}: KEY is a dotted path such as distill.epochs")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise KdpipeError(f"{where}: {text!r} is not a YAML value") from None
    node = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node.value, list):
            if not part.isdigit() or int(part) >= len(node.value):
                raise KdpipeError(
                    f"{where}: {part!r} is not an index of that list (0..{len(node.value) - 1})"
                )
            if last:
                node.value[int(part)] = _wrap(value, where)
                return
            node = node.value[int(part)]
        elif isinstance(node.value, dict):
            if last:
                node.value[part] = _wrap(value, where)
                return
            node = node.value.setdefault(part, Node({}, where))
        else:
            raise KdpipeError(f"{where}: {'.'.join(parts[:depth])} is a single value, not a section")


def _wrap(value: Any, where: str) -> Node:
    if isinstance(value, dict):
        return Node({str(k): _wrap(v, where) for k, v in value.items()}, where)
    if isinstance(value, list):
        return Node([_wrap(v, where) for v in value], where)
    return Node(value, where)


# ------------------------------------------------------------------------------------ type checks
_TYPE_NAMES = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (dict, "a mapping"),
    (list, "a list"),
)  # bool before int: True is an int too


def _type_name(value: Any) -> str:
    """How a YAML value's type reads in an error message."""
    if value is None:
        return "nothing (null)"
    return next((name for t, name in _TYPE_NAMES if isinstance(value, t)), type(value).__name__)


def want_str(n: Node, what: str) -> str:
    if isinstance(n.value, str) and n.value.strip():
        return n.value
    raise n.fail(f"{what} must be a non-empty string, not {_type_name(n.value)}")


def want_int(n: Node, what: str, minimum: int | None = None) -> int:
    if not isinstance(n.value, int) or isinstance(n.value, bool):
        raise n.fail(f"{what} must be an integer, not {_type_name(n.value)}")
    if minimum is not None and n.value < minimum:
        raise n.fail(f"{what} must be >= {minimum}, not {n.value}")
    return n.value


def want_bool(n: Node, what: str) -> bool:
    if not isinstance(n.value, bool):
        raise n.fail(f"{what} must be true or false, not {_type_name(n.value)}")
    return n.value


def want_map(n: Node, what: str) -> dict[str, Node]:
    if not isinstance(n.value, dict):
        raise n.fail(f"{what} must be a mapping (key: value lines), not {_type_name(n.value)}")
    return n.value


def want_list(n: Node, what: str) -> list[Node]:
    if not isinstance(n.value, list):
        raise n.fail(f"{what} must be a list, not {_type_name(n.value)}")
    return n.value


def check_keys(n: Node, section: str, allowed: list[str]) -> dict[str, Node]:
    """The mapping of ``n``; an unknown key fails on its own line with the allowed ones."""
    m = want_map(n, section)
    for k, v in m.items():
        if k not in allowed:
            hint = ", ".join(allowed)
            raise KdpipeError(f"{n.keys.get(k, v.where)}: unknown key {k!r} in {section} (allowed: {hint})")
    return m


# ----------------------------------------------------------------------- options of the commands
@dataclass(frozen=True)
class OptionSpec:
    """One long option of a kdpipe command, as a YAML key."""

    key: str  # python name: batch_size
    flag: str  # --batch-size
    kind: str  # "int" | "float" | "str" | "choice" | "flag" | "bool" | "multi"
    off_flag: str | None = None  # --no-flip for a "bool" option
    choices: tuple[str, ...] = ()


# Set by the pipeline itself, never by a YAML key.
RESERVED = {
    "cache-teacher": {"teacher", "data", "out", "card", "shard", "no_progress"},
    "distill": {"cache_path", "online_teacher", "data", "val_data", "out", "resume", "no_progress"},
}


def command_options(command: str) -> dict[str, OptionSpec]:
    """The YAML keys of `kdpipe COMMAND`'s options (from the click command, minus RESERVED)."""
    import click

    from kdpipe.cli import cli

    cmd = cli.commands[command]
    out: dict[str, OptionSpec] = {}
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.name is None or p.name in RESERVED.get(command, set()):
            continue
        flag = max(p.opts, key=len)
        key = flag.lstrip("-").replace("-", "_")  # --dtype -> dtype, --batch-size -> batch_size
        if p.is_flag and p.secondary_opts:
            out[key] = OptionSpec(key, flag, "bool", off_flag=p.secondary_opts[0])
        elif p.is_flag:
            out[key] = OptionSpec(key, flag, "flag")
        elif p.multiple:
            out[key] = OptionSpec(key, flag, "multi")
        elif isinstance(p.type, click.Choice):
            out[key] = OptionSpec(key, flag, "choice", choices=tuple(str(c) for c in p.type.choices))
        elif isinstance(p.type, click.types.IntParamType):
            out[key] = OptionSpec(key, flag, "int")
        elif isinstance(p.type, click.types.FloatParamType):
            out[key] = OptionSpec(key, flag, "float")
        else:
            out[key] = OptionSpec(key, flag, "str")
    return out


def option_args(spec: OptionSpec, n: Node, command: str) -> list[str]:
    """The command-line words for one YAML option value (validated against the option's kind)."""
    what = f"{command} option {spec.key!r}"
    v = n.value
    if spec.kind == "bool":
        return [spec.flag if want_bool(n, what) else str(spec.off_flag)]
    if spec.kind == "flag":
        return [spec.flag] if want_bool(n, what) else []
    if spec.kind == "int":
        return [spec.flag, str(want_int(n, what))]
    if spec.kind == "float":
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise n.fail(f"{what} must be a number, not {_type_name(v)}")
        return [spec.flag, repr(float(v)) if isinstance(v, float) else str(v)]
    if spec.kind == "choice":
        if str(v) not in spec.choices or isinstance(v, bool) or v is None:
            raise n.fail(f"{what} must be one of {', '.join(spec.choices)}, not {v!r}")
        return [spec.flag, str(v)]
    if spec.kind == "multi":  # KEY=VALUE options: a mapping or a list of "KEY=VALUE" strings
        if isinstance(v, dict):
            return [w for k, x in v.items() for w in (spec.flag, f"{k}={_scalar(x, what)}")]
        items = want_list(n, what + " (a mapping or a list of KEY=VALUE)")
        return [w for x in items for w in (spec.flag, _scalar(x, what))]
    if isinstance(v, list):  # comma-separated options (taps, targets, milestones, mean, std)
        return [spec.flag, ",".join(_scalar(x, what) for x in v)]
    return [spec.flag, _scalar(n, what)]


def _scalar(n: Node, what: str) -> str:
    v = n.value
    if isinstance(v, bool) or v is None or isinstance(v, dict | list):
        raise n.fail(f"{what} must be a string or a number, not {_type_name(v)}")
    return str(v)


# ---------------------------------------------------------------------------------------- sections
@dataclass
class Student:
    """One distill run of the pipeline: its folder name, an optional table label and its options."""

    name: str
    args: list[str]  # distill option words, after the pipeline's own
    options: dict[str, Any]  # the same options as plain values (for the table and the state)
    where: str
    label: str | None = None
    nproc: int = 1


@dataclass
class SlurmSettings:
    """sbatch settings of one step (defaults of the ``slurm`` section, overridden per step)."""

    partition: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    gpus: int | None = None
    mem: str | None = None
    extra: list[str] = field(default_factory=list)


@dataclass
class Pipeline:
    """A validated pipeline with resolved paths."""

    path: Path
    name: str
    workdir: Path
    teacher: Path
    card: Path | None
    train_data: str
    val_data: str | None
    cache_dir: Path
    shards: int
    cache_args: list[str]
    cache_options: dict[str, Any]
    students: list[Student]
    evaluate: bool
    evaluate_teacher: bool
    eval_data: str | None
    slurm: dict[str, SlurmSettings]  # "cache", "distill", "evaluate"


TOP_KEYS = ["name", "workdir", "teacher", "data", "cache", "distill", "evaluate", "slurm"]
SLURM_KEYS = ["partition", "time", "cpus_per_task", "gpus", "mem", "extra"]
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _file(n: Node, base: Path, what: str) -> Path:
    p = Path(want_str(n, what)).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.exists():
        raise n.fail(f"{what} {n.value!r}: no such file ({p})")
    return p.resolve()


def _data(n: Node, base: Path, what: str) -> str:
    """A dataset spec: a built-in name (with ``:split``) stays; a file or folder is resolved and checked."""
    from kdpipe.data.datasets import available_builtins

    spec = want_str(n, what).strip()
    name, _, split = spec.partition(":")
    if name in available_builtins():
        return spec
    p = Path(name).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.exists():
        raise n.fail(
            f"{what} {spec!r}: not a built-in dataset ({', '.join(available_builtins())}) and no such file "
            f"or folder ({p})"
        )
    return str(p.resolve()) + (f":{split}" if split else "")


def _options(section: dict[str, Node], command: str, skip: set[str]) -> tuple[list[str], dict[str, Any]]:
    specs = command_options(command)
    args: list[str] = []
    plain: dict[str, Any] = {}
    for k, n in section.items():
        if k in skip:
            continue
        args += option_args(specs[k], n, command)
        plain[k] = n.plain()
    return args, plain


def _slurm(n: Node | None, base: SlurmSettings, section: str) -> SlurmSettings:
    if n is None:
        return base
    m = check_keys(n, section, SLURM_KEYS)
    s = SlurmSettings(**{**base.__dict__, "extra": list(base.extra)})
    for k, v in m.items():
        if k == "time" and isinstance(v.value, int) and not isinstance(v.value, bool):
            raise v.fail('time must be quoted, e.g. time: "12:00:00" (YAML reads 12:00:00 as a number)')
        if k in ("partition", "time", "mem"):
            setattr(s, k, str(v.value) if isinstance(v.value, int) and k == "mem" else want_str(v, k))
        elif k in ("cpus_per_task", "gpus"):
            setattr(s, k, want_int(v, k, minimum=0))
        else:
            lines = [want_str(x, "an extra #SBATCH line") for x in want_list(v, "extra")]
            s.extra = s.extra + [ln.strip().removeprefix("#SBATCH").strip() for ln in lines]
    return s


def _students(d: dict[str, Node], common: dict[str, Node], nproc: int) -> list[Student]:
    specs = command_options("distill")
    allowed = ["name", "label", "nproc", *specs]
    out: list[Student] = []

    def add(name: str, label: str | None, own: dict[str, Node], where: str, np_: int) -> None:
        merged = {**common, **own}
        args, plain = _options(merged, "distill", set())
        if any(s.name == name for s in out):
            raise KdpipeError(f"{where}: two students are named {name!r}; give each its own name")
        out.append(Student(name, args, plain, where, label, np_))

    for item in want_list(d["students"], "distill.students") if "students" in d else []:
        m = check_keys(item, "a distill student", allowed)
        if "name" not in m:
            raise item.fail("a student needs a name: (its run folder under workdir)")
        name = want_str(m["name"], "name")
        if not _NAME_RE.match(name):
            raise m["name"].fail(f"student name {name!r}: use letters, digits, '_', '-', '.'")
        label = want_str(m["label"], "label") if "label" in m else None
        np_ = want_int(m["nproc"], "nproc", minimum=1) if "nproc" in m else nproc
        own = {k: v for k, v in m.items() if k not in ("name", "label", "nproc")}
        add(name, label, own, item.where, np_)
    if "sweep" in d:
        grid = check_keys(d["sweep"], "distill.sweep", list(specs))
        keys = list(grid)
        values = [want_list(grid[k], f"sweep values of {k!r}") for k in keys]
        for combo in itertools.product(*values):
            own = dict(zip(keys, combo, strict=True))
            parts = []
            for k, v in own.items():
                text = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(v.value))
                parts.append(text if k in ("method", "student") else f"{k}{text}")
            add("-".join(parts), None, own, d["sweep"].where, nproc)
    return out


def load_pipeline(path: str | os.PathLike, sets: tuple[str, ...] | list[str] = ()) -> Pipeline:
    """Read, override (``sets``: ``a.b=value``), validate and resolve the pipeline at ``path``."""
    p = Path(path)
    tree = read_yaml(p)
    for s in sets:
        apply_set(tree, s)
    top = check_keys(tree, "the pipeline", TOP_KEYS)
    base = p.resolve().parent
    for required in ("teacher", "data"):
        if required not in top:
            raise KdpipeError(f"{p}:1: missing section {required!r} (see pipelines/demo.yaml)")

    name = want_str(top["name"], "name") if "name" in top else p.stem
    if not _NAME_RE.match(name):
        raise (top["name"] if "name" in top else tree).fail(
            f"pipeline name {name!r}: use letters, digits, '_', '-', '.' (it names jobs and folders)"
        )
    workdir = Path(want_str(top["workdir"], "workdir")) if "workdir" in top else Path("out") / name
    workdir = workdir.expanduser().resolve()

    t = check_keys(top["teacher"], "teacher", ["onnx", "card"])
    if "onnx" not in t:
        raise top["teacher"].fail("teacher needs onnx: (the teacher's ONNX file)")
    teacher = _file(t["onnx"], base, "teacher onnx")
    card = _file(t["card"], base, "teacher card") if "card" in t and t["card"].value is not None else None

    dsec = check_keys(top["data"], "data", ["train", "val"])
    if "train" not in dsec:
        raise top["data"].fail("data needs train: (the dataset the cache is made from)")
    train = _data(dsec["train"], base, "data train")
    val = _data(dsec["val"], base, "data val") if "val" in dsec and dsec["val"].value is not None else None

    cache_specs = command_options("cache-teacher")
    csec = check_keys(top["cache"], "cache", ["path", "shards", *cache_specs]) if "cache" in top else {}
    cache_dir = workdir / (want_str(csec["path"], "cache path") if "path" in csec else "cache")
    shards = want_int(csec["shards"], "cache shards", minimum=1) if "shards" in csec else 1
    cache_args, cache_plain = _options(csec, "cache-teacher", {"path", "shards"})

    distill_specs = command_options("distill")
    dkeys = ["students", "sweep", "nproc", *distill_specs]
    dsec2 = check_keys(top["distill"], "distill", dkeys) if "distill" in top else {}
    nproc = want_int(dsec2["nproc"], "nproc", minimum=1) if "nproc" in dsec2 else 1
    common = {k: v for k, v in dsec2.items() if k not in ("students", "sweep", "nproc")}
    _options(common, "distill", set())  # the common options fail on their own lines
    students = _students(dsec2, common, nproc)
    if "distill" in top and not students:
        raise top["distill"].fail("distill lists no students: add students: or sweep:")

    esec = (
        check_keys(top["evaluate"], "evaluate", ["data", "teacher", "students"]) if "evaluate" in top else {}
    )
    eval_data = _data(esec["data"], base, "evaluate data") if "data" in esec else val
    do_students = want_bool(esec["students"], "evaluate students") if "students" in esec else True
    do_teacher = want_bool(esec["teacher"], "evaluate teacher") if "teacher" in esec else True
    if (do_students or do_teacher) and eval_data is None and "evaluate" in top:
        raise top["evaluate"].fail("evaluate needs data: (or data: val:)")

    ssec = (
        check_keys(top["slurm"], "slurm", [*SLURM_KEYS, "cache", "distill", "evaluate"])
        if "slurm" in top
        else {}
    )
    default = _slurm(
        Node({k: v for k, v in ssec.items() if k in SLURM_KEYS}, "slurm"), SlurmSettings(), "slurm"
    )
    slurm = {s: _slurm(ssec.get(s), default, f"slurm.{s}") for s in ("cache", "distill", "evaluate")}
    return Pipeline(
        path=p,
        name=name,
        workdir=workdir,
        teacher=teacher,
        card=card,
        train_data=train,
        val_data=val,
        cache_dir=cache_dir.resolve(),
        shards=shards,
        cache_args=cache_args,
        cache_options=cache_plain,
        students=students,
        evaluate=eval_data is not None and do_students,
        evaluate_teacher=eval_data is not None and do_teacher,
        eval_data=eval_data,
        slurm=slurm,
    )
