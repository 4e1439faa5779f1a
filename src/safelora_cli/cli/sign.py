"""``safelora sign``: sign an adapter safelora sanitized, once it is verified (after a key rotation,
or for an adapter projected without --sign-key)."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import api
from ..errors import SafeLoraError, UsageError
from . import render as rendering
from ._batch import deliver, expanded, interruptible
from ._errors import errors
from ._options import INPUTS, AdapterArgs, AdaptersOpt, JsonLinesOpt, QuietOpt, SignKeyOpt, TokenOpt, adapter_specs

EXAMPLES = """Examples:

  safelora sign ./my-adapter --sign-key release.pem

  safelora sign ./my-adapter --sign-key new.pem --original ./my-adapter-orig --base ./llama-base --aligned ./llama-chat
"""


def sign(
    adapters: AdapterArgs = None,
    adapter: AdaptersOpt = None,
    sign_key: SignKeyOpt = None,
    original: Annotated[
        str | None,
        typer.Option(
            metavar="DIR",
            help="Verify by recomputation first: this original adapter projected again against --base and "
            "--aligned must reproduce the adapter. Without it, safelora's local record must.",
            show_default=False,
            rich_help_panel=INPUTS,
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(metavar="REF", help="The base model, for --original.", show_default=False, rich_help_panel=INPUTS),
    ] = None,
    aligned: Annotated[
        str | None,
        typer.Option(
            metavar="REF", help="The aligned model, for --original.", show_default=False, rich_help_panel=INPUTS
        ),
    ] = None,
    token: TokenOpt = None,
    as_json: JsonLinesOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Sign adapters safelora sanitized, writing safelora.intoto.json beside each.

    Each adapter is verified first, as check verifies it without a key: by safelora's local record
    on this machine, or by recomputation (--original, --base, --aligned). An unverified adapter is
    not signed (exit 3), whatever its stamp says: a signature vouches for what was verified. Signing
    again with a new key replaces the attestation (rotation; revoking a key is re-signing with
    another and dropping the old public key where adapters are checked). Exit codes: 0 all signed;
    3 any not verified; 1 any error; 2 usage.
    """
    specs = adapter_specs(adapters, adapter)
    if len({original is None, base is None, aligned is None}) > 1:
        raise typer.BadParameter("give --original, --base and --aligned together", param_hint="--original")
    sink = rendering.Sink(as_json=as_json, quiet=quiet, lines=True)
    paths = expanded(specs)
    outcomes: list[api.Signed | SafeLoraError] = []
    with errors(sink, paths), interruptible(paths, in_place=True):
        for path in paths():
            try:
                outcomes.append(
                    api.sign(path, sign_key=sign_key, base=base, aligned=aligned, original=original, token=token)
                )
            except UsageError:
                raise
            except SafeLoraError as e:
                e.adapter = path
                outcomes.append(e)
    deliver(sink, outcomes, api.Signed.to_json, rendering.render_signed)
    sink.emit()
    codes = {o.exit_code for o in outcomes if isinstance(o, SafeLoraError)}
    if codes:
        raise typer.Exit(1 if 1 in codes else max(codes))
