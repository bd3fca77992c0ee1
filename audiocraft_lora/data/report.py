"""The result of validating a dataset: issues (errors stop training, warnings are summarised) and a summary table."""
from dataclasses import asdict, dataclass, field
import typing as tp

from ..errors import DataError
from .summary import duration_stats, format_duration


@dataclass(frozen=True)
class DataIssue:
    """One problem with one manifest entry (or one manifest line).

    Attributes:
        split (str): Split name ('train', 'valid', ...).
        path (str): The audio file (or the manifest, for a problem with the manifest itself).
        line (int, optional): 1-based line of the manifest entry.
        code (str): Stable machine-readable kind, e.g. 'missing_file' (see `validate.py`).
        message (str): What is wrong and how to fix it.
        manifest (str, optional): The manifest file holding the entry.
    """
    split: str
    path: str
    line: tp.Optional[int]
    code: str
    message: str
    manifest: tp.Optional[str] = None

    def __str__(self) -> str:
        where = f" ({self.manifest} line {self.line})" if self.line is not None and self.manifest else ''
        return f"[{self.split}] {self.path}{where}: {self.code}: {self.message}"


@dataclass
class SplitSummary:
    """Per-split counts for the summary table; `durations` are the checked (actual) clip lengths in seconds."""
    split: str
    manifest: tp.Optional[str] = None
    entries: int = 0
    durations: tp.List[float] = field(default_factory=list)


@dataclass
class ValidationReport:
    """Everything `validate_datasource` found.

    Attributes:
        errors (list of DataIssue): Problems that would break or silently spoil training.
        warnings (list of DataIssue): Things the dataset handles (resampling, padding, ...) worth knowing.
        splits (dict): Split name -> SplitSummary.
        settings (dict): The expectations checked against (sample_rate, channels, segment_duration, decoded).
    """
    errors: tp.List[DataIssue] = field(default_factory=list)
    warnings: tp.List[DataIssue] = field(default_factory=list)
    splits: tp.Dict[str, SplitSummary] = field(default_factory=dict)
    settings: tp.Dict[str, tp.Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def codes(self, severity: str = 'errors') -> tp.List[str]:
        """Issue codes of `errors` or `warnings`, in order."""
        return [issue.code for issue in getattr(self, severity)]

    def raise_if_errors(self) -> None:
        """Raise a DataError listing every failing entry with its problem and fix.

        Raises:
            DataError: There is at least one error.
        """
        if not self.errors:
            return
        listing = '\n'.join(f"  - {issue}" for issue in self.errors)
        raise DataError(f"{len(self.errors)} data error(s) must be fixed before training:\n{listing}\n"
                        f"(`audiocraft-lora validate` prints this report with the warnings.)")

    def summary_table(self, max_examples: int = 3) -> str:
        """A per-split table, then errors and warnings grouped by code (`raise_if_errors` lists every error)."""
        decoded = 'audio decoded' if self.settings.get('decoded', True) else 'headers only (--fast)'
        lines = [f"Dataset check: sample_rate={self.settings.get('sample_rate')} Hz, "
                 f"channels={self.settings.get('channels')}, "
                 f"segment_duration={self.settings.get('segment_duration')} s ({decoded})"]
        header = f"{'split':<9} {'clips':>6} {'total':>13} {'min':>7} {'median':>7} {'max':>7} {'errors':>7} " \
                 f"{'warnings':>8}  manifest"
        lines += [header, '-' * len(header)]
        for name, split in self.splits.items():
            stats = duration_stats(split.durations)
            num_errors = sum(1 for issue in self.errors if issue.split == name)
            num_warnings = sum(1 for issue in self.warnings if issue.split == name)
            lines.append(f"{name:<9} {split.entries:>6} {format_duration(stats.total):>13} {stats.minimum:>6.1f}s "
                         f"{stats.median:>6.1f}s {stats.maximum:>6.1f}s {num_errors:>7} {num_warnings:>8}  "
                         f"{split.manifest or '-'}")
        if self.errors:
            lines.append(f"Errors ({len(self.errors)}), by kind: training will not start until they are fixed")
            lines += self.grouped(self.errors, max_examples)
        else:
            lines.append("Errors: none")
        if self.warnings:
            lines.append(f"Warnings ({len(self.warnings)}), by kind:")
            lines += self.grouped(self.warnings, max_examples)
        return '\n'.join(lines)

    @staticmethod
    def grouped(issues: tp.List[DataIssue], max_examples: int = 3) -> tp.List[str]:
        """One line per code with its first full message, then a few other paths."""
        by_code: tp.Dict[str, tp.List[DataIssue]] = {}
        for issue in issues:
            by_code.setdefault(issue.code, []).append(issue)
        lines = []
        for code, group in by_code.items():
            first = group[0]
            lines.append(f"  {code} x{len(group)}: e.g. [{first.split}] {first.path}: {first.message}")
            others = sorted({issue.path for issue in group[1:]} - {first.path})
            if others:
                more = f" (+{len(others) - max_examples} more)" if len(others) > max_examples else ''
                lines.append(f"      also: {', '.join(others[:max_examples])}{more}")
        return lines

    def to_dict(self) -> tp.Dict[str, tp.Any]:
        """JSON-friendly form."""
        return {'errors': [asdict(issue) for issue in self.errors],
                'warnings': [asdict(issue) for issue in self.warnings],
                'splits': {name: asdict(split) for name, split in self.splits.items()},
                'settings': dict(self.settings)}
