"""The ``safelora`` command line: parse, call the pipeline, render. No math here."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from . import demo as demo_data
from .adapter import load_adapter
from .cache import ProjectionCache
from .errors import SafeLoraError
from .hub import Hub, open_source, parse_ref
from .pipeline import Device, Precision, Report, Settings, project_adapter
from .report import TransferDisplay, cache_json, dumps, render, render_cache, size
from .sources import open_local

app = typer.Typer(
    help="Safe LoRA for PEFT adapters: project each LoRA update onto the alignment subspace of "
    "W_aligned − W_base when it looks unlike it. Exit codes: 0 done, 1 input or I/O error, 2 usage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

BaseOpt = Annotated[
    str,
    typer.Option(
        help="The unaligned base model: a local directory (safetensors, single or sharded, or .bin), or a Hub "
        "repo org/name[@revision]. An existing local path wins; hf://org/name always means the Hub.",
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
NoCacheOpt = Annotated[
    bool,
    typer.Option("--no-cache", help="Neither read nor write the projection cache (SAFELORA_CACHE)."),
]
AdapterOpt = Annotated[Path, typer.Option(help="The PEFT LoRA adapter directory to patch.")]
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
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Compute and report; write nothing.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout; the table goes to stderr.")]
PrecisionOpt = Annotated[str, typer.Option(help="Compute precision: float32 or float64.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
AllowDoraOpt = Annotated[
    bool,
    typer.Option("--allow-dora", help="Project lora_B of a DoRA adapter; magnitudes are left unchanged."),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Project an adapter that already carries safelora provenance; reuse a non-empty --output.",
    ),
]

_PRECISIONS: dict[str, Precision] = {"float32": "float32", "float64": "float64"}
_DEVICES: dict[str, Device] = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}


def _err_console() -> Console:
    return Console(stderr=True)


@contextmanager
def _errors() -> Iterator[None]:
    """The one place errors become a one-line message and an exit code."""
    try:
        yield
    except SafeLoraError as e:
        if os.environ.get("SAFELORA_DEBUG"):
            traceback.print_exc()
        _err_console().print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None


def _choice(value: str, choices: Mapping[str, str], flag: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"expected one of {', '.join(choices)}", param_hint=flag)
    return value


def _aligned_default(adapter: Path, notes: list[str]) -> str:
    name = load_adapter(adapter).config.base_model_name_or_path
    if name is None or not (Path(name).is_dir() or parse_ref(name) is not None):
        hint = f" (adapter_config.json names {name!r}, neither a local directory nor a Hub repo id)" if name else ""
        raise typer.BadParameter(f"required{hint}", param_hint="--aligned")
    notes.append(f"--aligned taken from adapter_config.json's base_model_name_or_path: {name}")
    return name


def _emit(report: Report, as_json: bool) -> None:
    if as_json:
        render(report, _err_console())
        sys.stdout.write(dumps(report) + "\n")
    else:
        render(report, Console())


@app.command()
def project(
    base: BaseOpt,
    adapter: AdapterOpt,
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
    base_revision: BaseRevisionOpt = None,
    aligned_revision: AlignedRevisionOpt = None,
    token: TokenOpt = None,
    no_cache: NoCacheOpt = False,
) -> None:
    """Project a LoRA adapter (Safe LoRA): for each module, B ← C·B when its similarity is low.

    Rewrites adapter_model.safetensors in place (atomically) unless --output or --dry-run is given.
    Only the weights of the adapter's targeted modules are read, one tensor at a time; from a Hub
    repo, only their byte ranges are downloaded. Each module's projection operator is cached per
    (base, aligned) pair, so later runs on the same pair read nothing for it (--no-cache: off).
    """
    if threshold is not None and num_layers is not None:
        raise typer.BadParameter("give --threshold or --num-layers, not both", param_hint="--num-layers")
    settings = Settings(
        mode="number" if num_layers is not None else "threshold",
        threshold=0.5 if threshold is None else threshold,
        num_layers=num_layers,
        precision=_PRECISIONS[_choice(precision, _PRECISIONS, "--precision")],
        device=_DEVICES[_choice(device, _DEVICES, "--device")],
        allow_dora=allow_dora,
        force=force,
        dry_run=dry_run,
        output=output,
    )
    notes: list[str] = []
    err = _err_console()
    with _errors(), TransferDisplay(err) as transfer, ExitStack() as open_files:
        cache = None if no_cache else ProjectionCache()
        hub = Hub.from_env(token, cache.refs if cache is not None else None)
        aligned_spec = aligned if aligned is not None else _aligned_default(adapter, notes)
        sources = []
        for flag, spec, revision in (("--base", base, base_revision), ("--aligned", aligned_spec, aligned_revision)):
            src = open_source(spec, revision, flag=flag, hub=hub, transfer=transfer, notes=notes)
            open_files.callback(src.close)
            sources.append(src)
        base_src, aligned_src = sources
        report = project_adapter(
            adapter,
            base_src,
            aligned_src,
            settings,
            notes=notes,
            cache=cache.pair(base_src.cache_identity(), aligned_src.cache_identity()) if cache else None,
            on_cache_wait=lambda: err.print(
                "[dim]another safelora run is computing this pair's projection cache; waiting for it[/dim]"
            ),
        )
    _emit(report, as_json)


@app.command()
def demo(
    as_json: JsonOpt = False,
    keep: Annotated[
        Path | None,
        typer.Option(help="Build the example in this directory and keep it (default: a temp dir)."),
    ] = None,
) -> None:
    """Build a tiny base/aligned/adapter set (no downloads) and run `project` on it."""
    with _errors(), tempfile.TemporaryDirectory(prefix="safelora-demo-") as tmp:
        root = keep or Path(tmp)
        base, aligned, adapter = demo_data.build(root)
        console = _err_console() if as_json else Console()
        console.print(f"[dim]tiny example in {root}: base (sharded), aligned, adapter (q_proj/v_proj, r=8)[/dim]")
        console.print(
            f"[dim]$ safelora project --base {base} --aligned {aligned} --adapter {adapter}[/dim]",
            highlight=False,
        )
        base_src, aligned_src = open_local(base), open_local(aligned)
        try:
            report = project_adapter(adapter, base_src, aligned_src, Settings())
        finally:
            base_src.close()
            aligned_src.close()
        _emit(report, as_json)


cache_app = typer.Typer(
    help="The projection cache: each module's operator per (base, aligned) pair, under SAFELORA_CACHE "
    "(default ~/.cache/safelora, or $XDG_CACHE_HOME/safelora).",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(
    modules: Annotated[bool, typer.Option("--modules", "-m", help="List each pair's modules too.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List cached pairs (key, base, aligned, modules, size); --json includes every module."""
    with _errors():
        pairs = ProjectionCache().pairs()
    if as_json:
        sys.stdout.write(cache_json(pairs) + "\n")
    else:
        render_cache(pairs, Console(), modules=modules)


@cache_app.command("rm")
def cache_rm(pair: Annotated[str, typer.Argument(help="The pair's key, or a unique prefix of it.")]) -> None:
    """Remove one pair's cached operators."""
    with _errors():
        removed = ProjectionCache().remove(pair)
    Console().print(f"removed pair {removed.key} ({len(removed.entries)} modules, {size(removed.nbytes)})")


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every cached pair (a pair that a running safelora is computing is kept)."""
    with _errors():
        cache = ProjectionCache()
        removed, kept = cache.clear()
    console = Console()
    console.print(f"removed {len(removed)} pair(s), {size(sum(p.nbytes for p in removed))} from {cache.root}")
    for message in kept:
        _err_console().print(f"[yellow]kept:[/yellow] {message}", highlight=False)


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
