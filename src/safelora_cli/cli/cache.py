"""``safelora cache ls/rm/clear``: the projection cache and the kept originals, through the API."""

from __future__ import annotations

import sys
from functools import partial
from typing import Annotated

import typer

from .. import api
from . import render as rendering
from ._errors import err_console, errors
from ._options import REPORTS, SELECTION, Command, Group, JsonOpt, QuietOpt, YesOpt
from .console import line

app = typer.Typer(
    cls=Group,
    help="The projection cache: each module's operator per (base, aligned) pair, under SAFELORA_CACHE "
    "(default ~/.cache/safelora, or $XDG_CACHE_HOME/safelora); and the backups of originals, under "
    "SAFELORA_BACKUPS (default ~/.local/share/safelora/originals), removed only with --backups.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

BackupsFlag = Annotated[
    bool,
    typer.Option(
        "--backups",
        metavar="",
        help="The kept originals instead of the projection cache: each is the only copy of an adapter's "
        "original, restore can no longer bring it back.",
        rich_help_panel=SELECTION,
    ),
]


@app.command("ls", cls=Command, epilog="Examples:\n\n  safelora cache ls --modules\n\n  safelora cache ls --json\n")
def cache_ls(
    modules: Annotated[
        bool, typer.Option("--modules", "-m", help="List each pair's modules too.", metavar="", rich_help_panel=REPORTS)
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List cached pairs (key, base, aligned, modules, size) and kept originals (adapter, date, size).

    --json prints {"pairs": [...], "backups": [...]}, every pair with its modules.
    """
    sink = rendering.Sink(as_json=as_json, quiet=quiet, fit=True)
    with errors(sink):
        found = api.cache_list()
    sink.add(
        rendering.cache_to_json(found.pairs, found.backups),
        lambda c: rendering.render_cache(found.pairs, found.backups, found.backups_root, c, modules=modules),
    )
    sink.emit(batch=False)


@app.command(
    "rm",
    cls=Command,
    epilog="Examples:\n\n  safelora cache rm 3f2a9c\n\n  safelora cache rm --backups ./my-adapter --yes\n",
)
def cache_rm(
    targets: Annotated[
        list[str],
        typer.Argument(
            metavar="KEY_OR_ADAPTER...",
            help="Pair keys (or unique prefixes of them); with --backups, adapter directories.",
            show_default=False,
        ),
    ],
    backups_: BackupsFlag = False,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove pairs' cached operators; with --backups, adapters' kept originals (asks first)."""
    sink = rendering.Sink(as_json=as_json, quiet=quiet)
    if not backups_:
        with errors(sink):
            for key in targets:
                removed = api.cache_remove(key)
                sink.add(rendering.pair_to_json(removed), partial(rendering.render_removed_pair, removed))
        sink.emit(batch=len(targets) > 1)
        return
    with errors(sink):
        _confirm(api.backups_to_remove(targets), yes)
        done = api.remove_backups(targets)
    sink.add(
        {
            "removed": [b.to_json() for b in done.removed],
            "kept_for_other_adapters": done.kept_for_other_adapters,
        },
        lambda c: c.print(
            line(
                f"removed {len(done.removed)} kept original(s); "
                f"{done.kept_for_other_adapters} still kept for other adapters"
            ),
            highlight=False,
        ),
    )
    sink.emit(batch=False)


def _confirm(gone: list[api.Backup], yes: bool) -> None:
    """Ask before deleting backups: each is the only copy of an adapter's original."""
    what = f"{len(gone)} kept original(s), {rendering.size(sum(b.nbytes for b in gone))}"
    warning = f"deleting {what}: each is the only copy of an adapter's original, restore cannot bring it back"
    if yes:
        return
    if not sys.stdin.isatty():
        raise typer.BadParameter(f"{warning}. Nothing was removed; pass --yes to delete them", param_hint="--yes")
    if not typer.confirm(f"{warning[0].upper()}{warning[1:]}. Delete?", default=False, err=True):
        err_console().print(line("nothing was removed"), highlight=False)
        raise typer.Exit(1)


@app.command(
    "clear",
    cls=Command,
    epilog="Examples:\n\n  safelora cache clear\n\n  safelora cache clear --backups --older-than 30\n",
)
def cache_clear(
    backups_: BackupsFlag = False,
    older_than: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="With --backups: only originals kept more than DAYS days ago.",
            metavar="DAYS",
            rich_help_panel=SELECTION,
        ),
    ] = None,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove every cached pair (a pair a running safelora is computing is kept); never the backups,
    unless --backups (which asks first)."""
    if older_than is not None and not backups_:
        raise typer.BadParameter("applies to --backups only", param_hint="--older-than")
    sink = rendering.Sink(as_json=as_json, quiet=quiet)
    if backups_:
        with errors(sink):
            _confirm(api.backups_to_remove(older_than_days=older_than), yes)
            done = api.remove_backups(older_than_days=older_than)
        sink.add(
            {"removed": [b.to_json() for b in done.removed]},
            lambda c: c.print(line(f"removed {len(done.removed)} kept original(s) from {done.root}"), highlight=False),
        )
        sink.emit(batch=False)
        return
    with errors(sink):
        cleared = api.cache_clear()
    sink.add(
        {"removed": [rendering.pair_to_json(p) for p in cleared.removed], "kept": cleared.kept},
        lambda c: rendering.render_cleared(cleared.removed, cleared.kept, cleared.root, c),
    )
    sink.emit(batch=False)
