"""The run directory: resolved config, a manifest of completed steps, atomic step commits.

A step writes its artefacts (under temporary names, renamed when complete), then `commit`
enters it in `manifest.json` with each artefact's content hash. Only committed steps count
as done, so a run killed at any point and re-run with the same command continues after the
last committed step and never mistakes a half-written artefact for a finished one.
The run directory may be any pyarrow filesystem URI (local path, s3://, gs://).
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

from wsis_ray.config import Config, ConfigError, dump_yaml, parse_config
from wsis_ray.data.records import resolve_fs

MANIFEST = "manifest.json"
CONFIG = "config.yaml"


class RunDirError(RuntimeError):
    pass


class RunDir:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = resolve_fs(self.uri)
        self.fs.create_dir(self.root, recursive=True)
        self._train_runs: list[tuple[str, str]] = []  # (storage, name) to drop at commit

    # -- paths -------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        """Filesystem path (for self.fs) of `rel` inside the run."""
        return f"{self.root}/{rel}"

    def uri_of(self, rel: str) -> str:
        """URI of `rel` (a plain path for local runs), for libraries that take URIs."""
        if "://" in self.uri:
            return f"{self.uri}/{rel}"
        return self.path(rel)

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        """Atomic: written under a temporary name, then renamed."""
        self.write_bytes(rel, text.encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)

    # -- config ------------------------------------------------------------------------
    def check_config(self, cfg: Config, force: bool = False) -> None:
        """Record the resolved config; refuse a run directory made with another config."""
        text = dump_yaml(cfg)
        if self.exists(CONFIG):
            old = self.read_text(CONFIG)
            try:  # a field added to the code since this run started counts as its default
                old = dump_yaml(parse_config(old))
            except ConfigError:  # a field since removed: a different config
                pass
            if old != text and not force:
                raise RunDirError(
                    f"run directory {self.uri} was made with a different config "
                    f"(see {self.uri}/{CONFIG}). Use another --run-dir, or pass --force to "
                    f"continue it with the new config (completed steps are kept).")
        self.write_text(CONFIG, text)

    # -- manifest ----------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if not self.exists(MANIFEST):
            return {"steps": {}}
        return json.loads(self.read_text(MANIFEST))

    def is_done(self, step: str, inputs: list[str] | None = None) -> bool:
        """Committed, its artefacts unchanged, and (given `inputs`) computed from the steps
        `inputs` as they are committed now."""
        steps = self.manifest()["steps"]
        entry = steps.get(step)
        if entry is None:
            return False
        # (an entry without "inputs" predates their recording: its artefacts decide)
        if inputs is not None and "inputs" in entry \
                and entry["inputs"] != _inputs_digest(steps, inputs):
            return False
        # An artefact that vanished or changed after commit means the step is not done.
        return all(self.exists(a) and self._hash(a) == h for a, h in entry["artefacts"].items())

    def metrics(self, step: str) -> dict[str, Any]:
        return self.manifest()["steps"][step].get("metrics", {})

    def commit(self, step: str, artefacts: list[str], metrics: dict[str, Any] | None = None,
               seconds: float | None = None, inputs: list[str] | None = None) -> None:
        missing = [a for a in artefacts if not self.exists(a)]
        if missing:
            raise RunDirError(f"step {step}: artefacts missing at commit: {missing}")
        m = self.manifest()
        m["steps"][step] = {
            "artefacts": {a: self._hash(a) for a in artefacts},
            "metrics": metrics or {},
            "seconds": seconds,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if inputs is not None:
            m["steps"][step]["inputs"] = _inputs_digest(m["steps"], inputs)
        self.write_text(MANIFEST, json.dumps(m, indent=1))  # no sort_keys: keeps commit order
        self._drop_train_runs()

    def _drop_train_runs(self) -> None:
        """Delete the Ray Train runs of the step just committed: its artefacts now hold the
        trained model and any rerun trains under a new name (see `train_name`), so their
        checkpoints (model plus optimizer state, 100-200 MB each) are dead weight."""
        for storage, name in self._train_runs:
            fs, root = resolve_fs(storage.rstrip("/"))
            try:
                if fs.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound:
                    fs.delete_dir(f"{root}/{name}")
            except OSError as e:  # disk space only; the run itself is complete
                print(f"warning: could not delete Ray Train run {storage}/{name}: {e}", flush=True)
        self._train_runs = []

    def train_name(self, base: str, storage: str | None = None) -> str:
        """Ray Train run name for a training step: `base` plus a digest of the config and of
        every committed artefact. A step killed mid-training and rerun on the same inputs
        resumes its Ray Train checkpoint; after --force with another config, or once an
        upstream artefact was recomputed, it trains afresh instead of resuming a checkpoint
        trained on other inputs. Given the Ray Train `storage`, that run's checkpoints are
        deleted at the next commit."""
        h = hashlib.sha256(self.read_text(CONFIG).encode() if self.exists(CONFIG) else b"")
        steps = self.manifest()["steps"]
        h.update(json.dumps({k: v["artefacts"] for k, v in sorted(steps.items())}).encode())
        name = f"{base}-{h.hexdigest()[:10]}"
        if storage is not None:
            self._train_runs.append((storage, name))
        return name

    def _hash(self, rel: str) -> str:
        """sha256 of a file, or of a directory's files (names and contents, sorted)."""
        h = hashlib.sha256()
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            sel = pafs.FileSelector(self.path(rel), recursive=True)
            files = sorted(i.path for i in self.fs.get_file_info(sel)
                           if i.type == pafs.FileType.File)
            for p in files:
                h.update(p[len(self.root):].encode())
                self._update(h, p)
        else:
            self._update(h, self.path(rel))
        return h.hexdigest()

    def _update(self, h, path: str) -> None:
        with self.fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)


def _inputs_digest(steps: dict[str, Any], inputs: list[str]) -> str:
    """Digest of the committed artefacts of the steps `inputs` in a manifest's `steps`
    (absent ones count too)."""
    state = {n: steps[n]["artefacts"] if n in steps else None for n in inputs}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
