"""The papers' claims as checks over result files: each gives a verdict from seeded runs, never by hand.

A claim reads per-run rows (one per training seed, as :func:`layerlab.experiments.summarize` writes them in
``NAME-runs.csv``), groups them by run group, and compares 95% confidence intervals of the group means
(Student t, mean +- t * std / sqrt(n)):

* ``reproduced``: the intervals say what the paper says (they do not overlap, in the paper's direction);
* ``not reproduced``: the intervals say the opposite (no overlap, other direction);
* ``inconclusive``: the intervals overlap, or a group has fewer than :data:`MIN_SEEDS` seeds.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from layerlab.experiments import FIGURES, OVERFIT_TAG, metric_value, overfit_name
from layerlab.methods.perturbation import C_MIN, RWP_CMIN_SWEEP, RWP_K2_SWEEP

MIN_SEEDS = 3
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

# two-sided 95% Student t quantiles by degrees of freedom (1..30); larger samples use 1.96
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Estimate:
    """A group's mean, sample standard deviation, seed count and 95% interval of one metric."""

    mean: float
    std: float
    n: int

    @property
    def half_width(self) -> float:
        if self.n < 2:
            return math.inf
        t = _T95[self.n - 2] if self.n - 1 <= len(_T95) else 1.96
        return t * self.std / math.sqrt(self.n)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def __str__(self) -> str:
        spread = f" ± {self.std:.1f}" if self.n > 1 else ""
        return f"{self.mean:.1f}{spread} (n={self.n})"


# a robust metric on the worst case over the evaluation's attacks -> the same on PGD-20 (shown beside it)
PGD_OF = {"last_worst": "last_robust", "best_worst": "best_robust", "last_worst_nrr": "last_nrr",
          "best_worst_nrr": "best_nrr", "best_minus_last_worst": "best_minus_last_robust"}
METRIC_NAMES = {"last_natural": "natural, last", "last_robust": "PGD-20, last", "last_worst": "worst case, last",
                "best_worst": "worst case, best",
                "last_nrr": "NRR (PGD-20), last", "last_worst_nrr": "NRR (worst case), last",
                "best_minus_last_worst": "worst case best - last", "best_minus_last_robust": "PGD-20 best - last",
                "best_robust": "PGD-20, best"}


def estimate(rows: Iterable[dict[str, Any]], group: str, metric: str) -> Estimate | None:
    """The estimate of ``metric`` over the rows of ``group`` (None when it has no such rows)."""
    values = [v for r in rows if r["group"] == group and (v := metric_value(r, metric)) is not None]
    if not values:
        return None
    return Estimate(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def _verdict(holds: bool, fails: bool, estimates: Sequence[Estimate | None]) -> str:
    if any(e is None or e.n < MIN_SEEDS for e in estimates):
        return INCONCLUSIVE
    return REPRODUCED if holds else NOT_REPRODUCED if fails else INCONCLUSIVE


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: ``kind`` is ``greater`` (group a's metric above group b's), ``at_least`` (group a's
    metric >= ``value``) or ``peaks_inside`` (of ``groups`` in sweep order, an inner one has the highest metric)."""

    key: str
    paper: str
    text: str
    kind: str
    metric: str
    groups: tuple[str, ...]
    value: float | None = None
    published: tuple[tuple[str, str, str], ...] = ()  # (reference table, row, column) per group, as printed

    def check(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The claim's verdict on ``rows``, with the estimates it read."""
        est = [estimate(rows, g, self.metric) for g in self.groups]
        if self.kind == "greater":
            a, b = est
            verdict = _verdict(a is not None and b is not None and a.low > b.high,
                               a is not None and b is not None and a.high < b.low, est)
        elif self.kind == "at_least":
            (a,) = est
            verdict = _verdict(a is not None and a.low >= self.value, a is not None and a.high < self.value, est)
        elif self.kind == "peaks_inside":
            known = [e for e in est if e is not None]
            if len(known) < 3 or len(known) < len(est):
                verdict = INCONCLUSIVE
            else:
                top = max(range(len(est)), key=lambda i: est[i].mean)
                inner = 0 < top < len(est) - 1
                separated = all(est[top].low > e.high for i, e in enumerate(est) if i != top)
                verdict = _verdict(inner and separated, not inner and separated, est)
        else:
            raise ValueError(f"unknown claim kind {self.kind!r}")
        ours = "; ".join(f"{short(g)}: {e if e is not None else 'no runs'}" for g, e in zip(self.groups, est))
        pgd = PGD_OF.get(self.metric)
        beside = ("; ".join(f"{short(g)}: {e if e is not None else 'no runs'}"
                            for g in self.groups for e in [estimate(rows, g, pgd)]) if pgd else "")
        return {"claim": self.key, "paper": self.paper, "text": self.text, "published": published_values(self),
                "metric": self.metric, "ours": ours, "pgd20": beside, "verdict": verdict}


def short(group: str) -> str:
    """A run group's name as the claims table prints it: the overfitting regime's suffix shortened to ``-ovf``."""
    return group.replace(f"-{OVERFIT_TAG}", "-ovf")


# the reference tables' columns as the claims table names them
PUBLISHED_COLUMNS = {"nrr_cw": "NRR (C&W)", "robust_delta": "AA last - best"}


def published_values(claim: Claim) -> str:
    """The paper's printed numbers a claim compares (from :mod:`layerlab.gallery.reference`), or "-"."""
    from layerlab.gallery.reference import TABLES  # the gallery's reference tables (pandas)

    values = []
    for table, row, column in claim.published:
        values.append(f"{row} {PUBLISHED_COLUMNS.get(column, column)} {TABLES[table].rows[row][column]:.2f}")
    return f"{', '.join(values)} ({TABLES[claim.published[0][0]].source.split(',')[0]})" if values else "-"


_TABLE1_NRR = (("tradeoff", "CURE", "nrr_cw"), ("tradeoff", "TRADES", "nrr_cw"))
_AT, _AWP, _RWP, _CURE = (overfit_name(g) for g in ("AT", "AWP", "RWP", "CURE-code"))


def _table3_delta(*groups: str) -> tuple[tuple[str, str, str], ...]:
    return tuple(("overfitting", g, "robust_delta") for g in groups)


def _rwp_sweep(prefix: str, values: Sequence[float], default: float) -> tuple[str, ...]:
    """The overfitting-regime run groups of one RWP sweep, in sweep order (the default value is ``RWP`` itself)."""
    return tuple(overfit_name("RWP" if v == default else f"RWP-{prefix}{v:g}") for v in values)
CLAIMS: tuple[Claim, ...] = (
    Claim("cure-nrr-over-trades", "CURE", "CURE (paper text) has a better natural-robust trade-off (NRR) than "
          "TRADES (Table 1)", "greater", "last_worst_nrr", ("CURE", "TRADES"), published=_TABLE1_NRR),
    Claim("cure-code-nrr-over-trades", "CURE", "CURE as the released code runs it has a higher NRR than TRADES "
          "(Table 1)", "greater", "last_worst_nrr", ("CURE-code", "TRADES"), published=_TABLE1_NRR),
    Claim("cure-beats-trades-from-st", "CURE", "CURE (paper text) has a higher NRR than TRADES (beta 6) started "
          "from the same ST model (Table 5)", "greater", "last_worst_nrr", ("CURE", "TRADES-b6-fromST")),
    Claim("cure-code-beats-trades-from-st", "CURE", "CURE as the released code runs it has a higher NRR than "
          "TRADES (beta 5, its KL weight) from the same ST model", "greater", "last_worst_nrr",
          ("CURE-code", "TRADES-b5-fromST")),
    Claim("u23-natural-over-sat", "CURE", "U-23 is more accurate than SAT on natural images (Fig. 2b)",
          "greater", "last_natural", ("U-23", "AT")),
    Claim("u23-robust-over-sat", "CURE", "U-23 is more robust than SAT (Fig. 2b)", "greater", "last_worst",
          ("U-23", "AT")),
    Claim("u23-code-natural-over-sat", "CURE", "U-23, frozen as the released code freezes, is more accurate than "
          "SAT on natural images", "greater", "last_natural", ("U-23-code", "AT")),
    Claim("u23-code-robust-over-sat", "CURE", "U-23, frozen as the released code freezes, is more robust than SAT",
          "greater", "last_worst", ("U-23-code", "AT")),
    Claim("awp-gamma-peaks-inside", "RWP", "AWP's best robust accuracy peaks at an intermediate perturbation size "
          "(0 to 8 x 5e-3): a larger weight perturbation undermines robustness (Fig. 1a)", "peaks_inside",
          "best_worst", ("AT", "AWP-g0.0025", "AWP-g0.005", "AWP", "AWP-g0.02", "AWP-g0.04")),
    Claim("awp-small-loss-range-closes-the-gap", "RWP", "AWP generated from the small-loss examples alone "
          "([0, 0.5)) leaves a smaller best - last robust gap than AWP from the large-loss ones ([1.5, inf)) "
          "(Fig. 1c)", "greater", "best_minus_last_worst", (overfit_name("AWP-loss1.5-inf"), overfit_name("AWP-loss0-0.5"))),
    # CURE Table 7 around CURE as the released code runs it (experiment cure-ablation)
    *(Claim(f"{part}-raises-{short_metric}", "CURE", f"{label} raises CURE's {what} (Table 7)", "greater", metric,
            ("CURE-code", f"CURE-code{suffix}"),
            published=(("cure_ablation", "RGP + revision (CURE)", column), ("cure_ablation", row, column)))
      for part, label, suffix, row in (("rgp", "RGP", "-p0", "revision only"),
                                       ("revision", "The revision model", "-gamma0", "RGP only"))
      for short_metric, what, metric, column in (("natural", "natural accuracy", "last_natural", "natural"),
                                                 ("robustness", "robustness", "last_worst", "pgd20"))),
    # the overfitting regime (layerlab.experiments.OVERFIT): best - last is robust overfitting
    Claim("at-robust-overfits", "CURE", "AT robust-overfits: its best checkpoint is more robust than its last "
          "(CURE Table 3, RWP Fig. 1b)", "at_least", "best_minus_last_worst", (_AT,), value=0.0,
          published=_table3_delta("AT")),
    Claim("awp-closes-at-gap", "CURE", "AWP's best - last robust gap is smaller than AT's (CURE Table 3)", "greater",
          "best_minus_last_worst", (_AT, _AWP), published=_table3_delta("AT", "AWP")),
    Claim("cure-code-closes-at-gap", "CURE", "CURE (as the released code runs it) has a smaller best - last robust "
          "gap than AT (CURE Fig. 5c, Table 3)", "greater", "best_minus_last_worst", (_AT, _CURE),
          published=_table3_delta("AT", "CURE")),
    Claim("rwp-closes-at-gap", "RWP", "RWP's best - last robust gap is smaller than AT's (RWP Fig. 3c, Table 1)",
          "greater", "best_minus_last_worst", (_AT, _RWP)),
    Claim("rwp-over-awp-last", "RWP", "RWP is more robust than AWP at the last checkpoint (RWP Table 1)", "greater",
          "last_worst", (_RWP, _AWP)),
    Claim("rwp-over-at-best", "RWP", "RWP's best checkpoint is more robust than AT's (RWP Table 1)", "greater",
          "best_worst", (_RWP, _AT)),
    Claim("rwp-cmin-peaks-inside", "RWP", "RWP's best robust accuracy peaks inside the c_min sweep "
          f"({', '.join(f'{c:g}' for c in RWP_CMIN_SWEEP)}) (Fig. 3a)", "peaks_inside", "best_worst",
          _rwp_sweep("cmin", RWP_CMIN_SWEEP, C_MIN)),
    Claim("rwp-k2-peaks-inside", "RWP", "RWP's best robust accuracy peaks inside the K2 sweep "
          f"({', '.join(map(str, RWP_K2_SWEEP))}) (Fig. 3b)", "peaks_inside", "best_worst",
          _rwp_sweep("k", RWP_K2_SWEEP, 10)),
)


def read_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Per-run rows from ``NAME-runs.csv`` files (missing files are skipped; a run that several experiments
    share, such as AT, counts once)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        if Path(path).exists():
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh):
                    rows.setdefault(row.get("run") or f"{path}:{len(rows)}", row)
    return list(rows.values())


def claims_table(rows: Sequence[dict[str, Any]], claims: Sequence[Claim] = CLAIMS) -> str:
    """A Markdown table: claim | paper's numbers | ours (mean ± std, n seeds), PGD-20 beside | verdict."""
    lines = ["| claim | paper's numbers | ours: mean ± std (n seeds) | PGD-20 (upper bound) | verdict |",
             "|---|---|---|---|---|"]
    for claim in claims:
        r = claim.check(rows)
        metric = METRIC_NAMES.get(r["metric"], r["metric"])
        lines.append(f"| {r['text']} | {r['published']} | {metric}: {r['ours']} | {r['pgd20'] or '-'} | "
                     f"**{r['verdict']}** |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- claims: begin -->", "<!-- claims: end -->"


# the experiments' figures (layerlab.experiments.FIGURES), one folder per experiment, under the README's folder
FIGURES_DIR = "experiments"


def experiment_figures(figures: str | Path) -> dict[str, list[str]]:
    """The experiment figures in ``FIGURES/experiments/NAME/*.png`` (NAME: an experiment that draws figures), as
    paths relative to ``figures``, by experiment name, in name order."""
    found: dict[str, list[str]] = {}
    for png in sorted(Path(figures, FIGURES_DIR).glob("*/*.png")):
        if png.parent.name in FIGURES:
            found.setdefault(png.parent.name, []).append(png.relative_to(figures).as_posix())
    return found


def figure_lines(results: str | Path, figures: dict[str, list[str]]) -> list[str]:
    """One line per experiment of ``figures`` (see :func:`experiment_figures`): links to its figures and the
    command that draws them from the results store ``results``."""
    return [f"- `{name}`: " + ", ".join(f"[{Path(p).name}]({p})" for p in paths)
            + f" (`python -m layerlab.experiments figures {name} --store {results} --out figures/{FIGURES_DIR}`)"
            for name, paths in figures.items()]


def readme_section(results: str | Path, rows: Sequence[dict[str, Any]],
                   figures: dict[str, list[str]] | None = None) -> str:
    """The claims section of ``figures/README.md`` (between :data:`BEGIN` and :data:`END`), with links to the
    experiments' ``figures`` (see :func:`experiment_figures`) after the table."""
    listed = (["Figures of the experiments, drawn from the results in "
               f"`{results}` alone (the group means ± std over seeds that the claims read):", "",
               *figure_lines(results, figures), ""] if figures else [])
    return "\n".join([
        BEGIN, "## The papers' claims at this scale", "",
        f"Computed by `python -m layerlab.claims {results} --readme figures/README.md` from the per-run results in "
        f"`{results}/*-runs.csv` (written by `python -m layerlab.experiments summarize`). A verdict compares 95% "
        f"Student-t intervals of the group means over training seeds: **reproduced** when they separate in the "
        f"paper's direction, **not reproduced** when they separate the other way, **inconclusive** when they "
        f"overlap or a group has fewer than {MIN_SEEDS} seeds. Robust accuracy is the point-wise worst case over "
        f"PGD-20, CW-100 and AutoAttack's APGD-CE + APGD-T on the first 1,000 test images at the last checkpoint; "
        f"PGD-20 alone is shown beside it. Claims on best - last read the overfitting regime's runs "
        f"(`layerlab.experiments.OVERFIT`; `-ovf` stands for their groups' suffix `-{OVERFIT_TAG}`) at the "
        f"best-on-validation and the last checkpoint. Nothing in this table is typed by hand.", "",
        claims_table(rows), *listed, END])


def update_readme(path: str | Path, section: str) -> None:
    """Replace the claims section of the README at ``path``, or put it after the README's first paragraph."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        parts = text.split("\n\n", 2)
        text = "\n\n".join(parts[:2] + [section] + parts[2:]) if len(parts) > 2 else text + "\n" + section + "\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m layerlab.claims DIR``: the claims table from ``DIR/*-runs.csv`` (to standard output, or into
    a README's claims section with ``--readme``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m layerlab.claims", description=main.__doc__)
    parser.add_argument("results", help="directory of NAME-runs.csv files (e.g. results/experiments)")
    parser.add_argument("--readme", default=None, help="write the table into this README's claims section, "
                        f"with links to the experiment figures in {FIGURES_DIR}/ beside it")
    args = parser.parse_args(argv)
    rows = read_rows(sorted(Path(args.results).glob("*-runs.csv")))
    if args.readme:
        figures = experiment_figures(Path(args.readme).parent)
        update_readme(args.readme, readme_section(Path(args.results).as_posix(), rows, figures))
        print(f"wrote the claims section of {args.readme}")
    else:
        print(claims_table(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
