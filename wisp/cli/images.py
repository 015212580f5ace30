"""`wisp image list|build|import`: local admin commands on the host's base-image store.

They do not go through the API (an image is a host rootfs the server only reads); they
use `wisp.images.ImageStore` on `<data dir>/images` directly and usually need root.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from wisp.cli.common import json_option

if TYPE_CHECKING:
    from wisp.images import ImageStore

__all__ = ["image", "default_data_dir"]


def default_data_dir() -> Path:
    """WISP_DATA_DIR, else the server's default (/var/lib/wisp)."""
    from wisp.config import DEFAULT_DATA_DIR

    return Path(os.environ.get("WISP_DATA_DIR") or DEFAULT_DATA_DIR)


def _data_dir_option(fn: Any) -> Any:
    return click.option(
        "--data-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
        help="Server data directory [default: $WISP_DATA_DIR or /var/lib/wisp].")(fn)


def _store(data_dir: Path | None) -> ImageStore:
    from wisp.images import ImageStore

    return ImageStore((data_dir or default_data_dir()) / "images")


def _finish(result: Any) -> Any:
    """Run the store's result to completion whether the store method is sync or async."""
    if inspect.isawaitable(result):
        import asyncio

        async def wait() -> Any:
            return await result
        return asyncio.run(wait())
    return result


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # unreachable


@click.group()
def image() -> None:
    """Base images on this host (local; no server needed)."""


@image.command("list")
@_data_dir_option
@json_option
def list_(data_dir: Path | None, as_json: bool) -> None:
    """List the base images in the store."""
    from wisp.cli.output import jsonable, print_json, print_table

    images = list(_store(data_dir).list())
    if as_json:
        print_json(images)
        return
    print_table(["NAME", "VERSION", "SIZE", "CREATED", "SOURCE"],
                [(i.name, i.version, _size(i.size_bytes), jsonable(i.created), i.source)
                 for i in images])


@image.command()
@click.argument("name", required=False)
@click.option("--busybox", is_flag=True,
              help="Build a tiny busybox image (seconds; for tests) instead of Debian.")
@_data_dir_option
def build(name: str | None, busybox: bool, data_dir: Path | None) -> None:
    """Build base image NAME [default: debian, or busybox with --busybox]."""
    from wisp.cli.output import progress_display

    store = _store(data_dir)
    name = name or ("busybox" if busybox else "debian")
    with progress_display(f"building image {name}") as update:
        if busybox:
            update("installing busybox")
            img = _finish(store.build_busybox(name))
        else:
            img = _finish(store.build_debian(name=name, progress=update))
    _report(img, name)


@image.command("import")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@_data_dir_option
def import_(name: str, path: Path, data_dir: Path | None) -> None:
    """Import PATH (a rootfs directory or tarball) as base image NAME."""
    from wisp.cli.output import progress_display

    store = _store(data_dir)
    with progress_display(f"importing {path} as image {name}") as update:
        img = _finish(store.import_(name, path, progress=update))
    _report(img, name)


def _report(img: Any, name: str) -> None:
    version = getattr(img, "version", None)
    click.echo(f"image {name}" + (f" version {version}" if version is not None else "")
               + " ready")
