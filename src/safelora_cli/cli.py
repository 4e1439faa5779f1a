"""The ``safelora`` command line: parse, call the pipeline, render. No math here."""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from . import __version__, config
from .errors import SafeLoraError
from .text import console as _console
from .text import line


class _Deferred:
    """A module, imported when one of its attributes is first used."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


if TYPE_CHECKING:
    from . import adapter as adapter_io
    from . import audit, backups, pipeline, sources
    from . import cache as projection_cache
    from . import demo as demo_data
    from . import report as rendering
else:
    # torch takes ~2 s to import: the modules that need it load when a command first uses them, so
    # --help, --version and shell completion answer at once.
    adapter_io, audit, backups, demo_data, pipeline, projection_cache, rendering, sources = (
        _Deferred(f"{__package__}.{name}")
        for name in ("adapter", "audit", "backups", "demo", "pipeline", "cache", "report", "sources")
    )

app = typer.Typer(
    help="Safe LoRA for PEFT adapters: project each LoRA update onto the alignment subspace of "
    "W_aligned − W_base when it looks unlike it. Exit codes: 0 done, 1 input or I/O error, 2 usage, "
    "3 (check only) not sanitized against the pair or modified since.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

BaseOpt = Annotated[
    str | None,
    typer.Option(
        help="The unaligned base model: a local directory (safetensors, single or sharded, or .bin), or a Hub "
        "repo org/name[@revision]. An existing local path wins; hf://org/name always means the Hub. "
        "Default: the preset's base when --aligned is a preset's aligned model.",
        show_default=False,
    ),
]
AlignedOpt = Annotated[
    str | None,
    typer.Option(
        help="The aligned (chat) model, as --base. Default: adapter_config.json's base_model_name_or_path when "
        "it is a local directory or a Hub repo id.",
        show_default=False,
    ),
]
BaseRevisionOpt = Annotated[
    str | None, typer.Option(help="Branch, tag or commit sha of a Hub --base (default: main).", show_default=False)
]
AlignedRevisionOpt = Annotated[
    str | None, typer.Option(help="Branch, tag or commit sha of a Hub --aligned (default: main).", show_default=False)
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        help="Hugging Face token for gated or private repos. Default: HF_TOKEN, then the stored login. "
        "Never printed or stored.",
        show_default=False,
    ),
]
ConnectionsOpt = Annotated[
    int,
    typer.Option(
        min=1,
        max=64,
        help="HTTP connections for Hub downloads, shared by --base and --aligned: the byte ranges a run "
        "needs are fetched over this many at once.",
    ),
]
NoCacheOpt = Annotated[
    bool,
    typer.Option("--no-cache/--cache", help="Neither read nor write the projection cache (SAFELORA_CACHE)."),
]
AdaptersOpt = Annotated[
    list[str],
    typer.Option(
        "--adapter",
        help="The PEFT LoRA adapter directory to patch. Repeat it, or give a quoted glob ('adapters/*'), "
        "to patch several against one pair: each projection operator is read or computed once for all. "
        "A path that exists is taken as it is, never as a glob.",
        show_default=False,
    ),
]
CheckAdaptersOpt = Annotated[
    list[str],
    typer.Option(
        "--adapter",
        help="The PEFT LoRA adapter directory to check. Repeat it, or give a quoted glob ('adapters/*'): "
        "every one is judged.",
        show_default=False,
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        min=-1.0,
        max=1.0,
        help="Project every module whose similarity (rounded to 5 decimals) is ≤ τ. [default: 0.5]",
    ),
]
NumLayersOpt = Annotated[
    int | None,
    typer.Option(min=1, help="Number mode: project the K modules with the lowest similarities (ties included)."),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(help="Write a complete patched adapter directory here and leave the source untouched."),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run/--no-dry-run", help="Compute and report; write nothing.")]
JsonOpt = Annotated[
    bool, typer.Option("--json/--no-json", help="One JSON document on stdout; the table goes to stderr.")
]
PrecisionOpt = Annotated[str, typer.Option(help="Compute precision: float32 or float64.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
AllowDoraOpt = Annotated[
    bool,
    typer.Option(
        "--allow-dora/--no-allow-dora", help="Project lora_B of a DoRA adapter; magnitudes are left unchanged."
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet/--no-quiet", "-q", help="Print nothing but errors (and --json).")]
NoBackupOpt = Annotated[
    bool,
    typer.Option(
        "--no-backup/--backup",
        help="Keep no copy of the original before an in-place rewrite (SAFELORA_BACKUPS): restore then "
        "cannot undo the run.",
    ),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force/--no-force",
        help="Project an adapter that already carries safelora provenance; reuse a non-empty --output.",
    ),
]

_PRECISIONS: dict[str, pipeline.Precision] = {"float32": "float32", "float64": "float64"}
_DEVICES: dict[str, pipeline.Device] = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}


def _err_console() -> Console:
    return _console(stderr=True)


def _print_error(message: object) -> None:
    _err_console().print(line(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


@contextmanager
def _errors() -> Iterator[None]:
    """The one place errors become a one-line message and an exit code.

    An OS error that escaped the path-specific handling, or any other unexpected exception, is
    still one line and exit 1 (SAFELORA_DEBUG=1 shows the traceback): hostile input must never
    end in a traceback.
    """
    try:
        yield
    except SafeLoraError as e:
        if os.environ.get("SAFELORA_DEBUG"):
            traceback.print_exc()
        _print_error(e)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:
        if os.environ.get("SAFELORA_DEBUG"):
            traceback.print_exc()
        where = e.filename if e.filename is not None else "I/O"
        _print_error(f"{where}: {e.strerror or e.__class__.__name__}")
        raise typer.Exit(1) from None
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("typer", "click"):
            raise  # usage errors and exits: Typer prints them and exits 2 (or as asked)
        if os.environ.get("SAFELORA_DEBUG"):
            traceback.print_exc()
        _print_error(f"unexpected {e.__class__.__name__}: {str(e)[:200]}; set SAFELORA_DEBUG=1 for the traceback")
        raise typer.Exit(1) from None


def _after_write(what: str, render: Callable[[], None]) -> None:
    """Output after the adapters are written: a failure here is a warning, never the run's exit code."""
    try:
        render()
    except BrokenPipeError:
        # The reader went away (``| head``): say nothing more on stdout, and exit as the run ended.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except Exception as e:
        with suppress(Exception):
            _err_console().print(
                line(
                    ("warning:", "yellow"),
                    f" {what} failed ({e.__class__.__name__}: {str(e)[:200]}); "
                    "the adapters were processed as reported by the exit code",
                ),
                highlight=False,
                soft_wrap=True,
            )


def _choice(value: str, choices: Mapping[str, str], flag: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"expected one of {', '.join(choices)}", param_hint=flag)
    return value


_MODE_KEYS = ("threshold", "num_layers")


def _merge(lower: Mapping[str, Any], higher: Mapping[str, Any]) -> dict[str, Any]:
    """Option values where ``higher`` wins; τ and k are one choice, so either one replaces both."""
    merged = {**lower, **higher}
    if any(k in higher for k in _MODE_KEYS):
        for k in _MODE_KEYS:
            if k not in higher:
                merged.pop(k, None)
    return merged


def _option_keys(ctx: typer.Context) -> dict[str, str]:
    """YAML key -> parameter name, for every option of the command (``json`` -> ``as_json``)."""
    keys = {}
    for param in ctx.command.params:
        if param.name in ("config_file", "preset") or param.name is None:
            continue
        for opt in param.opts:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = param.name
    return keys


def _as_defaults(ctx: typer.Context, options: dict[str, Any]) -> dict[str, Any]:
    keys = _option_keys(ctx)
    repeatable = {p.name for p in ctx.command.params if getattr(p, "multiple", False)}
    # ``adapter: ./a`` in YAML means the one-element list a repeatable option expects.
    return {keys[k]: [v] if keys[k] in repeatable and not isinstance(v, list) else v for k, v in options.items()}


def _value_check(ctx: typer.Context) -> config.ValueCheck:
    """A config value judged by its option's own parsing: why it is refused, or None."""
    keys = _option_keys(ctx)
    params = {p.name: p for p in ctx.command.params}

    def check(key: str, value: Any) -> str | None:
        param = params[keys[key]]
        multiple = getattr(param, "multiple", False) and not isinstance(value, list)
        try:
            param.process_value(ctx, [value] if multiple else value)
        except typer.BadParameter as e:
            return str(e.message)
        return None

    return check


def _config_callback(ctx: typer.Context, value: Path | None) -> Path | None:
    if value is not None:
        with _errors():
            options = config.load_file(value, _option_keys(ctx), _value_check(ctx))
        ctx.default_map = _merge(ctx.default_map or {}, _as_defaults(ctx, options))
    return value


def _preset_callback(ctx: typer.Context, value: str | None) -> str | None:
    if value is not None:
        with _errors():
            chosen = config.preset(value)
            options = config.checked_options(chosen.options, f"preset {value}", _option_keys(ctx))
        # A --config file given beside the preset wins over it, whichever comes first on the line.
        ctx.default_map = _merge(_as_defaults(ctx, options), ctx.default_map or {})
    return value


def _aligned_default(adapters: list[adapter_io.Named], notes: list[str]) -> str:
    """--aligned left out: the first adapter's base_model_name_or_path, read through its open directory."""
    first = adapters[0]
    if first.dir is None:
        raise first.error or SafeLoraError(f"{first.path}: cannot be read")
    name = adapter_io.read_config(first.dir).base_model_name_or_path
    if name is None or not (os.path.isdir(name) or sources.parse_ref(name) is not None):
        hint = f" (adapter_config.json names {name!r}, neither a local directory nor a Hub repo id)" if name else ""
        raise typer.BadParameter(f"required{hint}", param_hint="--aligned")
    notes.append(f"--aligned taken from adapter_config.json's base_model_name_or_path: {name}")
    return name


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _base_from_preset(aligned: str, notes: list[str]) -> str:
    """--base left out: the base of the preset whose aligned model is ``aligned``."""
    match = config.preset_for_aligned(aligned)
    if match is None:
        raise typer.BadParameter(
            f"required ({aligned} is not the aligned model of any preset; see --preset)", param_hint="--base"
        )
    notes.append(f"--base filled in from preset {match.name}: {match.base}")
    return match.base


def _emit(report: pipeline.Report, as_json: bool, quiet: bool = False) -> None:
    if as_json:
        sys.stdout.write(rendering.dumps(report) + "\n")
    if not quiet:
        rendering.render(report, _err_console() if as_json else _console())


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        is_eager=True,
        callback=_config_callback,
        help="YAML file with any of these options (keys like num_layers or num-layers); flags given here win.",
        show_default=False,
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        is_eager=True,
        callback=_preset_callback,
        help="A shipped pair: llama-2-7b, llama-2-13b, llama-3-8b, llama-3.1-8b, mistral-7b, qwen2.5-7b, gemma-2-9b.",
        show_default=False,
    ),
]


@app.command()
def project(
    ctx: typer.Context,
    adapter: AdaptersOpt,
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    threshold: ThresholdOpt = None,
    num_layers: NumLayersOpt = None,
    output: OutputOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    precision: PrecisionOpt = "float32",
    device: DeviceOpt = "auto",
    allow_dora: AllowDoraOpt = False,
    force: ForceOpt = False,
    no_backup: NoBackupOpt = False,
    quiet: QuietOpt = False,
    config_file: ConfigOpt = None,
    preset: PresetOpt = None,
    base_revision: BaseRevisionOpt = None,
    aligned_revision: AlignedRevisionOpt = None,
    token: TokenOpt = None,
    no_cache: NoCacheOpt = False,
    connections: ConnectionsOpt = 8,
) -> None:
    """Project a LoRA adapter (Safe LoRA): for each module, B ← C·B when its similarity is low.

    Rewrites adapter_model.safetensors in place (atomically) unless --output or --dry-run is given.
    Only the weights of the adapter's targeted modules are read, one tensor at a time; from a Hub
    repo, only their byte ranges are downloaded. Each module's projection operator is cached per
    (base, aligned) pair, so later runs on the same pair read nothing for it (--no-cache: off).
    """
    if threshold is not None and num_layers is not None:
        # A flag on the command line beats the other one coming from --config/--preset.
        if _from_command_line(ctx, "num_layers") and not _from_command_line(ctx, "threshold"):
            threshold = None
        elif _from_command_line(ctx, "threshold") and not _from_command_line(ctx, "num_layers"):
            num_layers = None
        else:
            raise typer.BadParameter("give --threshold or --num-layers, not both", param_hint="--num-layers")
    settings = pipeline.Settings(
        mode="number" if num_layers is not None else "threshold",
        threshold=0.5 if threshold is None else threshold,
        num_layers=num_layers,
        precision=_PRECISIONS[_choice(precision, _PRECISIONS, "--precision")],
        device=_DEVICES[_choice(device, _DEVICES, "--device")],
        allow_dora=allow_dora,
        force=force,
        dry_run=dry_run,
        output=output,
        backup=not no_backup,
    )
    notes: list[str] = []
    with _errors(), rendering.RunDisplay(_err_console(), enabled=not quiet) as display, ExitStack() as open_files:
        cache = None if no_cache else projection_cache.ProjectionCache()
        if cache is not None and (problem := cache.problem()) is not None:
            notes.append(problem)
            cache = None
        hub = sources.Hub.from_env(token, cache.refs if cache is not None else None)
        adapters = open_files.enter_context(adapter_io.open_all(adapter))
        aligned_spec = aligned if aligned is not None else _aligned_default(adapters, notes)
        base_spec = base if base is not None else _base_from_preset(aligned_spec, notes)
        base_src = _open(base_spec, base_revision, "--base", hub, display, notes, connections)
        open_files.callback(base_src.close)
        aligned_src = _open(aligned_spec, aligned_revision, "--aligned", hub, display, notes, connections)
        open_files.callback(aligned_src.close)
        outcomes = pipeline.project_adapters(
            adapters,
            base_src,
            aligned_src,
            settings,
            notes=notes,
            on_module=display.on_module,
            cache=_pair_cache(cache, base_src, aligned_src, notes),
            on_wait=display.say,
        )
        paths = [named.path for named in adapters]
        if len(outcomes) == 1 and isinstance(outcomes[0], SafeLoraError):
            raise outcomes[0]
    failed = sum(isinstance(o, SafeLoraError) for o in outcomes)
    _after_write("printing the report", lambda: _emit_batch(paths, outcomes, as_json, quiet))
    if failed:
        raise typer.Exit(1)


def _pair_cache(
    cache: projection_cache.ProjectionCache | None, base: sources.Source, aligned: sources.Source, notes: list[str]
) -> projection_cache.PairCache | None:
    """The pair's cache, or None (with a note) when its directory breaks the ownership rule."""
    if cache is None:
        return None
    pair = cache.pair(base.cache_identity(), aligned.cache_identity())
    problem = pair.problem()
    if problem is not None:
        notes.append(problem)
        return None
    return pair


def _emit_batch(
    adapters: list[Path], outcomes: list[pipeline.Report | SafeLoraError], as_json: bool, quiet: bool
) -> None:
    """One report per adapter (a JSON array for several); each failure is one line."""
    if len(adapters) == 1 and isinstance(outcomes[0], pipeline.Report):
        _emit(outcomes[0], as_json, quiet)
        return
    console = _err_console() if as_json else _console()
    for outcome in outcomes:
        if isinstance(outcome, pipeline.Report):
            if not quiet:
                rendering.render(outcome, console)
        else:
            _print_error(outcome)
    failed = sum(isinstance(o, SafeLoraError) for o in outcomes)
    if not quiet:
        console.print(f"{len(adapters) - failed} of {len(adapters)} adapters done, {failed} failed", highlight=False)
    if as_json:
        docs = [
            o.to_json() if isinstance(o, pipeline.Report) else {"adapter": str(p), "error": str(o)}
            for p, o in zip(adapters, outcomes, strict=True)
        ]
        sys.stdout.write(json.dumps(docs, indent=2, allow_nan=False) + "\n")


def _open(
    spec: str,
    revision: str | None,
    flag: str,
    hub: sources.Hub,
    transfer: sources.Transfer,
    notes: list[str],
    connections: int = 8,
) -> sources.Source:
    return sources.open_source(
        spec, revision, flag=flag, hub=hub, transfer=transfer, notes=notes, connections=connections
    )


@app.command()
def demo(
    as_json: JsonOpt = False,
    keep: Annotated[
        Path | None,
        typer.Option(help="Build the example in this directory (new or empty) and keep it (default: a temp dir)."),
    ] = None,
) -> None:
    """Build a tiny base/aligned/adapter set (no downloads) and run `project` on it."""
    with _errors(), tempfile.TemporaryDirectory(prefix="safelora-demo-") as tmp:
        if keep is not None:
            _require_empty(keep)
        root = keep or Path(tmp)
        base, aligned, adapter = demo_data.build(root)
        console = _err_console() if as_json else _console()
        dim = "dim"
        console.print(line((f"tiny example in {root}: base (sharded), aligned, adapter (q_proj/v_proj, r=8)", dim)))
        console.print(line((f"$ safelora project --base {base} --aligned {aligned} --adapter {adapter}", dim)))
        base_src, aligned_src = sources.open_local(base), sources.open_local(aligned)
        try:
            report = pipeline.project_adapter(adapter, base_src, aligned_src, pipeline.Settings())
        finally:
            base_src.close()
            aligned_src.close()
        _emit(report, as_json)


def _require_empty(path: Path) -> None:
    """``demo --keep``: a new directory, or an empty one; never one that holds anything."""
    try:
        if not os.path.lexists(path):
            return
        if path.is_symlink() or not path.is_dir():
            raise SafeLoraError(f"{path}: exists and is not a directory; pass a new or empty directory to --keep")
        if any(path.iterdir()):
            raise SafeLoraError(f"{path}: exists and is not empty; pass a new or empty directory to --keep")
    except OSError as e:
        raise SafeLoraError(f"{path}: {e.strerror}") from None


@app.command()
def check(
    adapter: CheckAdaptersOpt,
    base: Annotated[str | None, typer.Option(help="Also require this base model (a directory or a Hub repo).")] = None,
    aligned: Annotated[
        str | None, typer.Option(help="Also require this aligned model (a directory or a Hub repo).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Gate: is each adapter sanitized by safelora, unmodified since, and (optionally) against this pair?

    Every adapter given is judged. Exit codes: 0 all sanitized; 3 any never sanitized, sanitized
    against another pair, or modified since (and none errored); 1 any error (unreadable adapter or
    checkpoint); 2 usage.
    """
    if (base is None) != (aligned is None):
        raise typer.BadParameter("give both --base and --aligned, or neither", param_hint="--base/--aligned")
    results: list[tuple[Path, audit.CheckResult | SafeLoraError]] = []
    with _errors(), ExitStack() as stack:
        pair = None
        if base is not None and aligned is not None:
            hub = sources.Hub.from_env(None, projection_cache.ProjectionCache().refs)
            pair = (_identity(base, "--base", hub), _identity(aligned, "--aligned", hub))
        for named in stack.enter_context(adapter_io.open_all(adapter)):
            try:
                if named.dir is None:
                    raise named.error or SafeLoraError(f"{named.path}: cannot be read")
                results.append((named.path, audit.check(named.dir, pair)))
            except SafeLoraError as e:
                results.append((named.path, e))
        if len(results) == 1 and isinstance(results[0][1], SafeLoraError):
            raise results[0][1]
    console = _err_console() if as_json else _console()
    for _, result in results:
        if isinstance(result, SafeLoraError):
            _print_error(result)
        else:
            rendering.render_check(result, console)
    if as_json:
        docs = [
            rendering.check_to_json(r) if isinstance(r, audit.CheckResult) else {"adapter": str(p), "error": str(r)}
            for p, r in results
        ]
        sys.stdout.write(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2) + "\n")
    if any(isinstance(r, SafeLoraError) for _, r in results):
        raise typer.Exit(1)
    if not all(isinstance(r, audit.CheckResult) and r.ok for _, r in results):
        raise typer.Exit(3)


def _identity(spec: str, flag: str, hub: sources.Hub) -> str:
    src = _open(spec, None, flag, hub, sources.QuietTransfer(), [])
    try:
        return pipeline.source_info(src).identity
    finally:
        src.close()


@app.command("inspect")
def inspect_(
    adapter: Annotated[Path, typer.Argument(help="The PEFT LoRA adapter directory.")],
    as_json: JsonOpt = False,
) -> None:
    """Show what an adapter is (modules, ranks, dtypes, size, targets, DoRA…), its provenance, and
    whether the original of a projected adapter is kept (restore can bring it back)."""
    with _errors():
        info = audit.inspect(adapter, backups.BackupStore())
    if as_json:
        sys.stdout.write(json.dumps(rendering.inspection_to_json(info), indent=2) + "\n")
    else:
        rendering.render_inspection(info, _console())


@app.command()
def restore(
    adapter: Annotated[
        list[str],
        typer.Option(
            "--adapter",
            help="The adapter directory to restore. Repeat it, or give a quoted glob ('adapters/*').",
            show_default=False,
        ),
    ],
    force: Annotated[
        bool,
        typer.Option("--force/--no-force", help="Restore an adapter changed since safelora projected it."),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Put back the original adapter_model.safetensors that an in-place project kept, byte for byte.

    The original comes from the backup store (SAFELORA_BACKUPS), found by the sha256 in the
    adapter's provenance; the rewrite is atomic and locked, as project's. Refused for an adapter
    changed since safelora wrote it (its edits would be lost), unless --force.
    """
    outcomes: list[tuple[Path, backups.Restored | SafeLoraError]] = []
    with _errors(), ExitStack() as stack:
        store = backups.BackupStore()
        for named in stack.enter_context(adapter_io.open_all(adapter)):
            try:
                if named.dir is None:
                    raise named.error or SafeLoraError(f"{named.path}: cannot be read")
                wait = partial(_say, f"another safelora run is rewriting {named.path}; waiting for it", quiet)
                outcomes.append((named.path, backups.restore(named.dir, store, force=force, on_wait=wait)))
            except SafeLoraError as e:
                outcomes.append((named.path, e))
        if len(outcomes) == 1 and isinstance(outcomes[0][1], SafeLoraError):
            raise outcomes[0][1]
    _after_write("printing the result", lambda: _emit_restored(outcomes, as_json, quiet))
    if any(isinstance(o, SafeLoraError) for _, o in outcomes):
        raise typer.Exit(1)


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        _err_console().print(line((message, "dim")), highlight=False, soft_wrap=True)


def _emit_restored(outcomes: list[tuple[Path, backups.Restored | SafeLoraError]], as_json: bool, quiet: bool) -> None:
    console = _err_console() if as_json else _console()
    for path, outcome in outcomes:
        if isinstance(outcome, SafeLoraError):
            _print_error(outcome)
        elif not quiet:
            b = outcome.backup
            console.print(
                line(f"restored {path}: the original, sha256 {b.sha256[:12]}… ({rendering.size(b.nbytes)})"),
                highlight=False,
            )
    if as_json:
        docs = [
            {"adapter": str(p), "error": str(o)}
            if isinstance(o, SafeLoraError)
            else {"adapter": str(p), "restored": True, "sha256": o.backup.sha256, "bytes": o.backup.nbytes}
            for p, o in outcomes
        ]
        sys.stdout.write(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2) + "\n")


cache_app = typer.Typer(
    help="The projection cache: each module's operator per (base, aligned) pair, under SAFELORA_CACHE "
    "(default ~/.cache/safelora, or $XDG_CACHE_HOME/safelora); and the backups of originals, under "
    "SAFELORA_BACKUPS (default ~/.local/share/safelora/originals), removed only with --backups.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(
    modules: Annotated[bool, typer.Option("--modules", "-m", help="List each pair's modules too.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List cached pairs (key, base, aligned, modules, size) and kept originals (adapter, date, size).

    --json prints {"pairs": [...], "backups": [...]}, every pair with its modules.
    """
    with _errors():
        pairs = projection_cache.ProjectionCache().pairs()
        store = backups.BackupStore()
        kept = store.all()
    if as_json:
        sys.stdout.write(rendering.cache_json(pairs, kept) + "\n")
    else:
        rendering.render_cache(pairs, _console(), modules=modules)
        rendering.render_backups(kept, store.root, _console())


@cache_app.command("rm")
def cache_rm(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="Pair keys (or unique prefixes of them); with --backups, adapter directories.", show_default=False
        ),
    ],
    backups_: Annotated[
        bool,
        typer.Option(
            "--backups",
            help="Remove the kept originals of these adapter directories: the only copies, restore can no longer "
            "bring them back.",
        ),
    ] = False,
    yes: YesOpt = False,
) -> None:
    """Remove pairs' cached operators; with --backups, adapters' kept originals (asks first)."""
    if not backups_:
        with _errors():
            cache = projection_cache.ProjectionCache()
            for key in targets:
                removed = cache.remove(key)
                _console().print(
                    line(
                        f"removed pair {removed.key} ({len(removed.entries)} modules, {rendering.size(removed.nbytes)})"
                    ),
                    highlight=False,
                )
        return
    with _errors():
        store = backups.BackupStore()
        chosen = _backups_of(store, targets)
        gone = [b for b, dirs in chosen if set(b.adapters) <= dirs or not b.adapters]
        _confirm(f"{len(gone)} kept original(s), {rendering.size(sum(b.nbytes for b in gone))}", yes)
        store.remove(gone)
        for backup, dirs in chosen:
            if backup not in gone:
                for d in dirs:
                    store.forget(backup, d)
    _console().print(
        line(f"removed {len(gone)} kept original(s); {len(chosen) - len(gone)} still kept for other adapters"),
        highlight=False,
    )


def _backups_of(store: backups.BackupStore, targets: list[str]) -> list[tuple[backups.Backup, set[str]]]:
    """The backups kept for these adapter directories: the one each one's provenance names, and any
    recorded for its path. Each with the directories (absolute) it is being removed for."""
    kept = store.all()
    chosen: dict[str, tuple[backups.Backup, set[str]]] = {}
    for target in targets:
        where = os.path.abspath(target)
        found = [b for b in kept if where in b.adapters]
        if os.path.isdir(target):
            with adapter_io.opened(Path(target)) as adapter:
                sha = adapter.provenance().get(adapter_io.PROVENANCE_PREFIX + "original")
            found += [b for b in kept if b.sha256 == sha]
        if not found:
            raise SafeLoraError(f"{target}: no kept original in {store.root}")
        for b in found:
            chosen.setdefault(b.sha256, (b, set()))[1].add(where)
    return list(chosen.values())


def _confirm(what: str, yes: bool) -> None:
    """Ask before deleting backups: each is the only copy of an adapter's original."""
    warning = f"deleting {what}: each is the only copy of an adapter's original, restore cannot bring it back"
    if yes:
        return
    if not sys.stdin.isatty():
        raise typer.BadParameter(f"{warning}. Nothing was removed; pass --yes to delete them", param_hint="--yes")
    if not typer.confirm(f"{warning[0].upper()}{warning[1:]}. Delete?", default=False, err=True):
        _err_console().print(line("nothing was removed"), highlight=False)
        raise typer.Exit(1)


@cache_app.command("clear")
def cache_clear(
    backups_: Annotated[
        bool,
        typer.Option(
            "--backups",
            help="Remove the kept originals instead of the projection cache: the only copies, restore can no "
            "longer bring them back.",
        ),
    ] = False,
    older_than: Annotated[
        float | None,
        typer.Option(min=0, help="With --backups: only originals kept more than DAYS days ago.", metavar="DAYS"),
    ] = None,
    yes: YesOpt = False,
) -> None:
    """Remove every cached pair (a pair a running safelora is computing is kept); never the backups,
    unless --backups (which asks first)."""
    if older_than is not None and not backups_:
        raise typer.BadParameter("applies to --backups only", param_hint="--older-than")
    if backups_:
        with _errors():
            store = backups.BackupStore()
            limit = time.time() - older_than * 86400 if older_than is not None else None
            gone = [b for b in store.all() if limit is None or b.created < limit]
            _confirm(f"{len(gone)} kept original(s), {rendering.size(sum(b.nbytes for b in gone))}", yes)
            store.remove(gone)
        _console().print(line(f"removed {len(gone)} kept original(s) from {store.root}"), highlight=False)
        return
    with _errors():
        cache = projection_cache.ProjectionCache()
        removed, kept = cache.clear()
    console = _console()
    console.print(
        line(f"removed {len(removed)} pair(s), {rendering.size(sum(p.nbytes for p in removed))} from {cache.root}"),
        highlight=False,
    )
    for message in kept:
        _err_console().print(line(("kept:", "yellow"), " ", message), highlight=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safelora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Safe LoRA for PEFT adapters."""


def main() -> None:
    """Console-script entry point."""
    app()
