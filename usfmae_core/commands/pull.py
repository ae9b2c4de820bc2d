"""``usfmae pull NAME``: download published USF-MAE weights into the model cache and import them."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull", help="download the published USF-MAE weights (usf-mae-100ep, usf-mae-500ep) into the model cache",
        description="Download a checkpoint that the USF-MAE authors publish (linked from github.com/Yusufii9/USF-MAE) "
                    "into the model cache (see usfmae info), check its sha256 (recorded at the first download) and "
                    "import it, so that --init NAME works in pretrain, finetune and the bundle. An interrupted "
                    "download continues where it stopped. Offline: the error says what to fetch by hand.")
    p.add_argument("name", nargs="?", help="usf-mae-100ep (recommended) or usf-mae-500ep")
    p.add_argument("--list", action="store_true", help="list the published models and what the cache holds")
    p.add_argument("--url", help="download from this address instead (a mirror or a local file:// copy)")
    p.add_argument("--force", action="store_true", help="download and import again even if cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_core import hub
    from usfmae_core.errors import UsfmaeError

    if args.list or not args.name:
        cache = hub.model_cache_dir()
        for m in hub.MODELS.values():
            where = cache / f"{m.name}.pt"
            print(f"{m.name:15s} {'cached: ' + str(where) if where.exists() else 'not downloaded'}\n"
                  f"{'':15s} {m.description}\n{'':15s} {m.url} (from {m.source}; {m.licence})")
        if not args.name and not args.list:
            raise UsfmaeError("no model name given", f"run usfmae pull {next(iter(hub.MODELS))}")
        return 0
    hub.pull(args.name, url=args.url, progress=not args.no_progress, force=args.force)
    return 0
