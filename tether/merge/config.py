"""The typed settings of ``tether merge`` (the CLI and ``merge_folders`` validate through the same class)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tether.configs import coerce_fields, opt
from tether.merge.ram import DEFAULT_RESCALE, DEFAULT_THRESHOLD, MergeMethod, OverlapRatio


@dataclass
class MergeConfig:
    COMMAND = "merge"

    base: str = opt("", "the base model folder every fine-tuned model started from")
    models: list[str] = field(default_factory=list, metadata={
        "help": "fine-tuned model folders (tether export output, HF folders) or tether run directories"})
    out: str = opt("", "output folder for the merged model (must not exist or be empty)")
    method: MergeMethod = opt(MergeMethod.RAM_PLUS, "ram-plus (RAM+, the authors' default), ram, or average (task "
                              "arithmetic, the baseline)")
    threshold: float = opt(DEFAULT_THRESHOLD, "a coordinate counts as changed by a model when |finetuned - base| > "
                           "this (ram and ram-plus drop smaller changes; every method reports its shared/unique counts)")
    rescale: float | None = opt(None, f"RAM+ rescale factor r >= 1 of unique coordinates (none: {DEFAULT_RESCALE}); "
                                "ram-plus only")
    overlap_ratio: OverlapRatio | None = opt(None, "RAM+ overlap ratio: unique (shared/unique, the authors' default) "
                                             "or changed (shared/changed); none: unique; ram-plus only")
    progress: bool = opt(True, "print progress lines")

    def __post_init__(self) -> None:
        coerce_fields(self)
        if not self.base:
            raise ValueError("config field 'base': give the base model folder (--base DIR)")
        if not self.models:
            raise ValueError("config field 'models': give at least one fine-tuned model folder (--models DIR ...)")
        if not self.out:
            raise ValueError("config field 'out': give an output folder (--out DIR)")
        if self.threshold < 0:
            raise ValueError(f"config field 'threshold' must be >= 0, got {self.threshold}")
        if self.method is not MergeMethod.RAM_PLUS:
            for name in ("rescale", "overlap_ratio"):
                if getattr(self, name) is not None:
                    raise ValueError(f"config field '{name}' is a setting of --method ram-plus; with --method "
                                     f"{self.method.value} it would be ignored")
        if self.rescale is not None and self.rescale < 1.0:
            raise ValueError(f"config field 'rescale' must be >= 1 (r = 1 is plain RAM), got {self.rescale}")
        paths = [Path(p).resolve() for p in (self.base, *self.models)]
        for i, p in enumerate(paths):
            if p in paths[:i]:
                what = "the base" if paths.index(p) == 0 else "another model"
                raise ValueError(f"config field 'models': {self.models[i - 1]!r} is given twice (also as {what})")
        if Path(self.out).resolve() in paths:
            raise ValueError(f"config field 'out': {self.out!r} is one of the input folders")

    @property
    def rescale_r(self) -> float:
        """``r`` in effect (``ram-plus``)."""
        return DEFAULT_RESCALE if self.rescale is None else self.rescale

    @property
    def ratio(self) -> OverlapRatio:
        """The RAM+ overlap ratio in effect."""
        return OverlapRatio.UNIQUE if self.overlap_ratio is None else self.overlap_ratio
