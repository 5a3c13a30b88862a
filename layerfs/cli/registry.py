"""Registry commands: pull, push, login, logout."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from layerfs.cli import complete
from layerfs.cli.base import Ctx, cli, emit_json, handle_errors, pass_ctx
from layerfs.errors import UsageError

if TYPE_CHECKING:  # httpx and trio load only when a registry command runs (0.25 s of every other command)
    from layerfs import registry

F = TypeVar("F", bound=Callable[..., Any])


def _transport_options(fn: F) -> F:
    for option in reversed([
        click.option("--tls-verify", type=click.BOOL, default=True, show_default=True,
                     help="Verify the registry's certificate; false also allows plain HTTP."),
        click.option("--cert-dir", type=click.Path(file_okay=False, exists=True),
                     help="certs.d-style directory: *.crt CAs, NAME.cert/NAME.key client certificate "
                          "(default: /etc/containers/certs.d/HOST, /etc/docker/certs.d/HOST)."),
        click.option("--retries", type=click.IntRange(0, 100), default=5, show_default=True,
                     help="Retries of a failed request (5xx, 429, dropped connection)."),
    ]):
        fn = option(fn)
    return fn


def _options(tls_verify: bool, cert_dir: str | None, retries: int, creds: str | None = None,
             jobs: int = 3, chunk_size: int | None = None) -> registry.Options:
    from layerfs import registry

    credentials = None
    if creds is not None:
        user, sep, password = creds.partition(":")
        if not sep or not user:
            raise UsageError("--creds needs USER:PASSWORD")
        credentials = registry.Credentials(user, password)
    backoff = float(os.environ.get("LAYERFS_REGISTRY_BACKOFF", "0.5"))
    return registry.Options(tls_verify=tls_verify, cert_dir=cert_dir, credentials=credentials, retries=retries,
                            backoff=backoff, concurrency=jobs, chunk_size=chunk_size)


@cli.command("pull")
@click.argument("ref")
@click.option("--name", help="Store the image under this name (default: REF as written).")
@click.option("--platform", help="os/arch[/variant] to pick from a multi-platform image (default: this machine).")
@click.option("--creds", metavar="USER:PASSWORD", help="Credentials (default: auth.json, ~/.docker/config.json).")
@click.option("-j", "--jobs", type=click.IntRange(1, 32), default=3, show_default=True,
              help="Layers downloaded (and unpacked) at once.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: NAME DIGEST on stdout; json: what was pulled, for programs.")
@_transport_options
@pass_ctx
@handle_errors
def pull_cmd(ctx: Ctx, ref: str, name: str | None, platform: str | None, creds: str | None, jobs: int, fmt: str,
             tls_verify: bool, cert_dir: str | None, retries: int) -> None:
    """Pull an image from a registry into the store (resumes an interrupted pull)."""
    from layerfs import registry

    opts = _options(tls_verify, cert_dir, retries, creds, jobs)
    r = registry.pull(ctx.store, ref, name=name, platform=platform, opts=opts, progress=ctx.progress())
    if fmt == "json":
        emit_json({"name": r.name, "source": r.remote, "endpoint": r.endpoint, "manifest_digest": r.manifest_digest,
                   "config_digest": r.config_digest, "platform": r.platform, "fetched_blobs": r.fetched,
                   "new_layers": r.imported.new_layers, "reused_layers": r.imported.reused_layers})
        return
    via = f" from {r.endpoint}" if r.endpoint and not r.remote.startswith(r.endpoint + ":") \
        and not r.remote.startswith(r.endpoint + "@") else ""
    ctx.log(f"Pulled {r.remote}{via} ({len(r.fetched)} blobs fetched, {len(r.imported.new_layers)} new layers, "
            f"{len(r.imported.reused_layers)} already present)")
    click.echo(f"{r.name} {r.manifest_digest}")


@cli.command("push")
@click.argument("image", shell_complete=complete.images)
@click.argument("destination", required=False)
@click.option("--creds", metavar="USER:PASSWORD", help="Credentials (default: auth.json, ~/.docker/config.json).")
@click.option("-j", "--jobs", type=click.IntRange(1, 32), default=3, show_default=True,
              help="Blobs uploaded at once.")
@click.option("--chunk-size", type=click.IntRange(1), default=None,
              help="Upload in PATCH chunks of this many bytes (default: one PUT per blob).")
@click.option("--index-with", "index_with", multiple=True, metavar="IMAGE",
              help="Push an image index of IMAGE and this image (repeat; one image per platform).")
@click.option("--allow-non-distributable-blobs", "push_foreign", is_flag=True,
              help="Upload foreign (non-distributable) layers too (default: keep their urls, do not upload).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: the manifest digest on stdout; json: what was pushed, for programs.")
@_transport_options
@pass_ctx
@handle_errors
def push_cmd(ctx: Ctx, image: str, destination: str | None, creds: str | None, jobs: int, chunk_size: int | None,
             index_with: tuple[str, ...], push_foreign: bool, fmt: str, tls_verify: bool, cert_dir: str | None,
             retries: int) -> None:
    """Push a stored image to a registry (DESTINATION defaults to IMAGE's name); prints the manifest digest."""
    from layerfs import registry

    opts = _options(tls_verify, cert_dir, retries, creds, jobs, chunk_size)
    opts.push_foreign = push_foreign
    r = registry.push(ctx.store, image, destination, index_with=index_with, opts=opts, progress=ctx.progress())
    if fmt == "json":
        emit_json({"source": r.source, "destination": r.destination, "manifest_digest": r.manifest_digest,
                   "manifest_size": r.manifest_size, "blobs": r.blobs})
        return
    counts = {k: sum(1 for v in r.blobs.values() if v == k) for k in ("uploaded", "mounted", "exists", "foreign")}
    foreign = f", {counts['foreign']} foreign layers left to their urls" if counts["foreign"] else ""
    ctx.log(f"Pushed {r.source} to {r.destination} ({counts['uploaded']} blobs uploaded, "
            f"{counts['mounted']} mounted, {counts['exists']} already there{foreign})")
    click.echo(r.manifest_digest)


@cli.command("login")
@click.argument("server")
@click.option("-u", "--username", help="User name (asked for on a terminal when missing).")
@click.option("-p", "--password", help="Password (prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--authfile", type=click.Path(dir_okay=False), help="auth.json to write (default: $REGISTRY_AUTH_FILE, "
              "$XDG_RUNTIME_DIR/containers/auth.json).")
@_transport_options
@pass_ctx
@handle_errors
def login_cmd(ctx: Ctx, server: str, username: str | None, password: str | None, password_stdin: bool,
              authfile: str | None, tls_verify: bool, cert_dir: str | None, retries: int) -> None:
    """Check credentials with a registry and keep them in auth.json."""
    from layerfs import registry
    from layerfs.registry.login import registry_host

    host = registry_host(server)
    if password_stdin:
        if password is not None:
            raise UsageError("--password and --password-stdin exclude each other")
        password = sys.stdin.readline().rstrip("\r\n")
    if username is None:
        if not sys.stdin.isatty():
            raise UsageError("login needs --username")
        username = click.prompt("Username")
    if password is None:
        if not sys.stdin.isatty():
            raise UsageError("login needs --password-stdin or --password")
        password = click.prompt("Password", hide_input=True)
    path = registry.login(host, registry.Credentials(username, password),
                          _options(tls_verify, cert_dir, retries), authfile)
    ctx.log(f"Credentials for {host} stored in {path}")
    click.echo("Login Succeeded!")


@cli.command("logout")
@click.argument("server")
@click.option("--authfile", type=click.Path(dir_okay=False), help="auth.json to change.")
@pass_ctx
@handle_errors
def logout_cmd(ctx: Ctx, server: str, authfile: str | None) -> None:
    """Remove a registry's credentials from auth.json."""
    from layerfs import registry
    from layerfs.registry.login import registry_host

    host = registry_host(server)
    removed, path = registry.logout(host, authfile)
    if not removed:
        raise UsageError(f"not logged in to {host} (no entry in {path})")
    click.echo(f"Removed login credentials for {host}")
