"""``merge_folders(cfg)``: the whole ``tether merge`` job (open and check the folders, merge, write, summarise)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from tether.merge.config import MergeConfig
from tether.merge.folders import (
    FloatView,
    ModelFolder,
    check_compatible,
    check_integer_tensors_equal,
    is_run_dir,
    prepare_out,
    write_merged,
)
from tether.merge.ram import MergeMethod, merge_state_dicts
from tether.train.progress import QUIET, Reporter


def _open(path: str, label: str, tmp: Path, progress: Reporter) -> ModelFolder:
    """A model folder; a tether run directory is exported (its latest checkpoint) into ``tmp`` first."""
    p = Path(path)
    if p.is_dir() and is_run_dir(p):
        from tether.train.checkpoint import CheckpointError
        from tether.train.export import export_run

        progress.note(f"{label} {p}: a tether run directory, exporting its latest checkpoint")
        try:
            p = export_run(p, tmp / label.replace(" ", "_"))
        except CheckpointError as e:
            raise ValueError(f"{label} {path}: {e}") from None
    return ModelFolder(p, label)


def merge_folders(cfg: MergeConfig, progress: Reporter | None = None) -> dict[str, Any]:
    """Merge ``cfg.models`` onto ``cfg.base`` and write ``cfg.out``; returns the summary (also in
    ``OUT/tether_merge.json``). Every folder is opened and checked before any weight is read."""
    progress = progress or (Reporter() if cfg.progress else QUIET)
    t0 = time.perf_counter()
    prepare_out(cfg.out)
    labels = [f"model {j + 1}" for j in range(len(cfg.models))]
    with tempfile.TemporaryDirectory(prefix="tether-merge-") as tmp:
        base = _open(cfg.base, "base", Path(tmp), progress)
        models = [_open(p, label, Path(tmp), progress) for p, label in zip(cfg.models, labels)]
        check_compatible(base, models)
        kept = check_integer_tensors_equal(base, models)
        names = [f"{label} ({m.path})" for label, m in zip(labels, models)]
        n_params = len(FloatView(base))
        passes = {"count": "counting changed coordinates", "merge": f"merging ({cfg.method.value})"}
        bars: dict[str, Any] = {}

        def on_param(phase: str, name: str) -> None:
            if phase not in bars:
                for bar in bars.values():
                    bar.__exit__(None, None, None)
                bars[phase] = progress.phase(passes[phase], n_params).__enter__()
            bars[phase].advance()

        try:
            merged, stats, lambdas = merge_state_dicts(
                FloatView(base), [FloatView(m) for m in models], cfg.method, threshold=cfg.threshold,
                rescale=cfg.rescale_r, ratio=cfg.ratio, labels=names, on_param=on_param)
        finally:
            for bar in bars.values():
                bar.__exit__(None, None, None)
        summary = {
            "method": cfg.method.value, "threshold": cfg.threshold,
            "rescale": cfg.rescale_r if cfg.method is MergeMethod.RAM_PLUS else None,
            "overlap_ratio": cfg.ratio.value if cfg.method is MergeMethod.RAM_PLUS else None,
            "base": str(Path(cfg.base).resolve()), "out": str(Path(cfg.out).resolve()),
            "parameters": n_params, "coordinates": stats[0].total,
            "models": [{"path": str(Path(p).resolve()), "changed": s.changed, "shared": s.shared, "unique": s.unique,
                        "changed_fraction": s.changed_fraction, "shared_fraction": s.shared_fraction,
                        "unique_fraction": s.unique_fraction, "rescale_lambda": lam}
                       for p, s, lam in zip(cfg.models, stats, lambdas)],
        }
        write_merged(base, {**merged, **kept}, cfg.out, summary)
    summary["time_s"] = time.perf_counter() - t0
    return summary
