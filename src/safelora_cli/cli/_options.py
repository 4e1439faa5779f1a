"""What the commands share: the command and group classes that make --help and usage errors read
well, the panels of --help, and the option aliases."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from .. import api
from ._errors import standalone, usage_errors

if TYPE_CHECKING:
    from ..api import Sort

# The panels of a command's --help, in the order they are shown. Every option names one with
# ``rich_help_panel=`` (tests/test_help.py holds every command to it). -h/--help joins Reports, beside
# -q (a short name needs a column of its own in a panel), or else the last panel.
INPUTS = "Inputs"  # what is read: adapters, checkpoints, a config or preset
SELECTION = "Selection"  # which modules are projected
OUTPUT = "Output"  # what is written, and whether an existing result may be replaced
REPORTS = "Reports"  # what is printed or written about the run
HUB = "Hub"  # downloads from the Hugging Face Hub
ADVANCED = "Advanced"  # how the math runs, and the cache
PANELS = (INPUTS, SELECTION, OUTPUT, REPORTS, HUB, ADVANCED)


class Command(TyperCommand):
    """A command whose --help reads well: positional arguments show their metavar, not Typer's
    ``<list[str]>``, -h/--help shows no ``<bool>``, the docstring's paragraphs are re-flowed to
    the terminal's width instead of keeping the source's line breaks, brackets in the text
    (``org/name[@revision]``, ``safelora[plot]``) stay text instead of being read as Rich markup,
    and the options are shown by panel in the order of ``PANELS``, whatever the order of the
    function's parameters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument) and param.metavar:
                _no_type(param)
            if getattr(param, "help", None):
                param.help = escape(param.help)  # type: ignore[attr-defined]
        self.params.sort(key=_panel_rank)
        if self.help:
            paragraphs = inspect.cleandoc(self.help).split("\n\n")
            self.help = escape("\n\n".join(" ".join(p.split("\n")) for p in paragraphs))
        if self.epilog:
            self.epilog = escape(self.epilog)

    def get_help_option(self, ctx: Any) -> TyperOption | None:
        option = super().get_help_option(ctx)
        if option is not None:
            _no_type(option)
            panels = [p.rich_help_panel for p in self.params if isinstance(p, TyperOption) and p.rich_help_panel]
            option.rich_help_panel = REPORTS if REPORTS in panels else panels[-1] if panels else None
        return option


def _no_type(param: TyperArgument | TyperOption) -> None:
    """Show no type after the parameter's name (Typer's ``<bool>``, ``<list[str]>``)."""
    param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]


def _panel_rank(param: Any) -> int:
    """Arguments first, then the options by panel (a panel not in ``PANELS`` last); stable within one."""
    if isinstance(param, TyperArgument):
        return -1
    panel = getattr(param, "rich_help_panel", None)
    return PANELS.index(panel) if panel in PANELS else len(PANELS)


class Group(TyperGroup):
    """A group whose usage errors, and those of every command under it, are worded by ``usage_errors``:
    three plain lines on a pipe, Typer's panel on a terminal, a mistyped option's likeliest meaning.
    Its own options, all flags (--version, the shell completion's), show no ``<bool>``."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperOption):
                _no_type(param)
        return params

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # Click's main(args, prog_name, complete_var, standalone_mode, ...): standalone_mode is the
        # fourth, by position or by name.
        token = standalone.set(bool(args[3]) if len(args) > 3 else kwargs.get("standalone_mode", True))
        try:
            return super().main(*args, **kwargs)
        finally:
            standalone.reset(token)

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with usage_errors():
            return super().invoke(ctx)


def flag(names: str, help: str, *short: str, rich_help_panel: str) -> Any:
    """A boolean flag with its --no- form: no metavar, and the default shown as the flag that is on."""
    return typer.Option(names, *short, help=help, metavar="", rich_help_panel=rich_help_panel)


BaseOpt = Annotated[
    str | None,
    typer.Option(
        metavar="REF",
        help="The unaligned base model: a local directory (safetensors, single or sharded, or .bin), or a Hub "
        "repo org/name[@revision]. An existing local path wins; hf://org/name always means the Hub. "
        "Default: the preset's base when --aligned is a preset's aligned model.",
        show_default=False,
        rich_help_panel=INPUTS,
    ),
]
AlignedOpt = Annotated[
    str | None,
    typer.Option(
        metavar="REF",
        help="The aligned (chat) model, as --base. Default: adapter_config.json's base_model_name_or_path when "
        "it is a local directory or a Hub repo id.",
        show_default=False,
        rich_help_panel=INPUTS,
    ),
]
BaseRevisionOpt = Annotated[
    str | None,
    typer.Option(
        metavar="REV",
        help="Branch, tag or commit sha of a Hub --base (default: main).",
        show_default=False,
        rich_help_panel=HUB,
    ),
]
AlignedRevisionOpt = Annotated[
    str | None,
    typer.Option(
        metavar="REV",
        help="Branch, tag or commit sha of a Hub --aligned (default: main).",
        show_default=False,
        rich_help_panel=HUB,
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        metavar="TOKEN",
        help="Hugging Face token for gated or private repos. Default: HF_TOKEN, then the stored login. "
        "Never printed or stored.",
        show_default=False,
        rich_help_panel=HUB,
    ),
]
ConnectionsOpt = Annotated[
    int,
    typer.Option(
        min=1,
        max=64,
        metavar="N",
        help="HTTP connections for Hub downloads, shared by --base and --aligned: the byte ranges a run "
        "needs are fetched over this many at once.",
        rich_help_panel=HUB,
    ),
]
NoCacheOpt = Annotated[
    bool,
    flag(
        "--no-cache/--cache", "Neither read nor write the projection cache (SAFELORA_CACHE).", rich_help_panel=ADVANCED
    ),
]
AdapterArgs = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="ADAPTER",
        help="LoRA adapters (or quoted globs such as 'adapters/*'), as --adapter.",
        show_default=False,
    ),
]
AdaptersOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter",
        metavar="PATH",
        help="A LoRA adapter: a PEFT or MLX-LM directory, or a GGUF LoRA file. Repeat it, or give a quoted "
        "glob ('adapters/*'), for several against one pair: each projection operator is read or computed "
        "once for all. A path that exists is taken as it is, never as a glob.",
        show_default=False,
        rich_help_panel=INPUTS,
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        min=-1.0,
        max=1.0,
        metavar="τ",
        help="Project every module whose similarity (rounded to 5 decimals) is ≤ τ. [default: 0.5]",
        rich_help_panel=SELECTION,
    ),
]
NumLayersOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        metavar="K",
        help="Number mode: project the K modules with the lowest similarities (ties included).",
        rich_help_panel=SELECTION,
    ),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="DIR",
        help="Write a complete patched adapter directory here (several adapters: DIR/<adapter name> each) and "
        "leave the source untouched.",
        show_default=False,
        rich_help_panel=OUTPUT,
    ),
]
DryRunOpt = Annotated[
    bool, flag("--dry-run/--no-dry-run", "Compute and report; write nothing.", rich_help_panel=OUTPUT)
]
SignKeyOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="Sign what is written: a PEM PKCS#8 private key (Ed25519, or ECDSA P-256), whose signed in-toto "
        "attestation goes beside the adapter (safelora.intoto.json). Default: SAFELORA_SIGN_KEY (a file, or the "
        "PEM itself); an encrypted key's passphrase is read from the environment (see Signing in the README). "
        "Needs safelora[sign].",
        show_default=False,
        rich_help_panel=OUTPUT,
    ),
]
JsonOpt = Annotated[
    bool,
    flag(
        "--json/--no-json",
        "One JSON document on stdout (an array for several); the rest goes to stderr.",
        rich_help_panel=REPORTS,
    ),
]
JsonLinesOpt = Annotated[
    bool,
    flag(
        "--json/--no-json",
        "JSON Lines on stdout: one object per adapter, one per line; the rest goes to stderr.",
        rich_help_panel=REPORTS,
    ),
]
QuietOpt = Annotated[
    bool,
    flag("--quiet/--no-quiet", "Print nothing but errors (and the JSON with --json).", "-q", rich_help_panel=REPORTS),
]
AllowDoraOpt = Annotated[
    bool,
    flag(
        "--allow-dora/--no-allow-dora",
        "Project lora_B of a DoRA adapter; magnitudes are left unchanged.",
        rich_help_panel=SELECTION,
    ),
]
AllowCheckpointOpt = Annotated[
    bool,
    flag(
        "--allow-checkpoint/--no-allow-checkpoint",
        "Rewrite the adapter of a Trainer checkpoint in place (resuming then continues from projected weights).",
        rich_help_panel=OUTPUT,
    ),
]
NoBackupOpt = Annotated[
    bool,
    flag(
        "--no-backup/--backup",
        "Keep no copy of the original before an in-place rewrite (SAFELORA_BACKUPS): restore then cannot undo the run.",
        rich_help_panel=OUTPUT,
    ),
]
ForceOpt = Annotated[
    bool,
    flag(
        "--force/--no-force",
        "Project what is there: an adapter whose stamp is not verified or whose original is not kept is "
        "projected again, on top of the earlier projection (a double projection); one changed since starts "
        "from its kept original if that original's lora_A is still its own; reuse a non-empty --output.",
        rich_help_panel=OUTPUT,
    ),
]
ModelCardOpt = Annotated[
    bool,
    flag(
        "--model-card/--no-model-card",
        "Write a Safe LoRA section (version, pair, settings, projected modules) into the written adapter's "
        "README.md, between markers (a rerun replaces it), and tag the card safelora.",
        rich_help_panel=OUTPUT,
    ),
]
SummaryOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="Append a Markdown section per adapter to FILE: the pair, the settings, the counts, a Mermaid chart "
        "of the similarities and the projected modules. Default: $GITHUB_STEP_SUMMARY when set (GitHub "
        "Actions); --quiet does not stop it.",
        show_default=False,
        rich_help_panel=REPORTS,
    ),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="Draw each module's similarity, by layer, with τ, to FILE.png or FILE.svg (needs safelora[plot]). "
        "Several adapters: FILE-1.png, FILE-2.png and so on, in the order they are reported.",
        show_default=False,
        rich_help_panel=REPORTS,
    ),
]
SORTS: dict[str, Sort] = {"layer": "layer", "similarity": "similarity"}
PRECISIONS: dict[str, api.Precision] = {"float32": "float32", "float64": "float64"}
DEVICES: dict[str, api.Device] = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}


def _one_of(choices: Mapping[str, str]) -> Callable[[str], str]:
    """An option's check of its value against ``choices``: part of parsing the option, so that the
    same value from a --config file is refused with the file and line."""

    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"expected one of {', '.join(choices)}")
        return value

    return check


def complete(choices: Mapping[str, str]) -> Callable[[str], list[str]]:
    return lambda incomplete: [c for c in choices if c.startswith(incomplete)]


def _choice(choices: Mapping[str, str], metavar: str, help: str, *, rich_help_panel: str) -> Any:
    """An option that takes one of ``choices``, checked while parsing and completed in the shell."""
    return typer.Option(
        metavar=metavar,
        help=help,
        callback=_one_of(choices),
        autocompletion=complete(choices),
        rich_help_panel=rich_help_panel,
    )


SortOpt = Annotated[
    str,
    _choice(SORTS, "KEY", "Order of the table's rows: layer, or similarity (lowest first).", rich_help_panel=REPORTS),
]
ProjectedOnlyOpt = Annotated[
    bool,
    flag("--projected-only/--all-modules", "List only the projected modules in the table.", rich_help_panel=REPORTS),
]


def complete_preset(incomplete: str) -> list[str]:
    return [name for name in api.preset_names() if name.startswith(incomplete)]


PrecisionOpt = Annotated[str, _choice(PRECISIONS, "float32|float64", "Compute precision.", rich_help_panel=ADVANCED)]
DeviceOpt = Annotated[
    str, _choice(DEVICES, "auto|cpu|cuda", "Where the math runs (auto: CUDA when present).", rich_help_panel=ADVANCED)
]


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="YAML file with any of these options (keys like num_layers or num-layers); flags given here win.",
        show_default=False,
        rich_help_panel=INPUTS,
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        autocompletion=complete_preset,
        help="A shipped pair: llama-2-7b, llama-2-13b, llama-3-8b, llama-3.1-8b, mistral-7b, qwen2.5-7b, gemma-2-9b.",
        show_default=False,
        rich_help_panel=INPUTS,
    ),
]
YesOpt = Annotated[
    bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.", metavar="", rich_help_panel=OUTPUT)
]


def adapter_specs(positional: list[str] | None, option: list[str] | None) -> list[str]:
    """Adapters given as arguments and with --adapter, in that order; at least one."""
    specs = [*(positional or []), *(option or [])]
    if not specs:
        raise typer.BadParameter("give an adapter directory (as an argument or with --adapter)", param_hint="ADAPTER")
    return specs
