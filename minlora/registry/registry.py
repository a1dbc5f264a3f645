"""The adapter registry's public facade: identity, revisions, provenance, evaluations,
serving and residency.

Storage is split in two: metadata in a SQL database (store.py: SQLite file by default,
PostgreSQL at scale; alembic migrations run at open) and weights as content-addressed
safetensors blobs (blobs.py: a local directory or an object store, through fsspec).  Each
method validates its arguments and hands the work to the module that owns it: commit.py,
tags.py, evaluations.py, serving.py, maintenance.py, diff.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Engine

from . import commit as C
from . import evaluations as E
from . import maintenance, serving
from . import tags as T
from . import validation as V
from .adapter_io import Adapter, AdapterState, load_verified, load_verified_state, read_peft, write_peft
from .blobs import BlobStore
from .diff import config_changes, tensor_changes
from .errors import RevisionNotFoundError
from .ids import normalize_adapter_id, normalize_tag
from .location import default_root, locate
from .store import RevRef, Store
from .types import Diff, Evaluation, Gate, GcReport, Promotion, Revision, VerifyReport
from .validation import default_actor

__all__ = ["Registry", "RevRef", "default_actor", "default_root"]


class Registry:
    """An adapter registry.

    Registry()                                  -> ~/.minlora/registry.db + ~/.minlora/blobs
    Registry(root="/data/minlora")              -> same layout under that root
    Registry("sqlite:////data/a.db")            -> /data/a.db + /data/a.blobs (beside it)
    Registry("postgresql+psycopg://...", "s3://bucket/minlora")   -> the cluster form

    Blobs belong to one database (location.py): a database without a file of its own
    (PostgreSQL, in-memory SQLite) needs its blob URL.  A damaged database raises
    DamagedDatabaseError at open and is never re-initialised (dbcheck.py).
    """

    def __init__(self, url: str | None = None, blobs: str | None = None, *, root: str | None = None) -> None:
        url, blobs = locate(url, blobs, root)
        self.url = url
        self.store = Store(url)
        self.blobs = BlobStore(blobs)
        self._pool: Any = None
        self._pool_key: Callable[[str, Revision | None], Any] = lambda adapter_id, _rev: adapter_id

    @property
    def engine(self) -> Engine:
        return self.store.engine

    @property
    def dialect(self) -> str:
        return self.store.dialect

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self.store.display_url()!r}, {self.blobs.url!r})"

    # ------------------------------------------------------------------ adapters

    def exists(self, adapter_id: str) -> bool:
        """Whether `adapter_id` is registered."""
        return self.store.exists(normalize_adapter_id(adapter_id))

    def adapters(
        self, *, prefix: str | None = None, after: str | None = None, limit: int | None = None
    ) -> list[str]:
        """Adapter ids in sorted order; `after` and `limit` page through a large registry."""
        return self.store.adapter_ids(prefix, after, limit)

    def count(self) -> dict[str, int]:
        """Numbers of adapters, revisions and distinct blobs."""
        return self.store.count()

    # ------------------------------------------------------------------ commit

    def commit(
        self,
        adapter_id: str,
        weights: Adapter | Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
        *,
        parent: Any = C.HEAD,
        message: str = "",
        author: str | None = None,
        provenance: Mapping[str, Any] | None = None,
        optimizer_state: AdapterState | None = None,
    ) -> Revision:
        """Record a new revision of `adapter_id` (created on first commit) and return it.

        weights: an Adapter (its config is used unless `config` is given) or a dict of LoraWeights.
        parent: a revision reference; by default the adapter's newest revision, None for a root.
        provenance: base_model (fingerprint or nn.Module), training_data (a reference),
            training_config (dict), and any other JSON keys (kept under `extra`).  The author,
            time, parent, minlora and torch versions are always recorded.
        optimizer_state: stored as the revision's state blob (content-addressed beside the
            weights; `load_optimizer_state` reads it back, `Revision.state_hash` names it).
        """
        aid = normalize_adapter_id(adapter_id)
        adapter = C.prepare(weights, config)
        prov = V.provenance(provenance)
        state = V.optimizer_state(optimizer_state)
        who = author or default_actor()
        return C.commit(
            self.store, self.blobs, aid, adapter, prov, parent=parent, message=message, author=who, state=state
        )

    def commit_many(
        self,
        items: Iterable[tuple[str, Adapter | Mapping[str, Any]]],
        *,
        message: str = "",
        author: str | None = None,
        provenance: Mapping[str, Any] | None = None,
        batch_size: int = 5000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Bulk registration: commit one revision for each (adapter_id, weights), `batch_size`
        per transaction.  The same guarantees as `commit` (blobs first, then the rows
        atomically per batch); parents are each adapter's newest revision.  Returns the number
        of revisions committed; `progress(n)` is called after each batch."""
        who = author or default_actor()
        prov = V.provenance(provenance)
        return C.commit_many(
            self.store,
            self.blobs,
            items,
            prov,
            message=message,
            author=who,
            batch_size=batch_size,
            progress=progress,
        )

    # ------------------------------------------------------------------ reading

    def log(self, adapter_id: str, *, limit: int | None = None) -> list[Revision]:
        """The adapter's revisions, newest first."""
        return self.store.log(normalize_adapter_id(adapter_id), limit)

    def show(self, adapter_id: str, rev: RevRef = "head") -> Revision:
        """One revision with its provenance, tags and serving flag."""
        return self.store.show(normalize_adapter_id(adapter_id), rev)

    def serving(self, adapter_id: str) -> Revision | None:
        """The serving revision, or None when none was promoted."""
        try:
            return self.show(adapter_id, "serving")
        except RevisionNotFoundError:
            return None

    def load(self, adapter_id: str, rev: RevRef = "head") -> Adapter:
        """The revision's weights, verified against its content hash.

        Raises CorruptBlobError (naming the adapter and revision) when the blob is missing,
        unreadable, or its content does not hash to the recorded value."""
        return self._weights(self.show(adapter_id, rev))

    def _weights(self, info: Revision) -> Adapter:
        return load_verified(self.blobs, info.adapter_id, info.number, info.content_hash)

    def load_optimizer_state(self, adapter_id: str, rev: RevRef = "head") -> AdapterState | None:
        """The revision's optimizer state (verified against its hash), or None when it was
        committed without one.  CorruptBlobError names the adapter and revision."""
        info = self.show(adapter_id, rev)
        if info.state_hash is None:
            return None
        return load_verified_state(self.blobs, info.adapter_id, info.number, info.state_hash)

    def diff(self, adapter_id: str, rev_a: RevRef, rev_b: RevRef = "head") -> Diff:
        """Which tensors (and scales, config keys) changed between two revisions, and by how much."""
        a_info, b_info = self.show(adapter_id, rev_a), self.show(adapter_id, rev_b)
        a, b = self._weights(a_info), self._weights(b_info)
        return Diff(
            adapter_id=a_info.adapter_id,
            rev_a=a_info.number,
            rev_b=b_info.number,
            same_content=a_info.content_hash == b_info.content_hash,
            tensors=tensor_changes(a, b),
            config_changes=config_changes(a.config, b.config),
        )

    # ------------------------------------------------------------------ tags

    def tag(
        self, adapter_id: str, name: str, rev: RevRef = "head", *, force: bool = False,
        author: str | None = None,
    ) -> Revision:
        """Name a revision.  Tags do not move unless `force` (then the old target is replaced)."""
        aid, tag = normalize_adapter_id(adapter_id), normalize_tag(name)
        return T.tag(self.store, aid, tag, rev, force=force, author=author or default_actor())

    def tags(self, adapter_id: str) -> dict[str, int]:
        """Tag name -> revision number."""
        return T.list_tags(self.store, normalize_adapter_id(adapter_id))

    # ------------------------------------------------------------------ evaluations and gates

    def record_evaluation(
        self,
        adapter_id: str,
        rev: RevRef,
        suite: str,
        metrics: Mapping[str, float],
        *,
        author: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> list[Evaluation]:
        """Attach metric values (suite/metric -> value) to a revision."""
        aid = normalize_adapter_id(adapter_id)
        suite, clean, det = V.evaluation_input(suite, metrics, details)
        return E.record(self.store, aid, rev, suite, clean, author or default_actor(), det)

    def evaluations(self, adapter_id: str, rev: RevRef = "head") -> list[Evaluation]:
        """Every evaluation recorded for a revision, oldest first."""
        return E.list_for(self.store, normalize_adapter_id(adapter_id), rev)

    def set_gate(self, adapter_id: str, gate: Gate) -> None:
        """Require `gate` for every later promotion of this adapter (replaces a gate on the same metric)."""
        aid = normalize_adapter_id(adapter_id)
        E.set_gate(self.store, aid, V.gate(gate))

    def remove_gate(self, adapter_id: str, suite: str, metric: str) -> bool:
        """Drop the gate on suite/metric; False when there was none."""
        return E.remove_gate(self.store, normalize_adapter_id(adapter_id), suite, metric)

    def gates(self, adapter_id: str) -> list[Gate]:
        """The adapter's stored gates."""
        return E.gates(self.store, normalize_adapter_id(adapter_id))

    def evaluate(
        self,
        fn: Callable[[Adapter, Revision], Mapping[str, float]],
        *,
        adapters: Iterable[str] | None = None,
        rev: RevRef = "head",
        suite: str = "default",
        author: str | None = None,
        progress: bool = False,
    ) -> list[Evaluation]:
        """The evaluation runner: for each adapter (all when None), load revision `rev`, call
        `fn(adapter_weights, revision) -> {metric: value}` and record the values under `suite`.
        An exception from `fn` is re-raised as RegistryError naming the adapter and revision
        (the results recorded before it stay recorded)."""
        ids: Iterable[str] = list(adapters) if adapters is not None else self.adapters()
        if progress:
            from tqdm import tqdm

            ids = tqdm(ids, desc=f"evaluate {suite}", unit="adapter")

        def record(info: Revision, metrics: dict[str, float]) -> list[Evaluation]:
            return self.record_evaluation(info.adapter_id, info.number, suite, metrics, author=author)

        return E.evaluate(self.store, self.blobs, fn, ids, rev, record)

    # ------------------------------------------------------------------ serving

    def promote(
        self,
        adapter_id: str,
        rev: RevRef = "head",
        *,
        force: bool = False,
        by: str | None = None,
        reason: str | None = None,
        gates: Sequence[Gate] | None = None,
    ) -> Promotion:
        """Point the adapter's serving pointer at `rev`, if it passes the gates.

        Gates are the adapter's stored ones (set_gate) unless `gates` is given.  A gate fails
        when the candidate lacks the metric or is worse than the serving revision's value by
        more than its tolerance; then PromotionRefusedError, unless `force`, in which case
        the promotion is recorded as forced, with `by` (default: the acting user) and the
        failing report."""
        aid = normalize_adapter_id(adapter_id)
        return serving.promote(
            self.store, aid, rev, force=force, actor=V.actor(by), reason=reason, gates=gates
        )

    def rollback(
        self, adapter_id: str, *, to: RevRef | None = None, by: str | None = None, reason: str | None = None
    ) -> Promotion:
        """Serve again the revision that served before the current one (or `to`, which must
        have served before).  Gates are not applied: the target already served.  Repeated
        rollbacks walk further back, like an undo stack."""
        aid = normalize_adapter_id(adapter_id)
        return serving.rollback(self.store, aid, to=to, actor=V.actor(by), reason=reason)

    def serving_history(self, adapter_id: str) -> list[Promotion]:
        """Every move of the serving pointer, oldest first."""
        return serving.history(self.store, normalize_adapter_id(adapter_id))

    # ------------------------------------------------------------------ residency

    def attach_pool(self, pool: Any, key: Callable[[str, Revision | None], Any] | None = None) -> None:
        """Report residency from `pool` (any object with `residency(key) -> str`, such as
        minlora.pool.AdapterPool).  `key(adapter_id, serving_revision)` gives the name the
        pool knows the adapter by; by default the adapter id."""
        if not callable(getattr(pool, "residency", None)):
            raise TypeError("the pool must have a residency(adapter_id) method")
        self._pool = pool
        if key is not None:
            self._pool_key = key

    def pool_source(self, adapter_id: str, rev: RevRef = "serving") -> Callable[[], Adapter]:
        """A loader to hand to AdapterPool.register: the revision is resolved now (so the pool
        holds exactly that revision even if the serving pointer moves later) and its weights
        are read and verified when the pool fetches them."""
        info = self.show(adapter_id, rev)
        return lambda: self._weights(info)

    def residency(self, adapter_id: str) -> str:
        """Where the adapter's serving revision lives now: "gpu", "host" or "disk" (or what
        the pool says, e.g. "unregistered").  "none" when no revision is serving.  Without an
        attached pool a serving revision is only in the blob store: "disk"."""
        rev = self.serving(adapter_id)
        if rev is None:
            return "none"
        if self._pool is None:
            return "disk"
        return str(self._pool.residency(self._pool_key(rev.adapter_id, rev)))

    # ------------------------------------------------------------------ PEFT

    def import_peft(self, path: str, adapter_id: str, **commit_kwargs: Any) -> Revision:
        """Commit the PEFT adapter directory `path` as a new revision of `adapter_id`."""
        return self.commit(adapter_id, read_peft(path), **commit_kwargs)

    def export_peft(self, adapter_id: str, path: str, rev: RevRef = "head") -> Revision:
        """Write a (verified) revision as a PEFT adapter directory."""
        info = self.show(adapter_id, rev)
        write_peft(self._weights(info), path)
        return info

    # ------------------------------------------------------------------ maintenance

    def verify(self, adapter_id: str | None = None, *, progress: bool = False) -> VerifyReport:
        """Load and re-hash the blob of every revision (of one adapter, or all), and its
        optimizer-state blob when it has one.  Each distinct blob is read once; a failure is
        reported for every revision that uses it."""
        aid = None if adapter_id is None else normalize_adapter_id(adapter_id)
        return maintenance.verify(self.store, self.blobs, aid, progress=progress)

    def gc(self, *, min_age_s: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Delete blob files that no revision references (orphans of crashed commits) and
        leftover temporary files, if older than `min_age_s` (a younger one may belong to a
        commit in flight, whose row is not yet visible)."""
        return maintenance.gc(self.store, self.blobs, min_age_s=min_age_s, dry_run=dry_run)
