"""``cfdeploy batch``: edit a dataset of latent shards on Ray Data, each shard exactly once, resumably.

A shard is one ``.npy`` of W+ (or W) codes. Ray Data hands shards to a pool of actors, each holding one
backend loaded once; an actor edits a shard with :func:`cfdeploy.editing.edit_to_directory` (the very
code of ``cfdeploy edit``) into a staging directory that replaces ``OUT/<shard>`` in one step, and only
then writes ``OUT/_done/<shard>.json``. A shard with a matching record is never redone; one without
(never started, or its worker died) is redone from scratch, and Ray retries a task whose actor died. So
every image is written once, whole, however often workers fail.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import stat
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cfdeploy.bundle import MANIFEST, without_clip_message
from cfdeploy.editing import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PNG_COMPRESSION,
    EditJob,
    edit_to_directory,
)
from cfdeploy.errors import CfdeployError, require_finite, require_range
from cfdeploy.files import require_file, sha256_file
from cfdeploy.inputs import load_latents, load_text_embedding
from cfdeploy.outputs import (
    DirectoryLock,
    StagedDirectory,
    clear_partial_files,
    make_parents,
    refuse_inputs,
    write_atomic,
)
from cfdeploy.serving.cluster import (
    actor_backend_options,
    check_resources,
    connect,
    disconnect,
    require_resources,
)

DONE_DIR = "_done"
RUN_RECORD = "_batch.json"  # what the output directory was made with; a rerun must match it
MAX_RESTARTS = (
    3  # a worker that dies this often (a shard that runs it out of memory, say) ends the run; a rerun resumes
)


@dataclass(frozen=True)
class BatchSettings:
    """One ``cfdeploy batch`` run: the CLI's options, and the PNG compression (``cfdeploy edit``'s default)."""

    bundle: Path
    shards: str  # a directory of .npy files, or a glob
    prompt: str | None
    out: Path
    text_embedding: Path | None = None  # instead of a prompt: CLIP text features [512] for every code
    strength: float = 1.0
    backend: str = "onnxruntime"
    workers: int = 2
    batch_size: int = DEFAULT_BATCH_SIZE
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    png_compression: int = DEFAULT_PNG_COMPRESSION
    precision: str | None = None  # openvino: bf16
    session_cache: bool | None = None  # False: --no-session-cache

    def check(self) -> None:
        if (self.prompt is None) == (self.text_embedding is None):
            raise CfdeployError("give exactly one of --text or --text-embedding")
        require_range(1, workers=self.workers, batch_size=self.batch_size)
        require_finite(strength=self.strength)
        check_resources(self.backend, self.cpus_per_worker, self.gpus_per_worker, "worker")

    def identity(self) -> dict[str, Any]:
        """What makes two runs' images the same: a rerun into the same directory must agree on all of it."""
        embedding = None if self.text_embedding is None else sha256_file(require_file(self.text_embedding))
        return {
            "bundle_manifest_sha256": sha256_file(self.bundle / MANIFEST),
            "prompt": self.prompt,
            "text_embedding_sha256": embedding,
            "strength": self.strength,
            "backend": self.backend,
            "png_compression": self.png_compression,
        }


@dataclass
class BatchSummary:
    shards: int
    skipped: int
    edited: int
    images: int
    seconds: float


def find_shards(spec: str, out: Path | None = None) -> tuple[list[Path], list[str]]:
    """The ``.npy`` files of a directory, or those a glob matches, sorted; names (stems) must be unique.

    Also a line for each match skipped: anything not a regular file (a FIFO would block the run, a
    dangling link fails it), and nothing inside ``out`` once it holds a run record: a recursive glob
    over a tree that holds ``out`` would otherwise take this run's own ``latents.npy`` for new shards.
    """
    path = Path(spec)
    found = (
        sorted(path.glob("*.npy"))
        if path.is_dir()
        else sorted(Path(match) for match in glob.glob(spec, recursive=True))
    )
    own_tree = out if out is not None and (out / RUN_RECORD).is_file() else None
    shards: list[Path] = []
    skipped: list[str] = []
    for candidate in found:
        if candidate.suffix != ".npy" or (own_tree is not None and _lies_in(candidate, own_tree)):
            continue
        why = _not_a_shard(candidate)
        if why:
            skipped.append(f"{candidate}: {why}; skipped")
        else:
            shards.append(candidate)
    if not shards:
        raise CfdeployError(
            f"{spec}: no .npy shards found (give a directory of .npy files or a glob such as 'shards/*.npy')"
        )
    names: dict[str, Path] = {}
    for shard in shards:
        if shard.stem.startswith(("_", ".")):
            raise CfdeployError(f"{shard}: shard names may not start with '_' or '.' (reserved in the output)")
        if shard.stem in names:
            raise CfdeployError(
                f"{shard}: two shards are named {shard.stem!r} ({names[shard.stem]}); names must be unique"
            )
        names[shard.stem] = shard
    return shards, skipped


def _lies_in(path: Path, directory: Path) -> bool:
    """Whether ``path`` (its parent directories resolved) is inside the resolved ``directory``."""
    parent = path.absolute().parent.resolve()
    return parent == directory or directory in parent.parents


def _not_a_shard(path: Path) -> str:
    """Why ``path`` cannot be read as a shard ("" when it can): only regular files, or links to them, are."""
    if path.is_symlink() and not path.exists():
        return f"a dangling symbolic link (to {os.readlink(path)})"
    try:
        mode = path.stat().st_mode
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if stat.S_ISREG(mode):
        return ""
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
    kind = next((name for test, name in kinds.items() if test(mode)), "a device file")
    return f"{kind}, not a regular file"


def _done_record(out: Path, name: str) -> Path:
    return out / DONE_DIR / f"{name}.json"


def redo_reason(out: Path, shard: Path) -> str | None:
    """None when the shard is done: its completion record names this very shard content, and every output file it
    records is on disk, unchanged. Otherwise why it is (re)done: "" for a shard never done, else a sentence."""
    record_path = _done_record(out, shard.stem)
    if not record_path.is_file():
        return ""
    try:
        record = json.loads(record_path.read_text())
        source, files = record["source_sha256"], record["files"]
        if not isinstance(files, dict) or not files:
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return "its completion record is damaged"
    if source != sha256_file(shard):
        return "the shard changed since it was edited"
    for name, digest in files.items():
        output = out / shard.stem / str(name)
        if "/" in str(name) or str(name).startswith(".") or not output.is_file():
            return f"{output.name} is recorded but missing"
        if sha256_file(output) != digest:
            return f"{output.name} changed since it was recorded"
    return None


def prepare_output(settings: BatchSettings, force: bool) -> None:
    """Make ``OUT`` or check it is this run's: a directory from another run (or anything else) needs ``--force``.

    The caller holds ``OUT``'s lock, so the temporary files of records left half-written are a killed run's.
    """
    out, identity = settings.out, settings.identity()
    record_path = out / RUN_RECORD
    if out.exists() and not out.is_dir():
        raise CfdeployError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        try:
            recorded = json.loads(record_path.read_text())["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CfdeployError(
                f"{out}: is not empty and is not a cfdeploy batch output; pass --force to write into it"
            ) from None
        changed = sorted(key for key in identity if recorded.get(key) != identity[key])
        if changed:
            raise CfdeployError(
                f"{out}: was made with another {', '.join(changed)}; use another --out, or --force to redo every shard"
            )
    (out / DONE_DIR).mkdir(parents=True, exist_ok=True)
    for directory in (out, out / DONE_DIR):  # records of a killed run half-written; its workers are gone
        clear_partial_files(directory)
    if force:
        for record in (out / DONE_DIR).glob("*.json"):
            record.unlink()
    write_atomic(
        record_path,
        (json.dumps({"identity": identity, "settings": asdict(settings)}, indent=2, default=str) + "\n").encode(),
    )


def edit_shard(backend: Any, settings: BatchSettings, shard: Path) -> dict[str, Any]:
    """Edit one shard into ``OUT/<shard>`` (as ``cfdeploy edit`` would, with latents.npy) and record it done."""
    started = time.perf_counter()
    source_sha256 = sha256_file(shard)
    latents = load_latents(shard, backend.n_latent, backend.style_dim)
    features = None if settings.text_embedding is None else load_text_embedding(settings.text_embedding, 1)
    job = EditJob(latents, settings.prompt, features, settings.strength, settings.batch_size)
    target = settings.out / shard.stem
    with StagedDirectory(target, force=True) as staged:
        summary = edit_to_directory(
            backend,
            job,
            staged,
            save_latents=True,
            png_compression=settings.png_compression,
            inputs={"backend": settings.backend, "bundle": str(settings.bundle), "latents": str(shard)},
        )
    files = sorted(entry.name for entry in target.iterdir() if entry.is_file())
    record = {
        "shard": shard.stem,
        "source": str(shard),
        "source_sha256": source_sha256,
        "count": len(latents),
        "files": {name: sha256_file(target / name) for name in files},
        "timings_s": {**summary["timings_s"], "total": round(time.perf_counter() - started, 6)},
        "worker": {"host": platform.node(), "pid": os.getpid()},
    }
    write_atomic(_done_record(settings.out, shard.stem), (json.dumps(record, indent=2) + "\n").encode())
    return record


class ShardEditor:
    """A Ray Data actor: one backend, loaded once, editing the shards it is handed."""

    def __init__(self, settings: BatchSettings) -> None:
        from cfdeploy.backends import open_backend

        self.settings = settings
        options = actor_backend_options(
            settings.backend,
            settings.cpus_per_worker,
            settings.gpus_per_worker,
            settings.precision,
            settings.session_cache,
        )
        self.backend = open_backend(settings.backend, settings.bundle, **options)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each shard's name, image count and, for a shard refused as bad input, the one-line reason (else "")."""
        names, counts, errors = [], [], []
        for path in map(Path, map(str, rows["path"])):
            try:
                counts.append(edit_shard(self.backend, self.settings, path)["count"])
                errors.append("")
            except CfdeployError as error:
                counts.append(0)
                errors.append(str(error))
            names.append(path.stem)
        return {"shard": np.array(names), "count": np.array(counts), "error": np.array(errors)}


@dataclass
class BatchPlan:
    """A checked run: its settings (paths made absolute, for workers), every shard, and those still to edit."""

    settings: BatchSettings
    shards: list[Path]
    pending: list[Path]
    redone: dict[str, str] = field(default_factory=dict)  # shards recorded done whose outputs are not: why
    skipped: list[str] = field(default_factory=list)  # matches that are not shards, a line each


def plan_batch(settings: BatchSettings, force: bool = False) -> BatchPlan:
    """Check everything (settings, bundle, shards, output directory) before Ray starts; make ``OUT`` ready."""
    from cfdeploy.bundle import Bundle

    settings.check()
    settings = replace(
        settings,
        bundle=settings.bundle.resolve(),
        out=settings.out.resolve(),
        text_embedding=None if settings.text_embedding is None else settings.text_embedding.resolve(),
    )
    if settings.text_embedding is not None:
        load_text_embedding(settings.text_embedding, 1)
    bundle = Bundle(settings.bundle)
    if (
        settings.prompt is not None
        and not bundle.has_network("clip_text")
        and bundle.precomputed_text_latents(settings.prompt) is None
    ):
        raise CfdeployError(without_clip_message(settings.bundle, bundle.manifest.get("prompts", {})))
    shards, skipped = find_shards(settings.shards, settings.out)
    inputs = [settings.bundle, *shards] + ([settings.text_embedding] if settings.text_embedding else [])
    refuse_inputs(settings.out, inputs)  # even with --force: a run would write over what it reads
    make_parents(settings.out)
    with DirectoryLock(settings.out, timeout=0):
        prepare_output(settings, force)
    reasons = {shard: redo_reason(settings.out, shard) for shard in shards}
    return BatchPlan(
        settings,
        shards,
        [shard for shard, reason in reasons.items() if reason is not None],
        {shard.stem: reason for shard, reason in reasons.items() if reason},
        skipped,
    )


def run_batch(
    plan: BatchPlan,
    *,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    on_shard: Callable[[str, int], None] | None = None,
) -> BatchSummary:
    """Edit the plan's pending shards on Ray; ``on_shard(name, images)`` as each lands.

    Holds ``OUT``'s lock throughout: a second run into the same ``OUT`` is refused at once, naming this one.
    """
    with DirectoryLock(plan.settings.out, timeout=0):
        return _edit_pending(plan, ray_address=ray_address, num_cpus=num_cpus, on_shard=on_shard)


def _edit_pending(
    plan: BatchPlan,
    *,
    ray_address: str | None,
    num_cpus: int | None,
    on_shard: Callable[[str, int], None] | None,
) -> BatchSummary:
    started = time.perf_counter()
    settings, shards, pending = plan.settings, plan.shards, plan.pending
    images = 0
    failures: list[str] = []
    if pending:
        import ray
        import ray.data

        connected = connect(ray_address, num_cpus, driver_logs=False)
        try:
            require_resources(settings.cpus_per_worker, settings.gpus_per_worker, "worker", settings.workers)
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.print_on_execution_start = False
            dataset = ray.data.from_items(
                [{"path": str(shard.resolve())} for shard in pending], override_num_blocks=len(pending)
            )
            with warnings.catch_warnings():
                # Ray 2.60 deprecates remote options given to map_batches, yet names none for bounded restarts (the
                # extra pins Ray below 2.64, which removes them)
                warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", category=DeprecationWarning)
                edited = dataset.map_batches(
                    ShardEditor,
                    fn_constructor_kwargs={"settings": settings},
                    batch_size=1,
                    compute=ray.data.ActorPoolStrategy(size=settings.workers),
                    num_cpus=settings.cpus_per_worker,
                    num_gpus=settings.gpus_per_worker,
                    max_restarts=MAX_RESTARTS,
                    max_task_retries=MAX_RESTARTS,
                )
            for row in edited.iter_rows():
                if row["error"]:
                    failures.append(str(row["error"]))
                images += int(row["count"])
                if on_shard is not None:
                    on_shard(str(row["shard"]), int(row["count"]))
        finally:
            if connected:
                disconnect()
    if failures:
        raise CfdeployError(
            f"{len(failures)} shard(s) refused, the others are done (rerun after fixing them): {failures[0]}"
        )
    return BatchSummary(len(shards), len(shards) - len(pending), len(pending), images, time.perf_counter() - started)
