"""The `kdpipe` command line. Every user mistake ends as one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from kdpipe.errors import KdpipeError


class _Group(click.Group):
    """Turns KdpipeError (and a few OS errors that are user mistakes) into one clear line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdpipeError as e:
            click.echo(f"kdpipe: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("kdpipe: interrupted; run the same command again to resume", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdpipe")
def cli() -> None:
    """kdpipe: cache a teacher's distillation targets once, train students from the cache."""


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


def main() -> None:
    cli(prog_name="kdpipe")


if __name__ == "__main__":
    main()
