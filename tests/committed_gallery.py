"""What the tests know of the committed gallery (``figures/``, drawn from ``results/``): its groups, and the groups
whose committed figures read records that were replaced since. One home for both: ``test_store`` expects exactly
these groups to fail ``verify``, ``test_notebooks`` expects exactly their notebooks to be committed without
outputs."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted(p.parent.name for p in (REPO / "figures").glob("*/manifest.json"))
# Drawn from the ST record that results/runs-cpu replaced (ST retrained; the old ST's CKA and corruption results
# and the minimum-perturbation arrays are in no records): their manifests keep the hashes of what they read, and
# verify fails until the groups are made again with ST's analyses. The trade-off, attack-strength and CURE-ablation
# groups read the CURE record that the cure-decision experiment replaced (CURE retrained from the retrained ST; its
# best-checkpoint attack suite not yet run, and the ablation runs still from the old ST). Strict: a fixed group must
# leave this list.
STALE = {"02_cka", "07_corruptions", "08_minpert_attributions", "04_tradeoff", "05_attack_strength",
         "11_cure_ablation"}
# Drawn by an earlier definition of their group and still matching their records: the gallery's CURE is now
# CURE-code (the released code's configuration) and, at the cpu profile, the robust-overfitting groups read the
# overfitting regime's runs, which are still training. Strict: a group re-made by the current definition must
# leave this list (test_store checks both ways).
PENDING = {"03_overfitting", "09_lsc", "10_rwp_ablations", "12_explorer"}
