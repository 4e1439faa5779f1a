"""``safelora check``, ``inspect`` and ``restore``: an adapter's provenance, judged, shown or undone."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from .. import api
from ..errors import SafeLoraError, UsageError
from . import render as rendering
from ._batch import deliver, expanded, interruptible
from ._errors import after_write, describe, errors
from ._options import (
    ADVANCED,
    INPUTS,
    OUTPUT,
    AdapterArgs,
    AdaptersOpt,
    JsonLinesOpt,
    QuietOpt,
    TokenOpt,
    adapter_specs,
    flag,
)

CHECK_EXAMPLES = """Examples:

  safelora check ./my-adapter

  safelora check 'adapters/*' --base meta-llama/Llama-2-7b-hf --aligned meta-llama/Llama-2-7b-chat-hf --json
"""


def check(
    adapters: AdapterArgs = None,
    adapter: AdaptersOpt = None,
    base: Annotated[
        str | None,
        typer.Option(
            metavar="REF",
            help="Also require this base model (a directory or a Hub repo).",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    aligned: Annotated[
        str | None,
        typer.Option(
            metavar="REF",
            help="Also require this aligned model (a directory or a Hub repo).",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    original: Annotated[
        str | None,
        typer.Option(
            metavar="DIR",
            help="Verify by recomputation: project this original adapter (before projection) against --base "
            "and --aligned again, from the checkpoints' weights (never the shared projection cache), with the "
            "settings the stamp records; it must reproduce the adapter. Needs --base and --aligned.",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    trust_stamp: Annotated[
        bool,
        flag(
            "--trust-stamp/--no-trust-stamp",
            "Pass an intact stamp without verifying it (the behaviour before 0.2). This only guards against "
            "accidents: anyone who can write the adapter's files can write a stamp that passes.",
            rich_help_panel=ADVANCED,
        ),
    ] = False,
    public_key: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="FILE",
            help="Verify by signature: a PEM public key (repeat for several; default: the files "
            "SAFELORA_PUBLIC_KEYS lists, separated as PATH is). Passes only when one of them signed the "
            "adapter's attestation (safelora.intoto.json), and reports what it attests. Needs safelora[sign].",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="What a verified adapter must also meet (YAML: base, aligned, mode, threshold_min, "
            "threshold_max, num_layers_min, projected_min, keys); outside it, exit 3. Needs safelora[sign].",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    token: TokenOpt = None,
    as_json: JsonLinesOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Gate: is each adapter sanitized by safelora, unmodified since, verified, and (optionally)
    against this pair?

    Verified means: safelora's local record says it wrote these exact bytes on this machine; or
    --original reproduces it; or --trust-stamp; or, with --public-key, a signed attestation (and
    then nothing else does). --base/--aligned compare by content: the weights the
    adapter was projected with, as its provenance lists them, by digest of dtype, shape and bytes, so
    a copy, a Hugging Face cache snapshot or the Hub repo of the same weights passes. With an empty
    memo this reads those targeted tensors of both checkpoints once; their digests are then kept by
    file stat in the private backup store (never taken from the shared projection cache). Every
    adapter given is judged. Exit codes: 0 all sanitized and verified; 3 any never sanitized,
    sanitized against another pair, modified since, or unverified (and none errored); 1 any error
    (unreadable adapter or checkpoint); 2 usage.
    """
    specs = adapter_specs(adapters, adapter)
    if (base is None) != (aligned is None):
        raise typer.BadParameter("give both --base and --aligned, or neither", param_hint="--base/--aligned")
    if original is not None and base is None:
        raise typer.BadParameter("--original needs --base and --aligned", param_hint="--original")
    if public_key and (original is not None or trust_stamp):
        raise typer.BadParameter(
            "verifies by signature: give it without --original or --trust-stamp", param_hint="--public-key"
        )
    sink = rendering.Sink(as_json=as_json, quiet=quiet, lines=True)
    paths = expanded(specs)
    results: list[api.CheckResult | SafeLoraError] = []
    with errors(sink, paths), interruptible(paths, in_place=False):
        for path in paths():
            try:
                results.append(
                    api.check(
                        path,
                        base=base,
                        aligned=aligned,
                        token=token,
                        original=original,
                        trust_stamp=trust_stamp,
                        public_keys=public_key or None,
                        policy=policy,
                    )
                )
            except UsageError:
                raise
            except SafeLoraError as e:
                e.adapter = path
                results.append(e)
    by_signature = bool(public_key) or bool(os.environ.get(api.PUBLIC_KEYS_ENV))
    deliver(sink, results, api.CheckResult.to_json, partial(rendering.render_check, by_signature=by_signature))
    sink.emit()
    if sink.failed:
        raise typer.Exit(1)
    if not all(not isinstance(r, SafeLoraError) and r.ok for r in results):
        raise typer.Exit(3)


INSPECT_EXAMPLES = """Examples:

  safelora inspect ./my-adapter

  safelora inspect ./my-adapter --json
"""


def inspect_(
    adapters: AdapterArgs = None,
    adapter: AdaptersOpt = None,
    as_json: JsonLinesOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show what an adapter is (modules, ranks, dtypes, size, targets, DoRA or not), its provenance, and
    whether the original of a projected adapter is kept (restore can bring it back)."""
    specs = adapter_specs(adapters, adapter)
    sink = rendering.Sink(as_json=as_json, quiet=quiet, lines=True, fit=True)
    paths = expanded(specs)
    with errors(sink, paths):
        for path in paths():
            try:
                info = api.inspect(path)
            except UsageError:
                raise
            except SafeLoraError as e:
                sink.fail(path, describe(e))
                continue
            sink.add(info.to_json(), partial(rendering.render_inspection, info))
    sink.emit()
    if sink.failed:
        raise typer.Exit(1)


RESTORE_EXAMPLES = """Examples:

  safelora restore ./my-adapter

  safelora restore 'adapters/*' --json
"""


def restore(
    adapters: AdapterArgs = None,
    adapter: AdaptersOpt = None,
    force: Annotated[
        bool,
        flag(
            "--force/--no-force",
            "Restore an adapter changed since safelora projected it (losing the change).",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    as_json: JsonLinesOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Put back the original adapter_model.safetensors that an in-place project kept, byte for byte.

    The original comes from the backup store (SAFELORA_BACKUPS), found by the sha256 in the
    adapter's provenance; the rewrite is atomic and locked, as project's. Refused for an adapter
    changed since safelora wrote it (its edits would be lost), unless --force.
    """
    specs = adapter_specs(adapters, adapter)
    sink = rendering.Sink(as_json=as_json, quiet=quiet, lines=True)
    paths = expanded(specs)
    with errors(sink, paths), interruptible(paths, in_place=True):
        outcomes = api.restore(list(specs), force=force)
    failed = sum(isinstance(o, SafeLoraError) for o in outcomes)

    def show() -> None:
        deliver(sink, outcomes, api.Restored.to_json, rendering.render_restored)
        sink.emit()

    after_write(show)
    if failed:
        raise typer.Exit(1)
