"""The `kdpipe` command line. Every user mistake ends as one line on stderr and a non-zero exit."""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any

import click

from kdpipe.errors import KdpipeError

# OS errors that come from the user's environment (paths, permissions, space), not from a bug
_USER_ERRNOS = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.ENOSPC: "the disk is full: free some space, then run the same command again to resume",
    errno.EDQUOT: "the disk quota is exceeded: free some space, then run the same command again",
    errno.EFBIG: "the file size limit was reached (ulimit -f): raise it, then run the command again",
}


def os_error_line(e: OSError) -> str | None:
    """One line for an OS error caused by the environment (None for anything else)."""
    hint = _USER_ERRNOS.get(e.errno or -1)
    if hint is None:
        return None
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}; {hint}"


class _Group(click.Group):
    """Turns KdpipeError (and OS errors that are user mistakes) into one clear line; --debug re-raises."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdpipeError as e:
            if _debug(ctx):
                raise
            click.echo(f"kdpipe: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:
            line = os_error_line(e)
            if line is None or _debug(ctx):
                raise
            click.echo(f"kdpipe: error: {line} (--debug shows the traceback)", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("kdpipe: interrupted; run the same command again to resume", err=True)
            ctx.exit(130)


def _debug(ctx: click.Context) -> bool:
    return bool((ctx.obj or {}).get("debug")) or os.environ.get("KDPIPE_DEBUG", "") not in ("", "0")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdpipe")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an error (also KDPIPE_DEBUG=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """kdpipe: cache a teacher's distillation targets once, train students from the cache."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="Print only warnings (exit 1 if the native ops are missing).")
def doctor(as_json: bool, quiet: bool) -> None:
    """Versions, native ops, threads, and the onnxruntime providers that actually load."""
    from kdpipe.doctor import collect, format_report

    info = collect()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    elif quiet:
        for w in info["warnings"]:
            click.echo(f"WARNING: {w}", err=True)
    else:
        click.echo(format_report(info))
    if not info["native"]:
        sys.exit(1)


# ----------------------------------------------------------------------------- teacher and cache


def _images_x_views(text: str) -> tuple[int, int]:
    """``"1281167x8"`` -> (1281167, 8)."""
    a, _, b = text.lower().partition("x")
    if not (a.strip().isdigit() and b.strip().isdigit()) or int(a) < 1 or int(b) < 1:
        raise KdpipeError(f"--project {text!r}: expected IMAGESxVIEWS, e.g. 1281167x8")
    return int(a), int(b)


def _parse_kv(items: tuple[str, ...], what: str) -> dict[str, Any]:
    """``("depth=16", "width=2.5")`` -> {"depth": 16, "width": 2.5} (YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise KdpipeError(f"{what} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _numbers(items: tuple[str, ...], what: str, example: str) -> dict[str, float]:
    """``("at=1000",)`` -> {"at": 1000.0}; a value that is not a number is one clear line."""
    out = {}
    for k, v in _parse_kv(items, what).items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise KdpipeError(f"{what} {k}={v!r}: expected TERM=NUMBER, e.g. {what} {example}") from None
    return out


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise KdpipeError(f"{what} {text!r}: expected comma-separated numbers such as 0.5,0.5,0.5") from None


@cli.command()
@click.argument("teacher", type=click.Path())
def inspect(teacher: str) -> None:
    """Show a teacher's input, outputs and candidate taps (and which ones `--taps auto` picks)."""
    from kdpipe.teacher import inspect_report, load_teacher

    click.echo(inspect_report(load_teacher(teacher)))


@cli.command("cache-teacher")
@click.argument("teacher", type=click.Path())
@click.option("--data", required=True, help="Dataset: animals, digits, a .npz, or a folder of class folders.")
@click.option("--out", required=True, type=click.Path(), help="Cache directory (resumed if it exists).")
@click.option(
    "--taps",
    default="auto",
    show_default=True,
    help="auto, or comma-separated tensor names, torch module paths, or re:REGEX.",
)
@click.option(
    "--targets",
    default="logits,at,pooled",
    show_default=True,
    help="Which targets to cache (add dct to store DCT targets; by default distill derives them from at; "
    "grad: the input gradient for --method grad-at).",
)
@click.option(
    "--grad-form",
    default="full",
    show_default=True,
    help="--targets grad: full (C,H,W), csum (channel sum), pool:K (area-pooled to KxK) or csum+pool:K.",
)
@click.option(
    "--grad-dtype",
    default="float16",
    show_default=True,
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Storage dtype of the grad array.",
)
@click.option(
    "--dct-variant",
    default="dft-abs",
    show_default=True,
    help="dft-abs (authors' code), dft (signed), dct2 (true DCT-II); comma-separated for several.",
)
@click.option(
    "--views", default=0, show_default=True, help="Augmented views per sample; 0 = the plain input."
)
@click.option(
    "--augment",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "pad-crop", "rrc"]),
    help="View policy when --views > 0 (auto: pad-crop for images <= 64 px, else rrc).",
)
@click.option("--pad", default=4, show_default=True, help="Padding (px) of pad-crop views.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Random horizontal flips in views.")
@click.option("--seed", default=0, show_default=True, help="Seed of the view parameters.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--chunk-size", default=0, help="Samples per journaled chunk (default: ~4096 items).")
@click.option("--provider", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option(
    "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: CPUs this job may use)."
)
@click.option(
    "--spin/--no-spin",
    default=True,
    show_default=True,
    help="onnxruntime threads spin between operators (fastest alone on the CPUs; --no-spin on shared ones).",
)
@click.option(
    "--reduce",
    default="graph",
    show_default=True,
    type=click.Choice(["graph", "native"]),
    help="Reduce taps to targets inside the ONNX graph, or with kdpipe's native ops.",
)
@click.option(
    "--dtype",
    "map_dtype",
    default="float16",
    show_default=True,
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Storage dtype of maps.",
)
@click.option(
    "--vec-dtype",
    default=None,
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Storage dtype of pooled vectors and full logits [default: pooled float16, logits float32].",
)
@click.option(
    "--logits",
    "logits_mode",
    default="auto",
    show_default=True,
    help="full, topk:K (the K largest logits + the others' mean), or auto (full up to 100 classes, "
    "else topk:100).",
)
@click.option(
    "--token-clip",
    type=float,
    default=None,
    help="Transformer taps: clip each at map at this per-sample quantile (e.g. 0.98) against outlier tokens.",
)
@click.option("--estimate", is_flag=True, help="Print the bytes per view and the cache's size; run nothing.")
@click.option("--shard", default=None, help="INDEX/COUNT of an array job (default: Slurm/Kubernetes env).")
@click.option("--card", type=click.Path(), default=None, help="YAML teacher card (preprocessing).")
@click.option("--input-size", type=int, default=None, help="Teacher input side (px), if not in the graph.")
@click.option("--scale", type=float, default=None, help="Pixel scale: 1/255 -> 0.00392156862745098, or 1.")
@click.option("--mean", default=None, help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406.")
@click.option("--std", default=None, help="Per-channel std after scaling.")
@click.option("--bgr", is_flag=True, help="The teacher expects BGR channel order.")
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Complete the cache even if the teacher outputs NaN/inf (recorded in COMPLETE.json).",
)
@click.option("--no-progress", is_flag=True)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Image folders: leave out files that do not decode (listed in the manifest).",
)
def cache_teacher_cmd(
    teacher: str,
    data: str,
    out: str,
    taps: str,
    targets: str,
    grad_form: str,
    grad_dtype: str,
    dct_variant: str,
    views: int,
    augment: str,
    pad: int,
    flip: bool,
    seed: int,
    batch_size: int,
    chunk_size: int,
    provider: str,
    threads: int | None,
    spin: bool,
    reduce: str,
    map_dtype: str,
    vec_dtype: str | None,
    logits_mode: str,
    token_clip: float | None,
    estimate: bool,
    shard: str | None,
    card: str | None,
    input_size: int | None,
    scale: float | None,
    mean: str | None,
    std: str | None,
    bgr: bool,
    allow_nonfinite: bool,
    no_progress: bool,
    skip_bad: bool,
) -> None:
    """Run TEACHER (an ONNX file) once over --data and cache its distillation targets in --out."""
    from kdpipe.cache_teacher import CacheJob, cache_teacher

    overrides: dict[str, Any] = {}
    if input_size:
        overrides["input_size"] = input_size
    if scale is not None:
        overrides["scale"] = scale
    if mean is not None:
        overrides["mean"] = _floats(mean, "--mean")
    if std is not None:
        overrides["std"] = _floats(std, "--std")
    if bgr:
        overrides["channel_order"] = "bgr"
    job = CacheJob(
        teacher=teacher,
        data=data,
        out=out,
        taps=taps if taps == "auto" else [t.strip() for t in taps.split(",") if t.strip()],
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
        dct_variants=tuple(v.strip() for v in dct_variant.split(",") if v.strip()),
        views=views,
        augment=augment,
        pad=pad,
        flip=flip,
        seed=seed,
        batch_size=batch_size,
        chunk_size=chunk_size,
        provider=provider,
        threads=threads,
        spinning=spin,
        reduce=reduce,
        map_dtype=map_dtype,
        vec_dtype=vec_dtype,
        logits=logits_mode,
        token_clip=token_clip,
        estimate=estimate,
        shard=shard,
        card=card,
        spec_overrides=overrides,
        progress=not no_progress,
        skip_bad=skip_bad,
        allow_nonfinite=allow_nonfinite,
        grad_form=grad_form,
        grad_dtype=grad_dtype,
    )
    s = cache_teacher(job, log=lambda m: click.echo(m, err=True))
    if s.get("estimate"):
        click.echo(_estimate_text(s))
        return
    acc = s["teacher_accuracy"]
    click.echo(
        f"cached {s['items_done']} item(s) ({s['samples']} samples x {s['views']} view(s), "
        f"shard {s['shard']}) "
        f"in {s['seconds']:.1f} s ({s['items_per_s'] or 0:,.0f} img/s); "
        f"{(s['bytes_on_disk'] or 0) / 2**20:.1f} MiB on disk; complete: {s['complete']}"
        + (f"; teacher top-1 on these views: {100 * acc:.2f}%" if acc is not None else "")
    )


def _estimate_text(s: dict[str, Any]) -> str:
    parts = ", ".join(f"{k} {v:,.0f}" for k, v in s["arrays"].items())
    return (
        f"{s['bytes_per_view']:,.0f} bytes per view ({parts}); this cache: {s['samples']:,} samples x "
        f"{s['views']} view(s) = {s['bytes'] / 2**20:,.1f} MiB"
    )


@cli.group()
def cache() -> None:
    """Inspect, verify and merge caches."""


@cache.command("info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--project",
    default="1281167x8",
    show_default=True,
    help="IMAGESxVIEWS: the size of a cache with these targets over that many items (ImageNet-1k x 8).",
)
def cache_info(path: str, as_json: bool, project: str) -> None:
    """Summary of a cache: samples, views, taps, arrays, bytes per view, projected size, completeness."""
    from kdpipe import cache as cache_mod

    info = cache_mod.info(path, project=_images_x_views(project))
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for k, v in info.items():
        if isinstance(v, dict):
            click.echo(f"{k}:")
            for k2, v2 in v.items():
                click.echo(f"  {k2}: {v2}")
        else:
            click.echo(f"{k}: {v}")


@cache.command("verify")
@click.argument("path", type=click.Path())
@click.option("--live", default=0, help="Also re-run the teacher on N random (sample, view) pairs.")
@click.option(
    "--teacher", "live_teacher", default=None, help="--live: the ONNX file (default: the recorded one)."
)
@click.option("--data", "live_data", default=None, help="--live: the dataset (default: the recorded one).")
@click.option("--seed", "live_seed", default=0, help="--live: seed of the random pairs.")
def cache_verify(
    path: str, live: int, live_teacher: str | None, live_data: str | None, live_seed: int
) -> None:
    """Re-read every byte and check it against the journal's checksums; exit 1 on any problem.

    With --live N, re-run the teacher on N random (sample, view) pairs and compare with the stored values.
    """
    from kdpipe import cache as cache_mod

    problems = cache_mod.verify(path)
    for p in problems:
        click.echo(f"DAMAGED: {p}")
    if problems:
        click.echo(f"kdpipe: {len(problems)} problem(s) in {path}", err=True)
        sys.exit(1)
    click.echo(f"{path}: OK")
    if live:
        _verify_live(path, live, live_teacher, live_data, live_seed)


@cache.command("merge")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
def cache_merge(src: str, dst: str) -> None:
    """Write a single-shard copy of a complete sharded cache."""
    from kdpipe import cache as cache_mod

    cache_mod.merge(src, dst)
    click.echo(f"merged {src} -> {dst}")


# ----------------------------------------------------------------------------- students


@cli.command("distill")
@click.option("--cache", "cache_path", type=click.Path(), default=None, help="Target cache (cache-teacher).")
@click.option(
    "--online-teacher",
    type=click.Path(),
    default=None,
    help="Baseline: run this ONNX teacher every step instead of reading a cache.",
)
@click.option("--data", required=True, help="Training dataset (the one the cache was made from).")
@click.option("--val-data", default=None, help="Evaluation dataset, e.g. animals:val.")
@click.option("--student", default="resnet20", show_default=True, help="Zoo name or my_pkg.models:make_net.")
@click.option("--student-arg", multiple=True, help="KEY=VALUE passed to the student factory (repeatable).")
@click.option(
    "--student-taps", default="auto", show_default=True, help="auto or comma-separated module paths."
)
@click.option(
    "--teacher-taps",
    default="auto",
    show_default=True,
    help="Teacher taps to pair: with --cache, cached tap indices (0,2,4), blocks:I,J or tap names; "
    "online, a --taps spec.",
)
@click.option(
    "--teacher-card",
    type=click.Path(),
    default=None,
    help="Online teacher only: its YAML card (preprocessing), as given to cache-teacher --card.",
)
@click.option(
    "--method", default="kd", show_default=True, help="ce, kd, at, dct, afd, grad-at or sums like at+kd."
)
@click.option("--weight", multiple=True, help="Override a loss weight, e.g. --weight at=1000 (repeatable).")
@click.option(
    "--at-tap-weights",
    default=None,
    help="AT: one factor per tap pair multiplying its term, e.g. 1,0.25,0.0625 (28/14/7 maps: every tap "
    "the same largest term).",
)
@click.option(
    "--term-warmup",
    multiple=True,
    help="TERM=EPOCHS: ramp a loss term's weight linearly from 0 over the first EPOCHS epochs, e.g. at=10 "
    "(repeatable).",
)
@click.option(
    "--dct-variant", default=None, help="Which cached DCT variant to use (default: the cached one)."
)
@click.option("--teacher-correct-mask", is_flag=True, help="DCT: ignore samples the teacher gets wrong.")
@click.option(
    "--flip-symmetry",
    is_flag=True,
    help="Add the student's input-gradient flip symmetry term (flip; one more forward/backward).",
)
@click.option(
    "--grad-form",
    default="full",
    show_default=True,
    help="Online teacher only: the form of J_T for grad-at (full, csum, pool:K, csum+pool:K).",
)
@click.option("--temperature", default=4.0, show_default=True)
@click.option("--views", default=0, show_default=True, help="Online teacher only: views per sample.")
@click.option("--augment", default="auto", show_default=True, help="Online teacher only.")
@click.option("--view-seed", default=0, show_default=True, help="Online teacher only.")
@click.option("--view-pad", default=4, show_default=True, help="Online teacher only: pad-crop padding (px).")
@click.option("--view-flip/--no-view-flip", default=True, show_default=True, help="Online teacher only.")
@click.option("--out", required=True, type=click.Path(), help="Run folder.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=128, show_default=True, help="Samples per step on each process.")
@click.option(
    "--global-batch",
    default=0,
    help="Samples per step over all processes (split between them; keeps a resume on another count exact).",
)
@click.option("--lr", default=0.1, show_default=True)
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adamw"]))
@click.option("--momentum", default=0.9, show_default=True)
@click.option("--nesterov/--no-nesterov", default=True, show_default=True)
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option(
    "--schedule", default="cosine", show_default=True, type=click.Choice(["cosine", "multistep", "constant"])
)
@click.option("--milestones", default="", help="Multistep epochs, e.g. 60,120,160.")
@click.option("--gamma", default=0.2, show_default=True, help="Multistep factor.")
@click.option("--warmup-epochs", default=0.0, show_default=True)
@click.option("--label-smoothing", default=0.0, show_default=True)
@click.option("--amp", default="none", show_default=True, type=click.Choice(["none", "bf16", "fp16"]))
@click.option("--channels-last", is_flag=True)
@click.option("--clip-grad", default=0.0, show_default=True, help="Max gradient norm (0 = off).")
@click.option("--seed", default=0, show_default=True)
@click.option("--eval-every", default=1, show_default=True)
@click.option("--workers", default=2, show_default=True, help="DataLoader worker processes.")
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--resume", is_flag=True, help="Continue the run in --out where it stopped.")
@click.option("--no-export", is_flag=True, help="Skip the ONNX export at the end.")
@click.option("--no-progress", is_flag=True)
@click.option("--max-steps", default=0, help="Stop after this many steps (smoke tests, benchmarks).")
@click.option(
    "--log-every", default=0, help="Steps between records in RUN/step_metrics.jsonl (default: ~50 an epoch)."
)
@click.option(
    "--checkpoint-every", default=0, help="Steps between mid-epoch checkpoints (default: at epoch ends only)."
)
@click.option("--no-tensorboard", is_flag=True, help="Write no TensorBoard event files (RUN/tensorboard/).")
@click.option(
    "--no-verify",
    is_flag=True,
    help="Skip the crc32 check of the cached arrays at start (only after `kdpipe cache verify`).",
)
@click.option(
    "--order",
    default="random",
    show_default=True,
    help="Sample order: random, or chunked[:SAMPLES] (shuffle the cache's chunks, then the samples "
    "inside windows of about SAMPLES, read ahead window by window: for caches larger than memory or "
    "on network file systems; default window: 256 MiB of the rows read).",
)
def distill_cmd(**opts: Any) -> None:
    """Train a student from a teacher cache (or from an online teacher, for comparison)."""
    from kdpipe.train import distill

    distill(_distill_config(opts), log=lambda m: click.echo(m, err=True))


def _distill_config(opts: dict[str, Any]) -> Any:
    """The DistillConfig of `kdpipe distill`'s options (the same names, but for the few below)."""
    from kdpipe.train import DistillConfig

    def taps_arg(t: str) -> str | list[str]:
        return t if t == "auto" else [x.strip() for x in t.split(",") if x.strip()]

    o = dict(opts)
    try:
        o["milestones"] = [int(m) for m in o["milestones"].split(",") if m.strip()]
    except ValueError:
        raise KdpipeError(f"--milestones {o['milestones']!r}: expected epochs such as 60,120,160") from None
    o["cache"] = o.pop("cache_path")
    o["student_kwargs"] = _parse_kv(o.pop("student_arg"), "--student-arg")
    o["weights"] = _numbers(o.pop("weight"), "--weight", "at=1000")
    o["term_warmup"] = _numbers(o.pop("term_warmup"), "--term-warmup", "at=10")
    o["at_tap_weights"] = list(_floats(o["at_tap_weights"], "--at-tap-weights") or ())
    o["student_taps"], o["teacher_taps"] = taps_arg(o["student_taps"]), taps_arg(o["teacher_taps"])
    for flag, name in (
        ("no_export", "export_onnx"),
        ("no_progress", "progress"),
        ("no_tensorboard", "tensorboard"),
        ("no_verify", "verify"),
    ):
        o[name] = not o.pop(flag)
    return DistillConfig(**o)


@cli.command("evaluate")
@click.argument("model", type=click.Path())
@click.option("--data", required=True, help="Dataset to evaluate on, e.g. animals:val.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--card", type=click.Path(), default=None, help="Teacher card (ONNX models only).")
def evaluate_cmd(model: str, data: str, batch_size: int, card: str | None) -> None:
    """Top-1/top-5 of an ONNX model (teacher or exported student) on plain views of --data."""
    from kdpipe.evaluate import evaluate_onnx

    r = evaluate_onnx(model, data, batch_size=batch_size, card=card)
    click.echo(json.dumps(r))


@cli.command("show-maps")
@click.argument("cache_path", type=click.Path())
@click.option("--sample", default=0, show_default=True, help="Sample index in the cache.")
@click.option("--view", default=0, show_default=True, help="Cached view of that sample.")
@click.option("--run", "runs", multiple=True, help="A distill run folder to compare (repeatable).")
@click.option("--data", default=None, help="Dataset (default: the one recorded in the cache).")
@click.option("--out", default="maps.png", show_default=True, type=click.Path(), help="PNG to write.")
def show_maps_cmd(
    cache_path: str, sample: int, view: int, runs: tuple[str, ...], data: str | None, out: str
) -> None:
    """Figure of the teacher's cached attention maps beside the maps of student runs."""
    from kdpipe.show_maps import show_maps

    click.echo(show_maps(cache_path, sample, list(runs), out, view=view, data=data))


@cli.command("show-curves")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", default="curves.png", show_default=True, type=click.Path(), help="PNG to write.")
def show_curves_cmd(runs: tuple[str, ...], out: str) -> None:
    """Figure of the loss terms (per step) and val top-1 (per epoch) of one or more distill RUNS."""
    from kdpipe.show_curves import show_curves

    click.echo(show_curves(list(runs), out))


# ----------------------------------------------------------------------------- pipelines


@cli.command("run")
@click.argument("pipeline", type=click.Path())
@click.option(
    "--set", "sets", multiple=True, help="Override a YAML value, e.g. --set cache.views=2 (repeatable)."
)
@click.option(
    "--dry-run", is_flag=True, help="Print the exact commands (with each step's state); run nothing."
)
@click.option(
    "--executor",
    default="local",
    show_default=True,
    type=click.Choice(["local", "slurm"]),
    help="local: run the steps here, in order; slurm: submit them with sbatch.",
)
def run_cmd(pipeline: str, sets: tuple[str, ...], dry_run: bool, executor: str) -> None:
    """Run PIPELINE (a YAML file): cache-teacher -> distill (one or more students) -> evaluate.

    Steps whose outputs are complete are skipped; a half-done step resumes. See pipelines/demo.yaml.
    """
    from kdpipe.pipeline import load_pipeline, make_plan
    from kdpipe.pipeline.plan import results_table

    p = load_pipeline(pipeline, sets)
    if executor == "slurm":
        from kdpipe.pipeline.slurm import submit

        submit(p, dry_run=dry_run, log=click.echo)
        return
    plan = make_plan(p)
    if dry_run:
        for step in plan.steps:
            prefix = {"done": "# done (skipped): ", "partial": "# resumes: "}.get(step.state, "")
            click.echo(f"{prefix}{step.command()}")
        return
    from kdpipe.pipeline.local import run_local

    run_local(plan, log=lambda m: click.echo(m, err=True))
    table = results_table(p)
    if table:
        click.echo(table)


def _verify_live(path: str, n: int, teacher: str | None, data: str | None, seed: int) -> None:
    """`cache verify --live N`: the teacher re-run on N pairs; exit 1 beyond the storage tolerance."""
    from kdpipe.cache.live import format_report, live_check

    rep = live_check(path, n, teacher=teacher, data=data, seed=seed)
    for line in format_report(rep):
        click.echo(line)
    if not rep.ok:
        click.echo(f"kdpipe: {path}: the stored targets do not match the teacher (see above)", err=True)
        sys.exit(1)
    click.echo(f"{path}: live OK")


def main() -> None:
    cli(prog_name="kdpipe")


if __name__ == "__main__":
    main()
