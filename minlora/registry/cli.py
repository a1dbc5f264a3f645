"""`minlora adapters ...`: the registry's command line.

Where the registry is: --root DIR (SQLite + blobs under DIR), or --url URL with --blobs URL;
the environment variables MINLORA_REGISTRY_URL, MINLORA_BLOBS and MINLORA_HOME give the
defaults, and ~/.minlora is the last resort.  Every sub-command takes --json (its result as
JSON on stdout).  Exit statuses are minlora.command's: 0 success, 1 an error (one line on
stderr), 2 bad usage, 3 a promotion refused by its gates, 4 corrupted stored weights.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from ..command import (
    DATABASE_ERROR,
    EXIT_CORRUPT,
    EXIT_ERROR,
    EXIT_OK,
    CommandError,
    describe,
    exit_status,
    is_instance,
    positive_int,
)

__all__ = ["add_arguments", "run"]

Handler = Callable[[Any, argparse.Namespace], int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `adapters` command: where the registry is, and its sub-commands."""
    parser.add_argument(
        "--root", help="registry root (SQLite file and blobs under it); default $MINLORA_HOME or ~/.minlora"
    )
    parser.add_argument(
        "--url", help="database URL (e.g. postgresql+psycopg://...); default $MINLORA_REGISTRY_URL"
    )
    parser.add_argument(
        "--blobs", help="blob store path or fsspec URL (e.g. s3://bucket/minlora); default $MINLORA_BLOBS"
    )
    sub = parser.add_subparsers(dest="adapters_command", metavar="SUBCOMMAND", required=True)

    def cmd(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        sp.set_defaults(handler=handler, _prog=sp.prog)
        return sp

    def commit_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-m", "--message", default="", help="what this revision is")
        sp.add_argument("--author", help="default: $MINLORA_USER or the OS user")
        sp.add_argument("--parent", help="parent revision (default: the newest; 'none' for a root)")
        sp.add_argument("--base-model", help="base-model fingerprint (64 hex digits)")
        sp.add_argument("--training-data", help="training data reference (URL, path, name@version)")
        sp.add_argument("--training-config", help="JSON file with the training configuration")

    sp = cmd("import", _import, "import a PEFT adapter directory as a new revision")
    sp.add_argument("path")
    sp.add_argument("adapter", nargs="?", help="adapter id (default: the directory's name)")
    commit_options(sp)

    sp = cmd(
        "commit",
        _commit,
        "commit weights (a PEFT directory or a minlora .safetensors blob) as a new revision",
    )
    sp.add_argument("adapter")
    sp.add_argument("path")
    commit_options(sp)

    sp = cmd("export", _export, "write a revision as a PEFT directory (or a minlora .safetensors file)")
    sp.add_argument("adapter")
    sp.add_argument("path")
    sp.add_argument("-r", "--rev", default="head")
    sp.add_argument("--format", choices=("peft", "minlora"), default="peft")

    sp = cmd("list", _list, "list adapter ids")
    sp.add_argument("--prefix")
    sp.add_argument("--after", help="start after this id (paging)")
    sp.add_argument("--limit", type=positive_int, default=1000)

    sp = cmd("log", _log, "revision history, newest first")
    sp.add_argument("adapter")
    sp.add_argument("-n", "--limit", type=positive_int)

    sp = cmd("show", _show, "one revision: provenance, tags, evaluations, serving, residency")
    sp.add_argument("adapter")
    sp.add_argument("-r", "--rev", default="head", help="number, tag, hash prefix, head or serving")

    sp = cmd("diff", _diff, "which tensors changed between two revisions, and by how much")
    sp.add_argument("adapter")
    sp.add_argument("rev_a")
    sp.add_argument("rev_b", nargs="?", default="head")

    sp = cmd("tag", _tag, "name a revision (or list the tags)")
    sp.add_argument("adapter")
    sp.add_argument("name", nargs="?")
    sp.add_argument("-r", "--rev", default="head")
    sp.add_argument("--force", action="store_true", help="move an existing tag")

    sp = cmd("promote", _promote, "make a revision the serving one, if it passes the gates")
    sp.add_argument("adapter")
    sp.add_argument("-r", "--rev", default="head")
    sp.add_argument(
        "--force", action="store_true", help="promote despite failing gates (recorded, with --by)"
    )
    sp.add_argument("--by", help="who promotes (default: $MINLORA_USER or the OS user)")
    sp.add_argument("--reason")

    sp = cmd("rollback", _rollback, "serve the previously serving revision again")
    sp.add_argument("adapter")
    sp.add_argument("--to", help="a specific revision that served before")
    sp.add_argument("--by")
    sp.add_argument("--reason")

    sp = cmd("eval", _eval, "record metrics for a revision, run an evaluation callable, or list evaluations")
    sp.add_argument("adapter", nargs="?", help="omit with --runner to evaluate every adapter")
    sp.add_argument("-r", "--rev", default="head")
    sp.add_argument("--suite", default="default")
    sp.add_argument("--metric", action="append", default=[], metavar="NAME=VALUE")
    sp.add_argument(
        "--runner", metavar="MODULE:FUNCTION", help="callable(adapter, revision) -> {metric: value}"
    )

    sp = cmd("gate", _gate, "require a metric for promotions (or list / remove gates)")
    sp.add_argument("adapter")
    sp.add_argument("suite", nargs="?")
    sp.add_argument("metric", nargs="?")
    sp.add_argument("--lower-is-better", action="store_true")
    sp.add_argument("--tolerance", type=float, default=0.0)
    sp.add_argument("--remove", action="store_true")

    sp = cmd("verify", _verify, "re-hash stored weights of every revision (or one adapter's)")
    sp.add_argument("adapter", nargs="?")
    sp.add_argument("--progress", action="store_true")

    sp = cmd("gc", _gc, "delete unreferenced blobs (crashed commits' leftovers)")
    sp.add_argument("--min-age", type=float, default=3600.0, help="seconds; younger files are kept")
    sp.add_argument("--dry-run", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Opens the registry, runs the chosen sub-command on it, closes it."""
    reg = _open(args)
    try:
        return int(args.handler(reg, args) or 0)
    except Exception as exc:
        if is_instance(exc, DATABASE_ERROR):  # e.g. a damaged page found by this query
            raise CommandError(f"the registry database {_location(args)}: {describe(exc)}") from exc
        raise
    finally:
        reg.close()


# ---------------------------------------------------------------------- plumbing


def _url(args: argparse.Namespace) -> str | None:
    return args.url or os.environ.get("MINLORA_REGISTRY_URL")


def _location(args: argparse.Namespace) -> str:
    """Where the registry is, for messages (a URL's password hidden)."""
    url = _url(args)
    if not url:
        from .registry import default_root

        return f"under {args.root or default_root()}"
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(--url is not a database URL)"


def _open(args: argparse.Namespace) -> Any:
    from .registry import Registry

    try:
        return Registry(_url(args), args.blobs or os.environ.get("MINLORA_BLOBS"), root=args.root)
    except Exception as exc:
        if exit_status(exc) is None:
            raise
        raise CommandError(f"cannot open the registry {_location(args)}: {describe(exc)}", exit_status(exc)) from exc


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    elif text:
        print(text)


def _rev_line(r: Any) -> str:
    marks = []
    if r.serving:
        marks.append("serving")
    marks += [f"tag:{t}" for t in r.tags]
    mark = f" ({', '.join(marks)})" if marks else ""
    when = r.created_at.strftime("%Y-%m-%d %H:%M:%S")
    return f"{r.number:>5}  {r.content_hash[:12]}  {when}  {r.author:<12} {r.message}{mark}"


def _commit_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    prov: dict[str, Any] = {}
    if args.base_model:
        prov["base_model"] = args.base_model
    if args.training_data:
        prov["training_data"] = args.training_data
    if args.training_config:
        try:
            with open(args.training_config, encoding="utf-8") as f:
                prov["training_config"] = json.load(f)
        except (OSError, ValueError) as exc:
            raise CommandError(f"--training-config {args.training_config}: {describe(exc)}") from exc
    kw: dict[str, Any] = {"message": args.message, "author": args.author, "provenance": prov}
    if args.parent is not None:
        kw["parent"] = None if args.parent.lower() == "none" else args.parent
    return kw


def _read_adapter(path: str) -> Any:
    """The adapter at `path`, a PEFT directory or a minlora adapter file; whatever is wrong
    with it (missing, truncated, a bad config or pattern) is one error that names the path."""
    from ..formats.load import load_adapter

    try:
        return load_adapter(path)
    except Exception as exc:
        kind = "PEFT adapter directory" if os.path.isdir(path) else "minlora adapter file or PEFT directory"
        raise CommandError(f"{path}: cannot read this {kind}: {describe(exc)}") from exc


# ---------------------------------------------------------------------- commands


def _write_adapter(adapter: Any, path: str, form: str) -> None:
    """Writes `adapter` to `path` as a PEFT directory ("peft") or a minlora adapter file."""
    from ..formats.native import save_adapter_file
    from ..formats.peft import save_peft

    try:
        if form == "peft":
            save_peft(adapter, path)
        else:
            save_adapter_file(adapter, path)
    except OSError as exc:
        raise CommandError(f"{path}: cannot be written ({exc.strerror or describe(exc)})") from exc


def _import(reg: Any, args: argparse.Namespace) -> int:
    if not os.path.isdir(args.path):
        raise CommandError(f"{args.path}: not a directory (import takes a PEFT adapter directory)")
    adapter_id = args.adapter or os.path.basename(os.path.normpath(args.path))
    rev = reg.commit(adapter_id, _read_adapter(args.path), **_commit_kwargs(args))
    _emit(args, rev.to_dict(), f"{rev.adapter_id} revision {rev.number} ({rev.content_hash[:12]})")
    return 0


def _commit(reg: Any, args: argparse.Namespace) -> int:
    rev = reg.commit(args.adapter, _read_adapter(args.path), **_commit_kwargs(args))
    _emit(args, rev.to_dict(), f"{rev.adapter_id} revision {rev.number} ({rev.content_hash[:12]})")
    return 0


def _export(reg: Any, args: argparse.Namespace) -> int:
    rev = reg.show(args.adapter, args.rev)
    _write_adapter(reg.load(args.adapter, rev.number), args.path, args.format)
    _emit(
        args,
        {"path": args.path, **rev.to_dict()},
        f"wrote {rev.adapter_id} revision {rev.number} to {args.path}",
    )
    return 0


def _list(reg: Any, args: argparse.Namespace) -> int:
    ids = reg.adapters(prefix=args.prefix, after=args.after, limit=args.limit)
    _emit(args, ids, "\n".join(ids))
    return 0


def _log(reg: Any, args: argparse.Namespace) -> int:
    revs = reg.log(args.adapter, limit=args.limit)
    _emit(args, [r.to_dict() for r in revs], "\n".join(_rev_line(r) for r in revs))
    return 0


def _show(reg: Any, args: argparse.Namespace) -> int:
    rev = reg.show(args.adapter, args.rev)
    evals = reg.evaluations(args.adapter, rev.number)
    residency = reg.residency(args.adapter)
    data = {
        **rev.to_dict(),
        "evaluations": [e.to_dict() for e in evals],
        "residency": residency,
        "serving_history": [p.to_dict() for p in reg.serving_history(args.adapter)],
    }
    lines = [
        f"adapter     {rev.adapter_id}",
        f"revision    {rev.number}" + ("  (serving)" if rev.serving else ""),
        f"content     {rev.content_hash}",
        f"parent      {rev.parent if rev.parent is not None else '-'}",
        f"author      {rev.author}",
        f"created     {rev.created_at.isoformat()}",
        f"message     {rev.message}",
        f"size        {rev.size} bytes",
        f"tags        {', '.join(rev.tags) or '-'}",
        f"residency   {residency} (serving revision)",
    ]
    prov = rev.provenance
    for key in ("base_model", "training_data", "minlora_version", "torch_version"):
        lines.append(f"{key:<11} {prov.get(key) if prov.get(key) is not None else '-'}")
    if prov.get("training_config"):
        lines.append(f"training_config {json.dumps(prov['training_config'], sort_keys=True)}")
    if prov.get("extra"):
        lines.append(f"extra       {json.dumps(prov['extra'], sort_keys=True)}")
    for e in evals:
        lines.append(
            f"eval        {e.suite}/{e.metric} = {e.value:.6g}  ({e.author}, {e.recorded_at.isoformat()})"
        )
    _emit(args, data, "\n".join(lines))
    return 0


def _diff(reg: Any, args: argparse.Namespace) -> int:
    d = reg.diff(args.adapter, args.rev_a, args.rev_b)
    lines = [
        f"{d.adapter_id}: revision {d.rev_a} -> {d.rev_b}"
        + ("  (identical content)" if d.same_content else "")
    ]
    for t in d.tensors:
        if t.status == "unchanged":
            continue
        extra = ""
        if t.max_abs_diff is not None:
            extra = f"  max|diff|={t.max_abs_diff:.4g}  rel={t.rel_norm_diff:.4g}"
        elif t.shape_a or t.shape_b:
            extra = f"  {t.shape_a} -> {t.shape_b}"
        lines.append(f"  {t.status:<9} {t.name}{extra}")
    for k, (va, vb) in d.config_changes.items():
        lines.append(f"  config    {k}: {va!r} -> {vb!r}")
    _emit(args, d.to_dict(), "\n".join(lines))
    return 0


def _tag(reg: Any, args: argparse.Namespace) -> int:
    if args.name is None:
        tags = reg.tags(args.adapter)
        _emit(args, tags, "\n".join(f"{n}\t{r}" for n, r in tags.items()))
        return 0
    rev = reg.tag(args.adapter, args.name, args.rev, force=args.force)
    _emit(args, rev.to_dict(), f"{rev.adapter_id}: tag {args.name} -> revision {rev.number}")
    return 0


def _promote(reg: Any, args: argparse.Namespace) -> int:
    from .errors import PromotionRefusedError

    try:
        p = reg.promote(args.adapter, args.rev, force=args.force, by=args.by, reason=args.reason)
    except PromotionRefusedError as exc:
        # The gates' report is the result a script wants; the refusal's exit status stays.
        _emit(args, {"refused": True, "error": str(exc), "gate_report": exc.report}, "")
        raise
    if not p.changed:
        text = f"{p.adapter_id}: revision {p.to_revision} is already serving"
    else:
        text = f"{p.adapter_id}: serving revision {p.to_revision} (was {p.from_revision})" + (
            f"  FORCED by {p.actor}" if p.forced else ""
        )
    _emit(args, p.to_dict(), text)
    return 0


def _rollback(reg: Any, args: argparse.Namespace) -> int:
    p = reg.rollback(args.adapter, to=args.to, by=args.by, reason=args.reason)
    _emit(
        args, p.to_dict(), f"{p.adapter_id}: serving revision {p.to_revision} again (was {p.from_revision})"
    )
    return 0


def _load_runner(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--runner must be MODULE:FUNCTION, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ImportError as exc:
        raise CommandError(f"--runner {spec}: cannot import {module!r} ({describe(exc)})") from exc
    if not callable(fn):
        raise ValueError(f"{spec}: not a callable")
    return fn


def _eval(reg: Any, args: argparse.Namespace) -> int:
    if args.runner:
        fn = _load_runner(args.runner)
        evals = reg.evaluate(
            fn, adapters=[args.adapter] if args.adapter else None, rev=args.rev, suite=args.suite
        )
    elif args.metric:
        if not args.adapter:
            raise ValueError("recording metrics needs an adapter id")
        metrics: dict[str, float] = {}
        for item in args.metric:
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--metric must be NAME=VALUE, got {item!r}")
            try:
                metrics[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"--metric {name}: {value!r} is not a number") from None
        evals = reg.record_evaluation(args.adapter, args.rev, args.suite, metrics)
    else:
        if not args.adapter:
            raise ValueError("give an adapter id (or --runner to evaluate all)")
        evals = reg.evaluations(args.adapter, args.rev)
    _emit(
        args,
        [e.to_dict() for e in evals],
        "\n".join(f"{e.adapter_id}@{e.revision}  {e.suite}/{e.metric} = {e.value:.6g}" for e in evals),
    )
    return 0


def _gate(reg: Any, args: argparse.Namespace) -> int:
    from .types import Gate

    if args.suite is None:
        gates = reg.gates(args.adapter)
        _emit(
            args,
            [g.to_dict() for g in gates],
            "\n".join(
                f"{g.suite}/{g.metric}  {'higher' if g.higher_is_better else 'lower'} is better, tolerance {g.tolerance:g}"
                for g in gates
            ),
        )
        return 0
    if args.metric is None:
        raise ValueError("give both SUITE and METRIC")
    if args.remove:
        removed = reg.remove_gate(args.adapter, args.suite, args.metric)
        _emit(args, {"removed": removed}, "removed" if removed else "no such gate")
        return EXIT_OK if removed else EXIT_ERROR
    gate = Gate(args.suite, args.metric, not args.lower_is_better, args.tolerance)
    reg.set_gate(args.adapter, gate)
    _emit(args, gate.to_dict(), f"{args.adapter}: promotions now require {gate.suite}/{gate.metric}")
    return 0


def _verify(reg: Any, args: argparse.Namespace) -> int:
    report = reg.verify(args.adapter, progress=args.progress)
    text = f"checked {report.revisions_checked} revisions ({report.blobs_checked} blobs): " + (
        "all good" if report.ok else f"{len(report.failures)} corrupted"
    )
    if not report.ok:
        text += "\n" + "\n".join(f"  {f['error']}" for f in report.failures)
    _emit(args, report.to_dict(), text)
    return EXIT_OK if report.ok else EXIT_CORRUPT


def _gc(reg: Any, args: argparse.Namespace) -> int:
    report = reg.gc(min_age_s=args.min_age, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    text = f"{verb} {len(report.deleted)} files ({report.bytes_freed} bytes); kept {report.kept_young} recent"
    _emit(args, report.to_dict(), text)
    return 0

